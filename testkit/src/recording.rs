//! What subscribers received and what publishers were told: [`Acks`] (every acknowledged
//! publication), [`Sub`] (a WebSocket client whose reader task records every push per channel)
//! and the checks of the one rule — every acknowledged publication reaches every subscriber
//! exactly once, in order, or the subscriber is told to reset first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::Message;

use crate::wait::{within, WAIT};
use crate::ws::{handshake, Ws};

#[derive(Debug, Clone, PartialEq)]
pub struct Pub {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
}

impl Pub {
    pub(crate) fn from_json(v: &Value) -> Option<Pub> {
        Some(Pub {
            epoch: v["epoch"].as_str()?.to_string(),
            offset: v["offset"].as_u64()?,
            data: v.get("data")?.clone(),
        })
    }
}

/// What one subscription of a recording client received, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The subscribe reply's result.
    Subscribed(Value),
    Pub(Pub),
    Reset {
        epoch: String,
        offset: u64,
        reason: String,
    },
    /// A presence join: the member.
    Join(Value),
    /// A presence leave: the member.
    Leave(Value),
}

/// Every acknowledged publication: channel → epoch → offset → data.
#[derive(Clone, Default)]
pub struct Acks(Arc<Mutex<HashMap<String, EpochAcks>>>);

/// One channel's acks: epoch → offset → data.
pub type EpochAcks = BTreeMap<String, BTreeMap<u64, Value>>;

impl Acks {
    /// Records an ack; two acks for one (channel, epoch, offset) are a server bug.
    pub fn record(&self, channel: &str, ack: &Value, data: &Value) {
        let epoch = ack["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("ack without epoch: {ack}"));
        let offset = ack["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("ack without offset: {ack}"));
        assert_eq!(ack["channel"], channel, "ack for another channel: {ack}");
        let mut all = self.0.lock().unwrap();
        let prev = all
            .entry(channel.to_string())
            .or_default()
            .entry(epoch.to_string())
            .or_default()
            .insert(offset, data.clone());
        assert!(
            prev.is_none(),
            "offset {offset} of {channel} (epoch {epoch}) acknowledged twice: {prev:?} and {data}"
        );
    }

    /// The channel's acks, for the only epoch it has (panics if there are several).
    pub fn single(&self, channel: &str) -> (String, BTreeMap<u64, Value>) {
        let all = self.0.lock().unwrap();
        let epochs = all
            .get(channel)
            .unwrap_or_else(|| panic!("no acks for {channel}"));
        assert_eq!(
            epochs.len(),
            1,
            "{channel} acknowledged under several epochs: {:?}",
            epochs.keys().collect::<Vec<_>>()
        );
        let (e, m) = epochs.iter().next().unwrap();
        (e.clone(), m.clone())
    }

    pub fn epochs(&self, channel: &str) -> EpochAcks {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .flat_map(|e| e.values())
            .map(BTreeMap::len)
            .sum()
    }

    pub fn count_of(&self, channel: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .map(|e| e.values().map(BTreeMap::len).sum())
            .unwrap_or(0)
    }

    /// Highest acked offset of the channel in `epoch`.
    pub fn top(&self, channel: &str, epoch: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .and_then(|e| e.get(epoch))
            .and_then(|m| m.keys().next_back().copied())
            .unwrap_or(0)
    }
}

/// Asserts the acks of a channel are gap-free from 1: every publish was acknowledged, so every
/// offset the backplane assigned must have an ack.
#[track_caller]
pub fn assert_contiguous(channel: &str, acks: &BTreeMap<u64, Value>) {
    let n = acks.len() as u64;
    let first = acks.keys().next().copied().unwrap_or(1);
    let last = acks.keys().next_back().copied().unwrap_or(0);
    assert!(
        first == 1 && last == n,
        "{channel}: acked offsets are not 1..={n} without gaps (first {first}, last {last}, count {n})"
    );
}

/// Asserts `got` is exactly `expected` (offset → data) restricted to offsets > `after`, in order,
/// once each, all in `epoch`.
#[track_caller]
pub fn assert_exact(
    what: &str,
    got: &[Pub],
    epoch: &str,
    expected: &BTreeMap<u64, Value>,
    after: u64,
) {
    let want: Vec<(u64, &Value)> = expected.range(after + 1..).map(|(o, d)| (*o, d)).collect();
    for (i, p) in got.iter().enumerate() {
        assert_eq!(
            p.epoch, epoch,
            "{what}: publication #{i} (offset {}) in epoch {}, expected {epoch}",
            p.offset, p.epoch
        );
    }
    let mut seen = HashSet::new();
    let dups: Vec<u64> = got
        .iter()
        .filter(|p| !seen.insert(p.offset))
        .map(|p| p.offset)
        .take(10)
        .collect();
    assert!(dups.is_empty(), "{what}: duplicates received: {dups:?}");
    let got_set: HashSet<u64> = got.iter().map(|p| p.offset).collect();
    let missing: Vec<u64> = want
        .iter()
        .map(|(o, _)| *o)
        .filter(|o| !got_set.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged publications never arrived (after offset {after}), first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let want_set: HashSet<u64> = want.iter().map(|(o, _)| *o).collect();
    let extra: Vec<u64> = got
        .iter()
        .map(|p| p.offset)
        .filter(|o| !want_set.contains(o))
        .take(10)
        .collect();
    assert!(
        extra.is_empty(),
        "{what}: received offsets that were not acknowledged after {after}: {extra:?}"
    );
    for (i, (p, (o, d))) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(
            p.offset, *o,
            "{what}: out of order at #{i}: got offset {}, expected {o}",
            p.offset
        );
        assert_eq!(
            &p.data, *d,
            "{what}: data of offset {o} differs from what was acknowledged"
        );
    }
}

/// The publications among `items`, in order.
pub fn pubs_of(items: &[Item]) -> Vec<Pub> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Pub(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Waits until `sub` has the last acknowledged offset of each of `chans` (one epoch each), then
/// makes a round trip, which flushes anything (e.g. a duplicate) queued behind it; the
/// connection must still be open.
pub async fn wait_caught_up(sub: &Sub, acks: &Acks, chans: &[String]) {
    for c in chans {
        let (_, a) = acks.single(c);
        sub.wait_offset(c, *a.keys().next_back().unwrap()).await;
    }
    sub.ping().await;
    assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
}

/// The one rule with nothing in the way: every channel's acks are gap-free, and every
/// subscriber, still connected, received every acknowledged publication of its channels exactly
/// once, in order, in the one epoch, without a reset.
pub async fn assert_every_subscriber_got_every_ack(acks: &Acks, subs: &[(Sub, Vec<String>)]) {
    let mut channels: Vec<&String> = subs.iter().flat_map(|(_, chans)| chans).collect();
    channels.sort();
    channels.dedup();
    for c in channels {
        let (_, a) = acks.single(c);
        assert_contiguous(c, &a);
    }
    for (sub, chans) in subs {
        wait_caught_up(sub, acks, chans).await;
        for c in chans {
            let (epoch, a) = acks.single(c);
            let items = sub.items(c);
            assert!(
                !items.iter().any(|i| matches!(i, Item::Reset { .. })),
                "{}: unexpected reset on {c}: {items:?}",
                sub.name
            );
            assert_exact(&format!("{} on {c}", sub.name), &sub.pubs(c), &epoch, &a, 0);
        }
    }
}

#[derive(Debug, Default)]
pub struct SubLog {
    pub channels: HashMap<String, Vec<Item>>,
    /// Set when the connection ended: the close code or the error.
    pub ended: Option<String>,
    /// Messages that are neither replies, publications nor resets.
    pub unexpected: Vec<Value>,
}

impl SubLog {
    pub fn pubs(&self, channel: &str) -> Vec<Pub> {
        self.channels
            .get(channel)
            .map(|items| pubs_of(items))
            .unwrap_or_default()
    }

    /// The members of the channel's presence events, in order: `("join"|"leave", member)`.
    pub fn presence_events(&self, channel: &str) -> Vec<(&'static str, Value)> {
        self.channels
            .get(channel)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| match i {
                        Item::Join(m) => Some(("join", m.clone())),
                        Item::Leave(m) => Some(("leave", m.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn pub_count(&self, channel: &str) -> usize {
        self.channels
            .get(channel)
            .map(|items| items.iter().filter(|i| matches!(i, Item::Pub(_))).count())
            .unwrap_or(0)
    }

    /// The position to resume from: the last publication, reset or subscribe result.
    pub fn position(&self, channel: &str) -> Option<(String, u64)> {
        self.channels
            .get(channel)?
            .iter()
            .rev()
            .find_map(|i| match i {
                Item::Pub(p) => Some((p.epoch.clone(), p.offset)),
                Item::Reset { epoch, offset, .. } => Some((epoch.clone(), *offset)),
                Item::Subscribed(r) => {
                    Some((r["epoch"].as_str()?.to_string(), r["offset"].as_u64()?))
                }
                Item::Join(_) | Item::Leave(_) => None,
            })
    }

    pub fn last_offset(&self, channel: &str) -> u64 {
        self.position(channel).map(|p| p.1).unwrap_or(0)
    }
}

/// A WebSocket client whose reader task records every push per channel; requests are matched
/// to replies by id.
pub struct Sub {
    pub name: String,
    pub addr: SocketAddr,
    log: Arc<Mutex<SubLog>>,
    changed: watch::Receiver<u64>,
    sink: Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Sub {
    pub async fn connect(name: &str, addr: SocketAddr) -> Sub {
        Sub::connect_path(name, addr, "/ws").await
    }

    /// Connects to `path` (e.g. `/ws?token=…`).
    pub async fn connect_path(name: &str, addr: SocketAddr, path: &str) -> Sub {
        let (sink, stream) = handshake(name, addr, path).await.split();
        let log = Arc::new(Mutex::new(SubLog::default()));
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let (tx, changed) = watch::channel(0u64);
        let reader = tokio::spawn(read_loop(stream, log.clone(), pending.clone(), tx));
        Sub {
            name: name.to_string(),
            addr,
            log,
            changed,
            sink: Arc::new(tokio::sync::Mutex::new(sink)),
            pending,
            next_id: AtomicU64::new(1),
            reader,
        }
    }

    /// Sends `op` with a fresh id and returns the whole reply.
    pub async fn request(&self, mut op: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        op["id"] = json!(id);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if let Some(ended) = self.ended() {
            panic!(
                "{}: cannot send {op}: connection ended ({ended})",
                self.name
            );
        }
        within(&format!("{}: send", self.name), async {
            self.sink
                .lock()
                .await
                .send(Message::text(op.to_string()))
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("{}: send {op}: {e}", self.name));
        within(&format!("{}: reply to {op}", self.name), rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: connection ended before the reply to {op}: {:?}",
                    self.name,
                    self.log.lock().unwrap().ended
                )
            })
    }

    /// Subscribes (from `since` if given), asserting success; returns the result.
    pub async fn subscribe(&self, channel: &str, since: Option<&(String, u64)>) -> Value {
        let mut op = json!({"op": "subscribe", "channel": channel});
        if let Some((epoch, offset)) = since {
            op["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let reply = self.request(op.clone()).await;
        let result = reply.get("result").cloned().unwrap_or_else(|| {
            panic!("{}: {op} failed: {reply}", self.name);
        });
        assert_eq!(result["channel"], channel, "{}: {reply}", self.name);
        result
    }

    /// `publish` over this connection; the whole reply.
    pub async fn publish(&self, channel: &str, data: &Value) -> Value {
        self.request(json!({"op": "publish", "channel": channel, "data": data}))
            .await
    }

    pub async fn ping(&self) {
        let reply = self.request(json!({"op": "ping"})).await;
        assert!(
            reply.get("result").is_some(),
            "{}: ping: {reply}",
            self.name
        );
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, SubLog> {
        self.log.lock().unwrap()
    }

    pub fn pubs(&self, channel: &str) -> Vec<Pub> {
        self.log().pubs(channel)
    }

    pub fn items(&self, channel: &str) -> Vec<Item> {
        self.log()
            .channels
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    pub fn ended(&self) -> Option<String> {
        self.log().ended.clone()
    }

    /// Waits (bounded by `limit`) until `pred` holds for the log; awaits the reader's change
    /// notifications, no polling.
    pub async fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&SubLog) -> bool) {
        let mut changed = self.changed.clone();
        let res = tokio::time::timeout(limit, async {
            loop {
                changed.borrow_and_update();
                if pred(&self.log()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    // The reader ended; the log cannot change any more.
                    if pred(&self.log()) {
                        return;
                    }
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if res.is_err() {
            let log = self.log();
            let summary: Vec<String> = log
                .channels
                .keys()
                .map(|c| {
                    format!(
                        "{c}: {} pubs, position {:?}",
                        log.pub_count(c),
                        log.position(c)
                    )
                })
                .collect();
            panic!(
                "{}: timed out after {limit:?} waiting for {what}; ended: {:?}; {summary:?}; unexpected: {:?}",
                self.name, log.ended, log.unexpected
            );
        }
    }

    /// Waits until the channel's last received offset reaches `offset`.
    pub async fn wait_offset(&self, channel: &str, offset: u64) {
        self.wait_for(
            &format!("{channel} to reach offset {offset}"),
            WAIT,
            |log| log.last_offset(channel) >= offset,
        )
        .await
    }

    /// Waits until the connection ends (close frame or EOF).
    pub async fn wait_ended(&self) -> String {
        self.wait_for("the connection to end", WAIT, |log| log.ended.is_some())
            .await;
        self.ended().unwrap()
    }

    /// Closes the connection politely and stops the reader.
    pub async fn close(self) {
        let _ = within("close", async { self.sink.lock().await.close().await }).await;
        self.reader.abort();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    log: Arc<Mutex<SubLog>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    changed: watch::Sender<u64>,
) {
    let mut n = 0u64;
    loop {
        let msg = stream.next().await;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                log.lock().unwrap().ended = Some(format!(
                    "close {:?}",
                    frame.map(|f| (u16::from(f.code), f.reason.to_string()))
                ));
                break;
            }
            Some(Ok(Message::Binary(_))) => {
                log.lock().unwrap().unexpected.push(json!("binary message"));
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                log.lock().unwrap().ended = Some(format!("error: {e}"));
                break;
            }
            None => {
                log.lock().unwrap().ended = Some("eof".into());
                break;
            }
        };
        let v: Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(_) => {
                log.lock().unwrap().unexpected.push(json!(text.as_str()));
                continue;
            }
        };
        {
            let mut log = log.lock().unwrap();
            if let Some(id) = v.get("id").and_then(Value::as_u64) {
                if let Some(result) = v.get("result") {
                    if result.get("recovered").is_some() {
                        if let Some(ch) = result["channel"].as_str() {
                            log.channels
                                .entry(ch.to_string())
                                .or_default()
                                .push(Item::Subscribed(result.clone()));
                        }
                    }
                }
                drop(log);
                if let Some(tx) = pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(v);
                }
            } else if let Some(reset) = v.get("reset") {
                let ch = reset["channel"].as_str().unwrap_or("").to_string();
                log.channels.entry(ch).or_default().push(Item::Reset {
                    epoch: reset["epoch"].as_str().unwrap_or("").to_string(),
                    offset: reset["offset"].as_u64().unwrap_or(0),
                    reason: reset["reason"].as_str().unwrap_or("").to_string(),
                });
            } else if let (Some(ch), Some(member)) = (v["channel"].as_str(), v.get("join")) {
                let item = Item::Join(member.clone());
                log.channels.entry(ch.to_string()).or_default().push(item);
            } else if let (Some(ch), Some(member)) = (v["channel"].as_str(), v.get("leave")) {
                let item = Item::Leave(member.clone());
                log.channels.entry(ch.to_string()).or_default().push(item);
            } else if let (Some(ch), Some(p)) = (v["channel"].as_str(), Pub::from_json(&v)) {
                log.channels
                    .entry(ch.to_string())
                    .or_default()
                    .push(Item::Pub(p));
            } else {
                log.unexpected.push(v);
            }
        }
        n += 1;
        changed.send_replace(n);
    }
    // Fail every waiting request.
    pending.lock().unwrap().clear();
    changed.send_replace(n + 1);
}
