//! The cursor: one opaque string that records the position of every channel of a stream or poll,
//! so `Last-Event-ID` (or a poll's `cursor`) alone is enough to resume all of them.
//!
//! Two forms. The full form names everything: base64url (no padding) of the JSON array
//! `[[channel, epoch, offset, tag?], ...]`, the tag (8 hex digits) of the publication at `offset`
//! when known; cursors from before tags (three-element entries) stay readable. Long-poll answers
//! carry it, and clients build it from the positions they hold. SSE event ids use the
//! [`compact`] form instead, which leans on the stream's request for the channel names.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use crate::session::delivery::ANY_EPOCH;

pub mod compact;

pub use compact::{CompactCursor, StreamCursor};

/// Longest cursor accepted, in bytes. A stream whose cursor could grow beyond it is refused
/// when it opens ([`longest_encoding`]), so every cursor the server issues is accepted back.
pub const MAX_CURSOR_LEN: usize = 64 * 1024;

/// The most a cursor entry takes besides its JSON-quoted channel name: brackets, commas, an
/// epoch of up to 32 characters quoted, an offset of up to 20 digits, a quoted 8-digit tag.
const ENTRY_OVERHEAD: usize = 2 + 1 + (32 + 2) + 1 + 20 + 1 + (8 + 2) + 1;

/// The longest cursor a stream over `channels` can be given, in bytes.
pub fn longest_encoding<'a>(channels: impl IntoIterator<Item = &'a str>) -> usize {
    let json: usize = 2 + channels
        .into_iter()
        .map(|c| quoted_len(c) + ENTRY_OVERHEAD)
        .sum::<usize>();
    json.div_ceil(3) * 4
}

/// The length of `text` as a JSON string, as `serde_json` writes it.
fn quoted_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// One channel's position in a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorEntry {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    pub tag: Option<u32>,
}

/// Encodes positions `(channel, epoch, offset)` without tags as a cursor.
pub fn encode<'a>(positions: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> String {
    encode_tagged(positions.into_iter().map(|(c, e, o)| (c, e, o, None)))
}

/// Encodes positions `(channel, epoch, offset, tag)` as a cursor.
pub fn encode_tagged<'a>(
    positions: impl IntoIterator<Item = (&'a str, &'a str, u64, Option<u32>)>,
) -> String {
    let mut out = String::new();
    encode_into(positions, &mut Vec::new(), &mut out);
    out
}

/// Appends the cursor to `out`, using `scratch` for the JSON form, so a stream can reuse both
/// buffers for every event.
pub fn encode_into<'a>(
    positions: impl IntoIterator<Item = (&'a str, &'a str, u64, Option<u32>)>,
    scratch: &mut Vec<u8>,
    out: &mut String,
) {
    scratch.clear();
    scratch.push(b'[');
    for (i, (channel, epoch, offset, tag)) in positions.into_iter().enumerate() {
        if i > 0 {
            scratch.push(b',');
        }
        scratch.push(b'[');
        serde_json::to_writer(&mut *scratch, channel).expect("cannot fail");
        scratch.push(b',');
        serde_json::to_writer(&mut *scratch, epoch).expect("cannot fail");
        scratch.push(b',');
        scratch.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        if let Some(tag) = tag {
            scratch.extend_from_slice(b",\"");
            scratch.extend_from_slice(backplane::format_tag(tag).as_bytes());
            scratch.push(b'"');
        }
        scratch.push(b']');
    }
    scratch.push(b']');
    URL_SAFE_NO_PAD.encode_string(&scratch[..], out);
}

/// A cursor as a client sent it back, in either form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    Positions(Vec<CursorEntry>),
    Compact(CompactCursor),
}

/// Decodes a cursor of either form.
pub fn decode_any(cursor: &str) -> Result<Cursor, String> {
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(format!("cursor is longer than {MAX_CURSOR_LEN} bytes"));
    }
    let cursor = cursor.trim();
    if cursor.starts_with(compact::PREFIX) {
        CompactCursor::decode(cursor).map(Cursor::Compact)
    } else {
        decode(cursor).map(Cursor::Positions)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEntry {
    Tagged(String, String, u64, String),
    Untagged(String, String, u64),
}

/// Decodes a cursor of the full form into its entries.
pub fn decode(cursor: &str) -> Result<Vec<CursorEntry>, String> {
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(format!("cursor is longer than {MAX_CURSOR_LEN} bytes"));
    }
    let json = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|e| format!("cursor is not base64url: {e}"))?;
    let raw: Vec<RawEntry> = serde_json::from_slice(&json)
        .map_err(|e| format!("cursor does not hold positions: {e}"))?;
    raw.into_iter()
        .map(|entry| {
            let (RawEntry::Untagged(_, epoch, _) | RawEntry::Tagged(_, epoch, _, _)) = &entry;
            if epoch == ANY_EPOCH {
                return Err(format!("cursor epoch {ANY_EPOCH:?} is reserved"));
            }
            Ok(match entry {
                RawEntry::Untagged(channel, epoch, offset) => CursorEntry {
                    channel,
                    epoch,
                    offset,
                    tag: None,
                },
                RawEntry::Tagged(channel, epoch, offset, tag) => CursorEntry {
                    channel,
                    epoch,
                    offset,
                    tag: Some(
                        backplane::parse_tag(&tag)
                            .ok_or_else(|| format!("cursor tag {tag:?} is not 8 hex digits"))?,
                    ),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(channel: &str, epoch: &str, offset: u64, tag: Option<u32>) -> CursorEntry {
        CursorEntry {
            channel: channel.into(),
            epoch: epoch.into(),
            offset,
            tag,
        }
    }

    #[test]
    fn round_trips_any_channel_name() {
        let cursor = encode_tagged([("chat:a,b", "e1", 7, Some(0xab)), ("x\"y", "e2", 0, None)]);
        assert!(!cursor.contains(['\n', '\r', ' ']));
        assert_eq!(
            decode(&cursor).unwrap(),
            vec![
                entry("chat:a,b", "e1", 7, Some(0xab)),
                entry("x\"y", "e2", 0, None)
            ]
        );
    }

    #[test]
    fn reads_cursors_from_before_tags() {
        let old = URL_SAFE_NO_PAD.encode(r#"[["a","e1",7]]"#);
        assert_eq!(decode(&old).unwrap(), vec![entry("a", "e1", 7, None)]);
        let bad_tag = URL_SAFE_NO_PAD.encode(r#"[["a","e1",7,"xyz"]]"#);
        assert!(decode(&bad_tag).is_err());
    }

    #[test]
    fn longest_encoding_bounds_every_cursor() {
        let names = ["a", "x\"y\\z", "é☃", &"\"".repeat(255), &"n".repeat(200)];
        for name in names {
            // The longest epoch, offset and tag the bound allows for.
            let longest = (
                name,
                "0123456789abcdef0123456789abcdef",
                u64::MAX,
                Some(u32::MAX),
            );
            let positions = [longest; 3];
            let cursor = encode_tagged(positions.iter().copied());
            let bound = longest_encoding(positions.iter().map(|p| p.0));
            assert!(cursor.len() <= bound, "{name}: {} > {bound}", cursor.len());
            assert!(
                bound - cursor.len() <= 4,
                "{name}: bound {bound} is loose for {}",
                cursor.len()
            );
        }
        // The issue's stream: 256 channels of 200 bytes would need more than the limit.
        let long: Vec<String> = (0..256)
            .map(|i| format!("{i:03}{}", "c".repeat(197)))
            .collect();
        assert!(longest_encoding(long.iter().map(String::as_str)) > MAX_CURSOR_LEN);
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode("%%%").is_err());
        assert!(decode(&URL_SAFE_NO_PAD.encode("{\"a\":1}")).is_err());
        assert!(decode(&"A".repeat(MAX_CURSOR_LEN + 1)).is_err());
    }
}
