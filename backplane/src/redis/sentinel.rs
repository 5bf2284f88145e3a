//! Following the master behind Redis Sentinel: resolving it through the sentinels (redis-rs'
//! `sentinel` module, which also checks the answer with `ROLE`), the command pool's manager that
//! connects to the resolved master and drops any connection whose server is no longer master, and
//! the pub/sub connection that moves to the new master after a failover.
//!
//! Credentials and TLS come from the sentinel node URLs (`redis[s]://[user:password@]host:port`)
//! and apply to the sentinels and to the master alike.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool::managed;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisConnectionInfo, RedisError, TlsMode, Value,
};
use tokio::sync::{mpsc, Notify};

use super::commands::unavailable;
use crate::BackplaneError;

/// Finds the current master of one monitored name.
pub(crate) struct MasterResolver {
    /// `async_master_for` needs `&mut`; only connection set-up waits on this lock.
    sentinel: tokio::sync::Mutex<Sentinel>,
    master: String,
    username: Option<String>,
    password: Option<String>,
    tls: bool,
    connect_timeout: Duration,
}

impl MasterResolver {
    pub(crate) fn new(
        nodes: &[String],
        master: &str,
        connect_timeout: Duration,
    ) -> Result<MasterResolver, BackplaneError> {
        let first = nodes
            .first()
            .ok_or_else(|| unavailable("redis.sentinel_nodes is empty"))?
            .as_str()
            .into_connection_info()
            .map_err(unavailable)?;
        let settings = first.redis_settings();
        let sentinel = Sentinel::build(nodes.to_vec()).map_err(unavailable)?;
        Ok(MasterResolver {
            sentinel: tokio::sync::Mutex::new(sentinel),
            master: master.to_string(),
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            tls: matches!(first.addr(), ConnectionAddr::TcpTls { .. }),
            connect_timeout,
        })
    }

    fn node_info(&self, protocol: ProtocolVersion) -> SentinelNodeConnectionInfo {
        let mut redis_info = RedisConnectionInfo::default().set_protocol(protocol);
        if let Some(username) = &self.username {
            redis_info = redis_info.set_username(username);
        }
        if let Some(password) = &self.password {
            redis_info = redis_info.set_password(password);
        }
        let info = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
        if self.tls {
            info.set_tls_mode(TlsMode::Secure)
        } else {
            info
        }
    }

    /// A client for the master the sentinels name now (confirmed by the master's own `ROLE`).
    pub(crate) async fn client(
        &self,
        protocol: ProtocolVersion,
    ) -> Result<redis::Client, RedisError> {
        let node_info = self.node_info(protocol);
        let resolve = async {
            let mut sentinel = self.sentinel.lock().await;
            sentinel
                .async_master_for(&self.master, Some(&node_info))
                .await
        };
        // Two connection set-ups: to a sentinel, then to the master for ROLE.
        match tokio::time::timeout(self.connect_timeout * 2, resolve).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "no answer from the sentinels",
                format!("master {:?} not resolved in time", self.master),
            ))),
        }
    }
}

/// Whether the server behind `connection` is a master now (`ROLE`).
async fn is_master(connection: &mut impl redis::aio::ConnectionLike) -> Result<bool, RedisError> {
    let role: Value = redis::cmd("ROLE").query_async(connection).await?;
    Ok(match role {
        Value::Array(items) => matches!(
            items.first(),
            Some(Value::BulkString(b)) if b == b"master"
        ),
        _ => false,
    })
}

/// The command pool's manager: a single address, or the master behind Sentinel.
pub(crate) enum PoolManager {
    Direct(deadpool_redis::Manager),
    Sentinel {
        resolver: Arc<MasterResolver>,
        config: AsyncConnectionConfig,
    },
}

impl managed::Manager for PoolManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        match self {
            PoolManager::Direct(manager) => manager.create().await,
            PoolManager::Sentinel { resolver, config } => {
                let client = resolver.client(ProtocolVersion::RESP2).await?;
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
            }
        }
    }

    async fn recycle(
        &self,
        connection: &mut MultiplexedConnection,
        metrics: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        match self {
            PoolManager::Direct(manager) => manager.recycle(connection, metrics).await,
            // A lane comes back here after a failed command: a server that was demoted (or
            // answered READONLY) is not written to again; the pool resolves the master anew.
            PoolManager::Sentinel { .. } => {
                if is_master(connection).await? {
                    Ok(())
                } else {
                    Err(managed::RecycleError::message("server is no longer master"))
                }
            }
        }
    }
}

/// The pub/sub connection on Sentinel: a connection manager (reconnecting and resubscribing by
/// itself) to the current master, replaced by one to the new master when the sentinels name
/// another. A watcher checks `ROLE` on it every `check_interval`, and at once when the
/// connection drops, and re-resolves when the connection fails or its server is no longer master.
pub(crate) struct FollowedMaster {
    state: parking_lot::Mutex<Followed>,
    resolver: Arc<MasterResolver>,
    pushes: Pushes,
    connect_timeout: Duration,
    command_timeout: Duration,
    check_interval: Duration,
}

/// Where a connection manager's pushes go: to the link, only from the current manager (a
/// replaced one may still reconnect to the old master); a disconnection also wakes the watcher.
#[derive(Clone)]
struct Pushes {
    link: mpsc::UnboundedSender<PushInfo>,
    generation: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl Pushes {
    fn sender(&self, generation: u64) -> impl redis::aio::AsyncPushSender {
        let pushes = self.clone();
        move |info: PushInfo| {
            if pushes.generation.load(Ordering::Acquire) != generation {
                return Ok(());
            }
            if info.kind == PushKind::Disconnection {
                pushes.wake.notify_one();
            }
            pushes.link.send(info)
        }
    }
}

struct Followed {
    manager: ConnectionManager,
    /// `host:port` of the master `manager` connects to.
    address: String,
    /// Every pub/sub channel the link asked for, to subscribe on a replacement connection.
    names: HashSet<String>,
}

impl FollowedMaster {
    pub(crate) async fn open(
        resolver: Arc<MasterResolver>,
        pushes: mpsc::UnboundedSender<PushInfo>,
        connect_timeout: Duration,
        command_timeout: Duration,
        check_interval: Duration,
    ) -> Result<Arc<FollowedMaster>, BackplaneError> {
        let pushes = Pushes {
            link: pushes,
            generation: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(Notify::new()),
        };
        let client = resolver
            .client(ProtocolVersion::RESP3)
            .await
            .map_err(unavailable)?;
        let address = client.get_connection_info().addr().to_string();
        let manager = manager(&client, pushes.sender(0), connect_timeout, command_timeout)
            .await
            .map_err(unavailable)?;
        let followed = Arc::new(FollowedMaster {
            state: parking_lot::Mutex::new(Followed {
                manager,
                address,
                names: HashSet::new(),
            }),
            resolver,
            pushes,
            connect_timeout,
            command_timeout,
            check_interval,
        });
        let wake = followed.pushes.wake.clone();
        tokio::spawn(watch(Arc::downgrade(&followed), wake, check_interval));
        Ok(followed)
    }

    pub(crate) async fn subscribe(&self, names: &[String]) -> redis::RedisResult<()> {
        // Recorded before the command, so a replacement made meanwhile subscribes them too.
        let (mut manager, known) = {
            let mut state = self.state.lock();
            let known = names.iter().all(|n| state.names.contains(n));
            state.names.extend(names.iter().cloned());
            (state.manager.clone(), known)
        };
        if known {
            // A re-assertion (the link's health check does this to make a dead connection
            // notice): the watcher already probes the connection, so the link is not held up on
            // a dead master while the sentinels elect a new one.
            let names = names.to_vec();
            tokio::spawn(async move {
                if let Err(e) = manager.subscribe(&names).await {
                    tracing::debug!(error = %e, "re-subscribe failed");
                }
            });
            return Ok(());
        }
        manager.subscribe(names).await
    }

    pub(crate) async fn unsubscribe(&self, names: &[String]) -> redis::RedisResult<()> {
        let mut manager = {
            let mut state = self.state.lock();
            for name in names {
                state.names.remove(name);
            }
            state.manager.clone()
        };
        manager.unsubscribe(names).await
    }

    /// One check: keeps the connection while its server is master, else moves to the master the
    /// sentinels name (if that is another server; the manager reconnects to the same one itself).
    /// Returns whether the connection is on a confirmed master now.
    async fn check(&self) -> bool {
        let mut current = self.state.lock().manager.clone();
        // Short: a manager reconnecting to a dead master retries for longer than this.
        let limit = self.command_timeout.min(self.check_interval);
        let role = tokio::time::timeout(limit, is_master(&mut current)).await;
        if matches!(role, Ok(Ok(true))) {
            return true;
        }
        let client = match self.resolver.client(ProtocolVersion::RESP3).await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "no master from the sentinels yet");
                return false;
            }
        };
        let address = client.get_connection_info().addr().to_string();
        if address == self.state.lock().address {
            return false;
        }
        let generation = self.pushes.generation.load(Ordering::Acquire) + 1;
        let mut manager = match manager(
            &client,
            self.pushes.sender(generation),
            self.connect_timeout,
            self.command_timeout,
        )
        .await
        {
            Ok(manager) => manager,
            Err(e) => {
                tracing::warn!(%address, error = %e, "cannot connect to the new master");
                return false;
            }
        };
        tracing::warn!(%address, "redis master changed: moving the pub/sub connection");
        // The link re-syncs every channel Redis confirms after a disconnect: what was published
        // while it followed the old master is read from the new master's history. Sent before
        // the new manager's pushes count, so it comes before their confirmations.
        let _ = self.pushes.link.send(PushInfo {
            kind: PushKind::Disconnection,
            data: Vec::new(),
        });
        let names: Vec<String> = {
            let mut state = self.state.lock();
            state.manager = manager.clone();
            state.address = address;
            self.pushes.generation.store(generation, Ordering::Release);
            state.names.iter().cloned().collect()
        };
        if let Err(e) = manager.subscribe(&names).await {
            // The link's health probe fails until the manager has resubscribed by itself.
            tracing::warn!(error = %e, "resubscribing on the new master failed");
        }
        let dropped: Vec<String> = {
            let state = self.state.lock();
            names
                .into_iter()
                .filter(|n| !state.names.contains(n))
                .collect()
        };
        if !dropped.is_empty() {
            let _ = manager.unsubscribe(&dropped).await;
        }
        true
    }
}

async fn manager(
    client: &redis::Client,
    pushes: impl redis::aio::AsyncPushSender,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_push_sender(pushes)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(command_timeout));
    client.get_connection_manager_with_config(config).await
}

/// Checks the followed master every `interval`, and when its connection drops, until the link
/// is gone. Without a confirmed master it checks again soon: the sentinels may name the new one
/// at any moment, and live delivery waits for this connection to move.
async fn watch(followed: Weak<FollowedMaster>, wake: Arc<Notify>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry = (interval / 10).max(Duration::from_millis(50));
    let mut on_master = true;
    loop {
        if on_master {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = wake.notified() => {}
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = wake.notified() => {}
            }
        }
        let Some(followed) = followed.upgrade() else {
            return;
        };
        on_master = followed.check().await;
    }
}
