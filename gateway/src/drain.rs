//! Draining: how a stopping node lets go of its clients without a reconnect storm.
//!
//! Every WebSocket and SSE connection registers here and gets its own close signal. A drain first
//! reports not ready while still serving for `drain.delay` (load balancers stop routing new
//! clients), then closes the registered connections in batches spread evenly over `drain.window`,
//! each with a jittered reconnect hint, so the clients arrive at the other nodes gradually.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use rand::seq::SliceRandom;

use crate::hub::ConnId;
use crate::metrics::Metrics;

/// Pause between two batches of a drain.
const BATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The streaming connections of a node (WebSocket, SSE, waiting long-polls), each closable on
/// its own. A connection's id here is its id everywhere in the node (the hub's `ConnId`).
#[derive(Default)]
pub(crate) struct Streams {
    connections: Mutex<HashMap<ConnId, Arc<CloseSignal>>>,
    next: std::sync::atomic::AtomicU64,
}

/// A connection's close request: one task waits for it, so a flag and one waker do (a
/// `CancellationToken` is a tree node of ~110 bytes, and its wait future ~70 bytes more in
/// every connection's future).
#[derive(Default)]
struct CloseSignal {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl CloseSignal {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// A connection's registration; dropping it unregisters the connection.
pub(crate) struct Registration {
    streams: Arc<Streams>,
    id: ConnId,
    signal: Arc<CloseSignal>,
}

/// Resolves once the node wants the connection closed (see [`Registration::closing`]).
pub(crate) struct Closing<'a>(&'a CloseSignal);

impl Future for Closing<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.0;
        if signal.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        signal.waker.register(cx.waker());
        // A close between the check and the registration woke no one: look again.
        if signal.closed.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Registration {
    /// The connection's id within the node.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    /// Resolves when the node wants this connection closed. One task waits for it at a time
    /// (the waker of the latest poll is the one woken).
    pub(crate) fn closing(&self) -> Closing<'_> {
        Closing(&self.signal)
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
        let signal = Arc::new(CloseSignal::default());
        self.connections.lock().insert(id, signal.clone());
        Registration {
            streams: self.clone(),
            id,
            signal,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.connections.lock().len()
    }

    /// Closes every connection now.
    pub(crate) fn close_all(&self) {
        for signal in self.connections.lock().values() {
            signal.close();
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
            let signals: Vec<Arc<CloseSignal>> = {
                let connections = self.connections.lock();
                ids[closed..end]
                    .iter()
                    .filter_map(|id| connections.get(id).cloned())
                    .collect()
            };
            for signal in &signals {
                signal.close();
            }
            metrics.drain_closed.inc_by(signals.len() as u64);
            closed = end;
            let remaining = ids.len() - closed;
            metrics.drain_remaining.set(remaining as i64);
            tracing::info!(
                batch = batch + 1,
                batches,
                closed = signals.len(),
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
