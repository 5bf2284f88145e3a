//! The node: the pieces one gateway process shares between its connections — configuration,
//! hub, backplane, metrics — and its lifecycle (ready, then draining on shutdown).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backplane::memory::MemoryBackplane;
use backplane::redis::RedisBackplane;
use backplane::{Backplane, BackplaneError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::{self, CONTROL_CHANNEL};
use crate::drain::Streams;
use crate::express::Sends;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::security::policy::Policy;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the backplane: {0}")]
    Backplane(#[from] backplane::BackplaneError),
    #[error("{0}")]
    Security(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Shared state of one gateway process.
pub struct Node {
    config: Config,
    hub: Arc<Hub>,
    backplane: Arc<dyn Backplane>,
    metrics: Metrics,
    /// Cancelled when the node stops accepting: the listener and plain HTTP connections watch it.
    shutdown: CancellationToken,
    /// WebSocket, SSE and waiting long-poll connections, each closable on its own (for
    /// staggered draining).
    streams: Arc<Streams>,
    /// Every WebSocket and SSE connection task, so shutdown can wait for them.
    connection_tasks: TaskTracker,
    policy: Policy,
    draining: AtomicBool,
    /// Random per process: with a connection's id it names the connection cluster-wide.
    id: u64,
    /// Local connections by user, and recent server disconnects ([`crate::control`]).
    control: Arc<control::Registry>,
}

impl Node {
    /// A node on the configured backplane: Redis if configured, else the embedded one.
    pub(crate) async fn start(config: Config) -> Result<Arc<Node>, StartError> {
        let policy = Policy::load(&config).map_err(StartError::Security)?;
        let metrics = Metrics::new();
        let sends = if config.server.batched_sends {
            Sends::Batched
        } else {
            Sends::OneByOne
        };
        let hub = Hub::new(metrics.clone())
            .with_namespaces(policy.namespaces.clone())
            .with_sends(sends);
        let hub = Arc::new(hub);
        let control = Arc::new(control::Registry::new(config.api.disconnect_window));
        hub.set_control(control.clone());
        let backplane: Arc<dyn Backplane> = match config.redis() {
            Some(redis) => RedisBackplane::connect(redis, config.settings(), hub.clone()).await?,
            None => MemoryBackplane::new(config.settings(), hub.clone()),
        };
        // Every node hears every control command from now on; the disconnects still in the
        // channel's history are read back, so a node started after one refuses its old tokens too.
        backplane.subscribe(CONTROL_CHANNEL).await?;
        let kept = config.history.max_page.max(config.history.max_count);
        let page = backplane.history(CONTROL_CHANNEL, 0, kept).await?;
        for publication in page.publications {
            backplane::PublicationSink::deliver(&*control, publication);
        }
        let node = Arc::new(Node {
            config,
            hub,
            backplane,
            metrics,
            shutdown: CancellationToken::new(),
            streams: Arc::new(Streams::default()),
            connection_tasks: TaskTracker::new(),
            policy,
            draining: AtomicBool::new(false),
            id: rand::random(),
            control,
        });
        tokio::spawn(report_channels(Arc::downgrade(&node)));
        Ok(node)
    }

    /// The cluster-wide id of this node's connection `conn` (presence lists it as `client`).
    pub(crate) fn client_id(&self, conn: crate::hub::ConnId) -> String {
        format!("{:016x}-{conn}", self.id)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The node's metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }

    pub(crate) fn backplane(&self) -> &dyn Backplane {
        &*self.backplane
    }

    /// Local connections by user, and recent server disconnects.
    pub(crate) fn control(&self) -> &control::Registry {
        &self.control
    }

    /// Keys, namespaces and limits.
    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The streaming connections a drain closes.
    pub(crate) fn streams(&self) -> &Arc<Streams> {
        &self.streams
    }

    /// The tasks of the streaming connections, so shutdown can wait for them.
    pub(crate) fn connection_tasks(&self) -> &TaskTracker {
        &self.connection_tasks
    }

    /// Cancelled once the node stops accepting connections and requests.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Counts a refusal by a limit in `gateway_limit_rejections_total`.
    pub(crate) fn count_limit(&self, limit: &str) {
        self.metrics
            .limit_rejections
            .with_label_values(&[limit])
            .inc();
    }

    /// Counts `n` resumes with one outcome in `gateway_resumes_total`.
    pub(crate) fn count_resumes(&self, recovered: bool, reason: Option<&str>, n: u64) {
        if n == 0 {
            return;
        }
        let result = if recovered {
            "recovered"
        } else {
            "not_recovered"
        };
        self.metrics
            .resumes
            .with_label_values(&[result, reason.unwrap_or("none")])
            .inc_by(n);
    }

    /// Counts a refused credential or permission in `gateway_auth_failures_total`.
    pub(crate) fn count_auth(&self, reason: &str) {
        self.metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// Whether the node takes traffic; `Err` says why not.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("node is shutting down".into());
        }
        self.backplane.health()
    }

    /// The metrics text, with values read from the backplane and the hub at scrape time.
    pub(crate) fn encode_metrics(&self) -> Vec<u8> {
        let (queued, largest) = self.hub.queued_bytes();
        self.metrics
            .observe(self.backplane.stats(), queued, largest);
        self.metrics.encode()
    }

    /// Whether a drain has begun (the node no longer takes new streaming clients).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the node not ready; it keeps serving.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
        self.metrics.drain_remaining.set(self.streams.len() as i64);
    }

    /// Stops accepting connections and HTTP requests on kept-alive connections.
    pub(crate) fn stop_accepting(&self) {
        self.shutdown.cancel();
        self.connection_tasks.close();
    }
}

impl Node {
    /// Runs a backplane operation, timed in `gateway_backplane_command_duration_seconds{op}`.
    async fn timed<T>(&self, op: &str, operation: impl std::future::Future<Output = T>) -> T {
        let timer = self
            .metrics
            .backplane_duration
            .with_label_values(&[op])
            .start_timer();
        let result = operation.await;
        timer.observe_duration();
        result
    }

    /// Publishes through the backplane and counts it.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        data: bytes::Bytes,
        idempotency: Option<backplane::Idempotency<'_>>,
        version: Option<u64>,
    ) -> Result<backplane::PublishAck, BackplaneError> {
        let item = backplane::BatchItem {
            channel,
            data,
            idempotency,
            version,
        };
        let ack = self
            .timed("publish", self.backplane.publish_item(&item))
            .await;
        let published = ack.as_ref().is_ok_and(|a| !a.suppressed);
        self.metrics.publications.inc_by(u64::from(published));
        ack
    }

    /// Publishes a batch through the backplane (one round trip to Redis), timed as one
    /// `publish_batch`, and counts every publication acknowledged.
    pub(crate) async fn publish_batch(
        &self,
        items: &[backplane::BatchItem<'_>],
    ) -> Vec<Result<backplane::PublishAck, BackplaneError>> {
        let publish = self.backplane.publish_batch(items);
        let acks = self.timed("publish_batch", publish).await;
        let published = acks
            .iter()
            .filter(|a| a.as_ref().is_ok_and(|a| !a.suppressed))
            .count();
        self.metrics.publications.inc_by(published as u64);
        acks
    }

    /// Reads history through the backplane, timed.
    pub(crate) async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<backplane::HistoryPage, BackplaneError> {
        let history = self.backplane.history(channel, since, limit);
        self.timed("history", history).await
    }

    /// Makes the node's backplane subscription to `channel` follow local membership, timed.
    pub(crate) async fn reconcile(&self, channel: &str) -> Result<(), BackplaneError> {
        let reconcile = self.hub.reconcile(&*self.backplane, channel);
        self.timed("subscribe", reconcile).await
    }

    /// Reports this node's channels and their local subscriber counts to the backplane, for the
    /// cluster-wide channel list.
    pub(crate) async fn report_channels(&self) -> Result<(), BackplaneError> {
        let report = self.backplane.report_channels(self.hub.channel_counts());
        self.timed("report_channels", report).await
    }

    /// The cluster's channels starting with `prefix` that have subscribers, with their counts.
    pub(crate) async fn channels(
        &self,
        prefix: &str,
    ) -> Result<Vec<backplane::ChannelCount>, BackplaneError> {
        self.timed("channels", self.backplane.channels(prefix))
            .await
    }

    /// Records the fan-out latency of a written batch from its oldest live publication.
    pub(crate) fn observe_fanout(&self, transport: &str, oldest_published_us: u64) {
        let histogram = self.metrics.fanout_latency.with_label_values(&[transport]);
        crate::metrics::observe_fanout(&histogram, oldest_published_us);
    }
}

/// Reports the node's channels every `api.channels_report_interval` until the node stops.
async fn report_channels(node: std::sync::Weak<Node>) {
    let Some(period) = node
        .upgrade()
        .map(|n| n.config.api.channels_report_interval)
    else {
        return;
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.shutdown.is_cancelled() {
            return;
        }
        if let Err(e) = node.report_channels().await {
            tracing::debug!(error = %e, "channel report failed");
        }
    }
}
