//! A write buffer that holds memory only while there is something to send: a batch of frames is
//! gathered into one write, and an idle connection keeps no buffer at all (a fixed 8 KiB
//! `BufWriter` per connection dominated idle memory).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Writes of this size or more skip the buffer; the buffer is written out before it grows past it.
const LIMIT: usize = 8 * 1024;

/// Gathers writes until flushed. The buffer grows with the batch and is freed by a flush that
/// finds nothing to write, which the connection issues when it has been idle for a while, so
/// a busy connection does not allocate per batch and an idle one holds nothing.
pub struct BatchWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` is already written to `inner`.
    written: usize,
    /// A write had to wait for the socket since [`BatchWriter::take_waited`] last asked.
    waited: bool,
}

impl<W: AsyncWrite + Unpin> BatchWriter<W> {
    pub fn new(inner: W) -> Self {
        BatchWriter {
            inner,
            buf: Vec::new(),
            written: 0,
            waited: false,
        }
    }

    /// The stream written to.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Whether everything written so far is out (nothing gathered or half written).
    pub fn is_flushed(&self) -> bool {
        self.buf.is_empty()
    }

    /// Puts `bytes` before anything gathered since, to be written with the next flush, whatever
    /// their size (express delivery's unsent frames, bounded by the connection's queue).
    pub fn adopt(&mut self, bytes: Vec<u8>) {
        if self.buf.is_empty() {
            self.buf = bytes;
        } else {
            self.buf.splice(self.written..self.written, bytes);
        }
    }

    /// Whether a write had to wait for the socket (the peer is not reading as fast as the node
    /// writes) since the last call.
    pub fn take_waited(&mut self) -> bool {
        std::mem::take(&mut self.waited)
    }

    /// Appends `head` and `payload` to the batch if they fit under the buffer's limit, without
    /// writing anything; `false` (nothing appended) when the batch must be written out first or
    /// the payload is large enough to skip the buffer. Keeps the common write of a batch free of
    /// await points, so the connection's future stays small.
    pub fn buffer(&mut self, head: &[u8], payload: &[u8]) -> bool {
        if self.buf.len() + head.len() + payload.len() > LIMIT {
            return false;
        }
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(payload);
        true
    }

    /// Writes out everything buffered.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let written = Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]);
            if written.is_pending() {
                self.waited = true;
            }
            let n = ready!(written)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for BatchWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > LIMIT {
            ready!(this.poll_write_out(cx))?;
        }
        if data.len() >= LIMIT {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = data.iter().map(|d| d.len()).sum();
        if this.buf.len() + total > LIMIT {
            ready!(this.poll_write_out(cx))?;
        }
        if total >= LIMIT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, data);
        }
        this.buf.reserve(total);
        for d in data {
            this.buf.extend_from_slice(d);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            this.buf = Vec::new();
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn gathers_until_flushed_and_frees_the_buffer_when_idle() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut writer = BatchWriter::new(client);
        writer.write_all(b"hello ").await.unwrap();
        let n = writer
            .write_vectored(&[IoSlice::new(b"wor"), IoSlice::new(b"ld")])
            .await
            .unwrap();
        assert_eq!(n, 5, "a batch takes vectored writes whole");
        assert_eq!(writer.buf, b"hello world");
        writer.flush().await.unwrap();
        assert!(writer.buf.is_empty() && writer.buf.capacity() > 0);
        writer.flush().await.unwrap();
        assert_eq!(writer.buf.capacity(), 0, "an idle flush frees the buffer");

        let big = vec![7u8; LIMIT + 1];
        writer.write_all(b"x").await.unwrap();
        writer.write_all(&big).await.unwrap();
        writer.flush().await.unwrap();
        let mut got = vec![0u8; 11 + 1 + big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..12], b"hello worldx");
        assert_eq!(&got[12..], &big[..]);

        assert!(writer.buffer(b"ab", b"cd"), "a small frame is buffered");
        assert!(
            !writer.buffer(b"", &vec![0; LIMIT]),
            "one past the limit is not"
        );
        assert_eq!(writer.buf, b"abcd");
        writer.flush().await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        assert!(!writer.take_waited(), "the pipe took everything at once");
    }

    #[tokio::test]
    async fn says_when_a_write_had_to_wait_for_the_socket() {
        let (client, mut server) = tokio::io::duplex(16);
        let mut writer = BatchWriter::new(client);
        assert!(writer.buffer(b"", &[1; 64]));
        let reader = tokio::spawn(async move {
            let mut got = [0u8; 64];
            server.read_exact(&mut got).await.unwrap();
        });
        writer.flush().await.unwrap();
        reader.await.unwrap();
        assert!(
            writer.take_waited(),
            "64 bytes do not fit a 16-byte pipe at once"
        );
        assert!(!writer.take_waited(), "asking clears it");
    }
}
