//! A write bounded by a timeout whose timer exists only when the write has to wait.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// Runs `work`, arming a `limit` timer only if it cannot finish at once; `None` when the limit
/// passed first. Almost every write fits in the socket's buffer (or a body channel's room), and
/// a timer per write cost more than the write itself; held inline, the timer (~110 bytes) would
/// also enlarge every connection's future, idle or not, for a path taken only when the peer is
/// slow — so it is boxed.
pub(crate) async fn bounded<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    let mut work = pin!(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(result) => Some(result),
        Poll::Pending => {
            let mut expired = Box::pin(tokio::time::sleep(limit));
            tokio::select! {
                result = work => Some(result),
                _ = &mut expired => None,
            }
        }
    }
}
