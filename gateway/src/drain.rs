//! Draining: how a stopping node lets go of its clients without a reconnect storm.
//!
//! Every WebSocket and SSE connection registers here and gets its own close token. A drain first
//! reports not ready while still serving for `drain.delay` (load balancers stop routing new
//! clients), then closes the registered connections in batches spread evenly over `drain.window`,
//! each with a jittered reconnect hint, so the clients arrive at the other nodes gradually.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use crate::hub::ConnId;
use crate::metrics::Metrics;

/// Pause between two batches of a drain.
const BATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The streaming connections of a node (WebSocket, SSE, waiting long-polls), each closable on
/// its own. A connection's id here is its id everywhere in the node (the hub's `ConnId`).
#[derive(Default)]
pub(crate) struct Streams {
    connections: Mutex<HashMap<ConnId, CancellationToken>>,
    next: std::sync::atomic::AtomicU64,
}

/// A connection's registration; dropping it unregisters the connection.
pub(crate) struct Registration {
    streams: Arc<Streams>,
    id: ConnId,
    token: CancellationToken,
}

impl Registration {
    /// The connection's id within the node.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    /// Resolves when the node wants this connection closed. Owned, so a connection loop can
    /// keep one pinned across iterations instead of registering a new waiter every time round.
    pub(crate) fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.connections.lock().remove(&self.id);
    }
}

impl Streams {
    pub(crate) fn register(self: &Arc<Self>) -> Registration {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        self.connections.lock().insert(id, token.clone());
        Registration {
            streams: self.clone(),
            id,
            token,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.connections.lock().len()
    }

    /// Closes every connection now.
    pub(crate) fn close_all(&self) {
        for token in self.connections.lock().values() {
            token.cancel();
        }
    }

    /// Closes the connections registered now in batches spread over `window`; returns the
    /// number of batches. Connections that register later are not waited for (the listener is
    /// closed by then).
    pub(crate) async fn close_spread(&self, window: Duration, metrics: &Metrics) -> usize {
        let mut ids: Vec<ConnId> = self.connections.lock().keys().copied().collect();
        ids.shuffle(&mut rand::rng());
        let batches = (window.as_millis() / BATCH_INTERVAL.as_millis()).max(1) as usize;
        let batches = batches.min(ids.len().max(1));
        let mut ticker = tokio::time::interval(window / batches as u32);
        let mut closed = 0;
        for batch in 0..batches {
            ticker.tick().await;
            // Spread the remainder so batch sizes differ by at most one.
            let end = ids.len() * (batch + 1) / batches;
            let tokens: Vec<CancellationToken> = {
                let connections = self.connections.lock();
                ids[closed..end]
                    .iter()
                    .filter_map(|id| connections.get(id).cloned())
                    .collect()
            };
            for token in &tokens {
                token.cancel();
            }
            metrics.drain_closed.inc_by(tokens.len() as u64);
            closed = end;
            let remaining = ids.len() - closed;
            metrics.drain_remaining.set(remaining as i64);
            tracing::info!(
                batch = batch + 1,
                batches,
                closed = tokens.len(),
                remaining,
                "drain batch"
            );
        }
        batches
    }
}

/// A reconnect delay hint in `[0, max)`, so clients closed in one batch do not return at once.
pub(crate) fn reconnect_hint(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random_range(0..max.as_millis().max(1) as u64))
}
