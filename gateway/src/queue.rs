//! A connection's outbound queue of publications, bounded in bytes. The fan-out path only ever
//! pushes without waiting; a connection whose queue overflows is marked and then cut off by its
//! own task, so one slow consumer never slows the others.
//!
//! One small allocation per connection (a tokio mpsc cost ~800 bytes even when empty): a deque
//! that grows only while publications wait, under a lock never held across an await.
//!
//! The queue is also the connection's control mailbox ([`Control`]): the node's control handler
//! leaves a command in it and the same notification wakes the task, so a connection needs no
//! task or channel of its own for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use backplane::Publication;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::control::Control;

/// A drained deque keeps at most this capacity, so a burst's memory does not outlive it.
const KEEP_CAPACITY: usize = 64;

struct Shared {
    queued: Mutex<VecDeque<Arc<Publication>>>,
    /// Wakes the connection task; a notification sent while it is busy is kept for it.
    ready: Notify,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    overflowed: AtomicBool,
    /// The connection task is gone: pushes are dropped.
    closed: AtomicBool,
    /// Control commands not yet taken; boxed, so an idle connection pays one pointer for it.
    control: Mutex<Option<Box<Mailbox>>>,
}

/// The control commands left for a connection, oldest first.
#[derive(Default)]
struct Mailbox(Vec<Control>);

/// What [`QueueReceiver::recv`] took: a control command comes before queued publications.
#[derive(Debug)]
pub(crate) enum Received {
    Publication(Arc<Publication>),
    Control(Control),
}

/// The hub's handle on a connection's queue.
#[derive(Clone)]
pub struct QueueSender {
    shared: Arc<Shared>,
}

/// The connection task's end of its queue.
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

/// Creates a queue that holds at most `max_bytes` of publication JSON.
pub fn outbound(max_bytes: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        queued: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        overflowed: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        control: Mutex::new(None),
    });
    (
        QueueSender {
            shared: shared.clone(),
        },
        QueueReceiver { shared },
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
        if shared.overflowed.load(Ordering::Relaxed) || shared.closed.load(Ordering::Relaxed) {
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
        shared.queued.lock().push_back(publication.clone());
        shared.ready.notify_one();
        Pushed::Queued
    }

    /// Leaves a control command for the connection task and wakes it. Never refused by the
    /// byte bound (commands are few and small); dropped once the task is gone.
    pub(crate) fn control(&self, command: Control) {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        shared
            .control
            .lock()
            .get_or_insert_with(Default::default)
            .0
            .push(command);
        shared.ready.notify_one();
    }
}

impl QueueReceiver {
    /// Waits for the next control command or publication. Cancel-safe.
    pub async fn recv(&mut self) -> Received {
        loop {
            if let Some(command) = self.try_control() {
                return Received::Control(command);
            }
            if let Some(publication) = self.try_recv() {
                return Received::Publication(publication);
            }
            self.shared.ready.notified().await;
        }
    }

    /// The oldest control command left for the connection, if any.
    pub(crate) fn try_control(&mut self) -> Option<Control> {
        let mut slot = self.shared.control.lock();
        let commands = &mut slot.as_mut()?.0;
        let command = commands.remove(0);
        if commands.is_empty() {
            *slot = None;
        }
        Some(command)
    }

    /// The next publication if one is queued now.
    pub fn try_recv(&mut self) -> Option<Arc<Publication>> {
        let publication = {
            let mut queued = self.shared.queued.lock();
            let publication = queued.pop_front()?;
            if queued.is_empty() && queued.capacity() > KEEP_CAPACITY {
                queued.shrink_to(KEEP_CAPACITY);
            }
            publication
        };
        self.shared
            .queued_bytes
            .fetch_sub(publication.json().len(), Ordering::Relaxed);
        Some(publication)
    }

    /// True once a push found the queue full: the connection must be cut off.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(size: usize) -> Arc<Publication> {
        let data = format!("\"{}\"", "x".repeat(size));
        Arc::new(Publication::new(
            "c".into(),
            1,
            "e".into(),
            0,
            data.as_bytes(),
        ))
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

    #[tokio::test]
    async fn recv_wakes_on_push_and_pushes_after_the_receiver_are_dropped() {
        let p = publication(10);
        let (tx, mut rx) = outbound(1 << 20);
        let waiter = tokio::spawn(async move {
            let got = rx.recv().await;
            (got, rx)
        });
        tokio::task::yield_now().await;
        assert_eq!(tx.push(&p), Pushed::Queued);
        let (got, rx) = waiter.await.unwrap();
        let Received::Publication(got) = got else {
            panic!("a publication was pushed")
        };
        assert!(Arc::ptr_eq(&got, &p));
        assert_eq!(tx.queued_bytes(), 0);
        drop(rx);
        assert_eq!(tx.push(&p), Pushed::Dropped);
    }

    #[tokio::test]
    async fn control_commands_come_first_and_wake_the_receiver() {
        let p = publication(10);
        let (tx, mut rx) = outbound(p.json().len());
        assert_eq!(tx.push(&p), Pushed::Queued);
        tx.control(Control::Unsubscribe("c".into()));
        tx.control(Control::Disconnect);
        assert!(matches!(
            rx.recv().await,
            Received::Control(Control::Unsubscribe(_))
        ));
        assert!(matches!(
            rx.recv().await,
            Received::Control(Control::Disconnect)
        ));
        assert!(matches!(rx.recv().await, Received::Publication(_)));
        assert_eq!(rx.try_control(), None);
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
