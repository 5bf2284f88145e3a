//! Publishing through a fault: publishers that retry a refused publish with its idempotency key
//! until it is acknowledged ([`RetryingPublishers`], [`publish_until_acked`]), and the one rule
//! checked against a subscriber's log: delivered, or an explicit reset first ([`check_delivery`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::http::{json_response, publish_http};
use crate::recording::Item;
use crate::wait::{poll_until, within, within_for};

/// Publishes over HTTP until one attempt is answered 200 (bounded by [`crate::wait::WAIT`]); returns the ack
/// and every earlier attempt's answer (a refused publish was not stored, but one that timed out
/// may have been).
pub async fn publish_until_acked(addr: SocketAddr, channel: &str, data: &Value) -> (Value, usize) {
    let mut failures = 0;
    within(&format!("publish of {data} to be acknowledged"), async {
        loop {
            let (status, body) = publish_http(addr, channel, data).await;
            if status == 200 {
                return (body, failures);
            }
            failures += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}
/// One acknowledged publication, in the order the publisher got the answers.
#[derive(Debug, Clone)]
pub struct Acked {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
}

/// One publisher per channel, each publishing `{"tag": channel, "i": i}` one at a time over
/// HTTP, rotating over `nodes`, and retrying a refused publish (any non-200, or a transport
/// error) with the same `idempotency_key` until it is acknowledged.
pub struct RetryingPublishers {
    stop: Arc<AtomicBool>,
    /// Per channel, every ack in order.
    pub acked: Arc<Mutex<HashMap<String, Vec<Acked>>>>,
    /// Refused attempts (retried).
    pub refused: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RetryingPublishers {
    pub fn start(nodes: &[SocketAddr], channels: &[String]) -> RetryingPublishers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<HashMap<String, Vec<Acked>>>> = Arc::default();
        let refused = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for channel in channels {
            let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
            let (nodes, channel) = (nodes.to_vec(), channel.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("reqwest client");
                let mut attempt = 0usize;
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let data = json!({"tag": channel, "i": i});
                    let body = json!({"channel": channel, "data": data,
                                      "idempotency_key": format!("{channel}-{i}")});
                    loop {
                        let addr = nodes[attempt % nodes.len()];
                        attempt += 1;
                        let answer = client
                            .post(format!("http://{addr}/api/publish"))
                            .header("content-type", "application/json")
                            .body(body.to_string())
                            .send()
                            .await;
                        if let Ok(resp) = answer {
                            let (status, ack) = json_response(resp).await;
                            if status == 200 {
                                acked
                                    .lock()
                                    .unwrap()
                                    .entry(channel.clone())
                                    .or_default()
                                    .push(Acked {
                                        epoch: ack["epoch"].as_str().unwrap_or("").to_string(),
                                        offset: ack["offset"].as_u64().unwrap_or(0),
                                        data: data.clone(),
                                    });
                                break;
                            }
                        }
                        refused.fetch_add(1, Ordering::Relaxed);
                        // A retry pause, not a wait for an event: the publisher must keep trying.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        RetryingPublishers {
            stop,
            acked,
            refused,
            tasks,
        }
    }

    pub fn count_of(&self, channel: &str) -> usize {
        self.acked.lock().unwrap().get(channel).map_or(0, Vec::len)
    }

    pub fn acked_of(&self, channel: &str) -> Vec<Acked> {
        self.acked
            .lock()
            .unwrap()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every channel has at least `n` acks.
    pub async fn wait_acked(&self, channels: &[String], n: usize, limit: Duration) {
        poll_until(&format!("{n} acks on every channel"), limit, || async {
            channels.iter().all(|c| self.count_of(c) >= n).then_some(())
        })
        .await
    }

    /// Stops after the publishes in flight (each finishes its retries).
    pub async fn stop(self) -> HashMap<String, Vec<Acked>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within_for("retrying publisher to stop", Duration::from_secs(90), t)
                .await
                .expect("publisher task");
        }
        Arc::try_unwrap(self.acked)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

/// What a subscriber's log says about a channel's acknowledged publications.
#[derive(Debug, Default)]
pub struct DeliveryCheck {
    /// Acked publications neither delivered nor preceded by a reset: the one rule is broken.
    pub silently_lost: Vec<String>,
    /// Acked publications not delivered, but after an explicit reset.
    pub covered_by_reset: usize,
    /// A position delivered twice, or with other data than was acknowledged for it.
    pub corrupt: Vec<String>,
    pub resets: usize,
}

/// Checks `items` (one subscription's log) against `acked`: every acknowledged publication after
/// `after` (epoch, offset) must be delivered with its data, or the subscriber must have received
/// a reset after the last publication it got before that one.
pub fn check_delivery(items: &[Item], acked: &[Acked], after: &(String, u64)) -> DeliveryCheck {
    let mut check = DeliveryCheck::default();
    // (epoch, offset) -> (index in the log, data)
    let mut delivered: HashMap<(String, u64), (usize, Value)> = HashMap::new();
    let mut reset_at = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Pub(p) => {
                let key = (p.epoch.clone(), p.offset);
                if delivered.insert(key, (i, p.data.clone())).is_some() {
                    check
                        .corrupt
                        .push(format!("{}/{} delivered twice", p.epoch, p.offset));
                }
            }
            Item::Reset { .. } => reset_at.push(i),
            Item::Subscribed(_) | Item::Join(_) | Item::Leave(_) => {}
        }
    }
    check.resets = reset_at.len();
    for a in acked {
        if a.epoch == after.0 && a.offset <= after.1 {
            continue;
        }
        match delivered.get(&(a.epoch.clone(), a.offset)) {
            Some((_, data)) if *data == a.data => {}
            Some((_, data)) => check.corrupt.push(format!(
                "{}/{}: acked {} but delivered {}",
                a.epoch, a.offset, a.data, data
            )),
            None => {
                // The log index of the last publication of the same epoch before this one.
                let before = delivered
                    .iter()
                    .filter(|((e, o), _)| *e == a.epoch && *o < a.offset)
                    .map(|(_, (i, _))| *i)
                    .max();
                if reset_at.iter().any(|&r| before.is_none_or(|b| r > b)) {
                    check.covered_by_reset += 1;
                } else {
                    check
                        .silently_lost
                        .push(format!("{}/{} {}", a.epoch, a.offset, a.data));
                }
            }
        }
    }
    check
}
