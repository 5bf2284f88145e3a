//! Where an SSE stream's bytes go. Over HTTP/2 and TLS the stream is the response body hyper
//! sends, and each poll's events are gathered into one frame ([`BufferSink`]); on the gateway's
//! own HTTP/1.x path it writes straight to the socket from the connection's task
//! (`http::sse_socket`). One stream loop serves both.

use bytes::{Bytes, BytesMut};

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

/// The events of one poll of a [`SseBody`](crate::transport::sse::SseBody), gathered for hyper
/// as one frame. It never waits: hyper polls the body only when the client has room, so its
/// HTTP/2 flow control (or the socket, on HTTP/1.x over TLS) is the stream's back-pressure.
#[derive(Default)]
pub(crate) struct BufferSink {
    /// What is gathered. A taken frame shares its allocation until hyper has written it; after
    /// that the whole buffer is reused, so a busy stream allocates only while frames wait.
    buf: BytesMut,
}

impl BufferSink {
    /// The bytes gathered since the last call, as one frame; `None` if there are none.
    pub(crate) fn take(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

impl EventSink for BufferSink {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    async fn send_shared(&mut self, bytes: Bytes) -> Result<(), ()> {
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    async fn flush(&mut self, _all: bool) -> Result<(), ()> {
        Ok(())
    }

    /// A client that leaves drops the body, and this with it.
    async fn closed(&mut self) {
        std::future::pending().await
    }

    fn take_waited(&mut self) -> bool {
        false
    }

    fn release(&mut self) {
        self.buf = BytesMut::new();
    }
}
