//! Publishers: a pipelined burst over one WebSocket ([`publish_many`], [`bulk_publish`]), a
//! paced stream until stopped ([`ContinuousPublisher`]) and round-robin publishing over HTTP or
//! WebSocket that records every ack ([`Publisher`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Message;

use crate::http::publish_http;
use crate::recording::{Acks, Sub};
use crate::wait::{within, within_for};
use crate::ws::WsClient;

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
    let (ws, _) = within(
        &format!("{who}: handshake"),
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), None, true),
    )
    .await
    .unwrap_or_else(|e| panic!("{who}: handshake: {e}"));
    let (mut sink, mut stream) = ws.split();
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

/// A publisher that keeps publishing to one channel, in paced windows of a few pipelined
/// requests, until stopped. Its `i`-th publication carries `data(i)`.
pub struct ContinuousPublisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Number of publications acknowledged so far.
    progress: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl ContinuousPublisher {
    /// Starts publishing and returns once the first window has been acknowledged.
    pub async fn start(
        addr: SocketAddr,
        channel: &str,
        data: impl Fn(usize) -> Value + Send + 'static,
    ) -> ContinuousPublisher {
        use std::sync::atomic::{AtomicBool, Ordering};
        const WINDOW: usize = 10;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (progress_tx, progress) = tokio::sync::watch::channel(0);
        let task = {
            let stop = stop.clone();
            let channel = channel.to_string();
            tokio::spawn(async move {
                let mut ws = WsClient::connect_addr(addr, "/ws").await;
                let mut offsets = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let first = offsets.len();
                    for i in first..first + WINDOW {
                        ws.send_json(&json!({"id": i, "op": "publish", "channel": channel,
                                             "data": data(i)}))
                            .await;
                    }
                    offsets.resize(first + WINDOW, 0);
                    for _ in 0..WINDOW {
                        let reply = ws.recv().await;
                        let i = reply["id"].as_u64().expect("reply id") as usize;
                        offsets[i] = reply["result"]["offset"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("publish failed: {reply}"));
                    }
                    let _ = progress_tx.send(offsets.len());
                    // Pacing only (about 2000 publications a second), so a slow reader on a
                    // loaded machine still catches up in bounded time.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                offsets
            })
        };
        let publisher = ContinuousPublisher {
            stop,
            progress,
            task,
        };
        publisher.published_at_least(1).await;
        publisher
    }

    /// How many publications have been acknowledged so far.
    pub fn published(&self) -> usize {
        *self.progress.borrow()
    }

    /// Waits until at least `n` publications have been acknowledged.
    pub async fn published_at_least(&self, n: usize) {
        let mut progress = self.progress.clone();
        within(
            "continuous publisher progress",
            progress.wait_for(|c| *c >= n),
        )
        .await
        .expect("continuous publisher stopped");
    }

    /// Stops and returns the offset of every publication, indexed by `i`.
    pub async fn stop(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        within("continuous publisher to stop", self.task)
            .await
            .expect("continuous publisher panicked")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /api/publish` from `concurrency` concurrent workers.
    Http,
    /// `publish` ops over one WebSocket, `concurrency` in flight at a time.
    Ws,
}

/// Publishes round-robin over `channels` until stopped or `limit` publications, asserting every
/// publish succeeds and recording every ack. Publication `i` carries `{"tag": tag, "i": i}`.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    progress: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (progress_tx, progress) = watch::channel(0u64);
        let progress_tx = Arc::new(progress_tx);
        let channels: Arc<Vec<String>> = Arc::new(channels.to_vec());
        let mut tasks = Vec::new();
        let workers = if via == Via::Http { concurrency } else { 1 };
        for _ in 0..workers {
            let (stop, next, done, progress_tx, channels, acks) = (
                stop.clone(),
                next.clone(),
                done.clone(),
                progress_tx.clone(),
                channels.clone(),
                acks.clone(),
            );
            let tag = tag.to_string();
            let ws = match via {
                Via::Ws => Some(Sub::connect(&format!("publisher {tag}"), addr).await),
                Via::Http => None,
            };
            tasks.push(tokio::spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = if ws.is_some() { concurrency as u64 } else { 1 };
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= limit {
                        break;
                    }
                    let last = (first + batch).min(limit);
                    let items: Vec<(String, Value)> = (first..last)
                        .map(|i| {
                            let ch = channels[i as usize % channels.len()].clone();
                            (ch, json!({"tag": tag, "i": i}))
                        })
                        .collect();
                    match &ws {
                        None => {
                            for (ch, data) in &items {
                                let (status, body) = publish_http(addr, ch, data).await;
                                assert_eq!(status, 200, "publisher {tag}: publish {data}: {body}");
                                acks.record(ch, &body, data);
                            }
                        }
                        Some(sub) => {
                            let replies = futures_util::future::join_all(
                                items.iter().map(|(ch, data)| sub.publish(ch, data)),
                            )
                            .await;
                            for ((ch, data), reply) in items.iter().zip(replies) {
                                let ack = reply.get("result").unwrap_or_else(|| {
                                    panic!("publisher {tag}: publish {data}: {reply}")
                                });
                                acks.record(ch, ack, data);
                            }
                        }
                    }
                    let n =
                        done.fetch_add(items.len() as u64, Ordering::Relaxed) + items.len() as u64;
                    progress_tx.send_replace(n);
                }
            }));
        }
        Publisher {
            stop,
            done,
            progress,
            tasks,
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
