//! `presence`: what presence costs at scale (#15.4). The tool starts redis-server and three
//! gateway nodes, then measures, one after the other:
//!
//! 1. **Join/leave fan-out**: `--observers` WebSocket subscribers of `room:burst` (a namespace
//!    with presence and join/leave) wait while `--joiners` clients, spread over the nodes,
//!    subscribe at once and later close at once. Reported: how long until every observer has
//!    every join (and every leave), how many join events the nodes delivered in all (each
//!    joiner also gets the joins after its own), and the CPU the nodes and Redis spent on it.
//! 2. **A big channel**: `--members` connections over the three nodes subscribe `crowd:big`
//!    (presence without join/leave); once every node counts them all: `--calls` presence reads
//!    per form (full list, count only) against each node, their latency and size, and the Redis
//!    memory the channel's presence takes (`MEMORY USAGE` of its keys, and `used_memory`).
//! 3. **A crash**: the third node is killed with SIGKILL; how long until the other nodes no
//!    longer list its members, against `presence.ttl`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::net::{cpu_seconds, cpu_seconds_all, Sources};
use crate::stats;
use testkit::{Backend, GatewayProcess, RedisOpts, RedisServer, PATIENT};

const BURST: &str = "room:burst";
const CROWD: &str = "crowd:big";
const NODES: usize = 3;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Clients that subscribe at once to the join/leave channel.
    #[arg(long, default_value_t = 1000)]
    pub joiners: usize,
    /// Subscribers of the join/leave channel that are there before the burst.
    #[arg(long, default_value_t = 10)]
    pub observers: usize,
    /// Members of the big channel, over the three nodes.
    #[arg(long, default_value_t = 10_000)]
    pub members: usize,
    /// Presence reads per form and node.
    #[arg(long, default_value_t = 100)]
    pub calls: usize,
    /// `presence.ttl` of the nodes, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub ttl: f64,
}

type Ws = WebSocketStream<TcpStream>;

async fn open(addr: SocketAddr, source: IpAddr) -> Result<Ws, String> {
    let stream = crate::net::connect(addr, source)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    Ok(ws)
}

/// Subscribes and waits for the reply (pushes before it are presence events of the channel).
async fn subscribe(ws: &mut Ws, channel: &str) -> Result<(), String> {
    let op = json!({"id": 1, "op": "subscribe", "channel": channel});
    ws.send(Message::text(op.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let text = match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            other => return Err(format!("no subscribe reply: {other:?}")),
        };
        let v: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
        if v["id"] == 1 {
            return match v.get("result") {
                Some(_) => Ok(()),
                None => Err(format!("subscribe refused: {v}")),
            };
        }
    }
}

/// Counts the joins and leaves a connection receives until it is told to stop.
#[derive(Default)]
struct Tally {
    joins: AtomicU64,
    leaves: AtomicU64,
}

/// Reads pushes, counting presence events, until the socket ends or `until` resolves.
async fn count_events(mut ws: Ws, tally: Arc<Tally>, until: tokio::sync::watch::Receiver<bool>) {
    let mut until = until;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(Message::Text(text))) = msg else {
                    if msg.is_none() || matches!(msg, Some(Err(_))) {
                        return;
                    }
                    continue;
                };
                // Cheap classification: the event's member key follows the channel name.
                if text.as_str().contains("\"join\":{") {
                    tally.joins.fetch_add(1, Ordering::Relaxed);
                } else if text.as_str().contains("\"leave\":{") {
                    tally.leaves.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = until.changed() => {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

async fn presence(
    http: &reqwest::Client,
    origin: &str,
    channel: &str,
    count_only: bool,
) -> Result<(Value, usize), String> {
    let url = format!("{origin}/api/presence?channel={channel}&count_only={count_only}");
    let response = http.get(&url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "{url}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok((v, body.len()))
}

/// Waits until `origin` counts `count` members of `channel`; the time it took.
async fn wait_count(
    http: &reqwest::Client,
    origin: &str,
    channel: &str,
    count: usize,
    limit: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let (v, _) = presence(http, origin, channel, true).await?;
        if v["count"] == count {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{origin}: {channel} counts {} members, not {count}, after {limit:?}",
                v["count"]
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `done()` holds (checked every 10 ms); the time it took.
async fn wait_until(
    what: &str,
    limit: Duration,
    done: impl Fn() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// `MEMORY USAGE` summed over the keys whose name holds `{channel}` (SCAN, no KEYS).
async fn channel_memory(redis: &RedisServer, channel: &str) -> (u64, usize) {
    let pattern = format!("*{{{channel}}}*");
    let mut cursor = "0".to_string();
    let (mut bytes, mut keys) = (0u64, 0usize);
    loop {
        let out = redis
            .cli(&["--raw", "SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
            .await;
        let mut lines = out.lines();
        cursor = lines.next().unwrap_or("0").trim().to_string();
        for key in lines.map(str::trim).filter(|k| !k.is_empty()) {
            let usage = redis.cli(&["--raw", "MEMORY", "USAGE", key]).await;
            bytes += usage.trim().parse::<u64>().unwrap_or(0);
            keys += 1;
        }
        if cursor == "0" {
            return (bytes, keys);
        }
    }
}

async fn used_memory(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "memory"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

pub async fn run(bin: &Path, a: &Args) -> Result<Vec<Value>, String> {
    let redis = RedisServer::try_start(RedisOpts::default()).await?;
    let ttl = format!("{}ms", (a.ttl * 1000.0) as u64);
    let mut env: Vec<(&str, &str)> = vec![
        ("GATEWAY__CHANNELS__NAMESPACES__ROOM__PRESENCE", "true"),
        ("GATEWAY__CHANNELS__NAMESPACES__ROOM__JOIN_LEAVE", "true"),
        ("GATEWAY__CHANNELS__NAMESPACES__CROWD__PRESENCE", "true"),
        ("GATEWAY__PRESENCE__TTL", &ttl),
        ("GATEWAY__LIMITS__FRESH_CHANNELS_PER_SECOND", "0"),
    ];
    env.extend(PATIENT);
    let backend = Backend::standalone(&redis);
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(GatewayProcess::try_start(bin, &format!("node{i}"), &backend.args, &env).await?);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let origins: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let pids: Vec<u32> = nodes.iter().map(|n| n.pid()).collect();
    let redis_pid = redis.pid();
    let sources = Sources::for_connections(a.joiners + a.observers + a.members);
    let http = reqwest::Client::new();

    // 1. Join/leave fan-out.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let observer_tallies: Vec<Arc<Tally>> = (0..a.observers).map(|_| Arc::default()).collect();
    for (i, tally) in observer_tallies.iter().enumerate() {
        let mut ws = open(addrs[i % NODES], sources.pick()).await?;
        subscribe(&mut ws, BURST).await?;
        tokio::spawn(count_events(ws, tally.clone(), stop_rx.clone()));
    }
    wait_count(
        &http,
        &origins[0],
        BURST,
        a.observers,
        Duration::from_secs(60),
    )
    .await?;
    // Observer i hears its own join and those of the observers after it; count from there.
    wait_until("the observers' own joins", Duration::from_secs(60), || {
        observer_tallies
            .iter()
            .enumerate()
            .all(|(i, t)| t.joins.load(Ordering::Relaxed) >= (a.observers - i) as u64)
    })
    .await?;
    let base: Vec<u64> = (0..a.observers).map(|i| (a.observers - i) as u64).collect();
    let mut joiner_sockets = Vec::with_capacity(a.joiners);
    for i in 0..a.joiners {
        joiner_sockets.push(open(addrs[i % NODES], sources.pick()).await?);
    }
    let cpu_before = (
        cpu_seconds_all(&pids),
        cpu_seconds(redis_pid).unwrap_or(0.0),
    );
    let burst = Instant::now();
    let joiner_tally: Arc<Tally> = Arc::default();
    let (leave_tx, leave_rx) = tokio::sync::watch::channel(false);
    let mut subscribing = Vec::new();
    for mut ws in joiner_sockets {
        let (tally, leave_rx) = (joiner_tally.clone(), leave_rx.clone());
        subscribing.push(tokio::spawn(async move {
            subscribe(&mut ws, BURST).await?;
            tokio::spawn(count_events(ws, tally, leave_rx));
            Ok::<_, String>(())
        }));
    }
    for s in subscribing {
        s.await.map_err(|e| e.to_string())??;
    }
    let subscribed = burst.elapsed();
    let joins = a.joiners as u64;
    let all_joined = wait_until(
        "every observer to see every join",
        Duration::from_secs(120),
        || {
            observer_tallies
                .iter()
                .zip(&base)
                .all(|(t, b)| t.joins.load(Ordering::Relaxed) - b >= joins)
        },
    )
    .await?;
    let joins_delivered_at = burst.elapsed();
    wait_count(
        &http,
        &origins[0],
        BURST,
        a.observers + a.joiners,
        Duration::from_secs(60),
    )
    .await?;
    let join_cpu = (
        cpu_seconds_all(&pids) - cpu_before.0,
        cpu_seconds(redis_pid).unwrap_or(0.0) - cpu_before.1,
    );
    let join_events: u64 = joiner_tally.joins.load(Ordering::Relaxed)
        + observer_tallies
            .iter()
            .zip(&base)
            .map(|(t, b)| t.joins.load(Ordering::Relaxed) - b)
            .sum::<u64>();
    let extra_joins: u64 = observer_tallies
        .iter()
        .zip(&base)
        .map(|(t, b)| (t.joins.load(Ordering::Relaxed) - b).saturating_sub(joins))
        .sum();

    let cpu_before = (
        cpu_seconds_all(&pids),
        cpu_seconds(redis_pid).unwrap_or(0.0),
    );
    let leaving = Instant::now();
    let _ = leave_tx.send(true);
    wait_until(
        "every observer to see every leave",
        Duration::from_secs(120),
        || {
            observer_tallies
                .iter()
                .all(|t| t.leaves.load(Ordering::Relaxed) >= joins)
        },
    )
    .await?;
    let all_left = leaving.elapsed();
    wait_count(
        &http,
        &origins[0],
        BURST,
        a.observers,
        Duration::from_secs(60),
    )
    .await?;
    let leave_cpu = (
        cpu_seconds_all(&pids) - cpu_before.0,
        cpu_seconds(redis_pid).unwrap_or(0.0) - cpu_before.1,
    );
    let extra_leaves: u64 = observer_tallies
        .iter()
        .map(|t| t.leaves.load(Ordering::Relaxed).saturating_sub(joins))
        .sum();
    let _ = stop_tx.send(true);

    // 2. A big channel.
    let memory_before = used_memory(&redis).await;
    let (crowd_stop_tx, crowd_stop_rx) = tokio::sync::watch::channel(false);
    let crowd_tally: Arc<Tally> = Arc::default();
    let connecting = Instant::now();
    let mut pending = Vec::new();
    for i in 0..a.members {
        let (addr, source, tally, stop) = (
            addrs[i % NODES],
            sources.pick(),
            crowd_tally.clone(),
            crowd_stop_rx.clone(),
        );
        pending.push(tokio::spawn(async move {
            let mut ws = open(addr, source).await?;
            subscribe(&mut ws, CROWD).await?;
            tokio::spawn(count_events(ws, tally, stop));
            Ok::<_, String>(())
        }));
        // A few hundred handshakes in flight at a time.
        if pending.len() >= 256 {
            for p in pending.drain(..) {
                p.await.map_err(|e| e.to_string())??;
            }
        }
    }
    for p in pending {
        p.await.map_err(|e| e.to_string())??;
    }
    let members_subscribed = connecting.elapsed();
    let mut counted_everywhere = Duration::ZERO;
    for origin in &origins {
        counted_everywhere = counted_everywhere
            .max(wait_count(&http, origin, CROWD, a.members, Duration::from_secs(120)).await?);
    }
    let (channel_bytes, channel_keys) = channel_memory(&redis, CROWD).await;
    let memory_after = used_memory(&redis).await;
    let mut reads = Vec::new();
    for count_only in [false, true] {
        let mut h = stats::new_histogram();
        let mut size = 0;
        let mut agreed = true;
        for call in 0..a.calls {
            let origin = &origins[call % NODES];
            let start = Instant::now();
            let (v, bytes) = presence(&http, origin, CROWD, count_only).await?;
            stats::record_clamped(&mut h, start.elapsed().as_micros() as u64);
            size = bytes;
            agreed &= v["count"] == a.members
                && (count_only || v["clients"].as_array().map(Vec::len) == Some(a.members));
        }
        let mut summary = stats::latency_summary(&h);
        summary["form"] = if count_only {
            "count_only"
        } else {
            "full list"
        }
        .into();
        summary["response_bytes"] = size.into();
        summary["agreed"] = agreed.into();
        reads.push(summary);
    }

    // 3. A crash.
    let lost = (0..a.members).filter(|i| i % NODES == NODES - 1).count();
    let killed = Instant::now();
    nodes[NODES - 1].kill9();
    let mut reaped = Duration::ZERO;
    for origin in &origins[..NODES - 1] {
        reaped = reaped.max(
            wait_count(
                &http,
                origin,
                CROWD,
                a.members - lost,
                crate::secs(a.ttl * 3.0 + 30.0),
            )
            .await?,
        );
    }
    let reap = killed.elapsed().max(reaped);
    let _ = crowd_stop_tx.send(true);

    let ok = extra_joins == 0
        && extra_leaves == 0
        && reads.iter().all(|r| r["agreed"] == true)
        && reap.as_secs_f64() <= a.ttl;
    // CPU milliseconds per 1,000 events (cpu_s * 1e3 / (events / 1e3)), to 3 decimals.
    let per_1k = |cpu: f64, events: u64| {
        if events == 0 {
            0.0
        } else {
            (cpu * 1e9 / events as f64).round() / 1e3
        }
    };
    Ok(vec![json!({
        "scenario": "presence",
        "ok": ok,
        "nodes": NODES,
        "ttl_s": a.ttl,
        "join_leave": {
            "observers": a.observers,
            "joiners": a.joiners,
            "all_subscribed_ms": ms(subscribed),
            "every_join_at_every_observer_ms": ms(joins_delivered_at.max(all_joined)),
            "join_events_delivered": join_events,
            "duplicate_joins_at_observers": extra_joins,
            "join_cpu_s": {"nodes": join_cpu.0, "redis": join_cpu.1},
            "node_cpu_ms_per_1k_join_events": per_1k(join_cpu.0, join_events),
            "every_leave_at_every_observer_ms": ms(all_left),
            "duplicate_leaves_at_observers": extra_leaves,
            "leave_cpu_s": {"nodes": leave_cpu.0, "redis": leave_cpu.1},
            "node_cpu_ms_per_1k_leave_events": per_1k(leave_cpu.0, joins * a.observers as u64),
        },
        "big_channel": {
            "members": a.members,
            "all_subscribed_ms": ms(members_subscribed),
            "counted_on_every_node_ms": ms(counted_everywhere),
            "redis_keys": channel_keys,
            "redis_memory_usage_bytes": channel_bytes,
            "redis_used_memory_delta_bytes": memory_after.saturating_sub(memory_before),
            "redis_bytes_per_member": if a.members == 0 { 0 } else { channel_bytes / a.members as u64 },
            "presence_reads": reads,
            "events_received": crowd_tally.joins.load(Ordering::Relaxed) + crowd_tally.leaves.load(Ordering::Relaxed),
        },
        "crash": {
            "members_lost": lost,
            "reaped_ms": ms(reap),
            "within_ttl": reap.as_secs_f64() <= a.ttl,
        },
    })])
}
