//! The hub: which local connections subscribe to which channel, and the fan-out of live
//! publications to them. Fan-out takes a shard's read lock, pushes the same `Arc<Publication>`
//! (serialised once) into each subscriber's bounded queue — or, for a connection that handed its
//! socket over, appends its frame there, written once per socket after the fan-out
//! ([`crate::express`]) — and never awaits.
//!
//! Local membership changes synchronously; the node's interest at the backplane follows it through
//! [`Hub::reconcile`], which re-reads the membership under a per-channel stripe lock, so racing
//! subscribes and unsubscribes always leave the backplane matching the hub.
//!
//! Publications of the gateway's control channel go to the node's control handler instead
//! ([`crate::control`]): no client subscribes to it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use backplane::{Backplane, BackplaneError, ChannelCount, Publication, PublicationSink};
use indexmap::IndexMap;
use parking_lot::RwLock;

use crate::control::CONTROL_CHANNEL;
use crate::express::Flushes;
use crate::metrics::Metrics;
use crate::queue::{Pushed, QueueSender};

const SHARDS: usize = 64;
const STRIPES: usize = 256;

/// A connection's identity within this node.
pub type ConnId = u64;

#[derive(Default)]
struct Entry {
    subscribers: IndexMap<ConnId, QueueSender>,
    /// Whether the backplane delivers this channel to the node.
    node_subscribed: bool,
    /// The channel's last publication fanned out: the next one's delta form is made against it.
    last: parking_lot::Mutex<Option<Arc<Publication>>>,
}

type Shard = RwLock<HashMap<Arc<str>, Entry>>;

/// Channel → local subscribers, and the node's interest in each channel at the backplane.
pub struct Hub {
    shards: Box<[Shard]>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    metrics: Metrics,
    /// Where the control channel's publications go, once the node set it.
    control: OnceLock<Arc<dyn PublicationSink>>,
    /// The namespaces, to tell the channels whose slow consumers conflate (none without).
    namespaces: Option<crate::security::namespace::Namespaces>,
    /// The sockets express delivery appended to, written after each fan-out.
    flushes: Arc<Flushes>,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
            metrics,
            control: OnceLock::new(),
            namespaces: None,
            flushes: Arc::new(Flushes::new(crate::express::Sends::default())),
        }
    }

    /// The hub writing its fan-out's sockets as `sends` says (`server.batched_sends`), instead
    /// of in io_uring batches.
    pub(crate) fn with_sends(mut self, sends: crate::express::Sends) -> Self {
        self.flushes = Arc::new(Flushes::new(sends));
        self
    }

    /// The hub with the namespaces that say which channels conflate for slow consumers.
    pub(crate) fn with_namespaces(
        mut self,
        namespaces: crate::security::namespace::Namespaces,
    ) -> Self {
        self.namespaces = Some(namespaces);
        self
    }

    fn conflates(&self, channel: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_some_and(|n| n.get(channel).slow_consumer == crate::config::SlowConsumer::Conflate)
    }

    /// Sends the control channel's publications to `sink` (set once, at node start).
    pub fn set_control(&self, sink: Arc<dyn PublicationSink>) {
        let _ = self.control.set(sink);
    }

    /// Every channel with local subscribers, and how many: this node's part of the cluster-wide
    /// channel list (`GET /api/channels`).
    pub fn channel_counts(&self) -> Vec<ChannelCount> {
        let mut counts = Vec::new();
        for shard in self.shards.iter() {
            for (channel, entry) in shard.read().iter() {
                if !entry.subscribers.is_empty() {
                    counts.push(ChannelCount {
                        channel: channel.to_string(),
                        subscribers: entry.subscribers.len() as u64,
                    });
                }
            }
        }
        counts.sort_by(|a, b| a.channel.cmp(&b.channel));
        counts
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Adds a local subscriber. It receives every publication the backplane delivers from now on;
    /// call [`Hub::reconcile`] to make sure the backplane delivers the channel at all.
    pub fn add(&self, channel: &Arc<str>, conn: ConnId, queue: QueueSender) {
        let mut shard = self.shard(channel).write();
        let entry = shard.entry(channel.clone()).or_default();
        if entry.subscribers.insert(conn, queue).is_none() {
            self.metrics.subscriptions.inc();
        }
    }

    /// Whether the node holds the channel: it has local subscribers or a backplane subscription
    /// (being set up or released). Any other channel is fresh: subscribing to it costs a new
    /// backplane subscription.
    pub fn holds(&self, channel: &str) -> bool {
        self.shard(channel).read().contains_key(channel)
    }

    /// Removes a local subscriber if present. Returns true when the channel has no local
    /// subscriber left, so the caller should [`Hub::reconcile`] it.
    pub fn remove(&self, channel: &str, conn: ConnId) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(entry) = shard.get_mut(channel) else {
            return false;
        };
        if entry.subscribers.swap_remove(&conn).is_none() {
            return false;
        }
        self.metrics.subscriptions.dec();
        entry.subscribers.is_empty()
    }

    /// Makes the node's subscription at the backplane match local membership: subscribed while
    /// the channel has local subscribers, unsubscribed otherwise. Idempotent.
    pub async fn reconcile(
        &self,
        backplane: &dyn Backplane,
        channel: &str,
    ) -> Result<(), BackplaneError> {
        let stripe = self.hasher.hash_one(channel) as usize % STRIPES;
        let _serialised = self.stripes[stripe].lock().await;
        let (wanted, have) = {
            let shard = self.shard(channel).read();
            shard.get(channel).map_or((false, false), |e| {
                (!e.subscribers.is_empty(), e.node_subscribed)
            })
        };
        if wanted && !have {
            backplane.subscribe(channel).await?;
            self.metrics.channels.inc();
            let mut shard = self.shard(channel).write();
            shard.entry(channel.into()).or_default().node_subscribed = true;
        } else if !wanted && have {
            let result = backplane.unsubscribe(channel).await;
            self.metrics.channels.dec();
            let mut shard = self.shard(channel).write();
            if let Some(entry) = shard.get_mut(channel) {
                entry.node_subscribed = false;
                if entry.subscribers.is_empty() {
                    shard.remove(channel);
                }
            }
            result?;
        } else if !wanted {
            let mut shard = self.shard(channel).write();
            if shard
                .get(channel)
                .is_some_and(|e| e.subscribers.is_empty() && !e.node_subscribed)
            {
                shard.remove(channel);
            }
        }
        Ok(())
    }

    /// Bytes queued for sending over all connections, and in the fullest connection's queue.
    pub fn queued_bytes(&self) -> (usize, usize) {
        let mut seen = std::collections::HashSet::new();
        let (mut total, mut largest) = (0, 0);
        for shard in self.shards.iter() {
            for entry in shard.read().values() {
                for (conn, queue) in &entry.subscribers {
                    if seen.insert(*conn) {
                        let bytes = queue.queued_bytes();
                        total += bytes;
                        largest = largest.max(bytes);
                    }
                }
            }
        }
        (total, largest)
    }

    /// Number of channels known to the hub (with local subscribers or node interest).
    #[cfg(test)]
    fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

impl PublicationSink for Hub {
    fn deliver(&self, publication: Arc<Publication>) {
        if &*publication.channel == CONTROL_CHANNEL {
            if let Some(control) = self.control.get() {
                control.deliver(publication);
            }
            return;
        }
        let shard = self.shard(&publication.channel).read();
        let Some(entry) = shard.get(&*publication.channel) else {
            return;
        };
        if publication.is_publication() {
            // Publications of a channel arrive here in order, one at a time.
            let mut last = entry.last.lock();
            if let Some(previous) = last.as_deref() {
                publication.follows(previous);
            }
            *last = Some(publication.clone());
        }
        let conflate = self.conflates(&publication.channel);
        let (mut slow, mut conflated) = (0, 0);
        let mut touched = Vec::new();
        for queue in entry.subscribers.values() {
            match queue.push(&publication, conflate) {
                Pushed::Overflowed => slow += 1,
                Pushed::Conflated { dropped } => conflated += dropped,
                Pushed::Express { first: true } => touched.push(queue.clone()),
                Pushed::Queued | Pushed::Express { first: false } | Pushed::Dropped => {}
            }
        }
        drop(shard);
        if !touched.is_empty() {
            self.flushes.add(touched);
        }
        if slow > 0 {
            self.metrics.slow_consumer_disconnects.inc_by(slow);
        }
        if conflated > 0 {
            self.metrics.conflated_publications.inc_by(conflated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::outbound;
    use backplane::memory::MemoryBackplane;
    use backplane::Settings;

    #[tokio::test]
    async fn fans_out_to_subscribers_only_and_tracks_node_interest() {
        let hub = Arc::new(Hub::new(Metrics::new()));
        let bp = MemoryBackplane::new(Settings::default(), hub.clone());
        let channel: Arc<str> = "c".into();
        let (tx1, mut rx1) = outbound(1 << 20);
        let (tx2, mut rx2) = outbound(1 << 20);
        hub.add(&channel, 1, tx1);
        hub.add(&channel, 2, tx2);
        hub.reconcile(&*bp, "c").await.unwrap();
        bp.publish("c", "1".into(), None).await.unwrap();
        bp.publish("other", "1".into(), None).await.unwrap();
        let a = rx1.try_recv().unwrap();
        let b = rx2.try_recv().unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "one serialisation shared by every subscriber"
        );
        assert!(rx1.try_recv().is_none());

        assert!(!hub.remove("c", 1));
        bp.publish("c", "2".into(), None).await.unwrap();
        assert!(rx1.try_recv().is_none());
        assert_eq!(rx2.try_recv().unwrap().offset, 2);
        assert!(hub.remove("c", 2));
        assert!(!hub.remove("c", 2), "removing twice is harmless");
        hub.reconcile(&*bp, "c").await.unwrap();
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn channel_counts_list_channels_with_subscribers() {
        let hub = Hub::new(Metrics::new());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (tx, _rx) = outbound(1 << 20);
        hub.add(&b, 1, tx.clone());
        hub.add(&a, 1, tx.clone());
        hub.add(&a, 2, tx.clone());
        hub.add(&b, 3, tx);
        hub.remove("b", 1);
        hub.remove("b", 3);
        let counts = hub.channel_counts();
        assert_eq!(
            counts,
            vec![ChannelCount {
                channel: "a".into(),
                subscribers: 2
            }]
        );
    }

    #[tokio::test]
    async fn reconcile_follows_membership_whatever_the_order() {
        let hub = Arc::new(Hub::new(Metrics::new()));
        let bp = MemoryBackplane::new(Settings::default(), hub.clone());
        let channel: Arc<str> = "c".into();
        let (tx, mut rx) = outbound(1 << 20);
        // Subscribe, unsubscribe and subscribe again before any reconcile runs.
        hub.add(&channel, 1, tx.clone());
        hub.remove("c", 1);
        hub.add(&channel, 1, tx);
        hub.reconcile(&*bp, "c").await.unwrap();
        hub.reconcile(&*bp, "c").await.unwrap();
        bp.publish("c", "1".into(), None).await.unwrap();
        assert_eq!(rx.try_recv().unwrap().offset, 1);
    }
}
