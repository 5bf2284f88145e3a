//! The node: the pieces one gateway process shares between its connections — configuration,
//! hub, backplane, metrics — and its lifecycle (ready, then draining on shutdown).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backplane::memory::MemoryBackplane;
use backplane::redis::RedisBackplane;
use backplane::{Backplane, BackplaneError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::drain::Registry;
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;

/// Shared state of one gateway process.
pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub backplane: Arc<dyn Backplane>,
    pub metrics: Metrics,
    /// Cancelled when the node stops accepting: the listener and plain HTTP connections watch it.
    pub shutdown: CancellationToken,
    /// WebSocket and SSE connections, each closable on its own (for staggered draining).
    pub registry: Arc<Registry>,
    /// Every WebSocket and SSE connection task, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// Keys, namespaces and limits (see `security`).
    pub security: crate::security::Security,
    draining: AtomicBool,
    next_conn: AtomicU64,
}

impl Node {
    /// A node on the configured backplane: Redis if configured, else the embedded one.
    pub async fn start(config: Config) -> Result<Arc<Node>, crate::server::StartError> {
        let security = crate::security::Security::load(&config)
            .map_err(crate::server::StartError::Security)?;
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let backplane: Arc<dyn Backplane> = match config.redis() {
            Some(redis) => RedisBackplane::connect(redis, config.settings(), hub.clone()).await?,
            None => MemoryBackplane::new(config.settings(), hub.clone()),
        };
        Ok(Arc::new(Node {
            config,
            hub,
            backplane,
            metrics,
            shutdown: CancellationToken::new(),
            registry: Arc::new(Registry::default()),
            connections: TaskTracker::new(),
            security,
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        }))
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the node takes traffic; `Err` says why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("node is shutting down".into());
        }
        self.backplane.health()
    }

    /// The metrics text, with values read from the backplane and the hub at scrape time.
    pub fn encode_metrics(&self) -> Vec<u8> {
        let (queued, largest) = self.hub.queued_bytes();
        self.metrics
            .observe(self.backplane.stats(), queued, largest);
        self.metrics.encode()
    }

    /// Whether a drain has begun (the node no longer takes new streaming clients).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the node not ready; it keeps serving.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
        self.metrics.drain_remaining.set(self.registry.len() as i64);
    }

    /// Stops accepting connections and HTTP requests on kept-alive connections.
    pub fn stop_accepting(&self) {
        self.shutdown.cancel();
        self.connections.close();
    }
}

impl Node {
    /// Publishes through the backplane and counts it.
    pub async fn publish(
        &self,
        channel: &str,
        data: bytes::Bytes,
        idempotency: Option<backplane::Idempotency<'_>>,
    ) -> Result<backplane::PublishAck, BackplaneError> {
        let metrics = &self.metrics;
        let timer = metrics
            .backplane_duration
            .with_label_values(&["publish"])
            .start_timer();
        let ack = self.backplane.publish(channel, data, idempotency).await;
        timer.observe_duration();
        metrics.publications.inc_by(u64::from(ack.is_ok()));
        ack
    }

    /// Reads history through the backplane, timed.
    pub async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<backplane::HistoryPage, BackplaneError> {
        let metrics = &self.metrics;
        let timer = metrics
            .backplane_duration
            .with_label_values(&["history"])
            .start_timer();
        let page = self.backplane.history(channel, since, limit).await;
        timer.observe_duration();
        page
    }

    /// Makes the node's backplane subscription to `channel` follow local membership, timed.
    pub async fn reconcile(&self, channel: &str) -> Result<(), BackplaneError> {
        let metrics = &self.metrics;
        let timer = metrics
            .backplane_duration
            .with_label_values(&["subscribe"])
            .start_timer();
        let result = self.hub.reconcile(&*self.backplane, channel).await;
        timer.observe_duration();
        result
    }

    /// Records the fan-out latency of a written batch from its oldest live publication.
    pub fn observe_fanout(&self, transport: &str, oldest_published_us: u64) {
        let histogram = self.metrics.fanout_latency.with_label_values(&[transport]);
        crate::metrics::observe_fanout(&histogram, oldest_published_us);
    }
}
