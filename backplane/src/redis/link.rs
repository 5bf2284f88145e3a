//! The pub/sub link's task: turns subscribe requests, Redis pushes and the results of its reads
//! into per-channel state changes and deliveries to the node's sink. It never waits on Redis in
//! its own loop: commands go to the subscription worker, reads run as tasks (a bounded number at
//! a time) whose results come back as completions, and each channel has at most one read in
//! flight while its live messages wait in order (see [`ChannelState`]).
//!
//! - Pub/sub messages published while the link was down are lost by Redis. After a disconnect,
//!   every channel waits for Redis to confirm its subscription again (or for a message on it),
//!   then re-reads history: tracked per channel, so a cluster shard that comes back late is
//!   covered too. Coming back from unhealthy re-reads every channel as well.
//! - A subscription Redis drops by itself (the `sunsubscribe` push when a cluster slot moves) is
//!   subscribed again, which routes it to the slot's new owner, and then re-read.
//! - Health is end to end: every `health_interval` the node publishes a nonce to its own health
//!   channel through the command path and expects it back on this link. No answer within two
//!   intervals marks the link unhealthy, which `/readyz` reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::channel_state::{ChannelState, Delivered, Page, Work, PAGE};
use super::link_reads;
use super::pubsub::{parse_message, Message, PresenceMessage, PublicationMessage, Request};
use super::subscription_worker::Change;
use super::Shared;
use crate::{BackplaneError, Publication};

/// History reads and rotations of the link in flight at once.
const READS_IN_FLIGHT: usize = 16;

/// The result of work the link started off its loop.
pub(crate) enum Completion {
    Subscribed {
        batch: Vec<(Arc<str>, String, u64)>,
        result: Result<Vec<Delivered>, BackplaneError>,
    },
    Read {
        channel: Arc<str>,
        incarnation: u64,
        since: u64,
        result: Result<Page, BackplaneError>,
    },
    Rotated {
        channel: Arc<str>,
        incarnation: u64,
        seen: Delivered,
        result: Result<(Option<Arc<str>>, bool), BackplaneError>,
    },
    ResubscribeFailed(Vec<String>),
    UnsubscribeFailed(Vec<String>),
}

/// What the link task is started with.
pub(crate) struct Wiring {
    pub(crate) shared: Arc<Shared>,
    pub(crate) requests: mpsc::UnboundedReceiver<Request>,
    pub(crate) pushes: mpsc::Receiver<PushInfo>,
    /// Raised when pushes were dropped because the push queue was full.
    pub(crate) pushes_dropped: Arc<AtomicBool>,
    pub(crate) changes: mpsc::UnboundedSender<Change>,
    pub(crate) completions: mpsc::UnboundedReceiver<Completion>,
    /// Cloned into every read task; holding it also keeps `completions` open.
    pub(crate) completion_tx: mpsc::UnboundedSender<Completion>,
    pub(crate) health_channel: String,
    pub(crate) health_interval: Duration,
    pub(crate) linger: Duration,
}

pub(crate) struct Task {
    w: Wiring,
    channels: HashMap<Arc<str>, ChannelState>,
    by_pubsub_name: HashMap<String, Arc<str>>,
    /// Subscribe requests not yet sent to Redis.
    pending: Vec<(Arc<str>, super::pubsub::Ack)>,
    reads: Arc<Semaphore>,
    next_incarnation: u64,
    /// Unsubscribes and resubscribes that failed, sent again on the next tick.
    unsubscribe_retry: Vec<String>,
    resubscribe_retry: Vec<String>,
    health_nonce: u64,
    /// When the oldest unanswered health probe was sent.
    health_waiting_since: Option<Instant>,
    /// Since when the link is healthy again (None while unhealthy).
    healthy_since: Option<Instant>,
    /// Publications to hand to the sink, in order.
    out: Vec<Arc<Publication>>,
}

impl Task {
    pub(crate) fn new(wiring: Wiring) -> Task {
        Task {
            w: wiring,
            channels: HashMap::new(),
            by_pubsub_name: HashMap::new(),
            pending: Vec::new(),
            reads: Arc::new(Semaphore::new(READS_IN_FLIGHT)),
            next_incarnation: 0,
            unsubscribe_retry: Vec::new(),
            resubscribe_retry: Vec::new(),
            health_nonce: 0,
            health_waiting_since: None,
            healthy_since: Some(Instant::now()),
            out: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.w.health_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = self.w.requests.recv() => {
                    let Some(request) = request else { return };
                    self.on_request(request);
                    while let Ok(request) = self.w.requests.try_recv() {
                        self.on_request(request);
                    }
                    self.flush_subscribes();
                }
                push = self.w.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push);
                }
                Some(completion) = self.w.completions.recv() => self.on_completion(completion),
                _ = ticker.tick() => {
                    self.check_health();
                    self.expire_lingers();
                    self.retry_failed();
                }
            }
            if self.w.pushes_dropped.swap(false, Ordering::Relaxed) {
                tracing::warn!("pub/sub push queue overflowed; re-reading every channel");
                self.resync_all();
            }
            for publication in self.out.drain(..) {
                self.w.shared.sink.deliver(publication);
            }
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Subscribe(channel, ack) => match self.channels.get_mut(&channel) {
                // Still subscribed at Redis (lingering or live), or being subscribed.
                Some(state) => {
                    state.linger_until = None;
                    if state.is_subscribing() {
                        state.waiters.push(ack);
                    } else {
                        let _ = ack.send(Ok(()));
                    }
                }
                None => self.pending.push((channel, ack)),
            },
            Request::Unsubscribe(channel) => match self.channels.get_mut(&channel) {
                Some(state) => state.linger_until = Some(Instant::now() + self.w.linger),
                // Not sent yet: drop the request unless someone still waits on it.
                None => self
                    .pending
                    .retain(|(c, ack)| c != &channel || !ack.is_closed()),
            },
        }
    }

    fn flush_subscribes(&mut self) {
        let mut batch = Vec::new();
        for (channel, ack) in std::mem::take(&mut self.pending) {
            if ack.is_closed() {
                continue; // The caller went away before anything was subscribed.
            }
            if let Some(state) = self.channels.get_mut(&channel) {
                state.linger_until = None;
                if state.is_subscribing() {
                    state.waiters.push(ack);
                } else {
                    let _ = ack.send(Ok(()));
                }
                continue;
            }
            self.next_incarnation += 1;
            let incarnation = self.next_incarnation;
            let pubsub_name = self.w.shared.keys.pubsub(&channel);
            let mut state =
                ChannelState::subscribing(channel.clone(), pubsub_name.clone(), incarnation);
            state.waiters.push(ack);
            self.by_pubsub_name
                .insert(pubsub_name.clone(), channel.clone());
            self.channels.insert(channel.clone(), state);
            batch.push((channel, pubsub_name, incarnation));
        }
        if !batch.is_empty() {
            self.count_subscriptions();
            let _ = self.w.changes.send(Change::Subscribe(batch));
        }
    }

    fn count_subscriptions(&self) {
        self.w
            .shared
            .health
            .set_subscriptions(self.channels.len() as u64);
    }

    fn remove(&mut self, channel: &str) -> Option<ChannelState> {
        let state = self.channels.remove(channel)?;
        self.by_pubsub_name.remove(&state.pubsub_name);
        Some(state)
    }

    fn expire_lingers(&mut self) {
        let now = Instant::now();
        let expired: Vec<Arc<str>> = self
            .channels
            .values()
            .filter(|s| !s.is_subscribing() && s.linger_until.is_some_and(|t| t <= now))
            .map(|s| s.name.clone())
            .collect();
        let mut names = std::mem::take(&mut self.unsubscribe_retry);
        // A retried one may have been subscribed again since.
        names.retain(|name| !self.by_pubsub_name.contains_key(name));
        names.extend(
            expired
                .iter()
                .filter_map(|channel| self.remove(channel))
                .map(|state| state.pubsub_name),
        );
        if !expired.is_empty() {
            self.count_subscriptions();
        }
        if !names.is_empty() {
            let _ = self.w.changes.send(Change::Unsubscribe(names));
        }
    }

    fn start(&self, channel: Arc<str>, incarnation: u64, work: Work) {
        let shared = self.w.shared.clone();
        let done = self.w.completion_tx.clone();
        let permits = self.reads.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let completion = match work {
                Work::Read { since } => Completion::Read {
                    result: link_reads::page(&shared, &channel, since, PAGE).await,
                    channel,
                    incarnation,
                    since,
                },
                Work::Rotate { seen } => Completion::Rotated {
                    result: link_reads::rotate(&shared, &channel, &seen).await,
                    channel,
                    incarnation,
                    seen,
                },
            };
            let _ = done.send(completion);
        });
    }

    /// Runs `f` on the channel's state if it is still `incarnation`, then starts its next read.
    fn with_state(
        &mut self,
        channel: &Arc<str>,
        incarnation: Option<u64>,
        f: impl FnOnce(&mut ChannelState, &mut Vec<Arc<Publication>>) -> Option<Work>,
    ) {
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        if incarnation.is_some_and(|i| i != state.incarnation) {
            return;
        }
        let incarnation = state.incarnation;
        if let Some(work) = f(state, &mut self.out) {
            self.start(channel.clone(), incarnation, work);
        }
    }

    fn resync_all(&mut self) {
        let channels: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        for channel in &channels {
            self.with_state(channel, None, |state, _| state.resync());
        }
    }

    fn retry_failed(&mut self) {
        let channels: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        for channel in &channels {
            self.with_state(channel, None, |state, _| state.retry_failed());
        }
        let mut names = std::mem::take(&mut self.resubscribe_retry);
        // Channels whose subscription Redis has not confirmed since a disconnect although the
        // link is healthy again (for two intervals): subscribe them again.
        if self
            .healthy_since
            .is_some_and(|t| t.elapsed() >= self.w.health_interval * 2)
        {
            names.extend(
                self.channels
                    .values()
                    .filter(|s| s.awaiting_confirmation)
                    .map(|s| s.pubsub_name.clone()),
            );
        }
        names.retain(|name| self.by_pubsub_name.contains_key(name));
        names.sort_unstable();
        names.dedup();
        if !names.is_empty() {
            let _ = self.w.changes.send(Change::Resubscribe(names));
        }
    }

    fn on_completion(&mut self, completion: Completion) {
        match completion {
            Completion::Subscribed { batch, result } => self.on_subscribed(batch, result),
            Completion::Read {
                channel,
                incarnation,
                since,
                result,
            } => {
                let result = result.map_err(|e| {
                    tracing::warn!(%channel, error = %e, "history read of the pub/sub link failed");
                    self.w.shared.health.count_error();
                });
                let before = self.out.len();
                self.with_state(&channel, Some(incarnation), |state, out| {
                    state.on_page(since, result, out)
                });
                if self.out.len() > before {
                    self.w
                        .shared
                        .health
                        .gap_fills
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Completion::Rotated {
                channel,
                incarnation,
                seen,
                result,
            } => {
                let result = match result {
                    Ok((epoch, rotated)) => {
                        if rotated {
                            tracing::warn!(%channel, old = ?seen.epoch, new = ?epoch, top_seen = seen.offset,
                                "Redis lost acknowledged publications of the channel; epoch rotated");
                        }
                        Ok(epoch)
                    }
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "epoch rotation failed");
                        self.w.shared.health.count_error();
                        Err(())
                    }
                };
                self.with_state(&channel, Some(incarnation), |state, out| {
                    state.on_rotated(result, out)
                });
            }
            Completion::ResubscribeFailed(names) => self.resubscribe_retry.extend(names),
            Completion::UnsubscribeFailed(names) => {
                // Only those nobody subscribed to again meanwhile.
                self.unsubscribe_retry.extend(
                    names
                        .into_iter()
                        .filter(|name| !self.by_pubsub_name.contains_key(name)),
                );
            }
        }
    }

    fn on_subscribed(
        &mut self,
        batch: Vec<(Arc<str>, String, u64)>,
        result: Result<Vec<Delivered>, BackplaneError>,
    ) {
        let positions = match result {
            Ok(positions) => positions,
            Err(e) => {
                tracing::warn!(error = %e, channels = batch.len(), "subscribe failed");
                self.w.shared.health.count_error();
                let mut names = Vec::new();
                for (channel, name, incarnation) in batch {
                    if self
                        .channels
                        .get(&channel)
                        .is_some_and(|s| s.incarnation == incarnation)
                    {
                        let state = self.remove(&channel).expect("present");
                        for ack in state.waiters {
                            let _ = ack.send(Err(BackplaneError::Unavailable(e.to_string())));
                        }
                        names.push(name);
                    }
                }
                self.count_subscriptions();
                // Redis may have taken part of the batch.
                if !names.is_empty() {
                    let _ = self.w.changes.send(Change::Unsubscribe(names));
                }
                return;
            }
        };
        let linger_until = Instant::now() + self.w.linger;
        for ((channel, _, incarnation), position) in batch.into_iter().zip(positions) {
            self.with_state(&channel, Some(incarnation), |state, out| {
                let work = state.on_position(position, out);
                let mut answered = false;
                for ack in std::mem::take(&mut state.waiters) {
                    answered |= ack.send(Ok(())).is_ok();
                }
                if !answered && state.linger_until.is_none() {
                    // Every caller went away: nobody knows the node is subscribed, so nobody
                    // will unsubscribe. Let it linger out.
                    state.linger_until = Some(linger_until);
                }
                work
            });
        }
    }

    fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let [Value::BulkString(name), Value::BulkString(payload)] = &push.data[..] else {
                    return;
                };
                if name[..] == *self.w.health_channel.as_bytes() {
                    self.on_health_echo(payload);
                } else {
                    self.on_message(payload);
                }
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                if let Some(channel) = self.tracked(&push) {
                    self.with_state(&channel, None, |state, _| state.on_confirmed());
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                let name = match push.data.first() {
                    Some(Value::BulkString(name)) => String::from_utf8_lossy(name).into_owned(),
                    _ => return,
                };
                if name == self.w.health_channel {
                    let _ = self.w.changes.send(Change::Resubscribe(vec![name]));
                } else if let Some(channel) = self.by_pubsub_name.get(&name).cloned() {
                    // Not ours (we forget a channel before unsubscribing it): Redis dropped it,
                    // e.g. its cluster slot moved. Subscribing again routes to the new owner.
                    tracing::info!(%channel, "Redis ended the subscription; subscribing again");
                    if let Some(state) = self.channels.get_mut(&channel) {
                        state.awaiting_confirmation = true;
                    }
                    let _ = self.w.changes.send(Change::Resubscribe(vec![name]));
                }
            }
            PushKind::Disconnection => {
                for state in self.channels.values_mut() {
                    state.awaiting_confirmation = true;
                }
                self.healthy_since = None;
                let shared = &self.w.shared;
                shared.commands.reset();
                shared.health.reconnects.fetch_add(1, Ordering::Relaxed);
                shared
                    .health
                    .set_unhealthy("pub/sub connection lost; reconnecting".into());
            }
            _ => {}
        }
    }

    /// The tracked channel a (un)subscribe push is about.
    fn tracked(&self, push: &PushInfo) -> Option<Arc<str>> {
        let Some(Value::BulkString(name)) = push.data.first() else {
            return None;
        };
        let name = std::str::from_utf8(name).ok()?;
        self.by_pubsub_name.get(name).cloned()
    }

    fn on_message(&mut self, payload: &[u8]) {
        let Some(message) = parse_message(payload) else {
            tracing::warn!("malformed pub/sub message ignored");
            return;
        };
        let channel = match &message {
            Message::Publication(p) => p.channel,
            Message::Presence(p) => p.channel,
        };
        let Some(state) = self.channels.get(channel) else {
            return;
        };
        let name = state.name.clone();
        // Share the epoch's allocation with the channel's state when it is the same.
        let epoch = |epoch: &str| match &state.delivered().epoch {
            Some(e) if **e == *epoch => e.clone(),
            _ => Arc::from(epoch),
        };
        let publication = match message {
            Message::Publication(PublicationMessage {
                offset,
                epoch: e,
                published_us,
                tag,
                data,
                ..
            }) => Publication::new(name.clone(), offset, epoch(e), tag, data)
                .published_at(published_us),
            Message::Presence(PresenceMessage {
                kind,
                after,
                epoch: e,
                member,
                ..
            }) => Publication::presence_event(kind, name.clone(), epoch(e), after, member),
        };
        let publication = Arc::new(publication);
        self.with_state(&name, None, |state, out| state.on_live(publication, out));
    }

    fn on_health_echo(&mut self, payload: &[u8]) {
        if payload != self.health_nonce.to_string().as_bytes() {
            return;
        }
        self.health_waiting_since = None;
        self.healthy_since.get_or_insert_with(Instant::now);
        if self.w.shared.health.set_healthy() {
            // Whatever was published while the link was down is in history.
            self.resync_all();
        }
    }

    fn check_health(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.health_waiting_since {
            if now.duration_since(since) >= self.w.health_interval * 2 {
                self.healthy_since = None;
                self.w.shared.health.set_unhealthy(format!(
                    "no round trip through pub/sub for {:?}",
                    now.duration_since(since)
                ));
                // A command on the link makes a dead connection notice and reconnect.
                let _ = self
                    .w
                    .changes
                    .send(Change::Resubscribe(vec![self.w.health_channel.clone()]));
            }
        }
        self.health_nonce += 1;
        self.health_waiting_since.get_or_insert(now);
        let shared = self.w.shared.clone();
        let channel = self.w.health_channel.clone();
        let nonce = self.health_nonce.to_string();
        tokio::spawn(async move {
            if let Err(e) = shared.commands.publish_raw(&channel, &nonce).await {
                tracing::debug!(error = %e, "health probe publish failed");
            }
        });
    }
}
