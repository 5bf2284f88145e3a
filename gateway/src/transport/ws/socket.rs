//! The two halves of an upgraded WebSocket stream. A plain TCP connection (HTTP/1.1 without
//! TLS, the common case behind a load balancer) is taken back from hyper and shared by both
//! halves without a lock; its write side can also be reached by express delivery
//! ([`crate::express`]), which writes frames from the fan-out without waking the connection's
//! task. Any other stream (TLS, an HTTP/2 extended CONNECT stream) is split with tokio's lock.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// The most of a read's buffer made ready per read: a plain TCP read needs initialised memory,
/// and zeroing a large message's whole spare room on every read would cost more than the read.
const READ_CHUNK: usize = 16 * 1024;

/// The read half.
pub(crate) enum SocketRead {
    /// What hyper had read past the handshake comes first.
    Tcp {
        stream: Arc<TcpStream>,
        early: Box<[u8]>,
    },
    Other(ReadHalf<TokioIo<Upgraded>>),
}

/// The write half.
pub(crate) enum SocketWrite {
    Tcp(Arc<TcpStream>),
    Other(WriteHalf<TokioIo<Upgraded>>),
}

/// Splits an upgraded stream, taking a plain TCP connection back from hyper.
pub(crate) fn split(io: TokioIo<Upgraded>) -> (SocketRead, SocketWrite) {
    match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(io.into_inner()) {
        Ok(parts) => {
            let stream = Arc::new(parts.io.into_inner());
            // Copied: even an empty slice may hold hyper's whole read buffer.
            let early = Box::from(&parts.read_buf[..]);
            let read = SocketRead::Tcp {
                stream: stream.clone(),
                early,
            };
            (read, SocketWrite::Tcp(stream))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (SocketRead::Other(read), SocketWrite::Other(write))
        }
    }
}

impl SocketWrite {
    /// The TCP socket, when the stream is a plain TCP connection.
    pub(crate) fn tcp(&self) -> Option<&Arc<TcpStream>> {
        match self {
            SocketWrite::Tcp(stream) => Some(stream),
            SocketWrite::Other(_) => None,
        }
    }
}

impl AsyncRead for SocketRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketRead::Tcp { stream, early } => {
                if !early.is_empty() {
                    let n = early.len().min(buf.remaining());
                    buf.put_slice(&early[..n]);
                    *early = Box::from(&early[n..]);
                    return Poll::Ready(Ok(()));
                }
                loop {
                    ready!(stream.poll_read_ready(cx))?;
                    let room = buf.remaining().min(READ_CHUNK);
                    match stream.try_read(buf.initialize_unfilled_to(room)) {
                        Ok(n) => {
                            buf.advance(n);
                            return Poll::Ready(Ok(()));
                        }
                        // Readiness was stale and is cleared: wait again.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            SocketRead::Other(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

/// Writes with `write` once the socket is writable; readiness that turned out stale (the write
/// would block, which clears it) is waited for again.
fn poll_tcp_write(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    write: impl Fn(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match write(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            written => return Poll::Ready(written),
        }
    }
}

impl AsyncWrite for SocketWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(stream) => poll_tcp_write(stream, cx, |s| s.try_write(data)),
            SocketWrite::Other(write) => Pin::new(write).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(stream) => poll_tcp_write(stream, cx, |s| s.try_write_vectored(data)),
            SocketWrite::Other(write) => Pin::new(write).poll_write_vectored(cx, data),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SocketWrite::Tcp(_) => true,
            SocketWrite::Other(write) => write.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(_) => Poll::Ready(Ok(())),
            SocketWrite::Other(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(stream) => {
                let shut = socket2::SockRef::from(&**stream).shutdown(std::net::Shutdown::Write);
                Poll::Ready(match shut {
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    other => other,
                })
            }
            SocketWrite::Other(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}
