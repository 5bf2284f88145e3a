//! The peer's frames polled only when the socket said there may be some.
//!
//! A connection task wakes for many reasons (a publication queued, a timer), and its `select!`
//! polls every branch each time. Polling the frame stream when the peer sent nothing walks the
//! whole read stack down to tokio's readiness check, on every delivery. The gate hands the stream
//! a waker of its own: until that waker fires, a poll of the gate only records the task's waker
//! and returns `Pending`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::Stream;
use futures_util::task::AtomicWaker;

/// `inner` behind the gate; see the module documentation.
pub(crate) struct ReadGate<S> {
    inner: S,
    signal: Arc<Signal>,
}

/// The gate's waker: remembers that the stream asked to be polled again, and wakes the task.
struct Signal {
    /// The stream woke (or has not been polled yet, or last returned an item).
    open: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<S> ReadGate<S> {
    pub(crate) fn new(inner: S) -> Self {
        ReadGate {
            inner,
            signal: Arc::new(Signal {
                open: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<S: Stream + Unpin> Stream for ReadGate<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        // Registered before the flag is read: a wake-up between the two is not lost.
        this.signal.task.register(cx.waker());
        if !this.signal.open.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.signal.clone());
        let polled = Pin::new(&mut this.inner).poll_next(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            // The stream may hold more already read: the next poll must reach it.
            this.signal.open.store(true, Ordering::Relaxed);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; yields an item each time `ready` was set, then waits again.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<parking_lot::Mutex<Option<Waker>>>,
    }

    impl Stream for Probe {
        type Item = ();
        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.swap(false, Ordering::Relaxed) {
                return Poll::Ready(Some(()));
            }
            *self.waker.lock() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_stream_is_polled_again_only_after_it_woke_or_yielded() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(parking_lot::Mutex::new(None));
        let mut gate = ReadGate::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        });
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);

        assert!(gate.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "the first poll reaches it"
        );
        for _ in 0..3 {
            assert!(gate.poll_next_unpin(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "not woken: not polled");

        ready.store(true, Ordering::Relaxed);
        waker.lock().take().expect("registered").wake();
        assert_eq!(gate.poll_next_unpin(&mut cx), Poll::Ready(Some(())));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        assert!(
            gate.poll_next_unpin(&mut cx).is_pending(),
            "after an item the stream is asked again"
        );
        assert_eq!(polls.load(Ordering::Relaxed), 3);
        assert!(gate.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_wake_reaches_the_task_waiting_on_the_gate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut gate = ReadGate::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let reader = tokio::spawn(async move { gate.next().await });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        assert_eq!(reader.await.unwrap(), Some(7));
    }
}
