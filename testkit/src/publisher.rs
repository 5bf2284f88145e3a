//! Publishers: a pipelined burst over one WebSocket ([`publish_many`], [`bulk_publish`]), and
//! one publisher that records every ack, publishing round-robin over HTTP or a WebSocket until a
//! limit or a stop ([`Publisher`]); [`ContinuousPublisher`] is that publisher paced, on one
//! channel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Message;

use crate::http::publish_http;
use crate::recording::{Acks, Sub};
use crate::wait::{within, within_for};
use crate::ws::handshake;

/// Sends `count` publish requests over one WebSocket with at most `window` in flight (writes
/// and reads run concurrently); request `i` publishes `data(i)` to `channel`. Returns every
/// reply's `result` (the ack) indexed by `i`; a failed publish panics, naming `who`.
async fn pipelined(
    addr: SocketAddr,
    who: &str,
    channel: &str,
    count: usize,
    window: usize,
    data: impl Fn(usize) -> Value,
) -> Vec<Value> {
    let (mut sink, mut stream) = handshake(who, addr, "/ws").await.split();
    let permits = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    let frames: Vec<String> = (0..count)
        .map(|i| json!({"id": i, "op": "publish", "channel": channel, "data": data(i)}).to_string())
        .collect();
    let writer = {
        let permits = permits.clone();
        async move {
            for f in frames {
                permits.acquire().await.expect("semaphore").forget();
                sink.send(Message::text(f)).await.expect("publisher send");
            }
            sink
        }
    };
    let reader = async {
        let mut acks = vec![Value::Null; count];
        let mut got = 0;
        while got < count {
            let text = match within(&format!("{who}: publish ack"), stream.next()).await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                other => panic!("{who}: connection ended: {other:?}"),
            };
            let reply: Value = serde_json::from_str(text.as_str()).expect("JSON reply");
            let i = reply["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no id: {reply}")) as usize;
            acks[i] = reply
                .get("result")
                .cloned()
                .unwrap_or_else(|| panic!("{who}: publish #{i} failed: {reply}"));
            got += 1;
            permits.add_permits(1);
        }
        acks
    };
    let (mut sink, acks) = tokio::join!(writer, reader);
    let _ = sink.close().await;
    acks
}

/// Publishes `count` messages to `channel` over one pipelined WebSocket connection; `data(i)`
/// makes the i-th payload (i from 0). Returns the acks' offsets in order of the requests.
pub async fn publish_many(
    addr: SocketAddr,
    channel: &str,
    count: usize,
    data: impl Fn(usize) -> Value,
) -> Vec<u64> {
    pipelined(addr, "publisher", channel, count, count, data)
        .await
        .iter()
        .map(|ack| ack["offset"].as_u64().expect("ack offset"))
        .collect()
}

/// A publisher that keeps publishing to one channel over a WebSocket, in paced windows of a few
/// pipelined requests, until stopped. Its `i`-th publication carries `data(i)`. A [`Publisher`]
/// underneath; what it adds is the pacing and the offsets by `i`.
pub struct ContinuousPublisher(Publisher);

impl ContinuousPublisher {
    /// Starts publishing and returns once the first publication has been acknowledged.
    pub async fn start(
        addr: SocketAddr,
        channel: &str,
        data: impl Fn(usize) -> Value + Send + Sync + 'static,
    ) -> ContinuousPublisher {
        let plan = Plan {
            via: Via::Ws,
            channels: vec![channel.to_string()],
            payload: Arc::new(move |i| data(i as usize)),
            acks: Acks::default(),
            limit: u64::MAX,
            concurrency: 10,
            // Pacing only (about 2000 publications a second), so a slow reader on a loaded
            // machine still catches up in bounded time.
            pace: Some(Duration::from_millis(5)),
        };
        let publisher = ContinuousPublisher(Publisher::spawn(addr, "continuous", plan).await);
        publisher.published_at_least(1).await;
        publisher
    }

    /// How many publications have been acknowledged so far.
    pub fn published(&self) -> usize {
        self.0.published() as usize
    }

    /// Waits until at least `n` publications have been acknowledged.
    pub async fn published_at_least(&self, n: usize) {
        self.0.wait_published(n as u64).await
    }

    /// Stops and returns the offset of every publication, indexed by `i`.
    pub async fn stop(self) -> Vec<u64> {
        let by_index = self.0.by_index.clone();
        self.0.stop().await;
        let by_index = std::mem::take(&mut *by_index.lock().unwrap());
        let offsets: Vec<u64> = by_index.values().copied().collect();
        assert_eq!(
            by_index.keys().next_back().map_or(0, |last| last + 1),
            offsets.len() as u64,
            "continuous publisher: publications missing between 0 and the last"
        );
        offsets
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /api/publish` from `concurrency` concurrent workers.
    Http,
    /// `publish` ops over one WebSocket, `concurrency` in flight at a time.
    Ws,
}

/// The payload of publication `i`.
type Payload = Arc<dyn Fn(u64) -> Value + Send + Sync>;

/// What a [`Publisher`] does.
struct Plan {
    via: Via,
    channels: Vec<String>,
    payload: Payload,
    acks: Acks,
    limit: u64,
    concurrency: usize,
    /// A pause after every batch, or none.
    pace: Option<Duration>,
}

/// Publishes round-robin over `channels` until stopped or `limit` publications, asserting every
/// publish succeeds and recording every ack. Publication `i` carries `{"tag": tag, "i": i}`.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    progress: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Offset of every acknowledged publication, by `i`.
    by_index: Arc<Mutex<BTreeMap<u64, u64>>>,
}

impl Publisher {
    pub async fn start(
        addr: SocketAddr,
        via: Via,
        channels: &[String],
        tag: &str,
        acks: &Acks,
        limit: u64,
        concurrency: usize,
    ) -> Publisher {
        let payload_tag = tag.to_string();
        let plan = Plan {
            via,
            channels: channels.to_vec(),
            payload: Arc::new(move |i| json!({"tag": payload_tag, "i": i})),
            acks: acks.clone(),
            limit,
            concurrency,
            pace: None,
        };
        Publisher::spawn(addr, tag, plan).await
    }

    async fn spawn(addr: SocketAddr, tag: &str, plan: Plan) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let by_index: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
        let (progress_tx, progress) = watch::channel(0u64);
        let progress_tx = Arc::new(progress_tx);
        let plan = Arc::new(plan);
        let mut tasks = Vec::new();
        let workers = if plan.via == Via::Http {
            plan.concurrency
        } else {
            1
        };
        for _ in 0..workers {
            let (stop, next, done, progress_tx, plan, by_index) = (
                stop.clone(),
                next.clone(),
                done.clone(),
                progress_tx.clone(),
                plan.clone(),
                by_index.clone(),
            );
            let tag = tag.to_string();
            let ws = match plan.via {
                Via::Ws => Some(Sub::connect(&format!("publisher {tag}"), addr).await),
                Via::Http => None,
            };
            tasks.push(tokio::spawn(async move {
                let acks = &plan.acks;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = if ws.is_some() {
                        plan.concurrency as u64
                    } else {
                        1
                    };
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= plan.limit {
                        break;
                    }
                    let last = (first + batch).min(plan.limit);
                    let items: Vec<(u64, String, Value)> = (first..last)
                        .map(|i| {
                            let ch = plan.channels[i as usize % plan.channels.len()].clone();
                            (i, ch, (plan.payload)(i))
                        })
                        .collect();
                    let mut offsets = Vec::with_capacity(items.len());
                    match &ws {
                        None => {
                            for (_, ch, data) in &items {
                                let (status, body) = publish_http(addr, ch, data).await;
                                assert_eq!(status, 200, "publisher {tag}: publish {data}: {body}");
                                acks.record(ch, &body, data);
                                offsets.push(body["offset"].as_u64());
                            }
                        }
                        Some(sub) => {
                            let replies = futures_util::future::join_all(
                                items.iter().map(|(_, ch, data)| sub.publish(ch, data)),
                            )
                            .await;
                            for ((_, ch, data), reply) in items.iter().zip(replies) {
                                let ack = reply.get("result").unwrap_or_else(|| {
                                    panic!("publisher {tag}: publish {data}: {reply}")
                                });
                                acks.record(ch, ack, data);
                                offsets.push(ack["offset"].as_u64());
                            }
                        }
                    }
                    {
                        let mut by_index = by_index.lock().unwrap();
                        for ((i, _, _), offset) in items.iter().zip(offsets) {
                            by_index.insert(*i, offset.expect("ack offset"));
                        }
                    }
                    let n =
                        done.fetch_add(items.len() as u64, Ordering::Relaxed) + items.len() as u64;
                    progress_tx.send_replace(n);
                    if let Some(pace) = plan.pace {
                        tokio::time::sleep(pace).await;
                    }
                }
            }));
        }
        Publisher {
            stop,
            done,
            progress,
            tasks,
            by_index,
        }
    }

    pub fn published(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` publications were acknowledged.
    pub async fn wait_published(&self, n: u64) {
        let mut progress = self.progress.clone();
        within(&format!("{n} publications acknowledged"), async {
            loop {
                if *progress.borrow_and_update() >= n {
                    return;
                }
                if progress.changed().await.is_err() {
                    panic!("publisher ended before {n} publications");
                }
            }
        })
        .await
    }

    /// Waits until the limit is reached (every worker finished); panics if one failed.
    pub async fn finish(self) -> u64 {
        for t in self.tasks {
            within_for("publisher to finish", Duration::from_secs(90), t)
                .await
                .expect("publisher failed");
        }
        self.done.load(Ordering::Relaxed)
    }

    /// Stops after the publishes in flight and returns how many were acknowledged.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }
}

/// Publishes `count` publications `{"tag": tag, "i": i}` to `channel` over one WebSocket with up
/// to `window` requests in flight, asserting every ack and recording it. Lighter on the test
/// process than [`Publisher`], for large volumes.
pub async fn bulk_publish(
    addr: SocketAddr,
    channel: &str,
    tag: &str,
    count: u64,
    window: usize,
    acks: &Acks,
) {
    let data = |i: usize| json!({"tag": tag, "i": i});
    let who = format!("bulk publisher {tag}");
    let replies = pipelined(addr, &who, channel, count as usize, window, data).await;
    for (i, ack) in replies.iter().enumerate() {
        acks.record(channel, ack, &data(i));
    }
}
