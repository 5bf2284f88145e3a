//! A publication and its one wire form, built once and shared by every subscriber and transport.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A message in a channel's history: `{"channel":C,"offset":N,"epoch":E,"data":D}`.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: Arc<str>,
    pub offset: u64,
    pub epoch: Arc<str>,
    /// When the publish was accepted, microseconds since the Unix epoch (0 if unknown).
    pub published_us: u64,
    /// Random per publication, so that (epoch, offset, tag) names one publication even after a
    /// store rollback reused the offset (0 for entries written before tags existed). Not in the
    /// wire form yet.
    pub tag: u32,
    json: Bytes,
    data: Range<usize>,
}

impl Publication {
    /// Builds the publication and its JSON text; `data` must be compact JSON.
    pub fn new(channel: Arc<str>, offset: u64, epoch: Arc<str>, data: &[u8]) -> Self {
        let mut json = Vec::with_capacity(data.len() + channel.len() + epoch.len() + 48);
        json.extend_from_slice(b"{\"channel\":");
        serde_json::to_writer(&mut json, &*channel).expect("writing to a Vec cannot fail");
        json.extend_from_slice(b",\"offset\":");
        json.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        json.extend_from_slice(b",\"epoch\":");
        serde_json::to_writer(&mut json, &*epoch).expect("writing to a Vec cannot fail");
        json.extend_from_slice(b",\"data\":");
        let start = json.len();
        json.extend_from_slice(data);
        let data = start..json.len();
        json.push(b'}');
        Publication {
            channel,
            offset,
            epoch,
            published_us: 0,
            tag: 0,
            json: Bytes::from(json),
            data,
        }
    }

    /// Records when the publish was accepted (microseconds since the Unix epoch).
    pub fn published_at(mut self, published_us: u64) -> Self {
        self.published_us = published_us;
        self
    }

    /// Sets the publication's tag.
    pub fn tagged(mut self, tag: u32) -> Self {
        self.tag = tag;
        self
    }

    /// The publication as one compact JSON object, the bytes every transport sends.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The `data` member's compact JSON text.
    pub fn data(&self) -> &[u8] {
        &self.json[self.data.clone()]
    }
}

/// What a successful publish returns: where the publication landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    pub channel: Arc<str>,
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The publication's tag ([`Publication::tag`]); not in the wire form yet.
    #[serde(skip)]
    pub tag: u32,
}

/// A tag as shown: 8 lowercase hex digits.
pub fn format_tag(tag: u32) -> String {
    format!("{tag:08x}")
}

/// Reads a tag written by [`format_tag`].
pub fn parse_tag(text: &str) -> Option<u32> {
    let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if text.len() != 8 || !text.as_bytes().iter().all(lower_hex) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

/// A position in a channel's stream: every publication up to `offset` of `epoch` was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_valid_json_with_escaped_names() {
        let p = Publication::new("chat:\"x\"".into(), 7, "e1".into(), b"{\"a\":[1,2]}");
        let v: serde_json::Value = serde_json::from_slice(p.json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel": "chat:\"x\"", "offset": 7, "epoch": "e1", "data": {"a": [1, 2]}})
        );
        assert_eq!(p.data(), b"{\"a\":[1,2]}");
    }

    #[test]
    fn tag_is_eight_lowercase_hex_digits_and_not_on_the_wire() {
        assert_eq!(format_tag(0xab), "000000ab");
        assert_eq!(format_tag(u32::MAX), "ffffffff");
        assert_eq!(parse_tag("00c0ffee"), Some(0xc0ffee));
        assert_eq!(parse_tag("c0ffee"), None);
        assert_eq!(parse_tag("00C0FFEE"), None);
        assert_eq!(parse_tag("+0c0ffee"), None);
        let p = Publication::new("c".into(), 1, "e".into(), b"1").tagged(7);
        assert_eq!(p.tag, 7);
        assert!(!std::str::from_utf8(p.json()).unwrap().contains("tag"));
    }
}
