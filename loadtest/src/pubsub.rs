//! A publish/subscribe run, the engine of `fanout`, `latency` and `storm`: C subscribers over K
//! channels on chosen nodes, one publisher, optionally a node killed mid-run. Every subscriber
//! accounts each offset it gets (lost, duplicated, out of order), the publish→deliver latency,
//! deliveries over time, and — after a kill — when it reconnected and when it had caught up.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::net::{cpu_seconds_all, Sources};
use crate::progress;
use crate::publisher::{now_micros, Acked, PublishReport, Publisher};
use crate::stats::{new_histogram, record_clamped, OffsetTracker};
use crate::subscriber::{Event, Resume, Subscriber, Target, Transport};
use crate::system::{System, SystemKind};

/// Subscriptions opened at once.
const CONNECT_CONCURRENCY: usize = 256;
/// Latency histograms shared by the clients (a histogram is ~300 KiB: one per client would
/// make the load generator's memory and setup time grow with the client count).
const LATENCY_SHARDS: usize = 64;
/// SSE streams sharing one HTTP/2 connection.
const H2_STREAMS_PER_CONNECTION: usize = 100;

pub struct Params {
    pub clients: usize,
    pub channels: usize,
    /// Publications per second over all channels; 0 = as fast as accepted.
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
    pub transport: Transport,
    /// How long subscribers wait for the last publications after the publisher stopped.
    pub drain: Duration,
    /// Nodes the subscribers connect to, round-robin (indices into the system's nodes).
    pub subscribe_nodes: Vec<usize>,
    pub publish_node: usize,
    pub storm: Option<Storm>,
    /// Width of the timeline buckets.
    pub bucket: Duration,
}

/// A node killed during the run.
#[derive(Clone, Copy, Debug)]
pub struct Storm {
    pub victim: usize,
    pub signal: libc::c_int,
    /// Publishing time before the kill.
    pub after: Duration,
    /// Each client waits a random time up to this before reconnecting (unless the server hinted).
    pub jitter: Duration,
}

pub struct Outcome {
    pub clients_ready: usize,
    pub client_errors: u64,
    pub first_errors: Vec<String>,
    pub publish: PublishReport,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub not_recovered: u64,
    pub resets: u64,
    pub latency: Histogram<u64>,
    /// Deliveries per bucket from the first publish.
    pub timeline: Vec<u64>,
    /// Successful reconnects per bucket from the kill.
    pub reconnect_curve: Vec<u64>,
    pub reconnects: u64,
    /// Milliseconds from the kill until each reconnected client had every publication
    /// acknowledged before it reconnected.
    pub caught_up_ms: Histogram<u64>,
    /// Clients the kill disconnected that never caught up.
    pub not_caught_up: u64,
    /// CPU seconds the system's processes used while publishing and draining.
    pub server_cpu_s: f64,
    /// Seconds from the first publish until every subscriber finished.
    pub elapsed_s: f64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.client_errors == 0
            && self.publish.errors == 0
            && self.not_recovered == 0
            && self.not_caught_up == 0
    }
}

/// What every client task shares.
struct Shared {
    kind: SystemKind,
    transport: Transport,
    origins: Vec<String>,
    channels: Arc<Vec<String>>,
    acked: Arc<Acked>,
    http: Vec<reqwest::Client>,
    sources: Sources,
    connect_gate: Semaphore,
    publish_start: OnceLock<Instant>,
    kill_at: OnceLock<Instant>,
    bucket: Duration,
    drain: Duration,
    storm: Option<Storm>,
    latency: Vec<Mutex<Histogram<u64>>>,
}

#[derive(Default)]
struct ClientReport {
    tracker: Option<OffsetTracker>,
    timeline: Vec<u64>,
    reconnects: Vec<Duration>,
    caught_up: Option<Duration>,
    disconnected_by_kill: bool,
    not_recovered: u64,
    resets: u64,
    error: Option<String>,
}

pub async fn run(system: &mut System, p: &Params) -> Outcome {
    let tag = format!("lt{}", now_micros() % 1_000_000_000);
    let channels: Arc<Vec<String>> = Arc::new(
        (0..p.channels.max(1))
            .map(|i| format!("{tag}-{i}"))
            .collect(),
    );
    let publisher = Publisher::new(
        system.publish_url(p.publish_node),
        channels.clone(),
        p.payload,
    );
    let sources = Sources::for_connections(p.clients);
    let http = sse_clients(p.transport, p.clients, &sources);
    let shared = Arc::new(Shared {
        kind: system.kind,
        transport: p.transport,
        origins: system.nodes.iter().map(|n| n.http.clone()).collect(),
        channels: channels.clone(),
        acked: publisher.acked.clone(),
        http,
        sources,
        connect_gate: Semaphore::new(CONNECT_CONCURRENCY),
        publish_start: OnceLock::new(),
        kill_at: OnceLock::new(),
        bucket: p.bucket,
        drain: p.drain,
        storm: p.storm,
        latency: (0..LATENCY_SHARDS)
            .map(|_| Mutex::new(new_histogram()))
            .collect(),
    });

    // Subscribers.
    let (finals_tx, finals_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(1024);
    let mut handles = Vec::with_capacity(p.clients);
    for i in 0..p.clients {
        let home = p.subscribe_nodes[i % p.subscribe_nodes.len().max(1)];
        let (shared, finals, ready) = (shared.clone(), finals_rx.clone(), ready_tx.clone());
        handles.push(tokio::spawn(client(i, home, shared, finals, ready)));
    }
    drop(ready_tx);
    let bar = progress::counter(p.clients as u64, "subscribing");
    let (mut ready, mut client_errors) = (0usize, 0u64);
    let mut first_errors = Vec::new();
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(()) => ready += 1,
            Err(e) => {
                client_errors += 1;
                if first_errors.len() < 3 {
                    first_errors.push(e);
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Publisher, and the kill.
    let pids = system.pids();
    let cpu_before = cpu_seconds_all(&pids);
    let _ = shared.publish_start.set(Instant::now());
    let bar = progress::timer(p.duration, "publishing");
    let publish = {
        let publishing = publisher.run(p.rate, p.duration);
        tokio::pin!(publishing);
        if let Some(storm) = p.storm {
            tokio::select! {
                report = &mut publishing => report,
                _ = tokio::time::sleep(storm.after) => {
                    let _ = shared.kill_at.set(Instant::now());
                    if let Err(e) = system.signal(storm.victim, storm.signal) {
                        first_errors.push(e);
                        client_errors += 1;
                    }
                    publishing.await
                }
            }
        } else {
            publishing.await
        }
    };
    bar.finish_and_clear();
    let _ = finals_tx.send(Some(Arc::new(publisher.acked.snapshot())));

    // Collect.
    let bar = progress::counter(p.clients as u64, "draining");
    let mut out = Outcome {
        clients_ready: ready,
        client_errors,
        first_errors,
        publish,
        deliveries: 0,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        not_recovered: 0,
        resets: 0,
        latency: new_histogram(),
        timeline: Vec::new(),
        reconnect_curve: Vec::new(),
        reconnects: 0,
        caught_up_ms: Histogram::new_with_bounds(1, 3_600_000, 3).expect("bounds"),
        not_caught_up: 0,
        server_cpu_s: 0.0,
        elapsed_s: 0.0,
    };
    let finals = publisher.acked.snapshot();
    for (i, h) in handles.into_iter().enumerate() {
        let r = match h.await {
            Ok(r) => r,
            Err(e) => ClientReport {
                error: Some(format!("task: {e}")),
                ..Default::default()
            },
        };
        bar.inc(1);
        if let Some(e) = r.error {
            out.client_errors += 1;
            if out.first_errors.len() < 3 {
                out.first_errors.push(e);
            }
        }
        if let Some(t) = &r.tracker {
            out.deliveries += t.received - t.duplicated;
            out.duplicated += t.duplicated;
            out.out_of_order += t.out_of_order;
            out.lost += t.lost(finals[i % finals.len()]);
        }
        add_into(&mut out.timeline, &r.timeline);
        for at in &r.reconnects {
            let b = (at.as_secs_f64() / p.bucket.as_secs_f64()) as usize;
            if out.reconnect_curve.len() <= b {
                out.reconnect_curve.resize(b + 1, 0);
            }
            out.reconnect_curve[b] += 1;
        }
        out.reconnects += r.reconnects.len() as u64;
        out.not_recovered += r.not_recovered;
        out.resets += r.resets;
        match (r.disconnected_by_kill, r.caught_up) {
            (_, Some(d)) => record_clamped(&mut out.caught_up_ms, d.as_millis() as u64),
            (true, None) => out.not_caught_up += 1,
            (false, None) => {}
        }
    }
    bar.finish_and_clear();
    for shard in &shared.latency {
        let h = shard.lock().expect("not poisoned");
        out.latency.add(&*h).expect("same bounds");
    }
    out.server_cpu_s = cpu_seconds_all(&pids) - cpu_before;
    out.elapsed_s = shared
        .publish_start
        .get()
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    out
}

fn add_into(total: &mut Vec<u64>, part: &[u64]) {
    if total.len() < part.len() {
        total.resize(part.len(), 0);
    }
    for (t, p) in total.iter_mut().zip(part) {
        *t += p;
    }
}

/// HTTP clients for SSE: one per source address over HTTP/1.1 (a connection per stream), or one
/// per `H2_STREAMS_PER_CONNECTION` streams over HTTP/2.
pub fn sse_clients(
    transport: Transport,
    clients: usize,
    sources: &Sources,
) -> Vec<reqwest::Client> {
    // With one source address there is nothing to choose: connect unbound. reqwest binds its
    // local address before connecting, and a port taken by bind() is skipped by every later
    // connect()'s choice of port (from any address) until its socket is gone, TIME_WAIT
    // included: after a 19,000-stream run the next run found ~9,000 ports and failed.
    let spread = sources.all().len() > 1;
    let build = |h2: bool, source| {
        let b = reqwest::Client::builder()
            .local_address(spread.then_some(source))
            .tcp_nodelay(true);
        // Over HTTP/2 the pool is what shares one connection among the client's streams: with
        // it disabled (no idle connections kept), every stream opened its own connection.
        let b = if h2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only().pool_max_idle_per_host(0)
        };
        b.build().expect("http client")
    };
    match transport {
        Transport::Ws => Vec::new(),
        Transport::Sse => sources.all().iter().map(|s| build(false, *s)).collect(),
        Transport::SseH2 => (0..clients.div_ceil(H2_STREAMS_PER_CONNECTION).max(1))
            .map(|_| build(true, sources.pick()))
            .collect(),
    }
}

/// The HTTP client SSE subscriber `i` uses (`None` for WebSocket).
pub fn sse_client_for(
    transport: Transport,
    clients: &[reqwest::Client],
    i: usize,
) -> Option<&reqwest::Client> {
    match transport {
        Transport::Ws => None,
        Transport::Sse => Some(&clients[i % clients.len()]),
        Transport::SseH2 => Some(&clients[i / H2_STREAMS_PER_CONNECTION]),
    }
}

/// A small per-client random source for reconnect jitter.
struct Jitter(u64);

impl Jitter {
    fn upto(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 10_000) as f64 / 10_000.0)
    }
}

async fn client(
    id: usize,
    home: usize,
    shared: Arc<Shared>,
    mut finals: watch::Receiver<Option<Arc<Vec<u64>>>>,
    ready: mpsc::Sender<Result<(), String>>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let channel = id % shared.channels.len();
    let mut node = home;
    let http = sse_client_for(shared.transport, &shared.http, id);
    let source = shared.sources.pick();
    let target = |node: usize| Target {
        kind: shared.kind,
        transport: shared.transport,
        origin: &shared.origins[node],
        channel: &shared.channels[channel],
        source,
        http,
    };
    let first = {
        let _permit = shared.connect_gate.acquire().await.expect("open");
        tokio::time::timeout(
            Duration::from_secs(30),
            Subscriber::connect(&target(node), &Resume::Fresh),
        )
        .await
        .unwrap_or_else(|_| Err("subscribe timed out".into()))
    };
    let (mut sub, subscribed) = match first {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return report;
        }
    };
    let _ = ready.send(Ok(())).await;
    drop(ready);
    let mut tracker = OffsetTracker::new(subscribed.base);
    let latency = &shared.latency[id % LATENCY_SHARDS];
    let mut jitter = Jitter(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
    let mut target_offset: Option<u64> = None;
    // After a reconnect: the offset to reach to count as caught up.
    let mut catching_up: Option<u64> = None;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
    loop {
        if let Some(t) = target_offset {
            if tracker.complete_up_to(t) {
                break;
            }
        }
        tokio::select! {
            event = sub.next() => match event {
                Event::Publication { offset, ts_us } => {
                    tracker.record(offset);
                    let now = Instant::now();
                    if let Some(start) = shared.publish_start.get() {
                        let b = (now.saturating_duration_since(*start).as_secs_f64()
                            / shared.bucket.as_secs_f64()) as usize;
                        if report.timeline.len() <= b {
                            report.timeline.resize(b + 1, 0);
                        }
                        report.timeline[b] += 1;
                    }
                    // Latency of live deliveries only: after a kill, replayed history is not.
                    if let (Some(ts), None) = (ts_us, shared.kill_at.get()) {
                        let mut h = latency.lock().expect("not poisoned");
                        record_clamped(&mut h, now_micros().saturating_sub(ts));
                    }
                    if let Some(goal) = catching_up {
                        if tracker.complete_up_to(goal) {
                            report.caught_up = shared.kill_at.get().map(|k| k.elapsed());
                            catching_up = None;
                        }
                    }
                }
                Event::Reset => report.resets += 1,
                Event::Closed { reason, reconnect_ms } => {
                    if shared.storm.is_none() {
                        report.error = Some(reason);
                        break;
                    }
                    if shared.kill_at.get().is_some() {
                        report.disconnected_by_kill = true;
                    }
                    // The server's drain hint, else a random share of the jitter window.
                    let storm = shared.storm.expect("checked");
                    let wait = reconnect_ms
                        .map(Duration::from_millis)
                        .unwrap_or_else(|| jitter.upto(storm.jitter));
                    tokio::time::sleep(wait).await;
                    match reconnect(&shared, &target, id, &mut node, sub.resume(), &mut jitter).await {
                        Ok((s, subscribed)) => {
                            sub = s;
                            if subscribed.recovered == Some(false) {
                                report.not_recovered += 1;
                            }
                            let since_kill = shared.kill_at.get().map(|k| k.elapsed()).unwrap_or_default();
                            report.reconnects.push(since_kill);
                            let goal = shared.acked.get(channel);
                            if tracker.complete_up_to(goal) {
                                report.caught_up = Some(since_kill);
                                catching_up = None;
                            } else {
                                catching_up = Some(goal);
                            }
                        }
                        Err(e) => {
                            report.error = Some(e);
                            break;
                        }
                    }
                }
            },
            changed = finals.changed(), if target_offset.is_none() => {
                target_offset = match changed {
                    Ok(()) => finals.borrow().as_ref().map(|f| f[channel]),
                    Err(_) => Some(u64::MAX),
                };
                deadline = tokio::time::Instant::now() + shared.drain;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    sub.close().await;
    report.tracker = Some(tracker);
    report
}

/// Reconnects to the other nodes in turn, backing off exponentially (with jitter) while they refuse.
async fn reconnect<'a>(
    shared: &'a Shared,
    target: &impl Fn(usize) -> Target<'a>,
    id: usize,
    node: &mut usize,
    resume: Resume,
    jitter: &mut Jitter,
) -> Result<(Subscriber, crate::subscriber::Subscribed), String> {
    let mut backoff = Duration::from_millis(50);
    let mut last_error = String::new();
    let n = shared.origins.len();
    // The first try spreads a node's clients over all the others; then each next node in turn.
    *node = (*node + id % n.saturating_sub(1).max(1)) % n;
    for _attempt in 0..40 {
        *node = (*node + 1) % n;
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            Subscriber::connect(&target(*node), &resume),
        )
        .await
        .unwrap_or_else(|_| Err("resubscribe timed out".into()));
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last_error = e,
        }
        tokio::time::sleep(jitter.upto(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    Err(format!("gave up reconnecting: {last_error}"))
}

impl Outcome {
    /// The result fields every publish/subscribe scenario reports.
    pub fn to_json(&self, p: &Params) -> serde_json::Value {
        let secs = self.elapsed_s.max(1e-9);
        let caught = &self.caught_up_ms;
        let ms_q = |q: f64| (!caught.is_empty()).then(|| caught.value_at_quantile(q));
        serde_json::json!({
            "ok": self.ok(),
            "transport": p.transport,
            "clients": p.clients,
            "clients_ready": self.clients_ready,
            "client_errors": self.client_errors,
            "first_errors": self.first_errors,
            "channels": p.channels,
            "rate_target": p.rate,
            "duration_s": p.duration.as_secs_f64(),
            "payload_bytes": p.payload,
            "publications": self.publish.published,
            "publish_errors": self.publish.errors,
            "first_publish_error": self.publish.first_error,
            "publish_rate": round2(self.publish.published as f64 / self.publish.elapsed.as_secs_f64().max(1e-9)),
            "deliveries": self.deliveries,
            "deliveries_per_s": round2(self.deliveries as f64 / secs),
            "server_cpu_s": round2(self.server_cpu_s),
            "deliveries_per_cpu_s": (self.server_cpu_s > 0.0).then(|| (self.deliveries as f64 / self.server_cpu_s).round()),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "latency": crate::stats::latency_summary(&self.latency),
            "timeline": {
                "bucket_ms": p.bucket.as_millis() as u64,
                "deliveries": self.timeline,
            },
            "storm": p.storm.map(|s| serde_json::json!({
                "victim": s.victim,
                "signal": if s.signal == libc::SIGKILL { "kill" } else { "term" },
                "kill_after_s": s.after.as_secs_f64(),
                "jitter_ms": s.jitter.as_millis() as u64,
                "reconnects": self.reconnects,
                "not_recovered": self.not_recovered,
                "resets": self.resets,
                "caught_up_clients": caught.len(),
                "not_caught_up": self.not_caught_up,
                "all_caught_up_ms": ms_q(1.0),
                "caught_up_p50_ms": ms_q(0.5),
                "caught_up_p99_ms": ms_q(0.99),
                "reconnect_curve": self.reconnect_curve,
            })),
        })
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
