//! Waiting without sleeping: a deadline around an awaited event ([`within`]) and polling of
//! outside state that offers no event ([`poll_until`], [`eventually`]). The deadlines only turn
//! a hang into a failure; nothing here measures or asserts time.

use std::future::Future;
use std::time::Duration;

/// Upper bound for one awaited event or condition: only there to fail instead of hanging, and
/// generous because CI is a busy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(what, WAIT, fut).await
}

/// Polls `cond` (external state that offers no event: a port, an HTTP endpoint, a counter in
/// another process) until it returns `Some`, with a short pause between attempts so the loop
/// does not spin; fails after `limit`.
pub async fn poll_until<T, F, Fut>(what: &str, limit: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within_for(what, limit, async {
        loop {
            if let Some(v) = cond().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// [`poll_until`] for a yes/no condition, bounded by [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(what, WAIT, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Seconds since `since`, for progress lines in a test's output (never asserted on).
pub fn elapsed(since: std::time::Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}
