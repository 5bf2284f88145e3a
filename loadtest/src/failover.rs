//! `failover`: a Redis Sentinel failover under load. The tool starts a master, its replicas, 3
//! sentinels and gateway nodes on Sentinel; WebSocket subscribers spread over the nodes and one
//! publisher per channel (HTTP, rotating over the nodes, retrying a refused publish with its
//! `idempotency_key`) run while the master is killed with SIGKILL. Reports the time until
//! publishing recovered, the time until every subscriber received a publication made after the
//! kill, and lost (acknowledged but neither delivered nor covered by a reset), duplicated and
//! reset counts. `publish-latency` measures what `redis.min_replicas_acked` costs a publish.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::stats;
use testkit::GatewayProcess;

const MASTER_NAME: &str = "loadtest";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Gateway nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Replicas of the master.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// WebSocket subscribers, spread over nodes and channels.
    #[arg(long, default_value_t = 24)]
    pub clients: usize,
    /// Publications per second per channel (each channel's publisher waits for every answer).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of publishing in all.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds of publishing before the master is killed.
    #[arg(long, default_value_t = 5.0)]
    pub kill_after: f64,
    /// `redis.min_replicas_acked` of the nodes.
    #[arg(long, default_value_t = 1)]
    pub min_replicas_acked: u32,
    /// Sentinel `down-after-milliseconds`.
    #[arg(long, default_value_t = 1000)]
    pub down_after_ms: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    /// Sequential publishes per setting.
    #[arg(long, default_value_t = 2000)]
    pub publishes: usize,
    /// Replicas of the master (the largest `min_replicas_acked` measured).
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A redis-server or redis-sentinel started for the run; killed when dropped.
struct Proc {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_dir(name: &str, port: u16) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("loadtest-{name}-{port}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

async fn redis_server(replica_of: Option<u16>) -> Result<Proc, String> {
    let port = testkit::free_port(false);
    let dir = run_dir("redis", port)?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(&dir);
    if let Some(master) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
    let server = Proc {
        child: Some(child),
        port,
        dir,
    };
    until(
        &format!("redis-server :{port} to answer PING"),
        || async move { cli(port, &["ping"]).await == "PONG" },
    )
    .await?;
    Ok(server)
}

async fn redis_sentinel(master: u16, quorum: usize, down_after_ms: u64) -> Result<Proc, String> {
    let port = testkit::free_port(false);
    let dir = run_dir("sentinel", port)?;
    let d = dir.display();
    let conf = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {d}\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master} {quorum}\n\
         sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
         sentinel failover-timeout {MASTER_NAME} {}\n\
         sentinel parallel-syncs {MASTER_NAME} 2\n",
        down_after_ms * 5
    );
    let path = dir.join("sentinel.conf");
    std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
    let child = Command::new("redis-sentinel")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start redis-sentinel (apt-get install redis-sentinel): {e}")
        })?;
    let sentinel = Proc {
        child: Some(child),
        port,
        dir,
    };
    until(
        &format!("redis-sentinel :{port} to answer PING"),
        || async move { cli(port, &["ping"]).await == "PONG" },
    )
    .await?;
    Ok(sentinel)
}

/// `redis-cli -p port args…`, trimmed stdout ("" if it cannot run).
async fn cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await;
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Polls `cond` until true, for at most 60 s.
async fn until<F, Fut>(what: &str, mut cond: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_replicas_in_sync(replicas: &[Proc]) -> Result<(), String> {
    for r in replicas {
        let port = r.port;
        until(&format!("replica :{port} in sync"), || async move {
            cli(port, &["info", "replication"])
                .await
                .contains("master_link_status:up")
        })
        .await?;
    }
    Ok(())
}

/// The master, its replicas and the sentinels of one run.
struct RedisSet {
    servers: Vec<Proc>,
    sentinels: Vec<Proc>,
}

impl RedisSet {
    async fn start(replicas: usize, sentinels: usize, down_after_ms: u64) -> Result<Self, String> {
        let master = redis_server(None).await?;
        let mut servers = vec![master];
        for _ in 0..replicas {
            servers.push(redis_server(Some(servers[0].port)).await?);
        }
        wait_replicas_in_sync(&servers[1..]).await?;
        let mut set = RedisSet {
            servers,
            sentinels: Vec::new(),
        };
        for _ in 0..sentinels {
            let s = redis_sentinel(set.servers[0].port, sentinels / 2 + 1, down_after_ms).await?;
            set.sentinels.push(s);
        }
        for s in &set.sentinels {
            let port = s.port;
            let (want_replicas, want_others) = (replicas, sentinels - 1);
            until(
                &format!("sentinel :{port} to see the whole set"),
                || async move {
                    let out = cli(port, &["sentinel", "master", MASTER_NAME]).await;
                    let lines: Vec<&str> = out.lines().collect();
                    let field = |name: &str| {
                        lines
                            .chunks(2)
                            .find(|p| p[0] == name)
                            .and_then(|p| p.get(1))
                            .and_then(|v| v.parse::<usize>().ok())
                    };
                    field("num-slaves") == Some(want_replicas)
                        && field("num-other-sentinels") == Some(want_others)
                },
            )
            .await?;
        }
        Ok(set)
    }

    fn sentinel_nodes(&self) -> String {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        nodes.join(",")
    }

    async fn master_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let out = cli(
                s.port,
                &["sentinel", "get-master-addr-by-name", MASTER_NAME],
            )
            .await;
            if let Some(port) = out.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                return Some(port);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Publishers and subscribers
// ---------------------------------------------------------------------------------------------

/// One acknowledged publication of a channel.
#[derive(Clone, Debug)]
struct Ack {
    epoch: String,
    offset: u64,
    i: u64,
}

#[derive(Default)]
struct ChannelLog {
    acks: Vec<Ack>,
    /// When the first publish started after the kill was acknowledged, and its `i`.
    first_after_kill: Option<(Instant, u64)>,
}

/// One channel's publisher: `{"i": i}` with key `<channel>-<i>`, retried until acknowledged.
#[allow(clippy::too_many_arguments)]
async fn publish_channel(
    http: reqwest::Client,
    origins: Arc<Vec<String>>,
    channel: String,
    rate: f64,
    until: Instant,
    killed_at: Arc<Mutex<Option<Instant>>>,
    log: Arc<Mutex<ChannelLog>>,
    refused: Arc<AtomicU64>,
) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut attempt = 0usize;
    let mut next = Instant::now();
    for i in 0u64.. {
        if Instant::now() >= until {
            return;
        }
        let started = Instant::now();
        let body = json!({"channel": channel, "data": {"i": i},
                          "idempotency_key": format!("{channel}-{i}")})
        .to_string();
        loop {
            let origin = &origins[attempt % origins.len()];
            attempt += 1;
            let answer = http
                .post(format!("{origin}/api/publish"))
                .header("content-type", "application/json")
                .body(body.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let acked = match answer {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            };
            if let Some(ack) = acked {
                let mut log = log.lock().unwrap();
                log.acks.push(Ack {
                    epoch: ack["epoch"].as_str().unwrap_or("").to_string(),
                    offset: ack["offset"].as_u64().unwrap_or(0),
                    i,
                });
                let kill = *killed_at.lock().unwrap();
                if log.first_after_kill.is_none() && kill.is_some_and(|k| started > k) {
                    log.first_after_kill = Some((Instant::now(), i));
                }
                break;
            }
            refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        next += period;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else {
            next = now;
        }
    }
}

enum Item {
    Pub { epoch: String, offset: u64, i: u64 },
    Reset,
}

#[derive(Default)]
struct SubLog {
    /// The position the subscription started at.
    start: Option<(String, u64)>,
    items: Vec<(Instant, Item)>,
    ended: Option<String>,
}

async fn subscribe(
    origin: String,
    channel: String,
    log: Arc<Mutex<SubLog>>,
    stop: Arc<AtomicBool>,
) {
    let url = format!("{}/ws", origin.replacen("http", "ws", 1));
    let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            log.lock().unwrap().ended = Some(format!("connect: {e}"));
            return;
        }
    };
    let op = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    if let Err(e) = ws.send(Message::text(op)).await {
        log.lock().unwrap().ended = Some(format!("send: {e}"));
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            Ok(other) => {
                log.lock().unwrap().ended = Some(format!("{other:?}"));
                return;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(msg.as_str()) else {
            continue;
        };
        let now = Instant::now();
        let mut log = log.lock().unwrap();
        if let Some(result) = v.get("result") {
            log.start = Some((
                result["epoch"].as_str().unwrap_or("").to_string(),
                result["offset"].as_u64().unwrap_or(0),
            ));
        } else if v.get("error").is_some() {
            log.ended = Some(format!("subscribe refused: {v}"));
            return;
        } else if v.get("reset").is_some() {
            log.items.push((now, Item::Reset));
        } else if let (Some(epoch), Some(offset), Some(i)) = (
            v["epoch"].as_str(),
            v["offset"].as_u64(),
            v["data"]["i"].as_u64(),
        ) {
            log.items.push((
                now,
                Item::Pub {
                    epoch: epoch.to_string(),
                    offset,
                    i,
                },
            ));
        }
    }
    let _ = ws.close(None).await;
}

/// What one subscriber's log says about its channel's acks after its start position.
#[derive(Default)]
struct Verdict {
    lost: u64,
    covered: u64,
    duplicated: u64,
    resets: u64,
}

fn verdict(log: &SubLog, acks: &[Ack]) -> Verdict {
    let mut v = Verdict::default();
    let mut delivered: HashMap<(&str, u64), (usize, u64)> = HashMap::new();
    let mut seen_i: HashMap<u64, u32> = HashMap::new();
    let mut resets = Vec::new();
    for (index, (_, item)) in log.items.iter().enumerate() {
        match item {
            Item::Pub { epoch, offset, i } => {
                delivered.insert((epoch.as_str(), *offset), (index, *i));
                let n = seen_i.entry(*i).or_default();
                *n += 1;
                if *n > 1 {
                    v.duplicated += 1;
                }
            }
            Item::Reset => resets.push(index),
        }
    }
    v.resets = resets.len() as u64;
    let Some((start_epoch, start_offset)) = &log.start else {
        return v;
    };
    for a in acks {
        if a.epoch == *start_epoch && a.offset <= *start_offset {
            continue;
        }
        match delivered.get(&(a.epoch.as_str(), a.offset)) {
            Some((_, i)) if *i == a.i => {}
            found => {
                // Not delivered, or another publication under its position: fine only after a
                // reset that follows the last publication delivered before it.
                let before = found.map(|(index, _)| *index).or_else(|| {
                    delivered
                        .iter()
                        .filter(|((e, o), _)| *e == a.epoch && *o < a.offset)
                        .map(|(_, (index, _))| *index)
                        .max()
                });
                if found.is_none() && resets.iter().any(|&r| before.is_none_or(|b| r > b)) {
                    v.covered += 1;
                } else {
                    v.lost += 1;
                }
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

async fn start_nodes(
    bin: &Path,
    n: usize,
    args: Vec<String>,
) -> Result<Vec<GatewayProcess>, String> {
    let mut nodes = Vec::new();
    for k in 0..n {
        nodes.push(GatewayProcess::try_start(bin, &format!("node{k}"), &args, &[]).await?);
    }
    Ok(nodes)
}

pub async fn run(bin: &Path, a: &Args) -> Result<Vec<Value>, String> {
    if a.nodes == 0 || a.channels == 0 || a.clients == 0 {
        return Err("failover needs at least one node, channel and client".into());
    }
    let mut set = RedisSet::start(a.replicas, 3, a.down_after_ms).await?;
    let nodes = start_nodes(
        bin,
        a.nodes,
        vec![
            "--redis-sentinel-nodes".into(),
            set.sentinel_nodes(),
            "--redis-sentinel-master".into(),
            MASTER_NAME.into(),
            "--redis-min-replicas-acked".into(),
            a.min_replicas_acked.to_string(),
        ],
    )
    .await?;
    let origins: Arc<Vec<String>> =
        Arc::new(nodes.iter().map(|n| format!("http://{}", n.addr)).collect());
    let channels: Vec<String> = (0..a.channels).map(|c| format!("failover-{c}")).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    for k in 0..a.clients {
        let log = Arc::new(Mutex::new(SubLog::default()));
        let channel = k % a.channels;
        tokio::spawn(subscribe(
            origins[k % origins.len()].clone(),
            channels[channel].clone(),
            log.clone(),
            stop.clone(),
        ));
        subs.push((channel, log));
    }
    until("every subscriber to be subscribed", || async {
        subs.iter().all(|(_, l)| {
            let l = l.lock().unwrap();
            l.start.is_some() || l.ended.is_some()
        })
    })
    .await?;

    let http = reqwest::Client::new();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let publish_until = Instant::now() + crate::secs(a.duration);
    let mut logs = Vec::new();
    let mut publishers = Vec::new();
    for channel in &channels {
        let log = Arc::new(Mutex::new(ChannelLog::default()));
        publishers.push(tokio::spawn(publish_channel(
            http.clone(),
            origins.clone(),
            channel.clone(),
            a.rate,
            publish_until,
            killed_at.clone(),
            log.clone(),
            refused.clone(),
        )));
        logs.push(log);
    }

    tokio::time::sleep(crate::secs(a.kill_after)).await;
    let old = set
        .master_port()
        .await
        .ok_or("no master named by the sentinels")?;
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);
    if let Some(p) = set.servers.iter_mut().find(|p| p.port == old) {
        p.kill9();
    }
    eprintln!("failover: killed the master :{old}");
    for p in publishers {
        let _ = p.await;
    }
    let new = set.master_port().await;

    // Drain: every subscriber has the last ack of its channel (or was reset past it).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = subs.iter().all(|(c, log)| {
            let last = logs[*c].lock().unwrap().acks.last().cloned();
            let log = log.lock().unwrap();
            log.ended.is_some()
                || last.is_none_or(|l| {
                    log.items.iter().any(|(_, item)| match item {
                        Item::Pub { epoch, offset, .. } => *epoch == l.epoch && *offset >= l.offset,
                        Item::Reset => false,
                    })
                })
        });
        if done || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = Verdict::default();
    let mut caught_up: Option<Duration> = Some(Duration::ZERO);
    let mut ended = 0;
    for (c, log) in &subs {
        let log = log.lock().unwrap();
        let channel = logs[*c].lock().unwrap();
        let v = verdict(&log, &channel.acks);
        total.lost += v.lost;
        total.covered += v.covered;
        total.duplicated += v.duplicated;
        total.resets += v.resets;
        ended += u64::from(log.ended.is_some());
        // When this subscriber first received a publication published after the kill.
        let got = channel.first_after_kill.and_then(|(_, first)| {
            log.items.iter().find_map(|(at, item)| match item {
                Item::Pub { i, .. } if *i >= first => Some(at.duration_since(kill)),
                _ => None,
            })
        });
        caught_up = match (caught_up, got) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let recovered = logs
        .iter()
        .map(|l| {
            l.lock()
                .unwrap()
                .first_after_kill
                .map(|(at, _)| at.duration_since(kill))
        })
        .collect::<Option<Vec<_>>>()
        .and_then(|v| v.into_iter().max());
    let acked: usize = logs.iter().map(|l| l.lock().unwrap().acks.len()).sum();
    let ms = |d: Option<Duration>| d.map_or(Value::Null, |d| json!(d.as_millis() as u64));
    Ok(vec![json!({
        "scenario": "failover",
        "nodes": a.nodes,
        "replicas": a.replicas,
        "min_replicas_acked": a.min_replicas_acked,
        "clients": a.clients,
        "channels": a.channels,
        "publish_rate": a.rate * a.channels as f64,
        "acked": acked,
        "refused_retried": refused.load(Ordering::Relaxed),
        "old_master": old,
        "new_master": new,
        "publishing_recovered_ms": ms(recovered),
        "all_caught_up_ms": ms(caught_up),
        "lost": total.lost,
        "duplicated": total.duplicated,
        "resets": total.resets,
        "covered_by_reset": total.covered,
        "subscribers_ended": ended,
        "ok": total.lost == 0 && ended == 0 && recovered.is_some() && caught_up.is_some(),
    })])
}

/// Sequential publishes through one node on a master with `replicas` replicas, for each
/// `min_replicas_acked` from 0 to `replicas`: p50 / p99 / max of the publish round trip.
pub async fn run_latency(bin: &Path, a: &LatencyArgs) -> Result<Vec<Value>, String> {
    let master = redis_server(None).await?;
    let mut replicas = Vec::new();
    for _ in 0..a.replicas {
        replicas.push(redis_server(Some(master.port)).await?);
    }
    wait_replicas_in_sync(&replicas).await?;
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    for n in 0..=a.replicas as u32 {
        let node = start_nodes(
            bin,
            1,
            vec![
                "--redis-url".into(),
                format!("redis://127.0.0.1:{}", master.port),
                "--redis-min-replicas-acked".into(),
                n.to_string(),
            ],
        )
        .await?
        .remove(0);
        let url = node.url("/api/publish");
        let channel = format!("latency-{n}");
        let mut histogram = stats::new_histogram();
        let mut refused = 0u64;
        for i in 0..a.publishes {
            let body = json!({"channel": channel, "data": {"i": i}}).to_string();
            let started = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| format!("publish: {e}"))?;
            let ok = r.status().is_success();
            let _ = r.bytes().await;
            if ok {
                stats::record_clamped(&mut histogram, started.elapsed().as_micros() as u64);
            } else {
                refused += 1;
            }
        }
        rows.push(json!({
            "scenario": "publish-latency",
            "replicas": a.replicas,
            "min_replicas_acked": n,
            "publishes": a.publishes,
            "refused": refused,
            "latency": stats::latency_summary(&histogram),
            "ok": refused == 0,
        }));
    }
    Ok(rows)
}
