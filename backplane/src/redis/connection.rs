//! The pub/sub connection of a node's link: RESP3 pushes on a single server's connection manager
//! (which reconnects and resubscribes by itself), on one that follows the master behind Sentinel,
//! or sharded pub/sub on a cluster connection.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::PushInfo;
use tokio::sync::mpsc;

use super::commands::unavailable;
use super::sentinel::{FollowedMaster, MasterResolver};
use super::{RedisConfig, Target};
use crate::BackplaneError;

/// The pub/sub connection: RESP3 pushes on a single server's connection manager (which
/// reconnects and resubscribes by itself), or sharded pub/sub on a cluster connection.
pub(crate) enum Connection {
    Single(ConnectionManager),
    Sentinel(Arc<FollowedMaster>),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(crate) async fn open(
        target: &Target,
        config: &RedisConfig,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> Result<Connection, BackplaneError> {
        match target {
            Target::Sentinel { nodes, master } => {
                // Its own sentinel client: resolving for the link never waits on the command
                // pool's resolutions.
                let resolver =
                    Arc::new(MasterResolver::new(nodes, master, config.connect_timeout)?);
                let followed = FollowedMaster::open(
                    resolver,
                    pushes,
                    config.connect_timeout,
                    config.command_timeout,
                    config.health_interval,
                )
                .await?;
                Ok(Connection::Sentinel(followed))
            }
            Target::Single(url) => {
                let separator = if url.contains('?') { '&' } else { '?' };
                let client = redis::Client::open(format!("{url}{separator}protocol=resp3"))
                    .map_err(unavailable)?;
                let manager_config = redis::aio::ConnectionManagerConfig::new()
                    .set_push_sender(pushes)
                    .set_automatic_resubscription()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.command_timeout));
                let manager = client
                    .get_connection_manager_with_config(manager_config)
                    .await
                    .map_err(unavailable)?;
                Ok(Connection::Single(manager))
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.command_timeout)
                    .build()
                    .map_err(unavailable)?;
                let connection = client.get_async_connection().await.map_err(unavailable)?;
                Ok(Connection::Cluster(connection))
            }
        }
    }

    pub(crate) async fn subscribe(
        &mut self,
        names: &[String],
        timeout: Duration,
    ) -> Result<(), BackplaneError> {
        self.change(true, names, timeout).await
    }

    pub(crate) async fn unsubscribe(
        &mut self,
        names: &[String],
        timeout: Duration,
    ) -> Result<(), BackplaneError> {
        self.change(false, names, timeout).await
    }

    /// (Un)subscribes, bounded by the command timeout per shard round trip.
    async fn change(
        &mut self,
        subscribe: bool,
        names: &[String],
        timeout: Duration,
    ) -> Result<(), BackplaneError> {
        let work = async {
            match self {
                Connection::Single(c) if subscribe => c.subscribe(names).await,
                Connection::Single(c) => c.unsubscribe(names).await,
                Connection::Sentinel(f) if subscribe => f.subscribe(names).await,
                Connection::Sentinel(f) => f.unsubscribe(names).await,
                Connection::Cluster(c) => {
                    // Each shard channel may live on another node: one command each.
                    for name in names {
                        if subscribe {
                            c.ssubscribe(name).await?;
                        } else {
                            c.sunsubscribe(name).await?;
                        }
                    }
                    Ok(())
                }
            }
        };
        match tokio::time::timeout(timeout * (names.len() as u32).clamp(1, 8), work).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(unavailable("pub/sub (un)subscribe timed out")),
        }
    }
}
