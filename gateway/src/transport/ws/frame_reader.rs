//! The read side of a WebSocket, holding memory only while the peer is sending.
//!
//! fastwebsockets' reader keeps an 8 KiB buffer for its whole life, which made it the largest
//! part of an idle connection. Here that reader exists only while frames arrive: when it holds no
//! byte of a next frame and the socket has nothing more, it is dropped, and the connection waits
//! for the peer with a small inline buffer whose bytes are handed to the next reader first. A
//! tracker of frame boundaries over every byte handed to fastwebsockets tells when it is empty.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use fastwebsockets::{Frame, Role, WebSocket, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read while no frame reader exists: pongs and short commands (a subscribe is ~55 bytes)
/// fit whole; it is part of every idle connection, so it is kept small.
const WAIT_BUFFER: usize = 64;
/// RFC 6455 §5.2: 2 bytes, up to 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// Reads frames; pings and closes are returned like any frame, for the caller to answer.
pub struct FrameReader<R> {
    state: State<R>,
    /// fastwebsockets refuses frames of at least this size before reading them.
    max_frame_size: usize,
}

enum State<R> {
    /// Between frames, with no fastwebsockets buffer.
    Waiting(Source<R>),
    /// Boxed: the reader is allocated only while reading anyway, and the idle state stays small.
    Reading(Box<WebSocket<Source<R>>>),
    /// After a read error, or while switching between the other two.
    Failed,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, max_frame_size: usize) -> Self {
        FrameReader {
            state: State::Waiting(Source {
                io,
                wait: [0; WAIT_BUFFER],
                waiting: 0..0,
                boundary: Boundary::default(),
            }),
            max_frame_size,
        }
    }

    /// The next frame, unmasked. Not cancel-safe: keep the future until it completes.
    pub async fn next(&mut self) -> Result<Frame<'static>, WebSocketError> {
        loop {
            match &mut self.state {
                State::Failed => return Err(WebSocketError::ConnectionClosed),
                State::Waiting(source) => {
                    match poll_fn(|cx| source.poll_wait(cx)).await {
                        Ok(0) => {
                            self.state = State::Failed;
                            return Err(WebSocketError::UnexpectedEOF);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.state = State::Failed;
                            return Err(WebSocketError::IoError(e));
                        }
                    }
                    let State::Waiting(source) = std::mem::replace(&mut self.state, State::Failed)
                    else {
                        unreachable!("matched above")
                    };
                    self.state = State::Reading(Box::new(self.reader(source)));
                }
                State::Reading(ws) => match ws.read_frame().await {
                    Ok(frame) => return Ok(frame),
                    Err(WebSocketError::IoError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Source::poll_read: fastwebsockets holds nothing and the peer is quiet.
                        let State::Reading(ws) = std::mem::replace(&mut self.state, State::Failed)
                        else {
                            unreachable!("matched above")
                        };
                        self.state = State::Waiting((*ws).into_inner());
                    }
                    Err(e) => {
                        self.state = State::Failed;
                        return Err(e);
                    }
                },
            }
        }
    }

    fn reader(&self, source: Source<R>) -> WebSocket<Source<R>> {
        let mut ws = WebSocket::after_handshake(source, Role::Server);
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        ws.set_max_message_size(self.max_frame_size);
        ws
    }
}

/// The socket as fastwebsockets sees it: bytes read while waiting first, then the socket, every
/// byte noted by the boundary tracker.
struct Source<R> {
    io: R,
    wait: [u8; WAIT_BUFFER],
    /// The part of `wait` not yet handed over.
    waiting: std::ops::Range<usize>,
    boundary: Boundary,
}

impl<R: AsyncRead + Unpin> Source<R> {
    /// Reads what the peer sent into the wait buffer; 0 at end of stream.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(&mut self.wait);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.waiting = 0..n;
        Poll::Ready(Ok(n))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Source<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.waiting.is_empty() {
            let n = this.waiting.len().min(buf.remaining());
            let bytes = &this.wait[this.waiting.start..this.waiting.start + n];
            this.boundary.feed(bytes);
            buf.put_slice(bytes);
            this.waiting.start += n;
            return Poll::Ready(Ok(()));
        }
        // fastwebsockets reads only when its buffer lacks a whole frame; at a frame start that
        // means its buffer is empty.
        let empty = this.boundary.at_frame_start();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if empty => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                this.boundary.feed(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

/// fastwebsockets' unsplit `WebSocket` is the one whose stream can be taken back; it writes only
/// automatic pongs and closes, which are off, so this side never writes.
impl<R: Unpin> AsyncWrite for Source<R> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Where the bytes handed to fastwebsockets stand in the frame sequence.
#[derive(Default)]
struct Boundary {
    header: [u8; MAX_HEADER],
    /// Bytes of the current frame's header seen; 0 between frames.
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl Boundary {
    fn at_frame_start(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    fn feed(&mut self, mut data: &[u8]) {
        while let Some((&first, rest)) = data.split_first() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len() as u64);
                self.payload_left -= n;
                data = &data[n as usize..];
                continue;
            }
            self.header[self.have] = first;
            self.have += 1;
            data = rest;
            if let Some(len) = payload_len(&self.header[..self.have]) {
                self.have = 0;
                self.payload_left = len;
            }
        }
    }
}

/// The payload length, once `header` holds a whole frame header.
fn payload_len(header: &[u8]) -> Option<u64> {
    let [_, second, rest @ ..] = header else {
        return None;
    };
    let code = second & 0x7f;
    let extended = match code {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    if rest.len() < extended + mask {
        return None;
    }
    Some(match extended {
        0 => u64::from(code),
        2 => u64::from(u16::from_be_bytes([rest[0], rest[1]])),
        _ => u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::OpCode;
    use tokio::io::AsyncWriteExt;

    /// A masked client frame with a header of the given length form.
    fn frame(opcode: u8, payload: &[u8], form: u8) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match form {
            0 => out.push(0x80 | payload.len() as u8),
            2 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        let mask = [1, 2, 3, 4];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn tracks_boundaries_across_any_split() {
        let mut stream = frame(1, b"hello", 0);
        stream.extend(frame(2, &[9; 300], 2));
        stream.extend(frame(1, b"long form", 8));
        stream.extend(frame(10, b"", 0));
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            let mut boundary = Boundary::default();
            for piece in stream.chunks(chunk) {
                boundary.feed(piece);
            }
            assert!(boundary.at_frame_start(), "chunk size {chunk}");
        }
        let mut boundary = Boundary::default();
        boundary.feed(&stream[..stream.len() - 1]);
        assert!(!boundary.at_frame_start());
    }

    #[tokio::test]
    async fn reads_frames_and_lets_go_of_the_buffer_between_bursts() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(server, 1 << 20);
        let big = vec![b'x'; 20_000];
        client.write_all(&frame(1, b"one", 0)).await.unwrap();
        client.write_all(&frame(2, &big, 2)).await.unwrap();
        let first = reader.next().await.unwrap();
        assert_eq!(
            (first.opcode, &first.payload[..]),
            (OpCode::Text, &b"one"[..])
        );
        let second = reader.next().await.unwrap();
        assert_eq!(&second.payload[..], &big[..]);

        // Nothing more is sent: the pending read parks the reader.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next());
        assert!(pending.await.is_err());
        assert!(matches!(reader.state, State::Waiting(_)));

        let mut burst = frame(9, b"ping", 0);
        burst.extend(frame(1, &[b'y'; 200], 2));
        client.write_all(&burst).await.unwrap();
        assert_eq!(reader.next().await.unwrap().opcode, OpCode::Ping);
        assert_eq!(reader.next().await.unwrap().payload.len(), 200);
        drop(client);
        assert!(reader.next().await.is_err());
    }
}
