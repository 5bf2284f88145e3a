//! Where an SSE stream's bytes go. Over HTTP/2 and TLS the stream writes into a response body
//! that hyper sends ([`ChannelSink`]); on the gateway's own HTTP/1.x path it writes straight to
//! the socket from the connection's task (`http::sse_socket`). One stream loop serves both.

use std::time::Duration;

use bytes::Bytes;

use crate::transport::body_channel::BodySender;
use crate::transport::bounded::bounded;

/// An event stream's output. `Err(())` from any method: the client is gone or too slow, and
/// the stream ends.
pub(crate) trait EventSink {
    /// Queues a copy of `bytes` after what is queued.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()>;

    /// Queues shared `bytes` (an event's data), copied only if the sink must.
    async fn send_shared(&mut self, bytes: Bytes) -> Result<(), ()>;

    /// Writes out what is queued: all of it when `all` (a burst is over), or only if much has
    /// gathered (an event is whole, more may follow).
    async fn flush(&mut self, all: bool) -> Result<(), ()>;

    /// Resolves when the response must end without another byte: the client went away.
    async fn closed(&mut self);

    /// Whether a write had to wait for the client since the last call.
    fn take_waited(&mut self) -> bool;

    /// Gives back what bursts left allocated: the stream is idle (its start is written, or a
    /// heartbeat). Kept between bursts otherwise, so a busy stream does not allocate per event.
    fn release(&mut self) {}
}

/// A response body fed through a [`body_channel`](crate::transport::body_channel); a client
/// that takes longer than `timeout` to make room is dropped.
pub(crate) struct ChannelSink {
    pub(crate) tx: BodySender,
    pub(crate) timeout: Duration,
}

impl EventSink for ChannelSink {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.send_shared(Bytes::copy_from_slice(bytes)).await
    }

    async fn send_shared(&mut self, bytes: Bytes) -> Result<(), ()> {
        let bytes = match self.tx.try_send(bytes) {
            Ok(None) => return Ok(()),
            Ok(Some(full)) => full,
            Err(_) => return Err(()),
        };
        // The client is behind: wait for room on the heap. Held inline, the wait and its timer
        // (~450 B) were part of every stream's future, idle or not.
        match Box::pin(bounded(self.timeout, self.tx.send(bytes))).await {
            Some(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Each chunk is hyper's to write as soon as it is queued.
    async fn flush(&mut self, _all: bool) -> Result<(), ()> {
        Ok(())
    }

    async fn closed(&mut self) {
        self.tx.closed().await
    }

    fn take_waited(&mut self) -> bool {
        self.tx.take_waited()
    }
}
