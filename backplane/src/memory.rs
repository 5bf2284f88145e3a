//! The embedded backplane: one node, no external store. History lives in this process, so a
//! restart loses it, and a channel gets a fresh epoch when it is created again.
//!
//! Presence is a table of members per channel, changed under the same lock as publishing, so a
//! join or leave reaches the sink exactly between the publications it was made between. The
//! channel list is the node's last report (there is no other node to sum).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::{
    new_epoch, new_tag, Backplane, BackplaneError, BatchItem, ChannelCount, HistoryPage,
    Idempotency, IdempotencyScope, Kind, Member, Presence, Publication, PublicationSink,
    PublishAck, Retention, Settings,
};

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, Arc<Mutex<Channel>>>>;

/// In-process backplane: per-channel offset, epoch, bounded history and synchronous fan-out.
pub struct MemoryBackplane {
    shards: Box<[Shard]>,
    hasher: RandomState,
    settings: Settings,
    /// How long an idle channel with no history and no subscribers keeps its epoch and offset.
    idle_ttl: Duration,
    idempotency_window: Duration,
    sink: Arc<dyn PublicationSink>,
    /// The node's last [`Backplane::report_channels`].
    channel_report: Mutex<Vec<ChannelCount>>,
}

struct Channel {
    name: Arc<str>,
    epoch: Arc<str>,
    top: u64,
    /// Tag of the publication at `top` (0 while `top` is 0); outlives its history entry.
    top_tag: u32,
    /// The version of the last versioned publish that was stored ([`BatchItem::version`]).
    version: Option<u64>,
    history: VecDeque<Entry>,
    node_subscribed: bool,
    touched: Instant,
    /// Idempotency keys of recent publishes, one map per [`IdempotencyScope`].
    recent_keys: [HashMap<Box<str>, Remembered>; 2],
    /// Presence: member by client id.
    members: HashMap<Box<str>, Member>,
    /// Set when the sweeper removed the channel from its shard; a holder must look it up again.
    removed: bool,
}

struct Entry {
    at: Instant,
    publication: Arc<Publication>,
    /// Tag of the publication before this one, so the tag at an offset whose entry was trimmed
    /// is still known while its successor is kept.
    prev_tag: u32,
}

/// What an idempotent publish returned, and a digest of its data to tell a retry from a conflict.
struct Remembered {
    ack: PublishAck,
    data_digest: u64,
    at: Instant,
}

fn scope_index(scope: IdempotencyScope) -> usize {
    match scope {
        IdempotencyScope::Client => 0,
        IdempotencyScope::Server => 1,
    }
}

impl Channel {
    fn new(name: Arc<str>, now: Instant) -> Self {
        Channel {
            name,
            epoch: new_epoch(),
            top: 0,
            top_tag: 0,
            version: None,
            history: VecDeque::new(),
            node_subscribed: false,
            touched: now,
            recent_keys: Default::default(),
            members: HashMap::new(),
            removed: false,
        }
    }

    fn trim(&mut self, now: Instant, retention: &Retention) {
        while self.history.len() > retention.max_count {
            self.history.pop_front();
        }
        while let Some(front) = self.history.front() {
            if now.duration_since(front.at) < retention.max_age {
                break;
            }
            self.history.pop_front();
        }
    }

    /// Hands a join or leave of `member` to the sink, placed after the channel's top.
    fn announce(&self, kind: Kind, member: &[u8], sink: &dyn PublicationSink) {
        if !self.node_subscribed {
            return;
        }
        // A channel with no publication has no epoch yet, as history reads show it.
        let epoch: Arc<str> = if self.top == 0 {
            "".into()
        } else {
            self.epoch.clone()
        };
        let event = Publication::presence_event(kind, self.name.clone(), epoch, self.top, member);
        sink.deliver(Arc::new(event));
    }
}

impl MemoryBackplane {
    /// Creates the backplane and starts its sweeper, which expires old history and forgets idle
    /// channels; the sweeper stops when the backplane is dropped. Needs a Tokio runtime.
    pub fn new(settings: Settings, sink: Arc<dyn PublicationSink>) -> Arc<Self> {
        let period =
            (settings.shortest_age() / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let backplane = Arc::new(MemoryBackplane {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            idle_ttl: settings.meta_ttl,
            idempotency_window: settings.idempotency_window,
            settings,
            sink,
            channel_report: Mutex::new(Vec::new()),
        });
        tokio::spawn(sweep(Arc::downgrade(&backplane), period));
        backplane
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Runs `f` on the channel's state, creating the channel if needed.
    fn with_channel<R>(&self, channel: &str, f: impl FnOnce(&mut Channel, Instant) -> R) -> R {
        loop {
            let now = Instant::now();
            let state = {
                let mut shard = self.shard(channel).lock();
                match shard.get(channel) {
                    Some(state) => state.clone(),
                    None => {
                        let name: Arc<str> = channel.into();
                        let state = Arc::new(Mutex::new(Channel::new(name.clone(), now)));
                        shard.insert(name, state.clone());
                        state
                    }
                }
            };
            let mut state = state.lock();
            if state.removed {
                continue;
            }
            state.touched = now;
            return f(&mut state, now);
        }
    }

    /// Runs `f` on the channel's state if the channel exists; creates nothing.
    fn with_existing<R>(
        &self,
        channel: &str,
        f: impl FnOnce(&mut Channel, Instant) -> R,
    ) -> Option<R> {
        loop {
            let now = Instant::now();
            let state = self.shard(channel).lock().get(channel)?.clone();
            let mut state = state.lock();
            if state.removed {
                continue;
            }
            return Some(f(&mut state, now));
        }
    }

    /// Forgets a channel that was never published to and holds nothing, so a subscribe and
    /// unsubscribe of a fresh name leaves no state.
    fn forget_if_unused(&self, channel: &str) {
        let mut shard = self.shard(channel).lock();
        let unused = shard.get(channel).is_some_and(|state| {
            let mut state = state.lock();
            let unused = state.top == 0
                && !state.node_subscribed
                && state.members.is_empty()
                && state.recent_keys.iter().all(HashMap::is_empty);
            state.removed |= unused;
            unused
        });
        if unused {
            shard.remove(channel);
        }
    }

    fn sweep_once(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard.lock().retain(|_, state| {
                let mut state = state.lock();
                let retention = self.settings.retention_for(&state.name);
                state.trim(now, &retention);
                let window = self.idempotency_window;
                for keys in state.recent_keys.iter_mut() {
                    keys.retain(|_, remembered| now.duration_since(remembered.at) < window);
                }
                let idle = now.duration_since(state.touched) >= self.idle_ttl;
                let keep = state.node_subscribed
                    || !state.members.is_empty()
                    || !state.history.is_empty()
                    || state.recent_keys.iter().any(|keys| !keys.is_empty())
                    || !idle;
                state.removed = !keep;
                keep
            });
        }
    }

    /// Number of channels currently known (for tests and metrics).
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

async fn sweep(backplane: Weak<MemoryBackplane>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match backplane.upgrade() {
            Some(backplane) => backplane.sweep_once(),
            None => return,
        }
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    async fn publish_item(&self, item: &BatchItem<'_>) -> Result<PublishAck, BackplaneError> {
        let BatchItem {
            channel,
            ref data,
            idempotency,
            version,
        } = *item;
        // Keyed with the backplane's random hasher keys, so nobody can craft a colliding payload.
        let data_digest = idempotency.map(|_| self.hasher.hash_one(&data[..]));
        self.with_channel(channel, |state, now| {
            if let Some(Idempotency { scope, key }) = idempotency {
                if let Some(first) = state.recent_keys[scope_index(scope)].get(key) {
                    if now.duration_since(first.at) < self.idempotency_window {
                        if Some(first.data_digest) != data_digest {
                            return Err(crate::idempotency_conflict(&first.ack));
                        }
                        return Ok(first.ack.clone());
                    }
                }
            }
            if let Some(version) = version {
                if state.version.is_some_and(|last| version <= last) {
                    return Ok(PublishAck {
                        channel: state.name.clone(),
                        offset: state.top,
                        epoch: state.epoch.clone(),
                        tag: state.top_tag,
                        suppressed: true,
                    });
                }
                state.version = Some(version);
            }
            state.top += 1;
            let prev_tag = std::mem::replace(&mut state.top_tag, new_tag());
            let publication = Arc::new(
                Publication::new(
                    state.name.clone(),
                    state.top,
                    state.epoch.clone(),
                    state.top_tag,
                    data,
                )
                .published_at(crate::now_us()),
            );
            state.history.push_back(Entry {
                at: now,
                publication: publication.clone(),
                prev_tag,
            });
            let retention = self.settings.retention_for(&state.name);
            state.trim(now, &retention);
            let ack = PublishAck {
                channel: state.name.clone(),
                offset: state.top,
                epoch: state.epoch.clone(),
                tag: state.top_tag,
                suppressed: false,
            };
            if let (Some(Idempotency { scope, key }), Some(data_digest)) =
                (idempotency, data_digest)
            {
                let remembered = Remembered {
                    ack: ack.clone(),
                    data_digest,
                    at: now,
                };
                state.recent_keys[scope_index(scope)].insert(key.into(), remembered);
            }
            // Delivered under the channel lock, so every node-level consumer sees offsets in order.
            if state.node_subscribed {
                self.sink.deliver(publication);
            }
            Ok(ack)
        })
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        let page = self.with_existing(channel, |state, now| {
            let retention = self.settings.retention_for(&state.name);
            state.trim(now, &retention);
            let first = state
                .history
                .front()
                .map_or(state.top + 1, |e| e.publication.offset);
            let skip = since.saturating_add(1).saturating_sub(first) as usize;
            let since_tag = if since == state.top && since > 0 {
                Some(state.top_tag)
            } else if since >= first && since < state.top {
                state
                    .history
                    .get((since - first) as usize)
                    .map(|e| e.publication.tag)
            } else if since > 0 && since.checked_add(1) == Some(first) {
                state.history.front().map(|e| e.prev_tag)
            } else {
                None
            };
            HistoryPage {
                // The epoch exists once the channel has a publication.
                epoch: if state.top == 0 {
                    "".into()
                } else {
                    state.epoch.clone()
                },
                top: state.top,
                since_tag,
                top_tag: (state.top > 0).then_some(state.top_tag),
                publications: state
                    .history
                    .iter()
                    .skip(skip)
                    .take(limit)
                    .map(|e| e.publication.clone())
                    .collect(),
            }
        });
        Ok(page.unwrap_or_else(|| HistoryPage {
            epoch: "".into(),
            top: 0,
            publications: Vec::new(),
            since_tag: None,
            top_tag: None,
        }))
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.with_channel(channel, |state, _| state.node_subscribed = true);
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.with_existing(channel, |state, _| state.node_subscribed = false);
        self.forget_if_unused(channel);
        Ok(())
    }

    fn presence_join(&self, channel: &str, member: Member, announce: bool) {
        let json = announce.then(|| member.to_json());
        self.with_channel(channel, |state, _| {
            let client: Box<str> = member.client.as_str().into();
            let new = state.members.insert(client, member).is_none();
            // Delivered under the channel lock, between the publications it was made between.
            if let (true, Some(json)) = (new, json) {
                state.announce(Kind::Join, &json, &*self.sink);
            }
        });
    }

    fn presence_leave(&self, channel: &str, client: &str, announce: bool) {
        self.with_existing(channel, |state, _| {
            let member = state.members.remove(client);
            if let (true, Some(member)) = (announce, member) {
                state.announce(Kind::Leave, &member.to_json(), &*self.sink);
            }
        });
        self.forget_if_unused(channel);
    }

    /// Changes are applied when they are made.
    async fn flush_presence(&self) -> Result<(), BackplaneError> {
        Ok(())
    }

    async fn presence(&self, channel: &str, members: bool) -> Result<Presence, BackplaneError> {
        let presence = self.with_existing(channel, |state, _| {
            let users: HashSet<&str> = state
                .members
                .values()
                .filter_map(|m| m.user.as_deref())
                .collect();
            let list = members.then(|| {
                let mut list: Vec<Member> = state.members.values().cloned().collect();
                list.sort_by(|a, b| a.client.cmp(&b.client));
                list
            });
            Presence {
                count: state.members.len() as u64,
                users: users.len() as u64,
                members: list,
            }
        });
        Ok(presence.unwrap_or(Presence {
            count: 0,
            users: 0,
            members: members.then(Vec::new),
        }))
    }

    async fn report_channels(&self, counts: Vec<ChannelCount>) -> Result<(), BackplaneError> {
        *self.channel_report.lock() = counts;
        Ok(())
    }

    async fn channels(&self, prefix: &str) -> Result<Vec<ChannelCount>, BackplaneError> {
        let mut channels: Vec<ChannelCount> = self
            .channel_report
            .lock()
            .iter()
            .filter(|c| c.subscribers > 0 && c.channel.starts_with(prefix))
            .cloned()
            .collect();
        channels.sort_by(|a, b| a.channel.cmp(&b.channel));
        Ok(channels)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Arc<Publication>>>);
    impl PublicationSink for Collect {
        fn deliver(&self, publication: Arc<Publication>) {
            self.0.lock().push(publication);
        }
    }

    fn backplane(max_count: usize, max_age: Duration) -> (Arc<MemoryBackplane>, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let settings = Settings {
            retention: Retention { max_count, max_age },
            meta_ttl: Duration::from_secs(1),
            ..Settings::default()
        };
        (MemoryBackplane::new(settings, sink.clone()), sink)
    }

    fn data(n: u64) -> Bytes {
        Bytes::from(n.to_string())
    }

    #[tokio::test]
    async fn history_is_trimmed_by_age() {
        let (bp, _) = backplane(100, Duration::from_secs(10));
        bp.publish("a", data(1), None).await.unwrap();
        bp.publish("a", data(2), None).await.unwrap();
        // Age the entries by rewriting their timestamps rather than waiting ten seconds.
        bp.with_channel("a", |state, now| {
            state.history[0].at = now - Duration::from_secs(11);
            state.history[1].at = now - Duration::from_secs(5);
        });
        let page = bp.history("a", 0, 10).await.unwrap();
        let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![2]);
    }

    #[tokio::test]
    async fn idle_empty_channels_are_forgotten_but_subscribed_ones_kept() {
        let (bp, _) = backplane(100, Duration::from_secs(60));
        let unknown = bp.history("unknown", 0, 1).await.unwrap();
        assert_eq!((&*unknown.epoch, unknown.top), ("", 0));
        assert_eq!(bp.channel_count(), 0, "a read creates nothing");
        bp.subscribe("fresh").await.unwrap();
        bp.unsubscribe("fresh").await.unwrap();
        assert_eq!(
            bp.channel_count(),
            0,
            "nor does a subscribe and unsubscribe"
        );
        bp.publish("idle", data(1), None).await.unwrap();
        bp.with_channel("idle", |state, _| state.history.clear());
        bp.subscribe("kept").await.unwrap();
        for shard in bp.shards.iter() {
            for state in shard.lock().values() {
                state.lock().touched -= Duration::from_secs(2);
            }
        }
        bp.sweep_once();
        assert_eq!(bp.channel_count(), 1);
        let kept = bp.publish("kept", data(1), None).await.unwrap().epoch;
        assert_eq!(bp.history("kept", 0, 1).await.unwrap().epoch, kept);
    }
}
