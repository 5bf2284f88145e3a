//! A connection's outbound queue of publications, bounded in bytes. The fan-out path only ever
//! pushes without waiting; a connection whose queue overflows is marked and then cut off by its
//! own task, so one slow consumer never slows the others.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use backplane::Publication;
use tokio::sync::mpsc;

struct Shared {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    overflowed: AtomicBool,
}

/// The hub's handle on a connection's queue.
#[derive(Clone)]
pub struct QueueSender {
    tx: mpsc::UnboundedSender<Arc<Publication>>,
    shared: Arc<Shared>,
}

/// The connection task's end of its queue.
pub struct QueueReceiver {
    rx: mpsc::UnboundedReceiver<Arc<Publication>>,
    shared: Arc<Shared>,
}

/// Creates a queue that holds at most `max_bytes` of publication JSON.
pub fn outbound(max_bytes: usize) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        overflowed: AtomicBool::new(false),
    });
    (
        QueueSender {
            tx,
            shared: shared.clone(),
        },
        QueueReceiver { rx, shared },
    )
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was already full or is now: the connection is a slow consumer. Reported once.
    Overflowed,
    /// The queue was already marked overflowed or its connection is gone.
    Dropped,
}

impl QueueSender {
    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }

    /// Queues a publication without waiting.
    pub fn push(&self, publication: &Arc<Publication>) -> Pushed {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) {
            return Pushed::Dropped;
        }
        let len = publication.json().len();
        let before = shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > shared.max_bytes {
            shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return if shared.overflowed.swap(true, Ordering::Relaxed) {
                Pushed::Dropped
            } else {
                Pushed::Overflowed
            };
        }
        match self.tx.send(publication.clone()) {
            Ok(()) => Pushed::Queued,
            Err(_) => Pushed::Dropped,
        }
    }
}

impl QueueReceiver {
    /// Waits for the next publication. Never returns `None` while a sender (the session's own)
    /// is alive.
    pub async fn recv(&mut self) -> Option<Arc<Publication>> {
        let publication = self.rx.recv().await?;
        self.taken(&publication);
        Some(publication)
    }

    /// The next publication if one is queued now.
    pub fn try_recv(&mut self) -> Option<Arc<Publication>> {
        let publication = self.rx.try_recv().ok()?;
        self.taken(&publication);
        Some(publication)
    }

    fn taken(&self, publication: &Publication) {
        self.shared
            .queued_bytes
            .fetch_sub(publication.json().len(), Ordering::Relaxed);
    }

    /// True once a push found the queue full: the connection must be cut off.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(size: usize) -> Arc<Publication> {
        let data = format!("\"{}\"", "x".repeat(size));
        Arc::new(Publication::new("c".into(), 1, "e".into(), data.as_bytes()))
    }

    #[test]
    fn overflow_is_reported_once_and_frees_nothing_twice() {
        let p = publication(100);
        let (tx, mut rx) = outbound(p.json().len() * 2);
        assert_eq!(tx.push(&p), Pushed::Queued);
        assert_eq!(tx.push(&p), Pushed::Queued);
        assert!(!rx.overflowed());
        assert_eq!(tx.push(&p), Pushed::Overflowed);
        assert_eq!(tx.push(&p), Pushed::Dropped);
        assert!(rx.overflowed());
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn taking_frees_room() {
        let p = publication(10);
        let (tx, mut rx) = outbound(p.json().len());
        for _ in 0..5 {
            assert_eq!(tx.push(&p), Pushed::Queued);
            assert!(rx.try_recv().is_some());
        }
    }
}
