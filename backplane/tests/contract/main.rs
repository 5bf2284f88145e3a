//! The contract every [`Backplane`] implementation keeps, as one suite run against each of them:
//! the memory backplane, a real single `redis-server` and a real 3-master Redis Cluster (started
//! by `testkit` on free ports, stopped when each test ends). The cases live in `cases.rs` and take
//! a [`Store`]; `contract_suite!` instantiates every case for one store.

mod cases;

use std::sync::Arc;
use std::time::Duration;

use backplane::memory::MemoryBackplane;
use backplane::redis::{RedisBackplane, RedisConfig, Target};
use backplane::{Backplane, Publication, PublicationSink, Settings};
use parking_lot::Mutex;
use tokio::sync::Notify;

use testkit::{redis_cli, RedisCluster, RedisOpts, RedisServer};

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

    /// Waits until a publication with `offset` was delivered on `channel`; returns the
    /// channel's deliveries then.
    pub async fn wait_for(&self, channel: &str, offset: u64) -> Vec<Arc<Publication>> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                let got = self.of(channel);
                if got.iter().any(|p| p.offset == offset) {
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
    publications.iter().map(|p| p.offset).collect()
}

/// One gateway node's view: its backplane and what reached its sink.
pub struct Node {
    pub backplane: Arc<dyn Backplane>,
    pub sink: Arc<Recorder>,
    /// The same backplane when it is the memory one, to count its channels.
    memory: Option<Arc<MemoryBackplane>>,
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
}

const PREFIX: &str = "contract";

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
                };
            }
            Store::Redis(server) => Target::Single(server.url()),
            Store::Cluster(cluster) => {
                Target::Cluster(cluster.nodes.iter().map(RedisServer::url).collect())
            }
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
            backplane,
            sink,
            memory: None,
        }
    }

    /// How much the store holds: the memory backplane's channels as seen by `node`, else the
    /// keys of every Redis server (`DBSIZE`).
    pub async fn stored(&self, node: &Node) -> u64 {
        let ports: Vec<u16> = match self {
            Store::Memory => {
                let memory = node.memory.as_ref().expect("a memory node");
                return memory.channel_count() as u64;
            }
            Store::Redis(server) => vec![server.port],
            Store::Cluster(cluster) => cluster.nodes.iter().map(|n| n.port).collect(),
        };
        let mut keys = 0;
        for port in ports {
            let out = redis_cli(port, &["dbsize"]).await;
            keys += out.parse::<u64>().expect("DBSIZE answers a number");
        }
        keys
    }

    /// Waits until no node is subscribed to `channel` at the store any more (Redis: the linger
    /// passed and the link unsubscribed). The memory backplane stops delivery at once.
    pub async fn wait_unsubscribed(&self, channel: &str) {
        let (ports, command): (Vec<u16>, _) = match self {
            Store::Memory => return,
            Store::Redis(server) => (vec![server.port], "numsub"),
            // Sharded subscriptions are counted by the shard that owns the slot: ask all.
            Store::Cluster(cluster) => (
                cluster.nodes.iter().map(|n| n.port).collect(),
                "shardnumsub",
            ),
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
    stale_versions_are_suppressed,
    versions_race_atomically,
);
