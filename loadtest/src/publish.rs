//! `publish`: acknowledged publishes per second with history through one Redis (#14.5), against
//! the ceiling of the gateway's own publish script driven straight at the same Redis in the same
//! run. The tool starts redis-server and a gateway on it (and a gateway on the embedded
//! backplane) on free ports, unless given `--url` (then `--redis-url` names that gateway's Redis
//! for the ceiling). For each channel count it runs, one after the other, each bounded by
//! `--duration` and `--count`:
//!
//! - the ceiling: `publish.lua` (with `trim.lua`, exactly the script the backplane loads) by
//!   `EVALSHA` with the backplane's KEYS/ARGV, from N connections, pipelined `--pipeline` deep,
//!   and unpipelined (one command at a time per connection);
//! - N publishers over HTTP/1.1 keep-alive to `POST /api/publish`, one request at a time each
//!   (and, with `--batch B`, N publishers sending B publications per request);
//! - N publishers over WebSocket `publish`, one at a time each;
//! - the same HTTP and WebSocket runs on the embedded backplane.
//!
//! Every run uses channels of its own, and every acknowledged publish is accounted for
//! afterwards: per channel the acknowledged offsets must be exactly 1..=top, and history must
//! hold, at each acknowledged offset, the data that publish sent.
//!
//! The ceiling is driven from Rust (the redis crate's pipelines) rather than `redis-benchmark`:
//! it passes the very arguments the backplane passes (fresh tag and epoch, the channel's keys
//! under one hash tag, the channel spread of the run) and its acknowledgements go through the
//! same loss accounting, which `redis-benchmark`'s fixed command line cannot give.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::stats;
use testkit::{Backend, GatewayProcess, RedisOpts, RedisServer};

/// The target of #14.5: gateway publishes/s over the pipelined ceiling.
const TARGET_RATIO: f64 = 0.8;
/// The backplane's key prefix (`redis.prefix` default).
const PREFIX: &str = "gw";
/// The script the backplane loads (backplane/src/redis/commands.rs).
const SCRIPT: &str = concat!(
    include_str!("../../backplane/src/redis/trim.lua"),
    include_str!("../../backplane/src/redis/publish.lua")
);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Concurrent publishers (connections), each with one publish (or pipeline, or batch) in
    /// flight.
    #[arg(long, default_value_t = 32)]
    pub publishers: usize,
    /// Channel counts to run, one set of runs each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub channels: Vec<usize>,
    /// Seconds per run at most.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Acknowledged publishes per run at most.
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// Commands per pipeline of the ceiling.
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// Also publish in batches of this many publications per `POST /api/publish` (0: no batch
    /// runs, for a gateway without the batch API).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Padding bytes added to each publication's data.
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    /// `history.max_count` of the gateways the tool starts (and ARGV[3] of the ceiling), so
    /// that every publication of a run can be checked against history.
    #[arg(long, default_value_t = 1_000_000)]
    pub history_max_count: u64,
    /// A running gateway (its origin) instead of starting one; with `--redis-url` for the
    /// ceiling (its `redis.prefix` must be `gw` and its `history.max_count` large enough).
    #[arg(long, value_name = "ORIGIN")]
    pub url: Option<String>,
    /// The Redis of `--url`'s gateway.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Skip the runs on the embedded backplane.
    #[arg(long)]
    pub no_memory: bool,
}

/// How one run publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Pipelined(usize),
    Unpipelined,
    Http,
    HttpBatch(usize),
    Ws,
}

impl Via {
    fn name(self) -> String {
        match self {
            Via::Pipelined(d) => format!("EVALSHA pipelined ×{d}"),
            Via::Unpipelined => "EVALSHA unpipelined".into(),
            Via::Http => "HTTP/1.1".into(),
            Via::HttpBatch(b) => format!("HTTP/1.1 batch ×{b}"),
            Via::Ws => "WebSocket".into(),
        }
    }
}

/// One acknowledged publish: channel index, offset, and what was sent (publisher, sequence).
#[derive(Clone, Copy)]
struct Ack {
    channel: u32,
    offset: u64,
    publisher: u32,
    seq: u64,
}

/// What one publisher did.
#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    errors: u64,
    first_error: Option<String>,
    rtt: Option<hdrhistogram::Histogram<u64>>,
}

impl Log {
    /// A log that also records each publish's round trip.
    fn timed() -> Log {
        Log {
            rtt: Some(stats::new_histogram()),
            ..Log::default()
        }
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// Shared bounds of one run.
struct Bounds {
    deadline: Instant,
    remaining: std::sync::atomic::AtomicI64,
    stop: AtomicBool,
}

impl Bounds {
    /// Claims `n` publishes of the budget; false once the run is over.
    fn take(&self, n: u64) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        self.remaining.fetch_sub(n as i64, Ordering::Relaxed) >= n as i64
    }
}

/// What a run publishes to, and how it reaches it.
struct Target<'a> {
    origin: Option<&'a str>,
    addr: Option<SocketAddr>,
    redis_url: Option<&'a str>,
    /// Processes whose CPU the run reports: the gateway (if started here) and Redis.
    gateway_pid: Option<u32>,
    redis_pid: Option<u32>,
    /// Names of the run's channels.
    channels: Vec<String>,
}

fn data(publisher: u32, seq: u64, pad: &str) -> String {
    if pad.is_empty() {
        format!("{{\"p\":{publisher},\"s\":{seq}}}")
    } else {
        format!("{{\"p\":{publisher},\"s\":{seq},\"x\":\"{pad}\"}}")
    }
}

pub async fn run(bin: Option<&Path>, a: &Args) -> Result<Vec<Value>, String> {
    if a.publishers == 0 || a.channels.is_empty() || a.channels.contains(&0) || a.pipeline == 0 {
        return Err("publish needs --publishers, --channels and --pipeline of at least 1".into());
    }
    let max_count = a.history_max_count.to_string();
    let env = [("GATEWAY__HISTORY__MAX_COUNT", max_count.as_str())];
    // The system under test: a gateway on Redis (started here unless given), and one on the
    // embedded backplane.
    let mut _redis = None;
    let mut nodes = Vec::new();
    let (origin, redis_url) = match &a.url {
        Some(url) => (url.trim_end_matches('/').to_string(), a.redis_url.clone()),
        None => {
            let bin = bin.ok_or("no gateway binary")?;
            let redis = RedisServer::try_start(RedisOpts::default()).await?;
            let url = redis.url();
            let node = GatewayProcess::try_start(
                bin,
                "redis-node",
                &Backend::standalone(&redis).args,
                &env,
            )
            .await?;
            let origin = format!("http://{}", node.addr);
            _redis = Some(redis);
            nodes.push(node);
            (origin, Some(url))
        }
    };
    let memory_origin = match (&a.url, a.no_memory) {
        (None, false) => {
            let bin = bin.ok_or("no gateway binary")?;
            let node = GatewayProcess::try_start(bin, "memory-node", &[], &env).await?;
            let origin = format!("http://{}", node.addr);
            nodes.push(node);
            Some(origin)
        }
        _ => None,
    };
    let redis_pid = match &redis_url {
        Some(url) => redis_pid(url).await,
        None => None,
    };
    let pid_of = |origin: &str| {
        nodes
            .iter()
            .find(|n| format!("http://{}", n.addr) == origin)
            .map(|n| n.pid())
    };
    let run_id = format!("{:x}", crate::publisher::now_micros());
    let mut results = Vec::new();
    for &k in &a.channels {
        let variant = if k == 1 {
            "1 channel".to_string()
        } else {
            format!("{k} channels")
        };
        let mut paths: Vec<(&str, Via, &str)> = Vec::new();
        if redis_url.is_some() {
            paths.push(("Redis, script alone", Via::Pipelined(a.pipeline), "redis"));
            paths.push(("Redis, script alone", Via::Unpipelined, "redis"));
        }
        paths.push(("gateway, Redis", Via::Http, "gateway"));
        if a.batch > 0 {
            paths.push(("gateway, Redis", Via::HttpBatch(a.batch), "gateway"));
        }
        paths.push(("gateway, Redis", Via::Ws, "gateway"));
        if memory_origin.is_some() {
            paths.push(("gateway, embedded", Via::Http, "memory"));
            if a.batch > 0 {
                paths.push(("gateway, embedded", Via::HttpBatch(a.batch), "memory"));
            }
            paths.push(("gateway, embedded", Via::Ws, "memory"));
        }
        let mut ceiling = None;
        for (i, (system, path, on)) in paths.into_iter().enumerate() {
            let origin = match on {
                "memory" => memory_origin.as_deref(),
                "gateway" => Some(origin.as_str()),
                _ => None,
            };
            let target = Target {
                origin,
                addr: origin.map(addr_of).transpose()?,
                redis_url: redis_url.as_deref(),
                gateway_pid: origin.and_then(pid_of),
                redis_pid: redis_pid.filter(|_| on != "memory"),
                channels: (0..k).map(|c| format!("pt-{run_id}-{k}-{i}-{c}")).collect(),
            };
            eprintln!("publish: {variant}, {system}, {} …", path.name());
            let mut v = one_run(&target, path, a).await?;
            let rate = v["publishes_per_s"].as_f64().unwrap_or(0.0);
            if path == Via::Pipelined(a.pipeline) {
                ceiling = Some(rate);
            }
            v["system"] = system.into();
            v["transport"] = path.name().into();
            v["variant"] = variant.clone().into();
            v["channels"] = k.into();
            v["ratio_to_ceiling"] = ceiling
                .filter(|c| *c > 0.0)
                .map_or(Value::Null, |c| ((rate / c * 100.0).round() / 100.0).into());
            results.push(v);
        }
    }
    // The target: the best gateway-on-Redis path per channel count against its ceiling.
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok();
    for v in &mut results {
        v["scenario"] = "publish".into();
        v["target_ratio"] = TARGET_RATIO.into();
        v["load_average"] = loadavg.as_deref().map(str::trim).into();
    }
    Ok(results)
}

fn addr_of(origin: &str) -> Result<SocketAddr, String> {
    let host = origin
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url must be http://HOST:PORT, got {origin}"))?;
    let host = host.split('/').next().unwrap_or(host);
    std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))
}

async fn one_run(target: &Target<'_>, path: Via, a: &Args) -> Result<Value, String> {
    let bounds = Arc::new(Bounds {
        deadline: Instant::now() + crate::secs(a.duration),
        remaining: std::sync::atomic::AtomicI64::new(a.count as i64),
        stop: AtomicBool::new(false),
    });
    let pad: Arc<str> = "x".repeat(a.payload).into();
    let channels: Arc<Vec<String>> = Arc::new(target.channels.clone());
    // Connections first, so the clock covers publishing only.
    let mut tasks = Vec::new();
    let sha = match path {
        Via::Pipelined(_) | Via::Unpipelined => {
            let url = target.redis_url.ok_or("no Redis for the ceiling")?;
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            Some((client, sha))
        }
        _ => None,
    };
    let started = Arc::new(tokio::sync::Barrier::new(a.publishers + 1));
    for p in 0..a.publishers {
        let bounds = bounds.clone();
        let pad = pad.clone();
        let channels = channels.clone();
        let started = started.clone();
        let p = p as u32;
        let max_count = a.history_max_count;
        let task = match path {
            Via::Pipelined(_) | Via::Unpipelined => {
                let (client, sha) = sha.clone().expect("loaded above");
                let depth = match path {
                    Via::Pipelined(d) => d,
                    _ => 1,
                };
                let c = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    started.wait().await;
                    script_publisher(c, sha, depth, p, channels, pad, bounds, max_count).await
                })
            }
            Via::Http | Via::HttpBatch(_) => {
                let batch = match path {
                    Via::HttpBatch(b) => Some(b),
                    _ => None,
                };
                let s = connect(target.addr.expect("gateway")).await?;
                tokio::spawn(async move {
                    started.wait().await;
                    http_publisher(s, batch, p, channels, pad, bounds).await
                })
            }
            Via::Ws => {
                let url = format!("ws://{}/ws", target.addr.expect("gateway"));
                let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .map_err(|e| format!("websocket {url}: {e}"))?;
                tokio::spawn(async move {
                    started.wait().await;
                    ws_publisher(ws, p, channels, pad, bounds).await
                })
            }
        };
        tasks.push(task);
    }
    let cpu_before = cpu_now(target);
    started.wait().await;
    let t0 = Instant::now();
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.map_err(|e| format!("publisher failed: {e}"))?);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_after = cpu_now(target);
    let per_s = |cpu: f64| (cpu / elapsed * 100.0).round() / 100.0;
    let acked: u64 = logs.iter().map(|l| l.acks.len() as u64).sum();
    let errors: u64 = logs.iter().map(|l| l.errors).sum();
    let first_error = logs.iter().find_map(|l| l.first_error.clone());
    let mut rtt = stats::new_histogram();
    for l in &logs {
        if let Some(h) = &l.rtt {
            rtt.add(h).expect("same bounds");
        }
    }
    let check = verify(target, &logs).await?;
    let ok = errors == 0 && check.is_clean();
    Ok(json!({
        "ok": ok,
        "publishers": a.publishers,
        "published": acked,
        "seconds": (elapsed * 1000.0).round() / 1000.0,
        "publishes_per_s": (acked as f64 / elapsed.max(1e-9)).round(),
        "rtt": stats::latency_summary(&rtt),
        "errors": errors,
        "first_errors": first_error.map_or(Value::Null, |e| json!([e])),
        "cpu_per_s": json!({
            "gateway": per_s(cpu_after[0] - cpu_before[0]),
            "redis": per_s(cpu_after[1] - cpu_before[1]),
            "loadtest": per_s(cpu_after[2] - cpu_before[2]),
        }),
        "lost": check.missing,
        "duplicated": check.duplicated,
        "history_mismatched": check.mismatched,
    }))
}

/// CPU seconds so far of the gateway, Redis and this tool.
fn cpu_now(target: &Target<'_>) -> [f64; 3] {
    let cpu = |pid: Option<u32>| pid.and_then(crate::net::cpu_seconds).unwrap_or(0.0);
    [
        cpu(target.gateway_pid),
        cpu(target.redis_pid),
        cpu(Some(std::process::id())),
    ]
}

/// Redis's process id (`INFO server`), when it runs on this machine.
async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
async fn script_publisher(
    mut c: redis::aio::MultiplexedConnection,
    sha: String,
    depth: usize,
    p: u32,
    channels: Arc<Vec<String>>,
    pad: Arc<str>,
    bounds: Arc<Bounds>,
    max_count: u64,
) -> Log {
    let mut log = Log::timed();
    let keys: Vec<[String; 4]> = channels
        .iter()
        .map(|ch| {
            let base = format!("{PREFIX}:{{{ch}}}");
            [
                format!("{base}:m"),
                format!("{base}:h"),
                format!("{base}:p"),
                ch.clone(),
            ]
        })
        .collect();
    let max_age = Duration::from_secs(600).as_millis() as u64;
    let meta_ttl = Duration::from_secs(24 * 3600).as_millis() as u64;
    let mut seq = 0u64;
    let mut sent = Vec::with_capacity(depth);
    while bounds.take(depth as u64) {
        let mut pipe = redis::pipe();
        sent.clear();
        for _ in 0..depth {
            let k = (p as usize + seq as usize) % keys.len();
            let [meta, history, pubsub, name] = &keys[k];
            let epoch: u64 = rand::random();
            let tag: u32 = rand::random();
            pipe.cmd("EVALSHA")
                .arg(&sha)
                .arg(3)
                .arg(meta)
                .arg(history)
                .arg(meta)
                .arg(data(p, seq, &pad))
                .arg(format!("{epoch:016x}"))
                .arg(max_count)
                .arg(max_age)
                .arg(max_age)
                .arg(meta_ttl)
                .arg(pubsub)
                .arg("0")
                .arg(0)
                .arg(name)
                .arg(format!("{tag:08x}"))
                // Unversioned.
                .arg("");
            sent.push((k as u32, seq));
            seq += 1;
        }
        let t = Instant::now();
        match pipe
            .query_async::<Vec<(u64, String, String, u8)>>(&mut c)
            .await
        {
            Ok(answers) => {
                stats::record_clamped(
                    log.rtt.as_mut().expect("set"),
                    t.elapsed().as_micros() as u64,
                );
                for ((channel, seq), (offset, ..)) in sent.iter().zip(answers) {
                    log.acks.push(Ack {
                        channel: *channel,
                        offset,
                        publisher: p,
                        seq: *seq,
                    });
                }
            }
            Err(e) => log.error(e),
        }
    }
    log
}

/// Reads one HTTP/1.1 response: status and body (Content-Length framing).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| io::Error::other("response head is not UTF-8"))?;
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("no status"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .ok_or_else(|| io::Error::other("no content-length"))?;
            let total = end + 4 + length;
            while buf.len() < total {
                if s.read_buf(buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Ok((status, body));
        }
        if s.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn http_publisher(
    mut s: TcpStream,
    batch: Option<usize>,
    p: u32,
    channels: Arc<Vec<String>>,
    pad: Arc<str>,
    bounds: Arc<Bounds>,
) -> Log {
    let mut log = Log::timed();
    let mut seq = 0u64;
    let mut buf = Vec::with_capacity(4096);
    let mut request = Vec::with_capacity(4096);
    let mut sent = Vec::new();
    let n = batch.unwrap_or(1);
    while bounds.take(n as u64) {
        sent.clear();
        let mut body = String::new();
        if batch.is_some() {
            body.push_str("{\"publications\":[");
        }
        for i in 0..n {
            let k = (p as usize + seq as usize) % channels.len();
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "{{\"channel\":\"{}\",\"data\":{}}}",
                channels[k],
                data(p, seq, &pad)
            ));
            sent.push((k as u32, seq));
            seq += 1;
        }
        if batch.is_some() {
            body.push_str("]}");
        }
        request.clear();
        request.extend_from_slice(
            format!(
                "POST /api/publish HTTP/1.1\r\nhost: loadtest\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(body.as_bytes());
        let t = Instant::now();
        if let Err(e) = s.write_all(&request).await {
            log.error(e);
            break;
        }
        let (status, body) = match read_response(&mut s, &mut buf).await {
            Ok(r) => r,
            Err(e) => {
                log.error(e);
                break;
            }
        };
        stats::record_clamped(
            log.rtt.as_mut().expect("set"),
            t.elapsed().as_micros() as u64,
        );
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 {
            log.error(format!("HTTP {status}: {answer}"));
            continue;
        }
        let items: Vec<&Value> = match batch {
            None => vec![&answer],
            Some(_) => answer["results"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
        };
        if items.len() != sent.len() {
            log.error(format!(
                "{} answers to {} publications",
                items.len(),
                sent.len()
            ));
            continue;
        }
        for (item, (channel, seq)) in items.into_iter().zip(&sent) {
            match item["offset"].as_u64() {
                Some(offset) => log.acks.push(Ack {
                    channel: *channel,
                    offset,
                    publisher: p,
                    seq: *seq,
                }),
                None => log.error(format!("not acknowledged: {item}")),
            }
        }
    }
    log
}

async fn ws_publisher(
    mut ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    p: u32,
    channels: Arc<Vec<String>>,
    pad: Arc<str>,
    bounds: Arc<Bounds>,
) -> Log {
    let mut log = Log::timed();
    let mut seq = 0u64;
    'publish: while bounds.take(1) {
        let k = (p as usize + seq as usize) % channels.len();
        let command = format!(
            "{{\"id\":{seq},\"op\":\"publish\",\"channel\":\"{}\",\"data\":{}}}",
            channels[k],
            data(p, seq, &pad)
        );
        let t = Instant::now();
        if let Err(e) = ws.send(Message::text(command)).await {
            log.error(e);
            break;
        }
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(c))) => {
                    log.error(format!("closed: {c:?}"));
                    break 'publish;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    log.error(e);
                    break 'publish;
                }
                None => {
                    log.error("closed");
                    break 'publish;
                }
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            if v["id"].as_u64() != Some(seq) {
                continue;
            }
            match v["result"]["offset"].as_u64() {
                Some(offset) => {
                    stats::record_clamped(
                        log.rtt.as_mut().expect("set"),
                        t.elapsed().as_micros() as u64,
                    );
                    log.acks.push(Ack {
                        channel: k as u32,
                        offset,
                        publisher: p,
                        seq,
                    })
                }
                None => log.error(format!("not acknowledged: {v}")),
            }
            break;
        }
        seq += 1;
    }
    let _ = ws.close(None).await;
    log
}

/// The accounting of one run.
#[derive(Default, Debug)]
struct Check {
    /// Offsets in 1..=top that no acknowledgement names, plus acknowledged offsets history lacks.
    missing: u64,
    /// Offsets acknowledged twice.
    duplicated: u64,
    /// Offsets where history holds other data than the acknowledged publish sent, or a channel
    /// whose top is not the count of its acknowledgements.
    mismatched: u64,
}

impl Check {
    fn is_clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.mismatched == 0
    }
}

/// Per channel: the acknowledged offsets are exactly 1..=n, history's top is n, and history
/// holds at each offset the data its acknowledged publish sent.
async fn verify(target: &Target<'_>, logs: &[Log]) -> Result<Check, String> {
    let mut by_channel: Vec<Vec<Ack>> = vec![Vec::new(); target.channels.len()];
    for l in logs {
        for a in &l.acks {
            by_channel[a.channel as usize].push(*a);
        }
    }
    let mut check = Check::default();
    let http = reqwest::Client::new();
    for (k, acks) in by_channel.iter_mut().enumerate() {
        acks.sort_unstable_by_key(|a| a.offset);
        let n = acks.len() as u64;
        let mut expected = 1u64;
        for (i, a) in acks.iter().enumerate() {
            if i > 0 && acks[i - 1].offset == a.offset {
                check.duplicated += 1;
                continue;
            }
            if a.offset != expected {
                check.missing += a.offset.saturating_sub(expected);
            }
            expected = a.offset + 1;
        }
        // History: (offset, data) from offset 1.
        let (top, entries) = match target.origin {
            Some(origin) => read_history_http(&http, origin, &target.channels[k]).await?,
            None => {
                read_history_redis(target.redis_url.expect("redis"), &target.channels[k]).await?
            }
        };
        if top != n {
            check.mismatched += 1;
        }
        let mut entries = entries.into_iter().peekable();
        for a in acks.iter() {
            while entries.peek().is_some_and(|(o, _)| *o < a.offset) {
                entries.next();
            }
            match entries.peek() {
                Some((o, d)) if *o == a.offset => {
                    let want = (u64::from(a.publisher), a.seq);
                    let got = (
                        d["p"].as_u64().unwrap_or(u64::MAX),
                        d["s"].as_u64().unwrap_or(0),
                    );
                    if got != want {
                        check.mismatched += 1;
                    }
                }
                _ => check.missing += 1,
            }
        }
    }
    Ok(check)
}

async fn read_history_http(
    http: &reqwest::Client,
    origin: &str,
    channel: &str,
) -> Result<(u64, Vec<(u64, Value)>), String> {
    let mut since = 0u64;
    let mut out = Vec::new();
    loop {
        let url = format!("{origin}/api/history?channel={channel}&since={since}");
        let page: Value = http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let top = page["top"].as_u64().unwrap_or(0);
        let publications = page["publications"].as_array().cloned().unwrap_or_default();
        if publications.is_empty() {
            return Ok((top, out));
        }
        for p in publications {
            let offset = p["offset"].as_u64().unwrap_or(0);
            since = offset;
            out.push((offset, p["data"].clone()));
        }
        if since >= top {
            return Ok((top, out));
        }
    }
}

async fn read_history_redis(url: &str, channel: &str) -> Result<(u64, Vec<(u64, Value)>), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let base = format!("{PREFIX}:{{{channel}}}");
    let top: Option<u64> = redis::cmd("HGET")
        .arg(format!("{base}:m"))
        .arg("t")
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{base}:h"))
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        if reply.ids.is_empty() {
            break;
        }
        for entry in &reply.ids {
            let offset: u64 = entry
                .id
                .split('-')
                .next()
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            let d: String = entry.get("d").unwrap_or_default();
            out.push((offset, serde_json::from_str(&d).unwrap_or(Value::Null)));
            start = format!("{}-1", offset);
        }
    }
    Ok((top.unwrap_or(0), out))
}
