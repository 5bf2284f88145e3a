//! The read side of a WebSocket: an RFC 6455 §5 frame parser that checks every rule a single
//! frame must obey, and holds memory only while the peer is sending.
//!
//! Our own parser rather than fastwebsockets' reader: fastwebsockets refuses any RSV bit, so a
//! permessage-deflate message (RSV1) cannot go through it, and it accepted unmasked client frames.
//! Pre-checking headers in front of it would have meant parsing every header twice and keeping a
//! queue of per-frame flags for frames it had buffered ahead, with errors reported out of order;
//! parsing here is one short function, and the buffer policy becomes simpler too.
//!
//! Buffering: a connection waiting for its peer holds no buffer at all. A read with nothing
//! pending goes into a stack buffer and only what arrived is copied to the heap; a frame's
//! payload is read straight into a buffer sized for it. Whatever is left after the last whole
//! frame is kept; once it is all consumed the buffer is released. Sequence rules (fragments,
//! continuations) are [`super::message::Assembler`]'s; close payload rules are checked where the
//! Close is answered.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use super::frame::{Frame, OpCode};

/// A read with nothing pending goes through a stack buffer of this size.
const STACK_READ: usize = 4096;
/// Smallest heap read while a frame is partly in.
const MIN_READ: usize = 4096;

/// Why no frame could be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Breaks RFC 6455: close 1002 with this reason.
    Protocol(&'static str),
    /// The frame is longer than the limit: close 1009.
    TooBig,
    /// The peer went away or the socket failed: nothing more can be said.
    Gone,
}

/// What the reader allows beyond plain RFC 6455.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Longest frame payload; longer frames are refused before their payload is read.
    pub max_payload: usize,
    /// permessage-deflate was negotiated: RSV1 may start a data message.
    pub rsv1_allowed: bool,
}

/// Reads frames; pings and closes are returned like any frame, for the caller to answer.
pub struct FrameReader<R> {
    io: R,
    /// Bytes read and not yet returned as frames; no allocation when empty.
    buf: BytesMut,
    limits: ReadLimits,
    failed: bool,
}

/// A parsed header: the frame needs `header + payload` bytes in all.
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header: usize,
    payload: usize,
}

enum Parse {
    /// At least this many bytes are needed to know more.
    Need(usize),
    Header(Header),
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, limits: ReadLimits) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            limits,
            failed: false,
        }
    }

    /// The next frame, unmasked. Not cancel-safe: keep the future until it completes. After an
    /// error every later call fails with [`ReadError::Gone`].
    pub async fn next(&mut self) -> Result<Frame, ReadError> {
        if self.failed {
            return Err(ReadError::Gone);
        }
        let result = self.read_frame().await;
        if result.is_err() {
            self.failed = true;
            self.buf = BytesMut::new();
        }
        result
    }

    async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            let header = match parse_header(&self.buf, self.limits)? {
                Parse::Need(total) => {
                    self.fill(total).await?;
                    continue;
                }
                Parse::Header(header) => header,
            };
            let total = header.header + header.payload;
            if self.buf.len() < total {
                self.fill(total).await?;
            }
            let mut payload = self.buf.split_to(total).split_off(header.header);
            if self.buf.is_empty() {
                // Let go of the allocation (the payload may still share it).
                self.buf = BytesMut::new();
            }
            unmask(&mut payload, header.mask);
            return Ok(Frame {
                fin: header.fin,
                compressed: header.rsv1,
                opcode: header.opcode,
                payload: payload.freeze(),
            });
        }
    }

    async fn fill(&mut self, total: usize) -> Result<(), ReadError> {
        poll_fn(|cx| self.poll_fill(cx, total)).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, total: usize) -> Poll<Result<(), ReadError>> {
        while self.buf.len() < total {
            let read = if self.buf.is_empty() {
                // Nothing of a frame yet: a pending read must not hold a heap buffer.
                let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
                let mut read = ReadBuf::uninit(&mut stack);
                match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                    Ok(()) => {
                        self.buf.extend_from_slice(read.filled());
                        Ok(read.filled().len())
                    }
                    Err(e) => Err(e),
                }
            } else {
                self.buf
                    .reserve((total - self.buf.len()).max(MIN_READ.min(total)));
                ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut self.io),
                    cx,
                    &mut self.buf
                ))
            };
            match read {
                Ok(0) | Err(_) => return Poll::Ready(Err(ReadError::Gone)),
                Ok(_) => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Parses and checks the header at the start of `buf` (RFC 6455 §5.2, §5.5).
fn parse_header(buf: &[u8], limits: ReadLimits) -> Result<Parse, ReadError> {
    let [first, second, rest @ ..] = buf else {
        return Ok(Parse::Need(2));
    };
    let fin = first & 0x80 != 0;
    let rsv1 = first & 0x40 != 0;
    if first & 0x30 != 0 {
        return Err(ReadError::Protocol("reserved bit set"));
    }
    let opcode = OpCode::from_bits(first & 0x0f).ok_or(ReadError::Protocol("reserved opcode"))?;
    if rsv1 && !(limits.rsv1_allowed && matches!(opcode, OpCode::Text | OpCode::Binary)) {
        return Err(ReadError::Protocol("reserved bit set"));
    }
    // §5.1: a server MUST close the connection upon receiving an unmasked frame.
    if second & 0x80 == 0 {
        return Err(ReadError::Protocol("unmasked client frame"));
    }
    let code = second & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(ReadError::Protocol("fragmented control frame"));
        }
        if code > 125 {
            return Err(ReadError::Protocol("control frame longer than 125 bytes"));
        }
    }
    let extended = match code {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header = 2 + extended + 4;
    if buf.len() < header {
        return Ok(Parse::Need(header));
    }
    let payload = match extended {
        0 => u64::from(code),
        2 => u64::from(u16::from_be_bytes([rest[0], rest[1]])),
        _ => {
            let len = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(ReadError::Protocol("length with the high bit set"));
            }
            len
        }
    };
    let payload = match usize::try_from(payload) {
        Ok(len) if len <= limits.max_payload => len,
        _ => return Err(ReadError::TooBig),
    };
    let mask = rest[extended..extended + 4]
        .try_into()
        .expect("4 bytes of mask");
    Ok(Parse::Header(Header {
        fin,
        rsv1,
        opcode,
        mask,
        header,
        payload,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

/// For the fuzz target: parses a byte stream as client frames until it ends or breaks a rule.
pub fn parse_all(data: &[u8], limits: ReadLimits) -> (Vec<Frame>, Option<ReadError>) {
    use futures_util::FutureExt;
    let mut reader = FrameReader::new(data, limits);
    let mut frames = Vec::new();
    loop {
        // A byte slice never makes a read wait.
        let next = reader
            .next()
            .now_or_never()
            .expect("a slice is always ready");
        match next {
            Ok(frame) => frames.push(frame),
            Err(ReadError::Gone) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const LIMITS: ReadLimits = ReadLimits {
        max_payload: 1 << 20,
        rsv1_allowed: false,
    };

    /// A client frame: `first` is the whole first header byte, masked unless told.
    fn raw(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= usize::from(u16::MAX) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if !masked {
            out.extend_from_slice(payload);
            return out;
        }
        let mask = [1, 2, 3, 4];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        raw(0x80 | opcode, payload, true)
    }

    fn first_error(bytes: &[u8], limits: ReadLimits) -> Option<ReadError> {
        parse_all(bytes, limits).1
    }

    #[test]
    fn reads_every_length_form_across_one_stream() {
        let mut stream = frame(1, b"hello");
        stream.extend(frame(2, &[9; 300]));
        stream.extend(frame(1, &[b'l'; 70_000]));
        stream.extend(frame(10, b""));
        let (frames, error) = parse_all(&stream, LIMITS);
        assert_eq!(error, None);
        let lens: Vec<_> = frames.iter().map(|f| f.payload.len()).collect();
        assert_eq!(lens, [5, 300, 70_000, 0]);
        assert_eq!(&frames[0].payload[..], b"hello");
        assert!(frames[2].payload.iter().all(|b| *b == b'l'));
        assert_eq!(frames[3].opcode, OpCode::Pong);
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let protocol = |bytes: Vec<u8>, limits| {
            assert!(
                matches!(first_error(&bytes, limits), Some(ReadError::Protocol(_))),
                "{bytes:?}"
            );
        };
        protocol(raw(0x81, b"unmasked", false), LIMITS);
        for rsv in [0x40, 0x20, 0x10] {
            protocol(raw(0x81 | rsv, b"x", true), LIMITS);
        }
        for opcode in [3, 7, 11, 15] {
            protocol(frame(opcode, b""), LIMITS);
        }
        protocol(frame(9, &[0; 126]), LIMITS);
        protocol(raw(0x09, b"", true), LIMITS);
        // With deflate, RSV1 is allowed on a message's first frame only.
        let deflate = ReadLimits {
            rsv1_allowed: true,
            ..LIMITS
        };
        assert_eq!(first_error(&raw(0xC1, b"x", true), deflate), None);
        protocol(raw(0xC0, b"x", true), deflate);
        protocol(raw(0xC9, b"x", true), deflate);
        protocol(raw(0xA1, b"x", true), deflate);
        // The 64-bit length's high bit.
        protocol(
            [&[0x82, 0xFF][..], &[0x80, 0, 0, 0, 0, 0, 0, 1], &[0; 4]].concat(),
            LIMITS,
        );
    }

    #[test]
    fn refuses_a_long_frame_before_reading_it() {
        let header = [&[0x82, 0xFF][..], &(1u64 << 40).to_be_bytes(), &[0; 4]].concat();
        assert_eq!(first_error(&header, LIMITS), Some(ReadError::TooBig));
        let limits = ReadLimits {
            max_payload: 10,
            ..LIMITS
        };
        assert_eq!(first_error(&frame(1, &[b'x'; 10]), limits), None);
        assert_eq!(
            first_error(&frame(1, &[b'x'; 11]), limits),
            Some(ReadError::TooBig)
        );
    }

    #[tokio::test]
    async fn reads_across_any_split_and_holds_no_buffer_between_bursts() {
        let mut stream = frame(1, b"one");
        stream.extend(frame(2, &[7; 20_000]));
        for chunk in [1, 2, 3, 7, 64, 5000] {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let mut reader = FrameReader::new(server, LIMITS);
            let writer = async {
                for piece in stream.chunks(chunk) {
                    client.write_all(piece).await.unwrap();
                }
                client
            };
            let reading = async {
                let one = reader.next().await.unwrap();
                let two = reader.next().await.unwrap();
                (one, two)
            };
            let (client, (one, two)) = tokio::join!(writer, reading);
            assert_eq!(&one.payload[..], b"one", "chunk {chunk}");
            assert_eq!(two.payload.len(), 20_000);
            assert_eq!(reader.buf.capacity(), 0, "nothing held between frames");
            drop(client);
            assert_eq!(reader.next().await, Err(ReadError::Gone));
        }
    }
}
