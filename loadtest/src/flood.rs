//! `fresh-flood`: what a flood of polls and subscribes over fresh channel names (each one a new
//! Redis subscription and position read) does to live delivery on other channels (#12.5). The
//! tool starts redis-server and one gateway node; a WebSocket subscriber listens on a hot
//! channel published at a fixed rate over HTTP, first without a flood, then while anonymous
//! loops send `GET /poll` over fresh names (some within `limits.fresh_channels_per_request`,
//! some beyond it) and WebSocket subscribes over fresh names, each loop from its own loopback
//! address unless `--one-source`. Reports the hot channel's publish→deliver p50/p99/max in both
//! phases, its losses, the flood's request counts and its 429s / refusals.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::publisher::now_micros;
use crate::stats;
use testkit::{Backend, GatewayProcess, RedisOpts, RedisServer};

/// The target of #12.5: the hot channel's p99 during the flood.
const TARGET_P99_MS: f64 = 10.0;
const HOT: &str = "flood-hot";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Publications per second on the hot channel.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing before the flood starts.
    #[arg(long, default_value_t = 5.0)]
    pub quiet: f64,
    /// Seconds of flood (publishing goes on).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Loops sending `GET /poll` over fresh names, one request at a time each.
    #[arg(long, default_value_t = 16)]
    pub pollers: usize,
    /// Fresh names per poll, by loop (loop k takes the k-th, cyclically): 64 is within the
    /// default `fresh_channels_per_request` (128), 256 beyond it.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub names: Vec<usize>,
    /// Loops subscribing fresh names over WebSocket.
    #[arg(long, default_value_t = 4)]
    pub ws_flooders: usize,
    /// Subscribes a WebSocket flooder sends at once before it reconnects.
    #[arg(long, default_value_t = 64)]
    pub ws_batch: usize,
    /// Every loop from 127.0.0.1 (the per-IP rate then refuses most of the flood) instead of
    /// one loopback address per loop.
    #[arg(long)]
    pub one_source: bool,
    /// Run the node with both fresh-channel limits off: the link's own behaviour.
    #[arg(long)]
    pub limits_off: bool,
}

/// What the flood loops did, over all of them.
#[derive(Default)]
struct FloodCounts {
    polls_ok: AtomicU64,
    polls_429: AtomicU64,
    polls_other: AtomicU64,
    fresh_polled: AtomicU64,
    ws_subscribed: AtomicU64,
    ws_refused: AtomicU64,
    ws_other: AtomicU64,
    transport_errors: AtomicU64,
}

impl FloodCounts {
    fn to_json(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "polls_ok": get(&self.polls_ok),
            "polls_429": get(&self.polls_429),
            "polls_other_status": get(&self.polls_other),
            "fresh_channels_polled": get(&self.fresh_polled),
            "ws_subscribes_ok": get(&self.ws_subscribed),
            "ws_subscribes_refused_fresh": get(&self.ws_refused),
            "ws_subscribes_other_error": get(&self.ws_other),
            "transport_errors": get(&self.transport_errors),
        })
    }
}

/// The hot subscriber's record: latency by phase, and which publications arrived.
struct HotLog {
    quiet: hdrhistogram::Histogram<u64>,
    flood: hdrhistogram::Histogram<u64>,
    received: u64,
    /// The `i` of the last publication received, to count gaps.
    last_i: Option<u64>,
    out_of_order: u64,
}

pub async fn run(bin: &Path, a: &Args) -> Result<Vec<Value>, String> {
    if a.names.is_empty() || a.names.contains(&0) || a.rate <= 0.0 {
        return Err("fresh-flood needs --names of at least 1 and a positive --rate".into());
    }
    let redis = RedisServer::try_start(RedisOpts::default()).await?;
    let mut env: Vec<(&str, &str)> = Vec::new();
    if a.limits_off {
        env.push(("GATEWAY__LIMITS__FRESH_CHANNELS_PER_REQUEST", "0"));
        env.push(("GATEWAY__LIMITS__FRESH_CHANNELS_PER_SECOND", "0"));
    }
    let node =
        GatewayProcess::try_start(bin, "node", &Backend::standalone(&redis).args, &env).await?;
    let addr = node.addr;
    let origin = format!("http://{addr}");

    let flood_started = Arc::new(AtomicU64::new(u64::MAX));
    let log = Arc::new(Mutex::new(HotLog {
        quiet: stats::new_histogram(),
        flood: stats::new_histogram(),
        received: 0,
        last_i: None,
        out_of_order: 0,
    }));
    let stop_hot = Arc::new(AtomicBool::new(false));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let hot = tokio::spawn(hot_subscriber(
        addr,
        log.clone(),
        flood_started.clone(),
        stop_hot.clone(),
        subscribed_tx,
    ));
    subscribed_rx
        .await
        .map_err(|_| "the hot subscriber could not subscribe".to_string())?;

    let published = Arc::new(AtomicU64::new(0));
    let round_trips = Arc::new(Mutex::new([stats::new_histogram(), stats::new_histogram()]));
    let publisher = tokio::spawn(publish_hot(
        origin.clone(),
        a.rate,
        crate::secs(a.quiet + a.duration),
        published.clone(),
        flood_started.clone(),
        round_trips.clone(),
    ));
    tokio::time::sleep(crate::secs(a.quiet)).await;

    // The flood.
    let fanout_before = metrics_text(&origin).await;
    // Whose CPU the flood takes: the node's, and this tool's own (the machine is shared).
    let cpu_before = (
        crate::net::cpu_seconds(node.pid()).unwrap_or(0.0),
        crate::net::cpu_seconds(std::process::id()).unwrap_or(0.0),
        Instant::now(),
    );
    flood_started.store(now_micros(), Ordering::Relaxed);
    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    let source = |k: usize| -> IpAddr {
        if a.one_source {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                1 + (k / 250) as u8,
                1 + (k % 250) as u8,
            ))
        }
    };
    let run_id = format!("{:x}", now_micros());
    for k in 0..a.pollers {
        let names = a.names[k % a.names.len()];
        loops.push(tokio::spawn(poll_loop(
            origin.clone(),
            source(k),
            format!("{run_id}-p{k}"),
            names,
            counts.clone(),
            stop.clone(),
        )));
    }
    for k in 0..a.ws_flooders {
        loops.push(tokio::spawn(ws_loop(
            addr,
            source(a.pollers + k),
            format!("{run_id}-w{k}"),
            a.ws_batch.max(1),
            counts.clone(),
            stop.clone(),
        )));
    }
    let publish_errors = publisher
        .await
        .map_err(|e| format!("publisher failed: {e}"))?;
    let fanout_after = metrics_text(&origin).await;
    let flood_wall = cpu_before.2.elapsed().as_secs_f64();
    let node_cpu = crate::net::cpu_seconds(node.pid()).unwrap_or(0.0) - cpu_before.0;
    let tool_cpu = crate::net::cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before.1;
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.await;
    }
    // Every acknowledged publication reaches the hot subscriber (or the run reports it lost).
    let acked = published.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.lock().unwrap().received < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_hot.store(true, Ordering::Relaxed);
    let _ = hot.await;
    let redis_keys: u64 = redis.cli(&["dbsize"]).await.trim().parse().unwrap_or(0);
    let metrics = limit_rejections(&metrics_text(&origin).await);
    drop(node);

    let log = log.lock().unwrap();
    let flood_p99 = log.flood.value_at_quantile(0.99) as f64 / 1000.0;
    let lost = acked.saturating_sub(log.received);
    let ok = lost == 0 && log.out_of_order == 0 && publish_errors == 0 && flood_p99 < TARGET_P99_MS;
    Ok(vec![json!({
        "scenario": "fresh-flood",
        "ok": ok,
        "target_p99_ms": TARGET_P99_MS,
        "rate": a.rate,
        "quiet_s": a.quiet,
        "flood_s": a.duration,
        "pollers": a.pollers,
        "names_per_poll": a.names,
        "ws_flooders": a.ws_flooders,
        "sources": if a.one_source { 1 } else { a.pollers + a.ws_flooders },
        "limits": if a.limits_off { "off" } else { "defaults" },
        "hot_quiet": stats::latency_summary(&log.quiet),
        "hot_flood": stats::latency_summary(&log.flood),
        "hot_acked": acked,
        "hot_received": log.received,
        "lost": lost,
        "out_of_order": log.out_of_order,
        "publish_errors": publish_errors,
        "flood_cpu_per_s": json!({
            "node": (node_cpu / flood_wall * 100.0).round() / 100.0,
            "loadtest": (tool_cpu / flood_wall * 100.0).round() / 100.0,
        }),
        "load_average_1m": load_average,
        "publish_rtt_quiet": stats::latency_summary(&round_trips.lock().unwrap()[0]),
        "publish_rtt_flood": stats::latency_summary(&round_trips.lock().unwrap()[1]),
        "node_fanout_flood": json!({
            "p50_le_s": fanout_quantile(&fanout_before, &fanout_after, 0.5),
            "p99_le_s": fanout_quantile(&fanout_before, &fanout_after, 0.99),
        }),
        "flood": counts.to_json(),
        "limit_rejections": metrics,
        "redis_keys_after": redis_keys,
    })])
}

async fn metrics_text(origin: &str) -> String {
    match reqwest::get(format!("{origin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The upper bound (seconds) of the bucket of `gateway_fanout_latency_seconds{transport="ws"}`
/// holding quantile `q` of what was observed between two scrapes: the node's own publish→write
/// time of the hot channel (the only one with publications), without the publish request's.
fn fanout_quantile(before: &str, after: &str, q: f64) -> Value {
    let series = "gateway_fanout_latency_seconds_bucket{transport=\"ws\"";
    testkit::bucket_quantile(before, after, series, q).map_or(Value::Null, Value::from)
}

/// `gateway_limit_rejections_total` by limit.
fn limit_rejections(text: &str) -> Value {
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("gateway_limit_rejections_total{limit=\"") {
            if let Some((limit, value)) = rest.split_once("\"} ") {
                out.insert(
                    limit.into(),
                    value.trim().parse::<f64>().unwrap_or(0.0).into(),
                );
            }
        }
    }
    Value::Object(out)
}

async fn hot_subscriber(
    addr: SocketAddr,
    log: Arc<Mutex<HotLog>>,
    flood_started: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let url = format!("ws://{addr}/ws");
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
        return;
    };
    let op = json!({"id": 1, "op": "subscribe", "channel": HOT}).to_string();
    if ws.send(Message::text(op)).await.is_err() {
        return;
    }
    let mut subscribed = Some(subscribed);
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return,
        };
        let now = now_micros();
        let Ok(v) = serde_json::from_str::<Value>(msg.as_str()) else {
            continue;
        };
        if v.get("result").is_some() {
            if let Some(tx) = subscribed.take() {
                let _ = tx.send(());
            }
            continue;
        }
        let (Some(sent), Some(i)) = (v["data"]["t"].as_u64(), v["data"]["i"].as_u64()) else {
            continue;
        };
        let mut log = log.lock().unwrap();
        let latency = now.saturating_sub(sent);
        if sent >= flood_started.load(Ordering::Relaxed) {
            stats::record_clamped(&mut log.flood, latency);
        } else {
            stats::record_clamped(&mut log.quiet, latency);
        }
        log.received += 1;
        if log.last_i.is_some_and(|last| i != last + 1) {
            log.out_of_order += 1;
        }
        log.last_i = Some(i);
    }
    let _ = ws.close(None).await;
}

/// Publishes `{"i", "t"}` on the hot channel at `rate` for `duration`, one request at a time
/// per tick; counts the acknowledged ones in `published`, returns the failed ones.
async fn publish_hot(
    origin: String,
    rate: f64,
    duration: Duration,
    published: Arc<AtomicU64>,
    flood_started: Arc<AtomicU64>,
    round_trips: Arc<Mutex<[hdrhistogram::Histogram<u64>; 2]>>,
) -> u64 {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + duration;
    let (mut i, mut errors) = (0u64, 0u64);
    while Instant::now() < end {
        tick.tick().await;
        let sent = now_micros();
        let body = json!({"channel": HOT, "data": {"i": i, "t": sent}});
        let answer = client
            .post(format!("{origin}/api/publish"))
            .json(&body)
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {
                let phase = usize::from(sent >= flood_started.load(Ordering::Relaxed));
                let rtt = now_micros().saturating_sub(sent);
                stats::record_clamped(&mut round_trips.lock().unwrap()[phase], rtt);
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            _ => errors += 1,
        }
    }
    errors
}

/// `GET /poll` over `names` fresh channel names at a time, from `source`, until stopped.
async fn poll_loop(
    origin: String,
    source: IpAddr,
    prefix: String,
    names: usize,
    counts: Arc<FloodCounts>,
    stop: Arc<AtomicBool>,
) {
    let Ok(client) = reqwest::Client::builder().local_address(source).build() else {
        return;
    };
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let query: Vec<String> = (0..names)
            .map(|i| format!("channel=fresh-{prefix}-{round}-{i}"))
            .collect();
        round += 1;
        let url = format!("{origin}/poll?{}&timeout=0", query.join("&"));
        match client.get(url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                match status {
                    200 => {
                        counts.polls_ok.fetch_add(1, Ordering::Relaxed);
                        counts
                            .fresh_polled
                            .fetch_add(names as u64, Ordering::Relaxed);
                    }
                    429 => {
                        counts.polls_429.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        counts.polls_other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                counts.transport_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Connects from `source`, sends `batch` subscribes to fresh names at once, reads their replies,
/// closes, again, until stopped.
async fn ws_loop(
    addr: SocketAddr,
    source: IpAddr,
    prefix: String,
    batch: usize,
    counts: Arc<FloodCounts>,
    stop: Arc<AtomicBool>,
) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = crate::net::connect(addr, source).await else {
            counts.transport_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let url = format!("ws://{addr}/ws");
        let Ok((mut ws, _)) = tokio_tungstenite::client_async(url.as_str(), stream).await else {
            counts.transport_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        for i in 0..batch {
            let op = json!({"id": i + 1, "op": "subscribe",
                "channel": format!("fresh-{prefix}-{round}-{i}")});
            if ws.send(Message::text(op.to_string())).await.is_err() {
                break;
            }
        }
        round += 1;
        let mut replies = 0;
        while replies < batch {
            let msg = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                _ => {
                    counts.transport_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let Ok(v) = serde_json::from_str::<Value>(msg.as_str()) else {
                continue;
            };
            if v.get("id").is_none() {
                continue;
            }
            replies += 1;
            let counter = match v["error"]["code"].as_str() {
                None => &counts.ws_subscribed,
                Some("too_many_fresh_channels") => &counts.ws_refused,
                Some(_) => &counts.ws_other,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let _ = ws.close(None).await;
    }
}
