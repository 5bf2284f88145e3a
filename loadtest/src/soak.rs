//! `soak`: one gateway node under mixed load for a long time. Subscribers churn — each, every
//! few seconds on average, either drops its connection and resumes from its position, or leaves
//! and subscribes afresh — while one publisher publishes at a steady rate. Every 10 s the node's
//! RSS, open file descriptors and `gateway_queued_bytes` are sampled. At the end every subscriber
//! must have every publication after each (re)subscribe exactly once, or an explicit reset; and
//! the samples must stay flat (last third's mean within a stated tolerance of the middle third's).
//! This module owns the churning client, the sampler and the flatness verdict.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::net::{cpu_seconds_all, vm_rss, Sources};
use crate::publisher::{now_micros, Publisher};
use crate::stats::OffsetTracker;
use crate::subscriber::{Event, Resume, Subscriber, Target, Transport};
use crate::system::{Spec, System, SystemKind};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 1800.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value_t = 20)]
    pub channels: usize,
    /// Publications per second over all channels.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Mean seconds between two churn events of one subscriber (a reconnect with resume, or an
    /// unsubscribe followed by a fresh subscribe).
    #[arg(long, default_value_t = 20.0)]
    pub churn_every: f64,
    /// Seconds between samples of RSS, file descriptors and queued bytes.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
    /// Use a Redis backplane (started by the tool) instead of the embedded one.
    #[arg(long)]
    pub redis: bool,
}

/// Flatness tolerances: the last third's mean may exceed the middle third's by this share plus
/// this many units.
const RSS_TOLERANCE: (f64, f64) = (0.10, 4.0 * 1024.0 * 1024.0);
const FD_TOLERANCE: (f64, f64) = (0.05, 20.0);
const QUEUED_TOLERANCE: (f64, f64) = (0.10, 256.0 * 1024.0);

#[derive(Default, Debug, Clone)]
struct ClientReport {
    /// Publications received once after a (re)subscribe, summed over the client's sessions.
    deliveries: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    resets: u64,
    not_recovered: u64,
    resumes: u64,
    fresh_subscribes: u64,
    error: Option<String>,
}

impl ClientReport {
    /// Closes one session's accounting: everything up to `last` must have arrived.
    fn settle(&mut self, t: &OffsetTracker, last: u64) {
        self.deliveries += t.received - t.duplicated;
        self.duplicated += t.duplicated;
        self.out_of_order += t.out_of_order;
        self.lost += t.lost(last);
    }
}

pub async fn run(gateway_bin: Option<std::path::PathBuf>, a: &Args) -> Result<Value, String> {
    let system = System::start(&Spec {
        kind: SystemKind::Gateway,
        nodes: 1,
        redis: a.redis,
        echo: false,
        gateway_bin,
    })
    .await?;
    let pid = system.pids()[0];
    let origin = system.nodes[0].http.clone();
    let tag = format!("soak{}", now_micros() % 1_000_000_000);
    let channels: Arc<Vec<String>> = Arc::new(
        (0..a.channels.max(1))
            .map(|i| format!("{tag}-{i}"))
            .collect(),
    );
    let publisher = Publisher::new(system.publish_url(0), channels.clone(), 0);
    let sources = Arc::new(Sources::for_connections(a.clients));
    let (stop_tx, stop_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let mut handles = Vec::with_capacity(a.clients);
    for id in 0..a.clients {
        let c = ClientSpec {
            id,
            origin: origin.clone(),
            channel: channels[id % channels.len()].clone(),
            channel_index: id % channels.len(),
            transport: a.transport,
            source: sources.pick(),
            churn_every: crate::secs(a.churn_every),
        };
        handles.push(tokio::spawn(client(c, stop_rx.clone())));
    }

    let cpu_before = cpu_seconds_all(&[pid]);
    let start = Instant::now();
    let duration = crate::secs(a.duration);
    let sampler = tokio::spawn(sample(
        pid,
        origin.clone(),
        crate::secs(a.sample_every),
        start + duration,
    ));
    let publish = publisher.run(a.rate, duration).await;
    let samples = sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let finals = Arc::new(publisher.acked.snapshot());
    let _ = stop_tx.send(Some(finals));

    let mut total = ClientReport::default();
    let mut errors = 0u64;
    let mut first_errors: Vec<String> = Vec::new();
    for h in handles {
        let r = h.await.unwrap_or_else(|e| ClientReport {
            error: Some(format!("task: {e}")),
            ..Default::default()
        });
        total.deliveries += r.deliveries;
        total.lost += r.lost;
        total.duplicated += r.duplicated;
        total.out_of_order += r.out_of_order;
        total.resets += r.resets;
        total.not_recovered += r.not_recovered;
        total.resumes += r.resumes;
        total.fresh_subscribes += r.fresh_subscribes;
        if let Some(e) = r.error {
            errors += 1;
            if first_errors.len() < 3 {
                first_errors.push(e);
            }
        }
    }
    let server_cpu_s = cpu_seconds_all(&[pid]) - cpu_before;
    let elapsed = start.elapsed().as_secs_f64();
    drop(system);

    let series = |key: &str| -> Vec<f64> {
        samples
            .iter()
            .filter_map(|s| s[key].as_f64())
            .collect::<Vec<_>>()
    };
    let flat = json!({
        "rss_bytes": flatness(&series("rss_bytes"), RSS_TOLERANCE),
        "fds": flatness(&series("fds"), FD_TOLERANCE),
        "queued_bytes": flatness(&series("queued_bytes"), QUEUED_TOLERANCE),
    });
    let all_flat = ["rss_bytes", "fds", "queued_bytes"]
        .iter()
        .all(|k| flat[k]["flat"] == true);
    let zero_loss = total.lost == 0 && total.duplicated == 0 && total.out_of_order == 0;
    let ok = zero_loss && all_flat && errors == 0 && publish.errors == 0;
    Ok(json!({
        "scenario": "soak",
        "system": "gateway",
        "backplane": if a.redis { "redis" } else { "embedded" },
        "ok": ok,
        "transport": a.transport,
        "duration_s": a.duration,
        "clients": a.clients,
        "channels": a.channels,
        "rate_target": a.rate,
        "churn_every_s": a.churn_every,
        "publications": publish.published,
        "publish_errors": publish.errors,
        "first_publish_error": publish.first_error,
        "publish_rate": crate::pubsub::round2(publish.published as f64 / publish.elapsed.as_secs_f64().max(1e-9)),
        "deliveries": total.deliveries,
        "deliveries_per_s": crate::pubsub::round2(total.deliveries as f64 / elapsed.max(1e-9)),
        "resumes": total.resumes,
        "fresh_subscribes": total.fresh_subscribes,
        "resets": total.resets,
        "not_recovered": total.not_recovered,
        "lost": total.lost,
        "duplicated": total.duplicated,
        "out_of_order": total.out_of_order,
        "client_errors": errors,
        "first_errors": first_errors,
        "server_cpu_s": crate::pubsub::round2(server_cpu_s),
        "flat": flat,
        "tolerances": {
            "rss": format!("+{}% + {} MiB", RSS_TOLERANCE.0 * 100.0, RSS_TOLERANCE.1 / 1048576.0),
            "fds": format!("+{}% + {}", FD_TOLERANCE.0 * 100.0, FD_TOLERANCE.1),
            "queued_bytes": format!("+{}% + {} KiB", QUEUED_TOLERANCE.0 * 100.0, QUEUED_TOLERANCE.1 / 1024.0),
        },
        "samples": samples,
    }))
}

/// The last third's mean against the middle third's (the first third is warm-up).
fn flatness(xs: &[f64], (share, units): (f64, f64)) -> Value {
    if xs.len() < 3 {
        return json!({"flat": Value::Null, "samples": xs.len()});
    }
    let third = xs.len() / 3;
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let middle = mean(&xs[third..2 * third]);
    let last = mean(&xs[2 * third..]);
    json!({
        "flat": last <= middle * (1.0 + share) + units,
        "middle_third_mean": crate::pubsub::round2(middle),
        "last_third_mean": crate::pubsub::round2(last),
        "max": xs.iter().copied().fold(0.0, f64::max),
    })
}

/// Samples the node every `every` until `until`.
async fn sample(pid: u32, origin: String, every: Duration, until: Instant) -> Vec<Value> {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .ok();
        let queued = queued_bytes(&http, &origin).await;
        out.push(json!({
            "t_s": crate::pubsub::round2(start.elapsed().as_secs_f64()),
            "rss_bytes": vm_rss(pid),
            "fds": fds,
            "queued_bytes": queued,
        }));
        if Instant::now() + every > until + Duration::from_millis(500) {
            return out;
        }
    }
}

async fn queued_bytes(http: &reqwest::Client, origin: &str) -> Option<u64> {
    let text = http
        .get(format!("{origin}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric(&text, "gateway_queued_bytes")
}

/// The value of an unlabelled metric in the Prometheus text format.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

struct ClientSpec {
    id: usize,
    origin: String,
    channel: String,
    channel_index: usize,
    transport: Transport,
    source: std::net::IpAddr,
    churn_every: Duration,
}

/// A small per-client random source.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in 0 ..= 2 × mean.
    fn around(&mut self, mean: Duration) -> Duration {
        mean.mul_f64((self.next() % 20_000) as f64 / 10_000.0)
    }
}

/// One churning subscriber until `stop` carries the final acknowledged offsets; then it waits
/// for its channel's last publication (at most 30 s) and settles its accounting.
async fn client(c: ClientSpec, mut stop: watch::Receiver<Option<Arc<Vec<u64>>>>) -> ClientReport {
    let mut report = ClientReport::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c.id as u64 + 1));
    let sse = crate::pubsub::sse_clients(c.transport, 1, &Sources::for_connections(1));
    let target = Target {
        kind: SystemKind::Gateway,
        transport: c.transport,
        origin: &c.origin,
        channel: &c.channel,
        source: c.source,
        http: sse.first(),
    };
    // Spread the first subscribes over the first second.
    tokio::time::sleep(Duration::from_millis(rng.next() % 1000)).await;
    let connect = |resume: Resume| {
        let target = &target;
        async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                Subscriber::connect(target, &resume),
            )
            .await
            .unwrap_or_else(|_| Err("subscribe timed out".into()))
        }
    };
    let (mut sub, subscribed) = match connect(Resume::Fresh).await {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    report.fresh_subscribes += 1;
    let mut tracker = OffsetTracker::new(subscribed.base);
    let mut highest = subscribed.base;
    let mut churn_at = tokio::time::Instant::now() + rng.around(c.churn_every);
    let mut finals: Option<u64> = None;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        if finals.is_some_and(|f| tracker.complete_up_to(f)) {
            break;
        }
        tokio::select! {
            event = sub.next() => match event {
                Event::Publication { offset, .. } => {
                    tracker.record(offset);
                    highest = highest.max(offset);
                }
                Event::Reset => {
                    // The server cannot continue: an explicit reset, a new session from its position.
                    report.resets += 1;
                    report.settle(&tracker, highest);
                    let base = match sub.resume() {
                        Resume::Position { offset, .. } => offset,
                        _ => highest,
                    };
                    tracker = OffsetTracker::new(base);
                    highest = base;
                }
                Event::Closed { reason, .. } => {
                    report.error = Some(reason);
                    break;
                }
            },
            _ = tokio::time::sleep_until(churn_at), if finals.is_none() => {
                churn_at = tokio::time::Instant::now() + rng.around(c.churn_every);
                if rng.next().is_multiple_of(2) {
                    // A dropped connection (reset, no close handshake), resumed from the position.
                    let resume = sub.resume();
                    drop(sub);
                    match connect(resume).await {
                        Ok((s, subscribed)) => {
                            sub = s;
                            report.resumes += 1;
                            if subscribed.recovered == Some(false) {
                                report.not_recovered += 1;
                                report.settle(&tracker, highest);
                                tracker = OffsetTracker::new(subscribed.base);
                                highest = subscribed.base;
                            }
                        }
                        Err(e) => {
                            report.error = Some(e);
                            return report;
                        }
                    }
                } else {
                    // Unsubscribe (a polite close), then a fresh subscribe: the old session owes
                    // everything up to the last publication it saw.
                    sub.close().await;
                    report.settle(&tracker, highest);
                    match connect(Resume::Fresh).await {
                        Ok((s, subscribed)) => {
                            sub = s;
                            report.fresh_subscribes += 1;
                            tracker = OffsetTracker::new(subscribed.base);
                            highest = subscribed.base;
                        }
                        Err(e) => {
                            report.error = Some(e);
                            return report;
                        }
                    }
                }
            }
            changed = stop.changed(), if finals.is_none() => {
                finals = match changed {
                    Ok(()) => stop.borrow().as_ref().map(|f| f[c.channel_index]),
                    Err(_) => Some(u64::MAX),
                };
                deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let last = finals.unwrap_or(highest).max(highest);
    report.settle(&tracker, last);
    sub.close().await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_means_the_last_third_stays_near_the_middle_third() {
        let steady = [100.0, 90.0, 100.0, 101.0, 99.0, 100.0];
        assert_eq!(flatness(&steady, (0.05, 0.0))["flat"], true);
        let growing = [100.0, 100.0, 110.0, 120.0, 150.0, 160.0];
        assert_eq!(flatness(&growing, (0.10, 0.0))["flat"], false);
        assert_eq!(flatness(&growing, (0.10, 50.0))["flat"], true);
        assert_eq!(flatness(&[1.0], (0.1, 0.0))["flat"], Value::Null);
    }

    #[test]
    fn reads_an_unlabelled_metric() {
        let text = "# HELP gateway_queued_bytes x\n# TYPE gateway_queued_bytes gauge\n\
                    gateway_queued_bytes_max 7\ngateway_queued_bytes 1234\n";
        assert_eq!(metric(text, "gateway_queued_bytes"), Some(1234));
        assert_eq!(metric(text, "gateway_queued_bytes_max"), Some(7));
        assert_eq!(metric(text, "missing"), None);
    }
}
