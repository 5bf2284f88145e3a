//! The socket as an SSE stream's sink, on the own HTTP/1.x path: the stream's loop runs in the
//! connection's task and writes here, chunked on HTTP/1.1 and plain on HTTP/1.0. A burst of
//! events is gathered into one buffer and written at once; the buffer exists only while a
//! burst is written, so an idle stream holds none (a body channel and a second task, as hyper's
//! path needs, cost kilobytes per stream).

use std::io::{ErrorKind, Write as _};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::response::Body;
use crate::transport::bounded::bounded;
use crate::transport::sse_sink::EventSink;

/// Room before a chunk's bytes for its size line: 8 hex digits (chunks stay far below 4 GiB)
/// and CRLF, written in place when the chunk is sealed, so the chunk is one write, not a copy.
const SIZE_LINE: usize = 10;
/// A burst is written out in pieces of about this size, not gathered whole.
const LIMIT: usize = 8 * 1024;

pub(crate) struct SocketSink {
    stream: TcpStream,
    /// The response's body: it carries no bytes, but holds the admission (the connection's
    /// permit) and ends when the client's token expires.
    body: Body,
    chunked: bool,
    /// `websocket.write_timeout`: a write that waits longer drops the client.
    timeout: Duration,
    /// The bytes being gathered (after room for the size line when chunked), or the sealed
    /// chunk being written; empty between bursts.
    buf: Vec<u8>,
    /// `buf` is sealed and written up to here; kept across a write cancelled by a drain, so
    /// what follows never lands inside a half-written chunk.
    sealed_from: Option<usize>,
    /// A write found the socket full since [`EventSink::take_waited`] last asked.
    waited: bool,
    /// A write failed or timed out, or the client left: nothing more is written.
    broken: bool,
}

impl SocketSink {
    /// The sink of a response whose head is written; `chunked` unless the request is HTTP/1.0.
    pub(crate) fn new(stream: TcpStream, body: Body, chunked: bool, timeout: Duration) -> Self {
        SocketSink {
            stream,
            body,
            chunked,
            timeout,
            buf: Vec::new(),
            sealed_from: None,
            waited: false,
            broken: false,
        }
    }

    /// Ends the response once the stream is over: the last chunk, then the connection's end.
    pub(crate) async fn finish(mut self) {
        if self.broken || self.flush(true).await.is_err() {
            return;
        }
        if self.chunked {
            let limit = self.timeout;
            if bounded(limit, self.stream.write_all(b"0\r\n\r\n"))
                .await
                .is_none()
            {
                return;
            }
        }
        let _ = self.stream.shutdown().await;
    }

    fn gather(&mut self, bytes: &[u8]) {
        if self.buf.is_empty() && self.chunked {
            self.buf.extend_from_slice(&[0; SIZE_LINE]);
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes gathered, `None` if there are none.
    fn gathered(&self) -> Option<usize> {
        let start = if self.chunked { SIZE_LINE } else { 0 };
        (self.buf.len() > start).then(|| self.buf.len() - start)
    }

    /// Frames what is gathered as one chunk (its size line in the room left for it).
    fn seal(&mut self, len: usize) {
        if !self.chunked {
            self.sealed_from = Some(0);
            return;
        }
        let mut line = [0u8; SIZE_LINE];
        let mut rest = &mut line[..];
        let _ = write!(rest, "{len:x}\r\n");
        let start = rest.len();
        let used = SIZE_LINE - start;
        self.buf[start..SIZE_LINE].copy_from_slice(&line[..used]);
        self.buf.extend_from_slice(b"\r\n");
        self.sealed_from = Some(start);
    }

    /// Writes the sealed bytes, within the write timeout. Cancel-safe: progress is kept.
    async fn write_sealed(&mut self) -> Result<(), ()> {
        // Almost always the socket takes a whole burst at once; the wait for room (and its
        // timer) is boxed where it happens, so it is not part of every stream's future.
        let written = match self.write_ready() {
            Ok(true) => Ok(()),
            Ok(false) => {
                let limit = self.timeout;
                Box::pin(bounded(limit, self.write_waiting()))
                    .await
                    .unwrap_or(Err(()))
            }
            Err(()) => Err(()),
        };
        if written.is_err() {
            self.broken = true;
            return Err(());
        }
        self.sealed_from = None;
        self.buf.clear();
        Ok(())
    }

    /// Writes what the socket takes now: `Ok(true)` when all is written, `Ok(false)` when the
    /// socket is full (a write had to wait: the stream reports it to the session).
    fn write_ready(&mut self) -> Result<bool, ()> {
        while let Some(from) = self.sealed_from.filter(|&from| from < self.buf.len()) {
            match self.stream.try_write(&self.buf[from..]) {
                Ok(0) => return Err(()),
                Ok(n) => self.sealed_from = Some(from + n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.waited = true;
                    return Ok(false);
                }
                Err(_) => return Err(()),
            }
        }
        Ok(true)
    }

    /// Waits for room and writes, until all is written.
    async fn write_waiting(&mut self) -> Result<(), ()> {
        loop {
            self.stream.writable().await.map_err(|_| ())?;
            if self.write_ready()? {
                return Ok(());
            }
        }
    }
}

impl EventSink for SocketSink {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if self.broken {
            return Err(());
        }
        if self.sealed_from.is_some() {
            // A write cancelled halfway (the drain): finish that chunk first.
            self.write_sealed().await?;
        }
        self.gather(bytes);
        Ok(())
    }

    async fn send_shared(&mut self, bytes: Bytes) -> Result<(), ()> {
        self.send(&bytes).await
    }

    async fn flush(&mut self, all: bool) -> Result<(), ()> {
        if self.broken {
            return Err(());
        }
        if self.sealed_from.is_none() {
            match self.gathered() {
                Some(len) if all || len >= LIMIT => self.seal(len),
                Some(_) => return Ok(()),
                None => {}
            }
        }
        if self.sealed_from.is_some() {
            self.write_sealed().await?;
        }
        Ok(())
    }

    async fn closed(&mut self) {
        loop {
            tokio::select! {
                gone = client_gone(&self.stream) => if gone { break },
                // Only its end comes: the token expired.
                frame = self.body.frame() => if !matches!(frame, Some(Ok(_))) { return },
            }
        }
        self.broken = true;
    }

    fn take_waited(&mut self) -> bool {
        std::mem::take(&mut self.waited)
    }

    /// An idle stream keeps no buffer (nor what a burst written out in pieces left allocated).
    fn release(&mut self) {
        if self.sealed_from.is_none() {
            self.buf = Vec::new();
        }
    }
}

/// Waits until the client sends something: `true` when it closed or the connection broke;
/// `false` after bytes that are read and dropped (nothing is served after this response).
async fn client_gone(stream: &TcpStream) -> bool {
    if stream.readable().await.is_err() {
        return true;
    }
    let mut sink = [0u8; 256];
    match stream.try_read(&mut sink) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A sink on one end of a loopback connection, and the other end.
    async fn pair(chunked: bool) -> (SocketSink, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let sink = SocketSink::new(
            accepted.unwrap().0,
            crate::http::response::empty(),
            chunked,
            Duration::from_secs(60),
        );
        (sink, client.unwrap())
    }

    #[tokio::test]
    async fn a_burst_is_one_chunk_and_the_end_is_the_last_chunk() {
        let (mut sink, mut client) = pair(true).await;
        sink.send(b"id: 1\ndata: ").await.unwrap();
        sink.send_shared(Bytes::from_static(b"{}")).await.unwrap();
        sink.send(b"\n\n").await.unwrap();
        // An event is whole, but little has gathered: nothing is written yet.
        sink.flush(false).await.unwrap();
        assert_eq!(sink.gathered(), Some(16));
        sink.flush(true).await.unwrap();
        assert!(sink.buf.capacity() > 0, "kept for the next burst");
        sink.release();
        assert_eq!(sink.buf.capacity(), 0, "an idle sink holds no buffer");
        // Nothing gathered: no empty chunk, which would end the body.
        sink.flush(true).await.unwrap();
        sink.send(b": heartbeat\n\n").await.unwrap();
        sink.flush(true).await.unwrap();
        sink.finish().await;
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "10\r\nid: 1\ndata: {}\n\n\r\nd\r\n: heartbeat\n\n\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_large_burst_is_written_in_pieces_and_plain_without_chunking() {
        let (mut sink, mut client) = pair(false).await;
        let event = [b'x'; 1000];
        for _ in 0..9 {
            sink.send(&event).await.unwrap();
            sink.flush(false).await.unwrap();
        }
        // The ninth event took it past the limit: written, the buffer kept for the burst.
        assert_eq!(sink.gathered(), None);
        assert!(sink.buf.capacity() > 0);
        sink.send(b"end").await.unwrap();
        sink.flush(true).await.unwrap();
        sink.release();
        assert_eq!(sink.buf.capacity(), 0);
        sink.finish().await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 9003);
        assert!(got.ends_with(b"xend"));
    }
}
