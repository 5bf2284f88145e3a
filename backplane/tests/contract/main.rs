//! The contract every [`Backplane`] implementation keeps, as one suite run against each of them:
//! the memory backplane, a real single `redis-server` and a real 3-master Redis Cluster (started
//! by `testkit` on free ports, stopped when each test ends); the presence cases also run on a
//! master behind Redis Sentinel. The cases live in `cases.rs` and take
//! a [`Store`]; `contract_suite!` instantiates every case for one store.

mod cases;

use std::sync::Arc;
use std::time::Duration;

use backplane::memory::MemoryBackplane;
use backplane::redis::{RedisBackplane, RedisConfig, Target};
use backplane::{Backplane, Kind, Publication, PublicationSink, Settings};
use parking_lot::Mutex;
use tokio::sync::Notify;

use testkit::{redis_cli, RedisCluster, RedisOpts, RedisServer, SentinelSet, SENTINEL_MASTER};

/// Upper bound for one awaited condition: only there to fail instead of hanging.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `cond` (state that offers no event, such as a server answering) until it returns
/// `Some`, pausing briefly between attempts; panics after [`WAIT`].
pub async fn poll_until<T, F, Fut>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(v) = cond().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    match tokio::time::timeout(WAIT, poll).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A node's sink: records every live publication and wakes waiters.
#[derive(Default)]
pub struct Recorder {
    delivered: Mutex<Vec<Arc<Publication>>>,
    changed: Notify,
}

impl PublicationSink for Recorder {
    fn deliver(&self, publication: Arc<Publication>) {
        self.delivered.lock().push(publication);
        self.changed.notify_waiters();
    }
}

impl Recorder {
    /// Everything delivered so far on `channel`, in delivery order.
    pub fn of(&self, channel: &str) -> Vec<Arc<Publication>> {
        let delivered = self.delivered.lock();
        delivered
            .iter()
            .filter(|p| &*p.channel == channel)
            .cloned()
            .collect()
    }

    /// Waits until the channel's deliveries satisfy `done` ("what" names it in a failure);
    /// returns them then.
    pub async fn wait_until(
        &self,
        channel: &str,
        what: &str,
        done: impl Fn(&[Arc<Publication>]) -> bool,
    ) -> Vec<Arc<Publication>> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                let got = self.of(channel);
                if done(&got) {
                    return got;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(WAIT, wait).await {
            Ok(got) => got,
            Err(_) => panic!(
                "{what} on {channel} not delivered within {WAIT:?}; got {:?}",
                script(&self.of(channel))
            ),
        }
    }

    /// Waits until a publication with `offset` was delivered on `channel`; returns the
    /// channel's deliveries then.
    pub async fn wait_for(&self, channel: &str, offset: u64) -> Vec<Arc<Publication>> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                let got = self.of(channel);
                if got.iter().any(|p| p.is_publication() && p.offset == offset) {
                    return got;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(WAIT, wait).await {
            Ok(got) => got,
            Err(_) => panic!(
                "offset {offset} of {channel} not delivered within {WAIT:?}; got {:?}",
                offsets(&self.of(channel))
            ),
        }
    }
}

pub fn offsets(publications: &[Arc<Publication>]) -> Vec<u64> {
    publications
        .iter()
        .filter(|p| p.is_publication())
        .map(|p| p.offset)
        .collect()
}

/// What a sink got, readable: `P<offset>` for a publication, `J<after>:<client>` for a join
/// and `L<after>:<client>` for a leave.
pub fn script(delivered: &[Arc<Publication>]) -> Vec<String> {
    delivered
        .iter()
        .map(|p| {
            let member = || {
                let member: backplane::Member =
                    serde_json::from_slice(p.data()).expect("an event carries a member");
                member.client
            };
            match p.kind {
                Kind::Publication => format!("P{}", p.offset),
                Kind::Join => format!("J{}:{}", p.offset, member()),
                Kind::Leave => format!("L{}:{}", p.offset, member()),
            }
        })
        .collect()
}

/// One gateway node's view: its backplane and what reached its sink.
pub struct Node {
    pub backplane: Arc<dyn Backplane>,
    pub sink: Arc<Recorder>,
    /// The same backplane when it is the memory one, to count its channels.
    memory: Option<Arc<MemoryBackplane>>,
    /// The same backplane when it is a Redis one, to stop it as a crash would.
    pub redis: Option<Arc<RedisBackplane>>,
}

/// How a case wants its nodes configured.
#[derive(Clone, Default)]
pub struct NodeOptions {
    pub settings: Settings,
    /// How long a node stays subscribed at the store after `unsubscribe` (Redis only).
    pub subscribe_linger: Option<Duration>,
}

/// The store behind the backplanes of one test: what the suite is parameterised over.
pub enum Store {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
    /// A master (with one replica) behind one sentinel; no failover happens in these cases.
    Sentinel(SentinelSet),
}

pub const PREFIX: &str = "contract";

impl Store {
    pub async fn memory() -> Store {
        Store::Memory
    }

    pub async fn redis() -> Store {
        Store::Redis(RedisServer::start(RedisOpts::default()).await)
    }

    pub async fn cluster() -> Store {
        Store::Cluster(RedisCluster::start(3).await)
    }

    pub async fn sentinel() -> Store {
        Store::Sentinel(SentinelSet::start(1, 1).await)
    }

    /// The port of every Redis server holding data (a Sentinel set's master).
    fn data_ports(&self) -> Vec<u16> {
        match self {
            Store::Memory => Vec::new(),
            Store::Redis(server) => vec![server.port],
            Store::Cluster(cluster) => cluster.nodes.iter().map(|n| n.port).collect(),
            Store::Sentinel(set) => vec![set.servers[0].port],
        }
    }

    /// Whether two nodes of this store share channels (the memory backplane is one node).
    pub fn shared(&self) -> bool {
        !matches!(self, Store::Memory)
    }

    /// A node on this store. Every call to a Redis store is another node on the same data.
    pub async fn node(&self, options: NodeOptions) -> Node {
        let sink = Arc::new(Recorder::default());
        let target = match self {
            Store::Memory => {
                let memory = MemoryBackplane::new(options.settings, sink.clone());
                return Node {
                    backplane: memory.clone(),
                    sink,
                    memory: Some(memory),
                    redis: None,
                };
            }
            Store::Redis(server) => Target::Single(server.url()),
            Store::Cluster(cluster) => {
                Target::Cluster(cluster.nodes.iter().map(RedisServer::url).collect())
            }
            Store::Sentinel(set) => Target::Sentinel {
                nodes: set
                    .sentinels
                    .iter()
                    .map(|s| format!("redis://127.0.0.1:{}", s.port))
                    .collect(),
                master: SENTINEL_MASTER.into(),
            },
        };
        let config = RedisConfig {
            target,
            pool_size: 4,
            prefix: PREFIX.into(),
            // Patient: a busy 2-core machine must not turn slow answers into failures.
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            health_interval: Duration::from_millis(200),
            subscribe_linger: options.subscribe_linger.unwrap_or(Duration::from_secs(2)),
            min_replicas_acked: 0,
            replica_ack_timeout: Duration::from_millis(250),
        };
        let backplane = RedisBackplane::connect(config, options.settings, sink.clone())
            .await
            .expect("connect the Redis backplane");
        Node {
            backplane: backplane.clone(),
            sink,
            memory: None,
            redis: Some(backplane),
        }
    }

    /// How much the store holds for channels: the memory backplane's channels as seen by
    /// `node`, else the keys of every Redis server but the nodes' own (their registry entries,
    /// channel sets and reports: see backplane/src/redis/keys.rs).
    pub async fn stored(&self, node: &Node) -> u64 {
        if let Store::Memory = self {
            let memory = node.memory.as_ref().expect("a memory node");
            return memory.channel_count() as u64;
        }
        let mut keys = 0;
        for port in self.data_ports() {
            let out = redis_cli(port, &["--scan", "--pattern", "*"]).await;
            keys += out
                .lines()
                .filter(|key| !key.is_empty())
                .filter(|key| {
                    !key.starts_with(&format!("{PREFIX}:{{nodes}}"))
                        && !key.starts_with(&format!("{PREFIX}:{{node."))
                })
                .count() as u64;
        }
        keys
    }

    /// Waits until no node is subscribed to `channel` at the store any more (Redis: the linger
    /// passed and the link unsubscribed). The memory backplane stops delivery at once.
    pub async fn wait_unsubscribed(&self, channel: &str) {
        let (ports, command) = match self {
            Store::Memory => return,
            // Sharded subscriptions are counted by the shard that owns the slot: ask all.
            Store::Cluster(_) => (self.data_ports(), "shardnumsub"),
            Store::Redis(_) | Store::Sentinel(_) => (self.data_ports(), "numsub"),
        };
        // The key layout of backplane/src/redis/keys.rs (a channel without `{`, `}`, `%`).
        let pubsub_name = format!("{PREFIX}:{{{channel}}}:p");
        poll_until(&format!("{channel} unsubscribed at Redis"), || {
            let ports = ports.clone();
            let pubsub_name = pubsub_name.clone();
            async move {
                let mut subscribers = 0;
                for port in ports {
                    let out = redis_cli(port, &["pubsub", command, &pubsub_name]).await;
                    let count = out.lines().nth(1)?.trim().parse::<u64>().ok()?;
                    subscribers += count;
                }
                (subscribers == 0).then_some(())
            }
        })
        .await;
    }
}

/// Instantiates every contract case as a test of its own against the store `$start` makes.
macro_rules! contract_suite {
    ($name:ident, $start:expr, [$($case:ident),* $(,)?]) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = $start.await;
                    crate::cases::$case(&store).await;
                }
            )*
        }
    };
}

macro_rules! every_backplane {
    ($($case:ident),* $(,)?) => {
        contract_suite!(memory, crate::Store::memory(), [$($case),*]);
        contract_suite!(redis, crate::Store::redis(), [$($case),*]);
        contract_suite!(redis_cluster, crate::Store::cluster(), [$($case),*]);
    };
}

every_backplane!(
    offsets_are_gap_free_from_one,
    reads_of_unknown_channels_create_nothing,
    history_is_trimmed_by_count,
    history_is_trimmed_by_age_per_namespace,
    history_pages_are_contiguous_up_to_top,
    delivery_is_in_order_and_only_while_subscribed,
    concurrent_publishers_get_distinct_gap_free_offsets,
    idempotent_retry_returns_the_first_ack,
    idempotency_key_with_other_data_is_a_conflict,
    idempotency_scopes_live_apart,
    tags_are_carried_everywhere,
    presence_counts_members_and_distinct_users,
    joins_and_leaves_keep_their_place_among_publications,
    flush_applies_every_queued_change_in_order,
    channel_reports_are_summed_over_live_nodes,
    stale_versions_are_suppressed,
    versions_race_atomically,
);

/// Cases about several nodes sharing one store (Redis and Redis Cluster).
macro_rules! shared_backplanes {
    ($($case:ident),* $(,)?) => {
        contract_suite!(redis_shared, crate::Store::redis(), [$($case),*]);
        contract_suite!(redis_cluster_shared, crate::Store::cluster(), [$($case),*]);
    };
}

shared_backplanes!(
    a_crashed_nodes_members_leave_once_each,
    concurrent_reapers_announce_each_leave_once,
);

contract_suite!(
    redis_single,
    crate::Store::redis(),
    [refresh_restores_members_in_batches]
);

contract_suite!(
    redis_sentinel,
    crate::Store::sentinel(),
    [
        presence_counts_members_and_distinct_users,
        joins_and_leaves_keep_their_place_among_publications,
        flush_applies_every_queued_change_in_order,
        channel_reports_are_summed_over_live_nodes,
        a_crashed_nodes_members_leave_once_each,
    ]
);

/// Not a contract case: it stops the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_changes_outlast_an_outage() {
    let mut store = Store::redis().await;
    cases::presence_changes_outlast_a_redis_outage(&mut store).await;
}
