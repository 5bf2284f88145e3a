//! A WebSocket client written by hand over TCP, for frames a real client library refuses to
//! make (bad opcodes, RSV bits, unmasked frames, fragments, oversized lengths), for several frames
//! in one TCP write, for handshakes with chosen headers (extension offers), and for reading
//! frames as sent, RSV bits included.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::within;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    /// The three RSV bits (RSV1 = 4: a permessage-deflate compressed message).
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The server's handshake response head (status line and headers).
    pub response_head: String,
}

/// Makes a masked client frame. `rsv` is the three RSV bits (0..=7).
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame_with(fin, rsv, opcode, payload, true)
}

/// Makes a client frame, masked or not (a server must refuse an unmasked one).
pub fn encode_frame_with(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 7) << 4) | (opcode & 0xF));
    let mask_bit = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
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
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

impl RawWs {
    /// Opens a TCP connection and completes the WebSocket handshake by hand.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let stream = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("tcp connect");
        Self::handshake(stream, addr, path).await
    }

    pub async fn handshake(stream: TcpStream, addr: SocketAddr, path: &str) -> RawWs {
        Self::handshake_with(stream, addr, path, &[]).await
    }

    /// Opens a WebSocket sending extra request headers, e.g.
    /// `("Sec-WebSocket-Extensions", "permessage-deflate")`.
    pub async fn connect_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawWs {
        let stream = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("tcp connect");
        Self::handshake_with(stream, addr, path, headers).await
    }

    /// The response's value of `name` (case-insensitive), if present.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }

    async fn handshake_with(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> RawWs {
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        within("handshake write", stream.write_all(request.as_bytes()))
            .await
            .expect("handshake write");
        let mut buf = Vec::new();
        let head_end = within("handshake response", async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("handshake read");
                assert!(n > 0, "connection closed during handshake: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake not accepted: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad Sec-WebSocket-Accept: {head}"
        );
        buf.drain(..head_end);
        RawWs {
            stream,
            buf,
            response_head: head,
        }
    }

    pub async fn send_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) {
        self.send_raw(&encode_frame(fin, rsv, opcode, payload))
            .await
            .expect("raw frame write");
    }

    /// Writes bytes, reporting failure (the server may already have closed).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("raw write", self.stream.write_all(bytes)).await
    }

    /// Reads one frame; None on EOF or connection error.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        within("raw frame", self.read_frame_inner()).await
    }

    async fn fill(&mut self, want: usize) -> bool {
        while self.buf.len() < want {
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    async fn read_frame_inner(&mut self) -> Option<Frame> {
        if !self.fill(2).await {
            return None;
        }
        let b0 = self.buf[0];
        let b1 = self.buf[1];
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let mut header = 2;
        let mut len = (b1 & 0x7f) as usize;
        if len == 126 {
            if !self.fill(4).await {
                return None;
            }
            len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
            header = 4;
        } else if len == 127 {
            if !self.fill(10).await {
                return None;
            }
            len = u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize;
            header = 10;
        }
        if !self.fill(header + len).await {
            return None;
        }
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some(Frame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 7,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// Reads frames until a close frame (returning its code, or Some(1005) for an empty close
    /// payload) or the end of the connection (None).
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode == OP_CLOSE {
                return Some(frame.close_code().unwrap_or(1005));
            }
        }
    }

    /// The next data frame, as JSON (control frames skipped).
    pub async fn read_json(&mut self) -> Value {
        loop {
            let frame = self.read_frame().await.expect("connection ended");
            match frame.opcode {
                OP_TEXT => return serde_json::from_slice(&frame.payload).expect("JSON"),
                OP_PING | OP_PONG => continue,
                _ => panic!("unexpected frame {frame:?}"),
            }
        }
    }
}

/// Opens a WebSocket to `addr`, then sends a `subscribe` of `channel` and a Close frame in one
/// TCP write and drops the socket without waiting for anything: the server sees the subscribe
/// and the end of the connection at once (a page reload does this).
pub async fn subscribe_and_close_in_one_write(addr: SocketAddr, channel: &str) {
    let mut ws = RawWs::connect(addr, "/ws").await;
    let subscribe = serde_json::json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    let mut bytes = encode_frame(true, 0, OP_TEXT, subscribe.as_bytes());
    bytes.extend(encode_frame(true, 0, OP_CLOSE, &1000u16.to_be_bytes()));
    ws.send_raw(&bytes).await.expect("subscribe and close");
}
