//! The command path to Redis: for a single server (or the master behind Sentinel),
//! `redis.pool_size` multiplexed connections from a deadpool pool, held and shared as lanes; on
//! Redis Cluster, one shared multiplexed cluster
//! connection (deadpool's cluster pool cannot bound response time). Both fail fast when Redis does
//! not answer, so a publish during an outage is refused, never left hanging.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, FromRedisValue, Script, ScriptInvocation, ServerErrorKind};

use super::sentinel::{MasterResolver, PoolManager};
use crate::BackplaneError;

type Pool = deadpool::managed::Pool<PoolManager>;

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

/// Commands per pipeline of [`Commands::run_groups`] on a single server.
const GROUPED_PIPELINE: usize = 256;

/// Runs a script's `EVALSHA`; on NOSCRIPT (nothing ran) loads the script and runs it again.
async fn eval<T: FromRedisValue>(
    command: &redis::Cmd,
    script: &Script,
    connection: &mut (impl redis::aio::ConnectionLike + Send),
) -> redis::RedisResult<T> {
    match command.query_async(connection).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(connection).await?;
            command.query_async(connection).await
        }
        answer => answer,
    }
}

/// Where commands go.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(Arc<Lanes>),
    Cluster(ClusterConnection),
}

/// Pooled connections kept checked out and shared. Each is multiplexed, so concurrent commands
/// pipeline on it; returning it to the pool after every command would make the next checkout pay
/// deadpool's recycle check (UNWATCH + PING), a second round trip per publish. A lane whose
/// command failed goes back to the pool, which checks it (or replaces it) before its next use.
pub(crate) struct Lanes {
    pool: Pool,
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Lane {
    held: Mutex<Option<deadpool::managed::Object<PoolManager>>>,
    /// One checkout per empty lane at a time: racing checkouts could exhaust the pool.
    filling: tokio::sync::Mutex<()>,
}

impl Lane {
    fn connection(&self) -> Option<MultiplexedConnection> {
        let held = self.held.lock().expect("not poisoned");
        held.as_deref().cloned()
    }

    fn release(&self) {
        let _returned = self.held.lock().expect("not poisoned").take();
    }
}

impl Lanes {
    /// A lane's connection (checked out of the pool if the lane is empty) and the lane's index.
    async fn get(&self) -> Result<(usize, MultiplexedConnection), BackplaneError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let lane = &self.lanes[i];
        if let Some(c) = lane.connection() {
            return Ok((i, c));
        }
        let _filling = lane.filling.lock().await;
        if let Some(c) = lane.connection() {
            return Ok((i, c));
        }
        let pooled = self.pool.get().await.map_err(unavailable)?;
        let connection = MultiplexedConnection::clone(&pooled);
        *lane.held.lock().expect("not poisoned") = Some(pooled);
        Ok((i, connection))
    }

    /// Returns every lane's connection to the pool, which checks each before its next use.
    fn reset(&self) {
        self.lanes.iter().for_each(Lane::release);
    }

    /// Runs `command` on a lane; on failure the lane's connection goes back to the pool.
    async fn with<T, F, Fut>(&self, command: F) -> Result<T, BackplaneError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (i, connection) = self.get().await?;
        let result = command(connection).await;
        if result.is_err() {
            self.lanes[i].release();
        }
        result.map_err(unavailable)
    }
}

fn connection_config(
    connect_timeout: Duration,
    command_timeout: Duration,
) -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(command_timeout))
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
        let config = connection_config(connect_timeout, command_timeout);
        let manager = deadpool_redis::Manager::new_with_config(url, config).map_err(unavailable)?;
        Self::lanes(
            PoolManager::Direct(manager),
            pool_size,
            connect_timeout,
            command_timeout,
        )
    }

    /// Lanes to the master behind Sentinel: a lane's connection is made to the master the
    /// sentinels name when it is checked out, and dropped once its server is no longer master.
    pub(crate) fn sentinel(
        resolver: Arc<MasterResolver>,
        pool_size: usize,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Commands, BackplaneError> {
        let config = connection_config(connect_timeout, command_timeout);
        Self::lanes(
            PoolManager::Sentinel { resolver, config },
            pool_size,
            // Creating a connection resolves the master first: two connection set-ups.
            connect_timeout * 3,
            command_timeout,
        )
    }

    fn lanes(
        manager: PoolManager,
        pool_size: usize,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Commands, BackplaneError> {
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(command_timeout))
            .build()
            .map_err(unavailable)?;
        Ok(Commands::Single(Arc::new(Lanes {
            pool,
            lanes: (0..pool_size.max(1)).map(|_| Lane::default()).collect(),
            next: AtomicUsize::new(0),
        })))
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

    /// Forgets the held connections after Redis dropped ours (the pub/sub link saw it): they are
    /// most likely dead too, and a command must not be the one to find out.
    pub(crate) fn reset(&self) {
        if let Commands::Single(lanes) = self {
            lanes.reset();
        }
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, BackplaneError> {
        match self {
            Commands::Single(lanes) => {
                lanes
                    .with(|mut c| async move { invocation.invoke_async(&mut c).await })
                    .await
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

    /// Runs the publish script's `EVALSHA` (loading `script` on NOSCRIPT), then (with `wait`)
    /// `WAIT n timeout` on the same connection, so the count covers this write. Returns the
    /// script's answer and how many replicas acknowledged (None without `wait`).
    pub(crate) async fn run_replicated<T: FromRedisValue + Send>(
        &self,
        command: &redis::Cmd,
        script: &Script,
        wait: Option<(u32, Duration)>,
    ) -> Result<(T, Option<u64>), BackplaneError> {
        match (self, wait) {
            (Commands::Single(lanes), None) => {
                lanes
                    .with(|mut c| async move { Ok((eval(command, script, &mut c).await?, None)) })
                    .await
            }
            (Commands::Single(lanes), Some((replicas, timeout))) => {
                lanes
                    .with(|mut c| async move {
                        let answer: T = eval(command, script, &mut c).await?;
                        let acked: u64 = redis::cmd("WAIT")
                            .arg(replicas)
                            .arg(timeout.as_millis().max(1) as u64)
                            .query_async(&mut c)
                            .await?;
                        Ok((answer, Some(acked)))
                    })
                    .await
            }
            (Commands::Cluster(connection), None) => {
                let mut connection = connection.clone();
                let answer = eval(command, script, &mut connection)
                    .await
                    .map_err(unavailable)?;
                Ok((answer, None))
            }
            // Refused by the configuration: WAIT would have to run on the shard's connection.
            (Commands::Cluster(_), Some(_)) => Err(unavailable(
                "min_replicas_acked is not supported on Redis Cluster",
            )),
        }
    }

    /// Runs `EVALSHA`s of `script` as one pipeline on one lane (a single server or the master
    /// behind Sentinel): EVALSHA each, in order, then with `wait` one `WAIT n timeout` covering
    /// them all. Invocations that found the script missing (NOSCRIPT: nothing ran) are run again
    /// once it is loaded. Returns each invocation's answer (a failed command fails only its own)
    /// and how many replicas acknowledged (None without `wait`).
    #[allow(clippy::type_complexity)]
    pub(crate) async fn run_batch<T: FromRedisValue + Send>(
        &self,
        commands: Vec<redis::Cmd>,
        script: &Script,
        wait: Option<(u32, Duration)>,
    ) -> Result<(Vec<Result<T, BackplaneError>>, Option<u64>), BackplaneError> {
        let Commands::Single(lanes) = self else {
            return Err(unavailable("batches run on a single server"));
        };
        lanes
            .with(|mut c| async move {
                let mut answers: Vec<Option<Result<T, BackplaneError>>> =
                    commands.iter().map(|_| None).collect();
                // The commands move into the pipeline; only a rerun after NOSCRIPT copies some.
                let mut pending: Vec<usize> = (0..commands.len()).collect();
                let mut pipe = redis::Pipeline::with_capacity(commands.len() + 1);
                commands.into_iter().for_each(|command| {
                    pipe.add_command(command);
                });
                let mut loaded = false;
                loop {
                    pipe.ignore_errors();
                    if let Some((replicas, timeout)) = wait {
                        pipe.cmd("WAIT")
                            .arg(replicas)
                            .arg(timeout.as_millis().max(1) as u64);
                    }
                    let mut results: Vec<redis::RedisResult<redis::Value>> =
                        pipe.query_async(&mut c).await?;
                    let acked = match wait {
                        Some(_) => Some(u64::from_redis_value(
                            results.pop().unwrap_or(Ok(redis::Value::Nil))?,
                        )?),
                        None => None,
                    };
                    // (place in this pipeline, index in the batch) of the commands to rerun.
                    let mut missing = Vec::new();
                    for (k, (&i, result)) in pending.iter().zip(results).enumerate() {
                        answers[i] = Some(match result {
                            Err(e)
                                if !loaded
                                    && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                            {
                                missing.push((k, i));
                                continue;
                            }
                            Err(e) => Err(unavailable(e)),
                            Ok(v) => T::from_redis_value(v).map_err(unavailable),
                        });
                    }
                    if missing.is_empty() {
                        let answers = answers
                            .into_iter()
                            .map(|a| a.unwrap_or_else(|| Err(unavailable("no answer"))))
                            .collect();
                        return Ok((answers, acked));
                    }
                    script.prepare_invoke().load_async(&mut c).await?;
                    loaded = true;
                    let sent: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
                    let mut rerun = redis::Pipeline::with_capacity(missing.len() + 1);
                    for &(k, _) in &missing {
                        rerun.add_command(sent[k].clone());
                    }
                    pipe = rerun;
                    pending = missing.into_iter().map(|(_, i)| i).collect();
                }
            })
            .await
    }

    /// Runs one command (routed by its key on a cluster).
    pub(crate) async fn query<T: FromRedisValue + Send>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, BackplaneError> {
        match self {
            Commands::Single(lanes) => {
                lanes
                    .with(|mut c| async move { command.query_async(&mut c).await })
                    .await
            }
            Commands::Cluster(connection) => {
                let mut connection = connection.clone();
                command
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// Runs a pipeline on one connection; on a cluster its commands must share a slot.
    pub(crate) async fn pipeline<T: FromRedisValue + Send>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BackplaneError> {
        match self {
            Commands::Single(lanes) => {
                lanes
                    .with(|mut c| async move { pipe.query_async(&mut c).await })
                    .await
            }
            Commands::Cluster(connection) => {
                let mut connection = connection.clone();
                pipe.query_async(&mut connection).await.map_err(unavailable)
            }
        }
    }

    /// Runs groups of `EVALSHA`s of `script`: each group's in order, the groups independently.
    /// On a single server (or Sentinel's master) all of them go out in order as pipelines of
    /// [`GROUPED_PIPELINE`] commands on one lane; on a cluster, where each group's keys share a
    /// slot, the groups run concurrently, each stopping at its first failure. Returns each
    /// group's answers, or an error of the group.
    #[allow(clippy::type_complexity)]
    pub(crate) async fn run_groups<T: FromRedisValue + Send>(
        &self,
        groups: Vec<Vec<redis::Cmd>>,
        script: &Script,
    ) -> Vec<Result<Vec<T>, BackplaneError>> {
        match self {
            Commands::Single(_) => {
                let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
                let mut flat = groups.into_iter().flatten().peekable();
                let mut answers: Vec<Result<T, BackplaneError>> = Vec::new();
                while flat.peek().is_some() {
                    let chunk: Vec<redis::Cmd> = flat.by_ref().take(GROUPED_PIPELINE).collect();
                    let n = chunk.len();
                    match self.run_batch::<T>(chunk, script, None).await {
                        Ok((got, _)) => answers.extend(got),
                        Err(e) => {
                            let message = e.to_string();
                            answers.extend((0..n).map(|_| Err(unavailable(&message))));
                        }
                    }
                }
                let mut answers = answers.into_iter();
                sizes
                    .into_iter()
                    .map(|size| answers.by_ref().take(size).collect())
                    .collect()
            }
            Commands::Cluster(_) => {
                let runs = groups.into_iter().map(|group| async move {
                    let mut answers = Vec::with_capacity(group.len());
                    for command in &group {
                        let (answer, _) = self.run_replicated(command, script, None).await?;
                        answers.push(answer);
                    }
                    Ok(answers)
                });
                futures_util::future::join_all(runs).await
            }
        }
    }

    /// A round trip to Redis (to every primary on a cluster).
    pub(crate) async fn ping(&self) -> Result<(), BackplaneError> {
        match self {
            Commands::Single(lanes) => {
                lanes
                    .with(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
                    .await?;
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
            Commands::Single(lanes) => {
                lanes
                    .with(|mut c| async move {
                        redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg(message)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await?;
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
