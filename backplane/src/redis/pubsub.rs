//! The pub/sub link of one node: which channels the node listens to at Redis, and the task that
//! turns pub/sub messages into in-order, gap-free deliveries to the node's sink.
//!
//! - Subscriptions are batched (requests that arrive together become one SUBSCRIBE) and linger
//!   for `subscribe_linger` after the last local subscriber left, against churn.
//! - Each channel remembers the last offset delivered. A message that skips offsets makes the
//!   task read the gap from history and deliver it first; an older one is a duplicate and dropped.
//! - Pub/sub messages published while the link was down are lost by Redis. So when Redis confirms
//!   a subscription again after a disconnect, or the link comes back from unhealthy, the affected
//!   channels are re-synced from history.
//! - Health is end to end: every `health_interval` the node publishes a nonce to its own health
//!   channel through the command path and expects it back on this link. No answer within two
//!   intervals marks the link unhealthy, which `/readyz` reports.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commands::unavailable;
use super::connection::Connection;
use super::{RedisConfig, Shared};
use crate::{BackplaneError, Publication};

type Ack = oneshot::Sender<Result<(), BackplaneError>>;

enum Request {
    Subscribe(Arc<str>, Ack),
    Unsubscribe(Arc<str>),
}

/// The backplane's handle on its link task.
pub(crate) struct Link {
    requests: mpsc::UnboundedSender<Request>,
}

impl Link {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        config: &RedisConfig,
    ) -> Result<Link, BackplaneError> {
        let (push_tx, pushes) = mpsc::unbounded_channel();
        let connection = Connection::open(&config.target, config, push_tx).await?;
        let (requests, request_rx) = mpsc::unbounded_channel();
        let node_id = format!("{:016x}", rand::random::<u64>());
        let mut task = Task {
            health_channel: shared.keys.health(&node_id),
            shared,
            connection,
            pushes,
            requests: request_rx,
            channels: HashMap::new(),
            by_pubsub_name: HashMap::new(),
            pending: Vec::new(),
            health_interval: config.health_interval,
            linger: config.subscribe_linger,
            command_timeout: config.command_timeout,
            health_nonce: 0,
            health_waiting_since: None,
            disconnected: false,
        };
        let health_channel = task.health_channel.clone();
        task.connection
            .subscribe(&[health_channel], task.command_timeout)
            .await?;
        tokio::spawn(task.run());
        Ok(Link { requests })
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Subscribe(channel.into(), tx))
            .map_err(|_| unavailable("pub/sub link stopped"))?;
        rx.await.map_err(|_| unavailable("pub/sub link stopped"))?
    }

    pub(crate) fn unsubscribe(&self, channel: &str) {
        let _ = self.requests.send(Request::Unsubscribe(channel.into()));
    }
}

struct ChannelState {
    name: Arc<str>,
    pubsub_name: String,
    /// Epoch and offset of the last publication delivered to the sink.
    last: Option<(Arc<str>, u64)>,
    /// Set while no local subscriber wants the channel; unsubscribed at Redis when it passes.
    linger_until: Option<Instant>,
}

struct Task {
    shared: Arc<Shared>,
    connection: Connection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    requests: mpsc::UnboundedReceiver<Request>,
    channels: HashMap<Arc<str>, ChannelState>,
    by_pubsub_name: HashMap<String, Arc<str>>,
    /// Subscribe requests not yet sent to Redis.
    pending: Vec<(Arc<str>, Ack)>,
    health_channel: String,
    health_interval: Duration,
    linger: Duration,
    command_timeout: Duration,
    health_nonce: u64,
    /// When the oldest unanswered health probe was sent.
    health_waiting_since: Option<Instant>,
    /// A disconnect was seen; channels are re-synced when Redis confirms them again.
    disconnected: bool,
}

impl Task {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.health_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = self.requests.recv() => {
                    let Some(request) = request else { return };
                    self.on_request(request);
                    while let Ok(request) = self.requests.try_recv() {
                        self.on_request(request);
                    }
                    self.flush_subscribes().await;
                }
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push).await;
                }
                _ = ticker.tick() => {
                    self.check_health().await;
                    self.expire_lingers().await;
                }
            }
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Subscribe(channel, ack) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    // Still subscribed at Redis (lingering or already live).
                    state.linger_until = None;
                    let _ = ack.send(Ok(()));
                } else {
                    self.pending.push((channel, ack));
                }
            }
            Request::Unsubscribe(channel) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.linger_until = Some(Instant::now() + self.linger);
                } else {
                    // Unsubscribed before its subscribe was flushed: drop the pending request
                    // only if nobody waits on it (the hub serialises these per channel).
                    self.pending
                        .retain(|(c, ack)| c != &channel || !ack.is_closed());
                }
            }
        }
    }

    async fn flush_subscribes(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let names: Vec<String> = pending
            .iter()
            .map(|(channel, _)| self.shared.keys.pubsub(channel))
            .collect();
        if let Err(e) = self
            .connection
            .subscribe(&names, self.command_timeout)
            .await
        {
            self.shared.health.count_error();
            for (_, ack) in pending {
                let _ = ack.send(Err(BackplaneError::Unavailable(e.to_string())));
            }
            return;
        }
        for ((channel, ack), pubsub_name) in pending.into_iter().zip(names) {
            // The position read after SUBSCRIBE: every later publication arrives on the link.
            let last = match super::history(&self.shared, &channel, u64::MAX, 0).await {
                Ok(page) => Some((page.epoch, page.top)),
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "position read after subscribe failed");
                    None
                }
            };
            self.by_pubsub_name
                .insert(pubsub_name.clone(), channel.clone());
            self.channels.insert(
                channel.clone(),
                ChannelState {
                    name: channel,
                    pubsub_name,
                    last,
                    linger_until: None,
                },
            );
            let _ = ack.send(Ok(()));
        }
    }

    async fn expire_lingers(&mut self) {
        let now = Instant::now();
        let expired: Vec<Arc<str>> = self
            .channels
            .values()
            .filter(|s| s.linger_until.is_some_and(|t| t <= now))
            .map(|s| s.name.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut names = Vec::with_capacity(expired.len());
        for channel in expired {
            if let Some(state) = self.channels.remove(&channel) {
                self.by_pubsub_name.remove(&state.pubsub_name);
                names.push(state.pubsub_name);
            }
        }
        if let Err(e) = self
            .connection
            .unsubscribe(&names, self.command_timeout)
            .await
        {
            // Harmless: messages for channels we no longer track are ignored.
            tracing::debug!(error = %e, "unsubscribe failed");
        }
    }

    async fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let [Value::BulkString(name), Value::BulkString(payload)] = &push.data[..] else {
                    return;
                };
                if name[..] == *self.health_channel.as_bytes() {
                    self.on_health_echo(payload).await;
                    return;
                }
                self.on_message(payload).await;
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                if !self.disconnected {
                    return;
                }
                // Redis confirms a subscription again after a reconnect: what was published
                // meanwhile was lost by pub/sub, so read it from history.
                let Some(Value::BulkString(name)) = push.data.first() else {
                    return;
                };
                let Ok(name) = std::str::from_utf8(name) else {
                    return;
                };
                if let Some(channel) = self.by_pubsub_name.get(name).cloned() {
                    self.resync(&channel).await;
                }
            }
            PushKind::Disconnection => {
                self.disconnected = true;
                self.shared.commands.reset();
                self.shared
                    .health
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                self.shared
                    .health
                    .set_unhealthy("pub/sub connection lost; reconnecting".into());
            }
            _ => {}
        }
    }

    async fn on_health_echo(&mut self, payload: &[u8]) {
        if payload != self.health_nonce.to_string().as_bytes() {
            return;
        }
        self.health_waiting_since = None;
        if self.shared.health.set_healthy() {
            self.disconnected = false;
            // Whatever was published while the link was down is in history.
            let channels: Vec<Arc<str>> = self.channels.keys().cloned().collect();
            for channel in channels {
                self.resync(&channel).await;
            }
        }
    }

    async fn check_health(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.health_waiting_since {
            if now.duration_since(since) >= self.health_interval * 2 {
                self.shared.health.set_unhealthy(format!(
                    "no round trip through pub/sub for {:?}",
                    now.duration_since(since)
                ));
                // A command on the link makes a dead connection notice and reconnect.
                let health_channel = self.health_channel.clone();
                let _ = self
                    .connection
                    .subscribe(&[health_channel], self.command_timeout)
                    .await;
            }
        }
        self.health_nonce += 1;
        self.health_waiting_since.get_or_insert(now);
        let shared = self.shared.clone();
        let channel = self.health_channel.clone();
        let nonce = self.health_nonce.to_string();
        tokio::spawn(async move {
            if let Err(e) = shared.commands.publish_raw(&channel, &nonce).await {
                tracing::debug!(error = %e, "health probe publish failed");
            }
        });
    }

    async fn on_message(&mut self, payload: &[u8]) {
        let Some(Message {
            offset,
            epoch,
            published_us,
            tag,
            channel,
            data,
        }) = parse_message(payload)
        else {
            tracing::warn!("malformed pub/sub message ignored");
            return;
        };
        let Some(state) = self.channels.get(channel) else {
            return;
        };
        let name = state.name.clone();
        let last = state.last.clone();
        let mut epoch_arc = None;
        if let Some((last_epoch, last)) = last {
            if *last_epoch == *epoch {
                if offset <= last {
                    return;
                }
                if offset > last + 1 {
                    self.fill(&name, last, offset - 1).await;
                }
                epoch_arc = Some(last_epoch);
            }
        }
        let Some(state) = self.channels.get_mut(&name) else {
            return;
        };
        if let Some((last_epoch, last)) = &state.last {
            if **last_epoch == *epoch && offset <= *last {
                return;
            }
        }
        let epoch = epoch_arc.unwrap_or_else(|| epoch.into());
        state.last = Some((epoch.clone(), offset));
        let publication = Publication::new(name, offset, epoch, data)
            .published_at(published_us)
            .tagged(tag);
        self.shared.sink.deliver(Arc::new(publication));
    }

    /// Delivers offsets `after + 1 ..= until` from history, in order.
    async fn fill(&mut self, channel: &Arc<str>, after: u64, until: u64) {
        self.shared.health.gap_fills.fetch_add(1, Ordering::Relaxed);
        self.deliver_from_history(channel, after, Some(until)).await;
    }

    /// Delivers everything history holds after the channel's last offset.
    async fn resync(&mut self, channel: &Arc<str>) {
        let Some(state) = self.channels.get(channel) else {
            return;
        };
        match &state.last {
            Some((_, last)) => {
                let last = *last;
                if self.deliver_from_history(channel, last, None).await > 0 {
                    self.shared.health.gap_fills.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                if let Ok(page) = super::history(&self.shared, channel, u64::MAX, 0).await {
                    if let Some(state) = self.channels.get_mut(channel) {
                        state.last = Some((page.epoch, page.top));
                    }
                }
            }
        }
    }

    /// Returns how many publications it delivered.
    async fn deliver_from_history(
        &mut self,
        channel: &Arc<str>,
        mut after: u64,
        until: Option<u64>,
    ) -> usize {
        const PAGE: usize = 1000;
        let mut delivered = 0;
        loop {
            let limit = match until {
                Some(until) if until <= after => return delivered,
                Some(until) => ((until - after) as usize).min(PAGE),
                None => PAGE,
            };
            let page = match super::history(&self.shared, channel, after, limit).await {
                Ok(page) => page,
                Err(e) => {
                    // Sessions notice the gap themselves and read history when it is back.
                    tracing::warn!(%channel, error = %e, "gap fill from history failed");
                    self.shared.health.count_error();
                    return delivered;
                }
            };
            let Some(state) = self.channels.get_mut(channel) else {
                return delivered;
            };
            if state.last.as_ref().is_some_and(|(e, _)| *e != page.epoch) {
                // History was lost: continue from the new epoch's top.
                state.last = Some((page.epoch, page.top));
                return delivered;
            }
            let count = page.publications.len();
            delivered += count;
            for publication in page.publications {
                after = publication.offset;
                state.last = Some((publication.epoch.clone(), publication.offset));
                self.shared.sink.deliver(publication);
            }
            if count < limit {
                return delivered;
            }
        }
    }
}

/// A publication as the publish script sends it through pub/sub.
#[derive(Debug, PartialEq, Eq)]
struct Message<'a> {
    offset: u64,
    epoch: &'a str,
    published_us: u64,
    tag: u32,
    channel: &'a str,
    data: &'a [u8],
}

/// Splits `"<offset> <epoch> <publish time, us> <tag> <channel>\n<data>"` (the tag is 8 hex
/// digits; the channel is last). Also reads the untagged form of nodes from before tags,
/// `"<offset> <epoch> <publish time, us> <channel>\n<data>"`, as tag 0, so a rolling deploy
/// does not drop their publications (channel names have no whitespace, so the forms differ in
/// their number of fields).
fn parse_message(payload: &[u8]) -> Option<Message<'_>> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&payload[..newline]).ok()?;
    let tagged = head.split(' ').count() >= 5;
    let mut parts = head.splitn(if tagged { 5 } else { 4 }, ' ');
    let offset = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let published_us = parts.next()?.parse().ok()?;
    let tag = if tagged {
        crate::parse_tag(parts.next()?)?
    } else {
        0
    };
    let channel = parts.next()?;
    Some(Message {
        offset,
        epoch,
        published_us,
        tag,
        channel,
        data: &payload[newline + 1..],
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_message, Message};

    #[test]
    fn parses_the_script_message() {
        let message =
            parse_message(b"42 e1 1700000000000123 00c0ffee chat:a\n{\"x\":\"a b\\nc\"}").unwrap();
        let expected = Message {
            offset: 42,
            epoch: "e1",
            published_us: 1700000000000123,
            tag: 0xc0ffee,
            channel: "chat:a",
            data: b"{\"x\":\"a b\\nc\"}",
        };
        assert_eq!(message, expected);
        assert!(parse_message(b"x e 1 0000000a c\n1").is_none());
        assert!(parse_message(b"1 e 1 0000000a c").is_none());
        assert!(parse_message(b"1 e 1 xyz c\n1").is_none(), "not a tag");
        let untagged = parse_message(b"7 e2 1700000000000456 chat:b\n[1]").unwrap();
        let expected = Message {
            offset: 7,
            epoch: "e2",
            published_us: 1700000000000456,
            tag: 0,
            channel: "chat:b",
            data: b"[1]",
        };
        assert_eq!(untagged, expected, "a node from before tags");
    }
}
