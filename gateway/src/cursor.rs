//! The SSE cursor: one opaque string (an event `id:`) that records the position of every channel
//! of a stream, so `Last-Event-ID` alone is enough to resume all of them.
//!
//! Form: base64url (no padding) of the JSON array `[[channel, epoch, offset], ...]`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Longest cursor accepted, in bytes.
pub const MAX_CURSOR_LEN: usize = 64 * 1024;

/// Encodes positions as a cursor.
pub fn encode<'a>(positions: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> String {
    let mut out = String::new();
    encode_into(positions, &mut Vec::new(), &mut out);
    out
}

/// Appends the cursor to `out`, using `scratch` for the JSON form, so a stream can reuse both
/// buffers for every event.
pub fn encode_into<'a>(
    positions: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
    scratch: &mut Vec<u8>,
    out: &mut String,
) {
    scratch.clear();
    scratch.push(b'[');
    for (i, (channel, epoch, offset)) in positions.into_iter().enumerate() {
        if i > 0 {
            scratch.push(b',');
        }
        scratch.push(b'[');
        serde_json::to_writer(&mut *scratch, channel).expect("cannot fail");
        scratch.push(b',');
        serde_json::to_writer(&mut *scratch, epoch).expect("cannot fail");
        scratch.push(b',');
        scratch.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        scratch.push(b']');
    }
    scratch.push(b']');
    URL_SAFE_NO_PAD.encode_string(&scratch[..], out);
}

/// Decodes a cursor into `(channel, epoch, offset)` triples.
pub fn decode(cursor: &str) -> Result<Vec<(String, String, u64)>, String> {
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(format!("cursor is longer than {MAX_CURSOR_LEN} bytes"));
    }
    let json = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|e| format!("cursor is not base64url: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("cursor does not hold positions: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_channel_name() {
        let cursor = encode([("chat:a,b", "e1", 7), ("x\"y", "e2", 0)]);
        assert!(!cursor.contains(['\n', '\r', ' ']));
        assert_eq!(
            decode(&cursor).unwrap(),
            vec![
                ("chat:a,b".to_string(), "e1".to_string(), 7),
                ("x\"y".to_string(), "e2".to_string(), 0)
            ]
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode("%%%").is_err());
        assert!(decode(&URL_SAFE_NO_PAD.encode("{\"a\":1}")).is_err());
        assert!(decode(&"A".repeat(MAX_CURSOR_LEN + 1)).is_err());
    }
}
