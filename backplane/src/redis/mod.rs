//! The Redis backplane: history, offsets and epochs in Redis, fan-out through Redis pub/sub, so
//! any number of stateless gateway nodes share every channel.
//!
//! - Publish is one Lua script (`publish.lua`): epoch, offset, history append (XADD with the offset
//!   as entry id), trim by count and by per-entry age, key expiry and the PUBLISH (SPUBLISH on
//!   Cluster) happen atomically. History reads are one script too (`history.lua`), so a page, the
//!   epoch and the top offset are read at one instant.
//! - Live delivery runs on a dedicated pub/sub link ([`pubsub`]) that fills gaps from history,
//!   re-syncs channels after reconnects and checks itself with round trips through pub/sub.
//! - On Sentinel (`sentinel.rs`) both paths follow the master the sentinels name; with
//!   `min_replicas_acked` a publish is acknowledged only once that many replicas have it (`WAIT`).
//! - Presence ([`presence`]): one writer per node applies its joins and leaves in order and
//!   announces them on the channel's pub/sub channel; nodes heartbeat into a registry and the
//!   survivors reap a dead node's members ([`registry`]), which also sums the channel reports.

mod channel_state;
mod commands;
mod connection;
mod health;
mod keys;
mod link;
mod link_reads;
mod presence;
mod presence_writer;
mod pubsub;
mod registry;
mod sentinel;
mod subscription_worker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    new_tag, parse_tag, Backplane, BackplaneError, BatchItem, ChannelCount, HistoryPage,
    Idempotency, Member, Presence, Publication, PublicationSink, PublishAck, Settings, Stats,
};
use commands::{Commands, HISTORY, PUBLISH};
use health::Health;
use keys::Keys;

/// Which Redis to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One Redis server, e.g. `redis://127.0.0.1:6379` (`rediss://` for TLS, credentials in the URL).
    Single(String),
    /// Seed nodes of a Redis Cluster (7+), e.g. `redis://10.0.0.1:7000`. Uses sharded pub/sub.
    Cluster(Vec<String>),
    /// The master that Redis Sentinels monitor under `master`, followed across failovers.
    /// `nodes` are sentinel URLs, e.g. `redis://10.0.0.1:26379`; credentials and `rediss://` in
    /// them apply to the sentinels and to the master.
    Sentinel { nodes: Vec<String>, master: String },
}

/// Connection settings of the Redis backplane.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: Target,
    /// Command connections (single server).
    pub pool_size: usize,
    /// Prefix of every key, so several deployments can share a Redis.
    pub prefix: String,
    pub connect_timeout: Duration,
    /// A command slower than this fails (and a publish is refused with 503).
    pub command_timeout: Duration,
    /// Period of the round trip through pub/sub that proves live delivery works.
    pub health_interval: Duration,
    /// How long the node stays subscribed to a channel after its last local subscriber left.
    pub subscribe_linger: Duration,
    /// A publish is acknowledged only once this many replicas confirmed it (`WAIT`); 0: at once.
    pub min_replicas_acked: u32,
    /// How long a publish waits for `min_replicas_acked` replicas before it is refused.
    pub replica_ack_timeout: Duration,
}

/// What the backplane and its link task share.
pub(crate) struct Shared {
    /// This node's id: its presence keys, its registry entry and its health channel.
    pub(crate) node_id: String,
    pub(crate) keys: Keys,
    pub(crate) sharded: bool,
    pub(crate) commands: Commands,
    pub(crate) settings: Settings,
    pub(crate) sink: Arc<dyn PublicationSink>,
    pub(crate) health: Health,
    /// `WAIT` after each publish: (replicas, timeout).
    pub(crate) replica_ack: Option<(u32, Duration)>,
}

/// The Redis implementation of [`Backplane`].
pub struct RedisBackplane {
    shared: Arc<Shared>,
    link: pubsub::Link,
    presence: presence::PresenceTasks,
}

impl RedisBackplane {
    /// Connects the command path and the pub/sub link; fails if Redis cannot be reached now.
    pub async fn connect(
        config: RedisConfig,
        settings: Settings,
        sink: Arc<dyn PublicationSink>,
    ) -> Result<Arc<RedisBackplane>, BackplaneError> {
        let commands = match &config.target {
            Target::Single(url) => {
                Commands::single(
                    url,
                    config.pool_size,
                    config.connect_timeout,
                    config.command_timeout,
                )
                .await?
            }
            Target::Cluster(nodes) => {
                Commands::cluster(nodes, config.connect_timeout, config.command_timeout).await?
            }
            Target::Sentinel { nodes, master } => Commands::sentinel(
                Arc::new(sentinel::MasterResolver::new(
                    nodes,
                    master,
                    config.connect_timeout,
                )?),
                config.pool_size,
                config.connect_timeout,
                config.command_timeout,
            )?,
        };
        let mut settings = settings;
        // The epoch and top must outlive the history they describe.
        settings.meta_ttl = settings.meta_ttl.max(settings.longest_age());
        let shared = Arc::new(Shared {
            node_id: format!("{:016x}", rand::random::<u64>()),
            keys: Keys::new(&config.prefix),
            sharded: matches!(config.target, Target::Cluster(_)),
            commands,
            settings,
            sink,
            health: Health::default(),
            replica_ack: (config.min_replicas_acked > 0)
                .then_some((config.min_replicas_acked, config.replica_ack_timeout)),
        });
        // Fail at start rather than serve with a store that is not there.
        shared.commands.ping().await?;
        let link = pubsub::Link::start(shared.clone(), &config).await?;
        // Registered before any member is written, so nobody takes the node for dead.
        registry::beat(&shared).await?;
        let (changes, queue) = tokio::sync::mpsc::unbounded_channel();
        let writer = presence_writer::Writer::new(shared.clone(), queue);
        let presence = presence::PresenceTasks {
            changes,
            writer: tokio::spawn(writer.run()).abort_handle(),
            timers: vec![tokio::spawn(registry::run(shared.clone())).abort_handle()],
        };
        Ok(Arc::new(RedisBackplane {
            shared,
            link,
            presence,
        }))
    }

    /// Stops this node's presence writer and heartbeat at once, as `kill -9` would: queued
    /// changes are not applied and no member leaves; the other nodes reap them. For tests of
    /// crash recovery.
    #[doc(hidden)]
    pub fn stop_presence_abruptly(&self) {
        self.presence.abort();
    }

    /// Reaps node `node` now, dead or not: removes its members, announcing their leaves, and
    /// forgets it. Returns how many members this call removed. For tests of concurrent reaping.
    #[doc(hidden)]
    pub async fn reap_node(&self, node: &str) -> Result<u64, BackplaneError> {
        registry::reap(&self.shared, node).await
    }

    /// This node's id in the registry and in its presence keys.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }
}

/// `n` as 16 lowercase hex digits (an epoch; its last 8 are a tag of the low 32 bits).
fn hex_of(n: u64, out: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    &out[..]
}

/// The publish script's status for a reused idempotency key whose first data differs.
const CONFLICT: u8 = 2;
/// The publish script's status for a version not greater than the channel's last one.
const SUPPRESSED: u8 = 3;

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX).max(1)
}

/// One run of the history script: the page's entries (each with its publish time, ms), the
/// channel's epoch and top, and the tags at `since` and at the top.
pub(crate) struct ScriptPage {
    pub(crate) epoch: Arc<str>,
    pub(crate) top: u64,
    pub(crate) entries: Vec<(Arc<Publication>, u64)>,
    pub(crate) since_tag: Option<u32>,
    pub(crate) top_tag: Option<u32>,
}

/// Reads a page of history (and the epoch, top and tags) in one script call. Client reads and
/// the pub/sub link's reads share it.
pub(crate) async fn read_history(
    shared: &Shared,
    channel: &Arc<str>,
    since: u64,
    limit: usize,
) -> Result<ScriptPage, BackplaneError> {
    let keys = &shared.keys;
    let settings = &shared.settings;
    let mut invocation = HISTORY.key(keys.meta(channel));
    invocation
        .key(keys.history(channel))
        .arg(since)
        .arg(limit)
        .arg(millis(settings.retention_for(channel).max_age));
    type Row = (String, Vec<Vec<u8>>);
    let (epoch, top, rows, since_tag, top_tag): (String, u64, Vec<Row>, String, String) =
        shared.commands.run(&invocation).await?;
    let epoch: Arc<str> = epoch.into();
    let mut entries = Vec::with_capacity(rows.len());
    for (id, fields) in rows {
        let offset = id
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                BackplaneError::Unavailable(format!("unexpected history entry id {id}"))
            })?;
        let field = |name: &[u8]| {
            fields
                .chunks(2)
                .find(|pair| pair.len() == 2 && pair[0] == name)
                .map(|pair| &pair[1][..])
        };
        let data = field(b"d").ok_or_else(|| {
            BackplaneError::Unavailable(format!("history entry {id} has no data"))
        })?;
        let published_ms = field(b"t")
            .and_then(|t| std::str::from_utf8(t).ok()?.parse().ok())
            .unwrap_or(0);
        // Entries written before tags existed have none: tag 0.
        let tag = field(b"g")
            .and_then(|g| parse_tag(std::str::from_utf8(g).ok()?))
            .unwrap_or(0);
        let publication = Publication::new(channel.clone(), offset, epoch.clone(), tag, data);
        entries.push((Arc::new(publication), published_ms));
    }
    Ok(ScriptPage {
        epoch,
        top,
        entries,
        since_tag: parse_tag(&since_tag),
        top_tag: parse_tag(&top_tag),
    })
}

/// Reads a page of history (and the epoch and top) in one script call.
pub(crate) async fn history(
    shared: &Shared,
    channel: &str,
    since: u64,
    limit: usize,
) -> Result<HistoryPage, BackplaneError> {
    let page = read_history(shared, &channel.into(), since, limit).await?;
    Ok(HistoryPage {
        epoch: page.epoch,
        top: page.top,
        publications: page.entries.into_iter().map(|(p, _)| p).collect(),
        since_tag: page.since_tag,
        top_tag: page.top_tag,
    })
}

impl RedisBackplane {
    /// The publish script's `EVALSHA` for one publication, with the backplane's KEYS/ARGV,
    /// written straight into one command buffer: the keys share one scratch string.
    fn command(
        &self,
        channel: &str,
        data: &[u8],
        idempotency: Option<Idempotency<'_>>,
        version: Option<u64>,
    ) -> redis::Cmd {
        let shared = &*self.shared;
        let settings = &shared.settings;
        let retention = settings.retention_for(channel);
        let mut key = shared.keys.base(channel);
        let base = key.len();
        let extra = idempotency.map_or(0, |i| i.key.len() + 5);
        key.reserve(extra + 2);
        let mut hex = [0u8; 16];
        let mut command = redis::Cmd::with_capacity(
            18,
            4 * (base + 2) + extra + data.len() + channel.len() + 128,
        );
        command.arg("EVALSHA").arg(PUBLISH.get_hash()).arg(3);
        key.push_str(":m");
        command.arg(key.as_str());
        key.truncate(base);
        key.push_str(":h");
        command.arg(key.as_str());
        key.truncate(base);
        let window = match idempotency {
            Some(Idempotency { scope, key: k }) => {
                key.push_str(keys::Keys::idempotency_infix(scope));
                key.push_str(k);
                millis(settings.idempotency_window)
            }
            None => {
                key.push_str(":m");
                0
            }
        };
        command
            .arg(key.as_str())
            .arg(data)
            .arg(hex_of(rand::random::<u64>(), &mut hex))
            .arg(retention.max_count)
            .arg(millis(retention.max_age))
            .arg(millis(retention.max_age))
            .arg(millis(settings.meta_ttl));
        key.truncate(base);
        key.push_str(":p");
        command
            .arg(key.as_str())
            .arg(if shared.sharded { "1" } else { "0" })
            .arg(window)
            .arg(channel);
        command.arg(hex_of(u64::from(new_tag()), &mut hex)[8..].as_ref());
        match version {
            Some(version) => command.arg(itoa::Buffer::new().format(version)),
            None => command.arg(""),
        };
        command
    }

    /// The acknowledgement of one run of the publish script, given how many replicas confirmed
    /// it (None: no `WAIT` asked).
    fn answer(
        &self,
        channel: &str,
        (offset, epoch, tag, status): (u64, String, String, u8),
        acked: Option<u64>,
    ) -> Result<PublishAck, BackplaneError> {
        let shared = &*self.shared;
        let Some(tag) = parse_tag(&tag) else {
            return Err(BackplaneError::Unavailable(format!(
                "publish script answered tag {tag:?}"
            )));
        };
        if let (Some((wanted, timeout)), Some(acked)) = (shared.replica_ack, acked) {
            if acked < u64::from(wanted) {
                shared.health.count_error();
                return Err(BackplaneError::Unavailable(format!(
                    "publication stored but not replicated: offset {offset} was acknowledged by \
                     {acked} of the {wanted} replicas required within {timeout:?}, so whether it \
                     survives a failover is unknown; retry with the same idempotency_key"
                )));
            }
        }
        let ack = PublishAck {
            channel: channel.into(),
            offset,
            epoch: epoch.into(),
            tag,
            suppressed: status == SUPPRESSED,
        };
        match status {
            CONFLICT => Err(crate::idempotency_conflict(&ack)),
            _ => Ok(ack),
        }
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn publish_item(&self, item: &BatchItem<'_>) -> Result<PublishAck, BackplaneError> {
        let shared = &*self.shared;
        let channel = item.channel;
        let command = self.command(channel, &item.data, item.idempotency, item.version);
        let result: Result<((u64, String, String, u8), Option<u64>), _> = shared
            .commands
            .run_replicated(&command, &PUBLISH, shared.replica_ack)
            .await;
        let (answer, acked) = result.inspect_err(|_| shared.health.count_error())?;
        self.answer(channel, answer, acked)
    }

    /// On a single server (or the master behind Sentinel) one pipeline on one connection: the
    /// scripts run in list order, then one `WAIT` (with `min_replicas_acked`) covers them all.
    /// On Redis Cluster the publications run one after the other.
    async fn publish_batch(
        &self,
        items: &[BatchItem<'_>],
    ) -> Vec<Result<PublishAck, BackplaneError>> {
        let shared = &*self.shared;
        if matches!(shared.commands, Commands::Cluster(_)) {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(self.publish_item(item).await);
            }
            return out;
        }
        let commands: Vec<_> = items
            .iter()
            .map(|item| self.command(item.channel, &item.data, item.idempotency, item.version))
            .collect();
        match shared
            .commands
            .run_batch(commands, &PUBLISH, shared.replica_ack)
            .await
        {
            Ok((answers, acked)) => items
                .iter()
                .zip(answers)
                .map(|(item, answer)| match answer {
                    Ok(answer) => self.answer(item.channel, answer, acked),
                    Err(e) => {
                        shared.health.count_error();
                        Err(e)
                    }
                })
                .collect(),
            Err(e) => {
                shared.health.count_error();
                let message = match e {
                    BackplaneError::Unavailable(m) => m,
                    other => other.to_string(),
                };
                items
                    .iter()
                    .map(|_| Err(BackplaneError::Unavailable(message.clone())))
                    .collect()
            }
        }
    }

    async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        history(&self.shared, channel, since, limit)
            .await
            .inspect_err(|_| self.shared.health.count_error())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.link.subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        self.link.unsubscribe(channel);
        Ok(())
    }

    fn presence_join(&self, channel: &str, member: Member, announce: bool) {
        let value = presence::stored_member(&member, announce);
        let _ = self.presence.changes.send(presence::Change::Join {
            channel: channel.into(),
            client: member.client,
            value,
        });
    }

    fn presence_leave(&self, channel: &str, client: &str, announce: bool) {
        let _ = self.presence.changes.send(presence::Change::Leave {
            channel: channel.into(),
            client: client.into(),
            announce,
        });
    }

    async fn flush_presence(&self) -> Result<(), BackplaneError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let stopped = || BackplaneError::Unavailable("the presence writer stopped".into());
        self.presence
            .changes
            .send(presence::Change::Flush(answer))
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    async fn presence(&self, channel: &str, members: bool) -> Result<Presence, BackplaneError> {
        presence::read(&self.shared, channel, members)
            .await
            .inspect_err(|_| self.shared.health.count_error())
    }

    async fn report_channels(&self, counts: Vec<ChannelCount>) -> Result<(), BackplaneError> {
        registry::report(&self.shared, &counts)
            .await
            .inspect_err(|_| self.shared.health.count_error())
    }

    async fn channels(&self, prefix: &str) -> Result<Vec<ChannelCount>, BackplaneError> {
        registry::channels(&self.shared, prefix)
            .await
            .inspect_err(|_| self.shared.health.count_error())
    }

    fn health(&self) -> Result<(), String> {
        self.shared.health.check()
    }

    fn stats(&self) -> Stats {
        self.shared.health.stats()
    }

    fn kind(&self) -> &'static str {
        if self.shared.sharded {
            "redis-cluster"
        } else {
            "redis"
        }
    }
}
