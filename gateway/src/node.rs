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
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;

/// Shared state of one gateway process.
pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub backplane: Arc<dyn Backplane>,
    pub metrics: Metrics,
    /// Cancelled when the node starts shutting down: every connection task watches it.
    pub shutdown: CancellationToken,
    /// Every WebSocket and SSE connection task, so shutdown can wait for them.
    pub connections: TaskTracker,
    draining: AtomicBool,
    next_conn: AtomicU64,
}

impl Node {
    /// A node on the configured backplane: Redis if configured, else the embedded one.
    pub async fn start(config: Config) -> Result<Arc<Node>, BackplaneError> {
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
            connections: TaskTracker::new(),
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

    /// Marks the node not ready and tells every connection to close.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::Relaxed);
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
        idempotency_key: Option<&str>,
    ) -> Result<backplane::PublishAck, BackplaneError> {
        let ack = self
            .backplane
            .publish(channel, data, idempotency_key)
            .await?;
        self.metrics.publications.inc();
        Ok(ack)
    }
}
