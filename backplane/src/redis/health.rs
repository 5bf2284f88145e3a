//! Health and counters of a node's Redis link: whether live delivery works now (what `/readyz`
//! reports) and the counts behind the backplane's metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::Stats;

/// Health and counters of the link.
pub(crate) struct Health {
    healthy: AtomicBool,
    reason: Mutex<String>,
    pub(crate) reconnects: AtomicU64,
    pub(crate) gap_fills: AtomicU64,
    /// Members of dead nodes this node reaped.
    pub(crate) presence_reaped: AtomicU64,
    errors: AtomicU64,
    /// Channels the link is subscribed to (or subscribing) at Redis.
    subscriptions: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
            reconnects: AtomicU64::new(0),
            gap_fills: AtomicU64::new(0),
            presence_reaped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
        }
    }
}

impl Health {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.healthy.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(format!(
                "redis pub/sub link unhealthy: {}",
                self.reason.lock()
            ))
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            pubsub_healthy: self.healthy.load(Ordering::Relaxed),
            pubsub_reconnects: self.reconnects.load(Ordering::Relaxed),
            gap_fills: self.gap_fills.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            pubsub_subscriptions: self.subscriptions.load(Ordering::Relaxed),
            presence_reaped: self.presence_reaped.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_subscriptions(&self, count: u64) {
        self.subscriptions.store(count, Ordering::Relaxed);
    }

    pub(crate) fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_unhealthy(&self, reason: String) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(%reason, "redis pub/sub link unhealthy");
        }
        *self.reason.lock() = reason;
    }

    /// Returns true if the link was unhealthy.
    pub(crate) fn set_healthy(&self) -> bool {
        let was_unhealthy = !self.healthy.swap(true, Ordering::Relaxed);
        if was_unhealthy {
            tracing::info!("redis pub/sub link healthy again");
        }
        was_unhealthy
    }
}
