//! The command path to Redis: a deadpool-redis pool for a single server, or one shared
//! multiplexed cluster connection (deadpool's cluster pool cannot bound response time). Both fail
//! fast when Redis does not answer, so a publish during an outage is refused, never left hanging.

use std::sync::LazyLock;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script, ScriptInvocation};

use crate::BackplaneError;

pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("trim.lua"),
        include_str!("publish.lua")
    ))
});
pub(crate) static HISTORY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("trim.lua"),
        include_str!("history.lua")
    ))
});

/// Where commands go.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(deadpool_redis::Pool),
    Cluster(ClusterConnection),
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BackplaneError {
    BackplaneError::Unavailable(e.to_string())
}

impl Commands {
    pub(crate) async fn single(
        url: &str,
        pool_size: usize,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Commands, BackplaneError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(command_timeout));
        let manager = deadpool_redis::Manager::new_with_config(url, config).map_err(unavailable)?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(command_timeout))
            .build()
            .map_err(unavailable)?;
        Ok(Commands::Single(pool))
    }

    pub(crate) async fn cluster(
        nodes: &[String],
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Commands, BackplaneError> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(connect_timeout)
            .response_timeout(command_timeout)
            .retries(2)
            .build()
            .map_err(unavailable)?;
        let connection = client.get_async_connection().await.map_err(unavailable)?;
        Ok(Commands::Cluster(connection))
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, BackplaneError> {
        match self {
            Commands::Single(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                invocation
                    .invoke_async(&mut *connection)
                    .await
                    .map_err(unavailable)
            }
            Commands::Cluster(connection) => {
                let mut connection = connection.clone();
                invocation
                    .invoke_async(&mut connection)
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// A round trip to Redis (to every primary on a cluster).
    pub(crate) async fn ping(&self) -> Result<(), BackplaneError> {
        match self {
            Commands::Single(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                redis::cmd("PING")
                    .query_async::<String>(&mut *connection)
                    .await
                    .map_err(unavailable)?;
            }
            Commands::Cluster(connection) => {
                let mut connection = connection.clone();
                redis::cmd("PING")
                    .query_async::<redis::Value>(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Publishes a raw pub/sub message (PUBLISH, or SPUBLISH on a cluster).
    pub(crate) async fn publish_raw(
        &self,
        channel: &str,
        message: &str,
    ) -> Result<(), BackplaneError> {
        match self {
            Commands::Single(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(&mut *connection)
                    .await
                    .map_err(unavailable)?;
            }
            Commands::Cluster(connection) => {
                let mut connection = connection.clone();
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }
}
