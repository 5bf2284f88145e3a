//! A streaming response body fed by a task, bounded in chunks. One small allocation per stream
//! (a tokio mpsc cost ~1.5 KB even when empty): chunks wait in a deque that grows only while they
//! wait, under a lock never held across an await.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::Frame;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// A drained deque keeps at most this capacity, so a burst's memory does not outlive it.
const KEEP_CAPACITY: usize = 8;

struct Shared {
    state: Mutex<State>,
    /// Wakes the sender when room is made or the body is gone; kept if it is not waiting.
    sender_wake: Notify,
    limit: usize,
}

struct State {
    chunks: VecDeque<Bytes>,
    body_waker: Option<Waker>,
    sender_gone: bool,
    body_gone: bool,
    /// A send had to wait for room since [`BodySender::take_waited`] last asked.
    sender_waited: bool,
}

/// The task's end: sends chunks, waiting while `limit` of them are unread.
pub struct BodySender {
    shared: Arc<Shared>,
}

/// The response body; it ends when the sender is dropped and every chunk is read.
pub struct ChannelBody {
    shared: Arc<Shared>,
}

/// The body was dropped: the client is gone.
#[derive(Debug)]
pub struct BodyGone;

/// A body and its sender; the sender waits while `limit` chunks are unread.
pub fn body_channel(limit: usize) -> (BodySender, ChannelBody) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            chunks: VecDeque::new(),
            body_waker: None,
            sender_gone: false,
            body_gone: false,
            sender_waited: false,
        }),
        sender_wake: Notify::new(),
        limit,
    });
    (
        BodySender {
            shared: shared.clone(),
        },
        ChannelBody { shared },
    )
}

impl BodySender {
    /// Queues a chunk, waiting for room. If cancelled while waiting, the chunk is dropped.
    pub async fn send(&self, mut chunk: Bytes) -> Result<(), BodyGone> {
        loop {
            match self.try_send(chunk)? {
                None => return Ok(()),
                // A notification sent before this wait starts is kept for it.
                Some(back) => chunk = back,
            }
            self.shared.sender_wake.notified().await;
        }
    }

    /// Queues a chunk if there is room now; gives it back when there is none (the send had to
    /// wait, as [`BodySender::take_waited`] then reports).
    pub fn try_send(&self, chunk: Bytes) -> Result<Option<Bytes>, BodyGone> {
        let mut state = self.shared.state.lock();
        if state.body_gone {
            return Err(BodyGone);
        }
        if state.chunks.len() >= self.shared.limit {
            state.sender_waited = true;
            return Ok(Some(chunk));
        }
        state.chunks.push_back(chunk);
        let waker = state.body_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(None)
    }

    /// Whether a send had to wait for room (the client reads slower than the stream writes)
    /// since the last call.
    pub fn take_waited(&self) -> bool {
        std::mem::take(&mut self.shared.state.lock().sender_waited)
    }

    /// Resolves when the body is dropped (the client went away).
    pub async fn closed(&self) {
        loop {
            if self.shared.state.lock().body_gone {
                return;
            }
            self.shared.sender_wake.notified().await;
        }
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.state.lock();
            state.sender_gone = true;
            state.body_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for ChannelBody {
    fn drop(&mut self) {
        self.shared.state.lock().body_gone = true;
        self.shared.sender_wake.notify_one();
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut state = self.shared.state.lock();
        let was_full = state.chunks.len() >= self.shared.limit;
        match state.chunks.pop_front() {
            Some(chunk) => {
                if state.chunks.is_empty() && state.chunks.capacity() > KEEP_CAPACITY {
                    state.chunks.shrink_to(KEEP_CAPACITY);
                }
                drop(state);
                if was_full {
                    self.shared.sender_wake.notify_one();
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None if state.sender_gone => Poll::Ready(None),
            None => {
                if !state
                    .body_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    state.body_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn bounded_in_order_and_ends_when_the_sender_goes() {
        let (tx, mut body) = body_channel(2);
        let writer = tokio::spawn(async move {
            for i in 0..2u8 {
                tx.send(Bytes::from(vec![i])).await.unwrap();
            }
            assert!(!tx.take_waited(), "two chunks fit");
            for i in 2..5u8 {
                tx.send(Bytes::from(vec![i])).await.unwrap();
            }
            assert!(tx.take_waited(), "the third waited for the body to read");
            assert!(!tx.take_waited(), "asking clears it");
        });
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(got, [0, 1, 2, 3, 4]);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_sender_learns_when_the_body_is_dropped() {
        let (tx, body) = body_channel(1);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let waiting = tokio::spawn(async move {
            let blocked = tx.send(Bytes::from_static(b"b")).await;
            tx.closed().await;
            blocked
        });
        tokio::task::yield_now().await;
        drop(body);
        assert!(waiting.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn try_send_gives_a_chunk_back_when_full_and_fails_once_the_body_is_gone() {
        let (tx, mut body) = body_channel(1);
        assert!(tx.try_send(Bytes::from_static(b"a")).unwrap().is_none());
        assert!(!tx.take_waited());
        let back = tx.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(back.as_deref(), Some(&b"b"[..]), "full: given back");
        assert!(tx.take_waited(), "a full channel counts as a wait");
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, &b"a"[..]);
        assert!(tx.try_send(Bytes::from_static(b"b")).unwrap().is_none());
        drop(body);
        assert!(tx.try_send(Bytes::from_static(b"c")).is_err());
    }
}
