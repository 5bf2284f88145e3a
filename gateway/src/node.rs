//! The node: the pieces one gateway process shares between its connections — configuration,
//! hub, backplane, metrics — and its lifecycle (ready, then draining on shutdown).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backplane::memory::MemoryBackplane;
use backplane::Backplane;
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
    /// A node on the embedded in-memory backplane.
    pub fn new(config: Config) -> Arc<Node> {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let backplane = MemoryBackplane::new(config.retention(), hub.clone());
        Arc::new(Node {
            config,
            hub,
            backplane,
            metrics,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        })
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
    ) -> Result<backplane::PublishAck, backplane::BackplaneError> {
        let ack = self.backplane.publish(channel, data).await?;
        self.metrics.publications.inc();
        Ok(ack)
    }
}
