//! The seam between gateway nodes and the store that orders publications.
//!
//! A backplane owns, per channel, an epoch (which changes only when the channel's history is lost)
//! and a gap-free offset sequence assigned at publish time, the channel's bounded history, and the
//! live fan-out of publications to every node interested in the channel. The gateway talks to it
//! only through the [`Backplane`] trait; [`memory::MemoryBackplane`] serves a single node with no
//! external dependency, and a Redis implementation serves a cluster behind the same trait.

pub mod json;
pub mod memory;
pub mod merge_patch;
mod presence;
mod publication;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use presence::{ChannelCount, Member, Presence};
pub use publication::{format_tag, parse_tag, Kind, Position, Publication, PublishAck};

/// Microseconds since the Unix epoch, the clock publications are stamped with.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A random epoch: a restarted process or a recreated channel never reuses one.
pub(crate) fn new_epoch() -> Arc<str> {
    let bits: u64 = rand::random();
    format!("{bits:016x}").into()
}

/// One page of a channel's history, read at a single instant.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The channel's epoch at the time of the read; empty for a channel with no publication
    /// (never published to, or forgotten): its first publication creates the epoch.
    pub epoch: Arc<str>,
    /// The channel's newest offset at the time of the read (0 for a channel never published to).
    pub top: u64,
    /// Publications with offset greater than the requested one, in order, contiguous.
    pub publications: Vec<Arc<Publication>>,
    /// The tag of the publication at the requested offset (`since`), when the channel still
    /// knows it: the history entry, or the tag of the top publication when `since == top`. A
    /// reader compares it with the tag it holds, so a position from before a store rollback that
    /// reused the offset under the same epoch does not pass for the publication now there.
    pub since_tag: Option<u32>,
    /// The tag of the publication at `top`, when the channel knows it (`None` at top 0).
    pub top_tag: Option<u32>,
}

/// One publication of a batch ([`Backplane::publish_batch`]).
#[derive(Debug, Clone)]
pub struct BatchItem<'a> {
    pub channel: &'a str,
    /// Compact JSON, as for [`Backplane::publish`].
    pub data: Bytes,
    pub idempotency: Option<Idempotency<'a>>,
    /// The producer's version of the channel's value: a publication whose version is not
    /// greater than the channel's last one is suppressed ([`PublishAck::suppressed`]).
    pub version: Option<u64>,
}

/// Who chose an idempotency key. Keys of each scope live apart, so a client can never take a key
/// the backend will use, nor the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdempotencyScope {
    /// A key sent by an end client (WebSocket publish).
    Client,
    /// A key sent by the backend through the server API (`POST /api/publish`).
    Server,
}

/// An idempotency key in its scope: a publish repeating it within the window returns the first
/// publish's result; repeating it with different data is a [`BackplaneError::Conflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idempotency<'a> {
    pub scope: IdempotencyScope,
    pub key: &'a str,
}

impl<'a> Idempotency<'a> {
    /// A key an end client chose.
    pub fn client(key: &'a str) -> Self {
        Idempotency {
            scope: IdempotencyScope::Client,
            key,
        }
    }

    /// A key the backend chose.
    pub fn server(key: &'a str) -> Self {
        Idempotency {
            scope: IdempotencyScope::Server,
            key,
        }
    }
}

/// The answer to a reused idempotency key with different data; `first` is what the key names.
pub(crate) fn idempotency_conflict(first: &PublishAck) -> BackplaneError {
    BackplaneError::Conflict(format!(
        "the idempotency key was already used with different data (offset {} of epoch {})",
        first.offset, first.epoch
    ))
}

/// A fresh per-publication tag. Drawn in Rust, not in a Redis script: Lua's `math.random` is
/// seeded identically in every script run.
pub(crate) fn new_tag() -> u32 {
    rand::random()
}

/// How long and how much history a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most publications kept per channel.
    pub max_count: usize,
    /// Publications older than this are dropped from history.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_count: 1000,
            max_age: Duration::from_secs(600),
        }
    }
}

/// What every backplane keeps per channel, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub retention: Retention,
    /// Retention of the channels of a namespace (the name's part before the first `:`), where
    /// it differs from `retention`.
    pub namespace_retention: Arc<[(String, Retention)]>,
    /// How long a channel's epoch and top offset outlive its last activity. When they are gone,
    /// the channel starts again with a new epoch (its history is lost).
    pub meta_ttl: Duration,
    /// A publish repeating an idempotency key within this window returns the first result.
    pub idempotency_window: Duration,
    /// How long the presence of a node that stopped without leaving (a crash) outlives it: within
    /// this time the surviving nodes remove its members and announce their leaves. A node
    /// heartbeats about every `presence_ttl / 6` and is taken for dead after `presence_ttl / 2`.
    pub presence_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retention: Retention::default(),
            namespace_retention: Arc::from([]),
            meta_ttl: Duration::from_secs(24 * 3600),
            idempotency_window: Duration::from_secs(300),
            presence_ttl: Duration::from_secs(30),
        }
    }
}

impl Settings {
    /// The retention of `channel`: its namespace's, else the default.
    pub fn retention_for(&self, channel: &str) -> Retention {
        if let Some((prefix, _)) = channel.split_once(':') {
            for (name, retention) in self.namespace_retention.iter() {
                if name == prefix {
                    return *retention;
                }
            }
        }
        self.retention
    }

    /// The longest `max_age` of any channel.
    pub fn longest_age(&self) -> Duration {
        self.namespace_retention
            .iter()
            .map(|(_, r)| r.max_age)
            .fold(self.retention.max_age, Duration::max)
    }

    /// The shortest `max_age` of any channel.
    pub fn shortest_age(&self) -> Duration {
        self.namespace_retention
            .iter()
            .map(|(_, r)| r.max_age)
            .fold(self.retention.max_age, Duration::min)
    }
}

/// Counters and state a backplane reports for metrics and readiness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether live delivery from the store works now (always true for the embedded backplane).
    pub pubsub_healthy: bool,
    /// Times the pub/sub link was re-established.
    pub pubsub_reconnects: u64,
    /// Times a gap in live delivery was filled from history.
    pub gap_fills: u64,
    /// Commands that failed.
    pub errors: u64,
    /// Channels the node is subscribed to at the store: those with local subscribers plus those
    /// lingering after their last one left.
    pub pubsub_subscriptions: u64,
    /// Presence members of dead nodes this node removed (each with its leave, if announced).
    pub presence_reaped: u64,
}

/// Failure of a backplane operation. Nothing that failed was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    /// The store cannot be reached or did not answer in time; retrying later may succeed.
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    /// The request cannot be served as asked (for example data that is not JSON).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The idempotency key was used within the window for a publish with different data; the
    /// first publication stands and this one was not stored.
    #[error("idempotency conflict: {0}")]
    Conflict(String),
}

/// Receives every live publication of the channels a node subscribed to, in offset order per
/// channel. Called on the backplane's delivery path: implementations must not block.
pub trait PublicationSink: Send + Sync + 'static {
    fn deliver(&self, publication: Arc<Publication>);
}

/// The store and fan-out that every gateway node shares.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Appends `data` (compact JSON, see [`json::compact`]) to the channel's history and fans it
    /// out. An `Ok` means the publication is in history and will reach every current subscriber.
    /// Every publication gets a fresh random tag, carried in the ack, live delivery and history.
    /// A repeated idempotency key (in its scope, within the window) with the same data returns
    /// the first publish's ack and stores nothing; with different data it is a
    /// [`BackplaneError::Conflict`].
    async fn publish(
        &self,
        channel: &str,
        data: Bytes,
        idempotency: Option<Idempotency<'_>>,
    ) -> Result<PublishAck, BackplaneError> {
        self.publish_item(&BatchItem {
            channel,
            data,
            idempotency,
            version: None,
        })
        .await
    }

    /// Publishes one item as [`Backplane::publish`] does, honouring its `version`: with one not
    /// greater than the last version the channel was published with, nothing is stored or fanned
    /// out and the ack is the channel's current top, marked [`PublishAck::suppressed`]. The
    /// comparison and the append are atomic; the last version lives as long as the channel's
    /// epoch.
    async fn publish_item(&self, item: &BatchItem<'_>) -> Result<PublishAck, BackplaneError>;

    /// Publishes several publications; each is answered as [`Backplane::publish_item`] answers it,
    /// in list order, and publications of one channel get increasing offsets in list order.
    /// One failing does not stop the others. The default publishes them one after the other;
    /// an implementation sends them to its store together.
    async fn publish_batch(
        &self,
        items: &[BatchItem<'_>],
    ) -> Vec<Result<PublishAck, BackplaneError>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.publish_item(item).await);
        }
        out
    }

    /// Reads up to `limit` publications with offset greater than `since`, in order, and the tag
    /// of the publication at `since` (see [`HistoryPage::since_tag`]). Creates nothing: a channel
    /// never published to reads as epoch `""`, top 0, and leaves no state behind.
    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError>;

    /// Starts delivering the channel's live publications to this node's sink, in offset order and
    /// without gaps (a gap in transport is filled from history before delivery goes on). The node
    /// calls it when its first local subscriber arrives; once it returns, no later publication is
    /// missed.
    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError>;

    /// Stops live delivery of the channel to this node (its last local subscriber left).
    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError>;

    /// Adds `member` to the channel's presence and, when `announce`, fans out a join
    /// ([`Kind::Join`]) to every subscriber of the channel in order with its publications (a
    /// client already present is updated, not announced again). `announce` is kept with the
    /// member: a node that removes it after this node crashed announces its leave only if set.
    /// Not awaited: a node's presence changes are queued and applied at the store in the order
    /// they were made, in batches ([`Backplane::flush_presence`] waits for them).
    fn presence_join(&self, channel: &str, member: Member, announce: bool);

    /// Removes the member `client` from the channel's presence and, when `announce` and the
    /// member was still present, fans out one leave ([`Kind::Leave`]). Queued like
    /// [`Backplane::presence_join`].
    fn presence_leave(&self, channel: &str, client: &str, announce: bool);

    /// Waits until every presence change queued before the call is applied at the store (a
    /// draining node calls it before it exits). An error says some were not applied yet; they
    /// stay queued, in order, and are retried.
    async fn flush_presence(&self) -> Result<(), BackplaneError>;

    /// Reads the channel's presence across the cluster; the member list only when `members`.
    async fn presence(&self, channel: &str, members: bool) -> Result<Presence, BackplaneError>;

    /// Replaces this node's report of its channels and their local subscriber counts, which
    /// [`Backplane::channels`] sums over the live nodes.
    async fn report_channels(&self, counts: Vec<ChannelCount>) -> Result<(), BackplaneError>;

    /// The channels whose name starts with `prefix` that have subscribers on any live node, with
    /// the cluster-wide subscriber count, sorted by name.
    async fn channels(&self, prefix: &str) -> Result<Vec<ChannelCount>, BackplaneError>;

    /// Whether the backplane can take traffic now; `Err` says why not.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// Counters for metrics.
    fn stats(&self) -> Stats {
        Stats {
            pubsub_healthy: true,
            ..Stats::default()
        }
    }

    /// A short name for logs and metrics ("memory", "redis").
    fn kind(&self) -> &'static str;
}
