//! The publisher: HTTP publishes at a fixed rate (or as fast as they are accepted) spread over the
//! run's channels, each carrying its send time; it remembers the highest acknowledged offset per
//! channel, which is what every subscriber must end up with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

/// Requests in flight at once.
const IN_FLIGHT: usize = 128;
/// Closed-loop workers when publishing as fast as accepted.
const WORKERS: usize = 32;

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Highest acknowledged offset per channel index.
pub struct Acked(Vec<AtomicU64>);

impl Acked {
    pub fn new(channels: usize) -> Arc<Acked> {
        Arc::new(Acked((0..channels).map(|_| AtomicU64::new(0)).collect()))
    }

    pub fn get(&self, channel: usize) -> u64 {
        self.0[channel].load(Ordering::Acquire)
    }

    fn record(&self, channel: usize, offset: u64) {
        self.0[channel].fetch_max(offset, Ordering::AcqRel);
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(|a| a.load(Ordering::Acquire)).collect()
    }
}

pub struct Publisher {
    http: reqwest::Client,
    url: String,
    channels: Arc<Vec<String>>,
    pad: Arc<str>,
    pub acked: Arc<Acked>,
}

#[derive(Debug, Default, Clone)]
pub struct PublishReport {
    pub published: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Publisher {
    pub fn new(url: String, channels: Arc<Vec<String>>, payload: usize) -> Publisher {
        let acked = Acked::new(channels.len());
        Publisher {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(IN_FLIGHT)
                .tcp_nodelay(true)
                .build()
                .expect("http client"),
            url,
            channels,
            pad: "x".repeat(payload).into(),
            acked,
        }
    }

    /// Publishes for `duration`: `rate` per second over all channels, round-robin, or as fast as
    /// the server accepts them when `rate` is 0. Returns once every request has been answered.
    pub async fn run(&self, rate: f64, duration: Duration) -> PublishReport {
        let counters = Arc::new(Counters::default());
        let start = Instant::now();
        if rate > 0.0 {
            let total = (rate * duration.as_secs_f64()).round() as u64;
            let period = Duration::from_secs_f64(1.0 / rate);
            let gate = Arc::new(Semaphore::new(IN_FLIGHT));
            let t0 = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for seq in 0..total {
                tokio::time::sleep_until(t0 + period.mul_f64(seq as f64)).await;
                let permit = gate.clone().acquire_owned().await.expect("open");
                let job = self.job(seq, counters.clone());
                tasks.spawn(async move {
                    job.await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        } else {
            let next = Arc::new(AtomicU64::new(0));
            let deadline = tokio::time::Instant::now() + duration;
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..WORKERS {
                let (next, counters) = (next.clone(), counters.clone());
                let me = self.clone_for_worker();
                workers.spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        me.job(seq, counters.clone()).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
        let first_error = counters.first_error.lock().expect("not poisoned").clone();
        PublishReport {
            published: counters.published.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            first_error,
            elapsed: start.elapsed(),
        }
    }

    fn clone_for_worker(&self) -> Publisher {
        Publisher {
            http: self.http.clone(),
            url: self.url.clone(),
            channels: self.channels.clone(),
            pad: self.pad.clone(),
            acked: self.acked.clone(),
        }
    }

    /// One publish of sequence number `seq`, accounted in `counters` and `acked`.
    fn job(
        &self,
        seq: u64,
        counters: Arc<Counters>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let channel = (seq % self.channels.len() as u64) as usize;
        let body = format!(
            r#"{{"channel":"{}","data":{{"ts":{},"seq":{seq},"pad":"{}"}}}}"#,
            self.channels[channel],
            now_micros(),
            self.pad
        );
        let req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(10));
        let acked = self.acked.clone();
        async move {
            let outcome = match req.send().await {
                Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                    Ok(v) => v["offset"]
                        .as_u64()
                        .ok_or_else(|| format!("no offset in {v}")),
                    Err(e) => Err(format!("reply: {e}")),
                },
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(format!("request: {}", with_causes(&e))),
            };
            match outcome {
                Ok(offset) => {
                    acked.record(channel, offset);
                    counters.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let mut first = counters.first_error.lock().expect("not poisoned");
                    first.get_or_insert(e);
                }
            }
        }
    }
}

/// An error and its causes, `outer: inner: …`: reqwest's own message ("error sending request")
/// says nothing of what went wrong.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
