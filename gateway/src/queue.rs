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
//!
//! Channels of a conflating namespace (`slow_consumer = "conflate"`) are not cut off: when the
//! queue passes its limit — or earlier, when the connection's socket stops taking data while a
//! backlog waits — each such channel keeps only its newest waiting publication, in the
//! place of its oldest waiting one (so it is sent as soon as the first would have been), counting
//! the ones it replaced ([`Publication::skipped`]); until the queue is empty again, a newer
//! publication of such a channel replaces its waiting one in place. A publication only ever
//! replaces publications of its own channel and epoch with nothing of that channel in between
//! (a presence event stays between the publications around it), so no channel is reordered.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use backplane::Publication;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::control::Control;
use crate::express::{Express, Offer};

/// A drained deque keeps at most this capacity, so a burst's memory does not outlive it.
const KEEP_CAPACITY: usize = 64;

struct Shared {
    queued: Mutex<Waiting>,
    /// Set by a push or a control command since the connection task last looked; the task is
    /// woken only by the one that sets it, so a burst of pushes costs one wake-up.
    woken: AtomicBool,
    /// The connection task, woken when `woken` is set.
    task: AtomicWaker,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    overflowed: AtomicBool,
    /// The connection task is gone: pushes are dropped.
    closed: AtomicBool,
    /// Control commands not yet taken; boxed, so an idle connection pays one pointer for it.
    control: Mutex<Option<Box<Mailbox>>>,
    /// Whether `control` holds a command: read on every wake-up instead of taking its lock.
    has_control: AtomicBool,
    /// The queue passed its limit (or its socket stalled) and has not been empty since:
    /// conflating channels replace their waiting publication instead of queueing another.
    /// Written only under the `queued` lock, so it agrees with the entries; an atomic so the
    /// connection task can ask on every wake-up without taking the lock.
    conflating: AtomicBool,
    /// Whether `queued` holds an [`Express`] (the fan-out writes to the socket): read on every
    /// push, and on every wake-up of the task, instead of taking the lock.
    express: AtomicBool,
}

/// The control commands left for a connection, oldest first.
#[derive(Default)]
struct Mailbox(Vec<Control>);

/// What [`QueueReceiver::recv`] took: a control command comes before queued publications.
#[derive(Debug)]
pub(crate) enum Received {
    Publication(Arc<Publication>),
    Control(Control),
    /// The fan-out gave the socket back ([`crate::express`]) with nothing queued: a write it
    /// could not finish waits for the task.
    HandedBack,
}

/// What waits to be sent.
#[derive(Default)]
struct Waiting {
    entries: VecDeque<Entry>,
    /// The connection's socket, while the fan-out writes to it. Only live with no entry waiting,
    /// so an express frame never overtakes a queued publication.
    express: Option<Box<Express>>,
}

/// A waiting publication.
struct Entry {
    publication: Arc<Publication>,
    /// Publications of the channel right before this one that conflation removed.
    skipped: u64,
    /// Whether the channel conflates.
    conflate: bool,
}

/// Folds each conflating channel's waiting publications into the place of its oldest one (per
/// epoch, and never across another entry of the channel), which then holds the newest and counts
/// the rest. Returns the bytes freed and the publications dropped.
fn compact(entries: &mut VecDeque<Entry>) -> (usize, u64) {
    let mut kept: VecDeque<Entry> = VecDeque::with_capacity(entries.len());
    // The place in `kept` that publications of a channel fold into.
    let mut slot: FxHashMap<Arc<str>, usize> = FxHashMap::default();
    let (mut freed, mut dropped) = (0, 0);
    for entry in entries.drain(..) {
        let channel = entry.publication.channel.clone();
        if !entry.conflate {
            slot.remove(&channel);
            kept.push_back(entry);
            continue;
        }
        if let Some(older) = slot.get(&channel).map(|&i| &mut kept[i]) {
            if older.publication.epoch == entry.publication.epoch {
                freed += older.publication.json().len();
                dropped += 1;
                older.skipped += 1 + entry.skipped;
                older.publication = entry.publication;
                continue;
            }
        }
        slot.insert(channel, kept.len());
        kept.push_back(entry);
    }
    *entries = kept;
    (freed, dropped)
}

/// Replaces the waiting publication of `entry`'s channel, if the channel's last waiting entry is
/// a publication of the same epoch; returns the bytes that replaced publication held.
fn replace_in_place(entries: &mut VecDeque<Entry>, entry: &Entry) -> Option<usize> {
    let p = &entry.publication;
    let waiting = entries
        .iter_mut()
        .rev()
        .find(|e| e.publication.channel == p.channel)?;
    if !waiting.conflate || waiting.publication.epoch != p.epoch {
        return None;
    }
    let freed = waiting.publication.json().len();
    waiting.skipped += 1;
    waiting.publication = p.clone();
    Some(freed)
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
        queued: Mutex::new(Waiting::default()),
        woken: AtomicBool::new(false),
        task: AtomicWaker::new(),
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        overflowed: AtomicBool::new(false),
        conflating: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        control: Mutex::new(None),
        has_control: AtomicBool::new(false),
        express: AtomicBool::new(false),
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
    /// Appended to the connection's express buffer ([`crate::express`]); `first` when the
    /// connection now has something to write.
    Express {
        first: bool,
    },
    /// The publication replaced waiting ones of its channel (the queue passed its limit);
    /// `dropped` publications will not be sent.
    Conflated {
        dropped: u64,
    },
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

    /// Queues a publication without waiting; with `conflate`, its channel conflates when the
    /// queue is full instead of overflowing.
    pub fn push(&self, publication: &Arc<Publication>, conflate: bool) -> Pushed {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) || shared.closed.load(Ordering::Relaxed) {
            return Pushed::Dropped;
        }
        let entry = Entry {
            publication: publication.clone(),
            skipped: 0,
            conflate: conflate && publication.is_publication(),
        };
        let len = publication.json().len();
        if shared.express.load(Ordering::Acquire) {
            let mut waiting = shared.queued.lock();
            if let Some(express) = waiting.express.as_mut().filter(|e| e.is_live()) {
                match express.offer(publication, shared.max_bytes) {
                    Offer::Taken { first } => return Pushed::Express { first },
                    Offer::Stale => return Pushed::Dropped,
                    // Queued under the same lock hold (the queue is empty while express is
                    // live), so the task, taking the socket back, finds it after what was
                    // appended.
                    Offer::Refused if len <= shared.max_bytes => {
                        express.refuse();
                        shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
                        waiting.entries.push_back(entry);
                        drop(waiting);
                        shared.wake();
                        return Pushed::Queued;
                    }
                    Offer::Refused => express.refuse(),
                }
            }
        }
        if entry.conflate {
            let mut waiting = shared.queued.lock();
            if shared.conflating.load(Ordering::Relaxed) {
                if let Some(freed) = replace_in_place(&mut waiting.entries, &entry) {
                    shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
                    shared.queued_bytes.fetch_sub(freed, Ordering::Relaxed);
                    return Pushed::Conflated { dropped: 1 };
                }
            }
        }
        let before = shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > shared.max_bytes {
            if entry.conflate {
                let mut waiting = shared.queued.lock();
                waiting.entries.push_back(entry);
                shared.conflating.store(true, Ordering::Relaxed);
                let (freed, dropped) = compact(&mut waiting.entries);
                let now = shared.queued_bytes.fetch_sub(freed, Ordering::Relaxed) - freed;
                if now <= shared.max_bytes {
                    drop(waiting);
                    shared.wake();
                    return Pushed::Conflated { dropped };
                }
                // Too full even so: cut off like any other, as the queue stands (its bytes are
                // counted; nothing more is taken from it).
            } else {
                shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            return if shared.overflowed.swap(true, Ordering::Relaxed) {
                Pushed::Dropped
            } else {
                Pushed::Overflowed
            };
        }
        shared.queued.lock().entries.push_back(entry);
        shared.wake();
        Pushed::Queued
    }

    /// Leaves a control command for the connection task and wakes it. Never refused by the
    /// byte bound (commands are few and small); dropped once the task is gone.
    pub(crate) fn control(&self, command: Control) {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        let mut slot = shared.control.lock();
        slot.get_or_insert_with(Default::default).0.push(command);
        shared.has_control.store(true, Ordering::Relaxed);
        drop(slot);
        shared.wake();
    }
}

/// Writes what the express path appended to each connection, without waiting, the batch sent by
/// `send_all`: one system call for all of it ([`crate::send_batch::send_all`], where io_uring is
/// allowed), or, where it returns false, one per socket. A socket that did not take it all is
/// handed back to its connection's task. Each connection's lock is held until its bytes are
/// written, so nothing is appended behind bytes still being sent.
pub(crate) fn flush_express(
    batch: &[QueueSender],
    now_us: u64,
    send_all: impl FnOnce(&[(RawFd, &[u8])], &mut Vec<i32>) -> bool,
) {
    // Locked in one order (and each once: a connection handed back and over again can be in a
    // round twice), so two batches written at once never wait for each other in a circle.
    let mut batch: Vec<&Shared> = batch.iter().map(|q| &*q.shared).collect();
    batch.sort_unstable_by_key(|shared| *shared as *const Shared);
    batch.dedup_by_key(|shared| *shared as *const Shared);
    let mut held: Vec<_> = batch.iter().map(|shared| shared.queued.lock()).collect();
    // The connections with bytes to write (by their place in `held`), and their sends.
    let (mut at, mut sends) = (
        Vec::with_capacity(held.len()),
        Vec::with_capacity(held.len()),
    );
    for (i, waiting) in held.iter().enumerate() {
        if let Some(send) = waiting.express.as_ref().and_then(|e| e.pending()) {
            at.push(i);
            sends.push(send);
        }
    }
    let mut results = Vec::new();
    let batched = send_all(&sends, &mut results);
    drop(sends);
    let mut refused = Vec::new();
    for (n, i) in at.into_iter().enumerate() {
        let express = held[i].express.as_mut().expect("pending above");
        let written = if batched {
            express.sent(results[n], now_us)
        } else {
            express.flush(now_us)
        };
        if !written {
            express.refuse();
            refused.push(i);
        }
    }
    drop(held);
    for i in refused {
        batch[i].wake();
    }
}

impl Shared {
    /// Tells the connection task something is waiting; only the push that finds it not yet
    /// told wakes it.
    fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.task.wake();
        }
    }
}

impl QueueReceiver {
    /// Waits for the next control command or publication. Cancel-safe.
    pub async fn recv(&mut self) -> Received {
        loop {
            // Cleared before looking: whatever is pushed after this sets it again.
            self.shared.woken.swap(false, Ordering::AcqRel);
            if let Some(command) = self.try_control() {
                return Received::Control(command);
            }
            if let Some(publication) = self.try_recv() {
                return Received::Publication(publication);
            }
            if self.handed_back() {
                return Received::HandedBack;
            }
            std::future::poll_fn(|cx| {
                self.shared.task.register(cx.waker());
                match self.shared.woken.load(Ordering::Acquire) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                }
            })
            .await;
        }
    }

    /// The oldest control command left for the connection, if any.
    pub(crate) fn try_control(&mut self) -> Option<Control> {
        if !self.shared.has_control.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = self.shared.control.lock();
        let commands = &mut slot.as_mut()?.0;
        let command = commands.remove(0);
        if commands.is_empty() {
            *slot = None;
            self.shared.has_control.store(false, Ordering::Relaxed);
        }
        Some(command)
    }

    /// The next publication if one is queued now; one that replaced others by conflation
    /// says how many ([`Publication::skipped`]).
    pub fn try_recv(&mut self) -> Option<Arc<Publication>> {
        // Bytes are counted before an entry is queued and uncounted after it is taken (and no
        // publication is empty), so none counted means none waiting: no lock to find nothing.
        if self.shared.queued_bytes.load(Ordering::Acquire) == 0 {
            return None;
        }
        let entry = {
            let mut waiting = self.shared.queued.lock();
            let entry = waiting.entries.pop_front()?;
            if waiting.entries.is_empty() {
                // Caught up: queue normally again.
                self.shared.conflating.store(false, Ordering::Relaxed);
                if waiting.entries.capacity() > KEEP_CAPACITY {
                    waiting.entries.shrink_to(KEEP_CAPACITY);
                }
            }
            entry
        };
        self.shared
            .queued_bytes
            .fetch_sub(entry.publication.json().len(), Ordering::Relaxed);
        Some(match entry.skipped {
            0 => entry.publication,
            skipped => Arc::new(entry.publication.after_skipping(skipped)),
        })
    }

    /// Whether the queue passed its limit and conflates until it has been emptied: the
    /// connection then takes one publication at a time, each when the socket accepts more, so
    /// what it writes is the newest of its channel at that moment rather than a batch that
    /// ages in the socket's buffers.
    pub fn conflating(&self) -> bool {
        self.shared.conflating.load(Ordering::Relaxed)
    }

    /// The connection's socket stopped taking data (its peer reads slower than the channels
    /// publish): with a backlog of conflating channels waiting, they conflate from now until the
    /// queue has been emptied, as when it passes its limit, rather than let the backlog age until it
    /// reaches the limit. Returns how many waiting publications that dropped.
    pub fn conflate_backlog(&mut self) -> u64 {
        let mut waiting = self.shared.queued.lock();
        // A backlog of channels that never conflate stays as it is, batched as usual.
        if !waiting.entries.iter().any(|e| e.conflate) {
            return 0;
        }
        self.shared.conflating.store(true, Ordering::Relaxed);
        let (freed, dropped) = compact(&mut waiting.entries);
        self.shared.queued_bytes.fetch_sub(freed, Ordering::Relaxed);
        dropped
    }

    /// True once a push found the queue full: the connection must be cut off.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }
}

impl QueueReceiver {
    /// Hands the connection's socket to the fan-out ([`crate::express`]), unless something
    /// waits in the queue or the connection is cut off.
    pub(crate) fn hand_over(&mut self, express: Box<Express>) -> bool {
        let shared = &*self.shared;
        let mut waiting = shared.queued.lock();
        if !waiting.entries.is_empty()
            || shared.overflowed.load(Ordering::Relaxed)
            || shared.closed.load(Ordering::Relaxed)
        {
            return false;
        }
        waiting.express = Some(express);
        shared.express.store(true, Ordering::Release);
        true
    }

    /// Whether the fan-out holds the socket but gave up on it.
    fn handed_back(&self) -> bool {
        self.shared.express.load(Ordering::Acquire)
            && self
                .shared
                .queued
                .lock()
                .express
                .as_ref()
                .is_some_and(|e| !e.is_live())
    }

    /// Takes the socket back from the fan-out, with what it appended and did not write.
    pub(crate) fn take_back(&mut self) -> Option<Box<Express>> {
        let shared = &*self.shared;
        if !shared.express.load(Ordering::Acquire) {
            return None;
        }
        let express = shared.queued.lock().express.take();
        shared.express.store(false, Ordering::Release);
        express
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        // The socket goes with the connection, not with the fan-out's last handle.
        self.take_back();
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
        assert_eq!(tx.push(&p, false), Pushed::Queued);
        assert_eq!(tx.push(&p, false), Pushed::Queued);
        assert!(!rx.overflowed());
        assert_eq!(tx.push(&p, false), Pushed::Overflowed);
        assert_eq!(tx.push(&p, false), Pushed::Dropped);
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
        assert_eq!(tx.push(&p, false), Pushed::Queued);
        let (got, rx) = waiter.await.unwrap();
        let Received::Publication(got) = got else {
            panic!("a publication was pushed")
        };
        assert!(Arc::ptr_eq(&got, &p));
        assert_eq!(tx.queued_bytes(), 0);
        drop(rx);
        assert_eq!(tx.push(&p, false), Pushed::Dropped);
    }

    fn quote(channel: &str, epoch: &str, offset: u64) -> Arc<Publication> {
        let data = format!("{{\"price\":{offset},\"pad\":\"{}\"}}", "x".repeat(50));
        Arc::new(Publication::new(
            channel.into(),
            offset,
            epoch.into(),
            0,
            data.as_bytes(),
        ))
    }

    fn drain(rx: &mut QueueReceiver) -> Vec<(String, u64, u64)> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|p| (p.channel.to_string(), p.offset, p.skipped))
            .collect()
    }

    #[test]
    fn conflation_keeps_the_newest_of_each_channel_in_its_first_place_and_counts_the_rest() {
        let size = quote("a", "e", 1).json().len();
        let (tx, mut rx) = outbound(size * 4);
        assert_eq!(tx.push(&quote("a", "e", 1), true), Pushed::Queued);
        assert_eq!(tx.push(&quote("b", "e", 1), true), Pushed::Queued);
        assert_eq!(tx.push(&quote("a", "e", 2), true), Pushed::Queued);
        assert_eq!(tx.push(&quote("b", "e", 2), true), Pushed::Queued);
        assert_eq!(
            tx.push(&quote("a", "e", 3), true),
            Pushed::Conflated { dropped: 3 }
        );
        assert_eq!(tx.queued_bytes(), size * 2);
        // Until the queue is empty again, a newer publication replaces the waiting one.
        assert_eq!(
            tx.push(&quote("a", "e", 4), true),
            Pushed::Conflated { dropped: 1 }
        );
        assert_eq!(
            tx.push(&quote("b", "e", 3), true),
            Pushed::Conflated { dropped: 1 }
        );
        assert_eq!(tx.push(&quote("c", "e", 1), true), Pushed::Queued);
        assert!(!rx.overflowed());
        assert_eq!(
            drain(&mut rx),
            vec![("a".into(), 4, 3), ("b".into(), 3, 2), ("c".into(), 1, 0)],
            "the newest of each, in the place of its first"
        );
        assert_eq!(tx.queued_bytes(), 0);
        // Caught up: queued normally again.
        assert_eq!(tx.push(&quote("a", "e", 5), true), Pushed::Queued);
        assert_eq!(tx.push(&quote("a", "e", 6), true), Pushed::Queued);
        assert_eq!(drain(&mut rx), vec![("a".into(), 5, 0), ("a".into(), 6, 0)]);
    }

    #[test]
    fn a_stalled_socket_conflates_the_backlog_before_the_limit_until_the_queue_is_empty() {
        let size = quote("a", "e", 1).json().len();
        let (tx, mut rx) = outbound(size * 100);
        assert_eq!(
            rx.conflate_backlog(),
            0,
            "nothing waits: nothing to conflate"
        );
        assert_eq!(tx.push(&quote("x", "e", 0), false), Pushed::Queued);
        assert_eq!(rx.conflate_backlog(), 0);
        assert!(!rx.conflating(), "a lossless backlog is left as it is");
        assert_eq!(drain(&mut rx), [("x".into(), 0, 0)]);
        assert_eq!(tx.push(&quote("a", "e", 1), true), Pushed::Queued);
        assert_eq!(
            tx.push(&quote("a", "e", 2), true),
            Pushed::Queued,
            "far under the limit"
        );
        assert_eq!(tx.push(&quote("x", "e", 1), false), Pushed::Queued);
        assert_eq!(tx.push(&quote("x", "e", 2), false), Pushed::Queued);
        assert_eq!(tx.push(&quote("b", "e", 1), true), Pushed::Queued);
        assert!(!rx.conflating());
        assert_eq!(rx.conflate_backlog(), 1, "a's two fold into one");
        assert!(rx.conflating());
        assert_eq!(tx.queued_bytes(), size * 4);
        assert_eq!(
            tx.push(&quote("b", "e", 2), true),
            Pushed::Conflated { dropped: 1 }
        );
        assert_eq!(
            drain(&mut rx),
            [
                ("a".into(), 2, 1),
                ("x".into(), 1, 0),
                ("x".into(), 2, 0),
                ("b".into(), 2, 1)
            ],
            "the channel that does not conflate keeps every publication"
        );
        assert!(!rx.conflating(), "emptied: queues normally again");
        assert_eq!(tx.push(&quote("a", "e", 3), true), Pushed::Queued);
        assert_eq!(tx.push(&quote("a", "e", 4), true), Pushed::Queued);
        assert_eq!(tx.queued_bytes(), size * 2);
    }

    #[test]
    fn conflation_keeps_epochs_and_presence_events_in_place_and_others_still_overflow() {
        let size = quote("a", "e", 1).json().len();
        let (tx, mut rx) = outbound(size * 3);
        tx.push(&quote("a", "e", 7), true);
        tx.push(&quote("a", "f", 1), true);
        tx.push(&quote("a", "f", 2), true);
        assert_eq!(
            tx.push(&quote("a", "f", 3), true),
            Pushed::Conflated { dropped: 2 }
        );
        assert_eq!(drain(&mut rx), vec![("a".into(), 7, 0), ("a".into(), 3, 2)]);

        let join = Arc::new(Publication::presence_event(
            backplane::Kind::Join,
            "a".into(),
            "e".into(),
            1,
            b"{}",
        ));
        let (tx, mut rx) = outbound(size * 3);
        tx.push(&quote("a", "e", 1), true);
        tx.push(&join, true);
        tx.push(&quote("a", "e", 2), true);
        tx.push(&quote("a", "e", 3), true);
        let order: Vec<(u64, bool)> = std::iter::from_fn(|| rx.try_recv())
            .map(|p| (p.offset, p.is_publication()))
            .collect();
        assert_eq!(
            order,
            vec![(1, true), (1, false), (3, true)],
            "a join after 1 stays between 1 and what follows it"
        );

        let (tx, rx) = outbound(size * 2);
        tx.push(&quote("b", "e", 1), false);
        tx.push(&quote("b", "e", 2), false);
        assert_eq!(tx.push(&quote("a", "e", 1), true), Pushed::Overflowed);
        assert!(
            rx.overflowed(),
            "what does not conflate is not dropped: cut off"
        );
    }

    #[tokio::test]
    async fn control_commands_come_first_and_wake_the_receiver() {
        let p = publication(10);
        let (tx, mut rx) = outbound(p.json().len());
        assert_eq!(tx.push(&p, false), Pushed::Queued);
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
            assert_eq!(tx.push(&p, false), Pushed::Queued);
            assert!(rx.try_recv().is_some());
        }
    }
}
