//! RFC 6455 §5 frames as this server reads and writes them: opcodes, a received frame, the
//! header of a frame the server sends (never masked, RSV1 set for a compressed message), and the
//! close codes a peer may send (§7.4).

use bytes::Bytes;

/// A frame's opcode; the reserved ones (3–7, 11–15) never get past the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A frame from the peer, unmasked and checked against the rules of a single frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: the first frame of a permessage-deflate compressed message (RFC 7692 §6).
    pub compressed: bool,
    pub opcode: OpCode,
    pub payload: Bytes,
}

/// Longest header the server writes: 2 bytes and 8 of extended length (no mask).
pub const MAX_SERVER_HEADER: usize = 10;

/// The header of a server frame carrying `len` payload bytes.
pub fn server_header(
    fin: bool,
    compressed: bool,
    opcode: OpCode,
    len: usize,
) -> ([u8; MAX_SERVER_HEADER], usize) {
    let mut head = [0u8; MAX_SERVER_HEADER];
    head[0] = (u8::from(fin) << 7) | (u8::from(compressed) << 6) | opcode as u8;
    let size = if len < 126 {
        head[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, size)
}

/// RFC 6455 §7.4: the codes a peer may put in a Close frame. 1004–1006 and 1015 are reserved
/// for local use, the rest below 3000 that IANA has not assigned are invalid, 3000–4999 are for
/// libraries and applications.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_registry() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
        ] {
            assert!(close_code_allowed(code), "{code}");
        }
        for code in [
            0,
            999,
            1004,
            1005,
            1006,
            1015,
            1016,
            2000,
            2999,
            5000,
            u16::MAX,
        ] {
            assert!(!close_code_allowed(code), "{code}");
        }
        assert!(close_code_allowed(3000) && close_code_allowed(4999));
    }

    #[test]
    fn header_length_forms() {
        let (h, n) = server_header(true, false, OpCode::Text, 125);
        assert_eq!(&h[..n], &[0x81, 125]);
        let (h, n) = server_header(true, true, OpCode::Binary, 126);
        assert_eq!(&h[..n], &[0xC2, 126, 0, 126]);
        let (h, n) = server_header(false, false, OpCode::Continuation, 65_536);
        assert_eq!(&h[..n], &[0x00, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
}
