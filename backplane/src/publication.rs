//! A publication and its one wire form, built once and shared by every subscriber and transport;
//! and its delta form (a merge patch against the channel's previous publication), also built at
//! most once and shared by every subscriber that asked for deltas.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What a fanned-out item is. Presence events travel the channel's publication path so they
/// keep their place among its publications, but they are not in history and have no offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A publication, in history at `offset`.
    Publication,
    /// A member joined: `{"channel":C,"join":M}`. It follows the publication at `offset` of
    /// `epoch` (offset 0: before the channel's first publication, epoch `""` if it has none).
    Join,
    /// A member left: `{"channel":C,"leave":M}`, placed like a join.
    Leave,
}

/// A message in a channel's history: `{"channel":C,"offset":N,"epoch":E,"tag":T,"data":D}`,
/// or a presence event placed after a publication ([`Kind`]).
#[derive(Debug, Clone)]
pub struct Publication {
    pub kind: Kind,
    pub channel: Arc<str>,
    /// The publication's offset; for a presence event, the offset it follows.
    pub offset: u64,
    pub epoch: Arc<str>,
    /// When the publish was accepted, microseconds since the Unix epoch (0 if unknown).
    pub published_us: u64,
    /// Random per publication, so that (epoch, offset, tag) names one publication even after a
    /// store rollback reused the offset (0 for entries written before tags existed). On the wire
    /// as 8 lowercase hex digits ([`format_tag`]).
    pub tag: u32,
    /// Publications of the channel right before this one that a conflating connection queue
    /// dropped (0 but for a publication taken from such a queue); not part of the JSON text.
    pub skipped: u64,
    json: Bytes,
    data: Range<usize>,
    /// Forms of `json` a transport derives, each made on first use and then shared like `json`
    /// (WebSocket permessage-deflate: one per window size). Unallocated until one is asked for.
    encoded: OnceLock<Box<[OnceLock<Bytes>; ENCODED_SLOTS]>>,
    /// The channel's previous publication as the node saw it, set by the node's fan-out.
    previous: OnceLock<Previous>,
    /// The delta form, made on first use from `previous` (`None`: no smaller form).
    delta: OnceLock<Option<Arc<Publication>>>,
}

/// What the delta form needs of the previous publication: its tag, to check the subscriber
/// holds that very publication, and its `data` (a slice of its JSON text, not the publication:
/// no chain of publications is kept alive).
#[derive(Debug, Clone)]
struct Previous {
    tag: u32,
    data: Bytes,
}

/// How many derived forms a publication can hold ([`Publication::encoded`]).
pub const ENCODED_SLOTS: usize = 8;

impl Publication {
    /// Builds the publication and its JSON text, the one serialisation every subscriber shares;
    /// `data` must be compact JSON.
    pub fn new(channel: Arc<str>, offset: u64, epoch: Arc<str>, tag: u32, data: &[u8]) -> Self {
        let mut json = Vec::with_capacity(data.len() + channel.len() + epoch.len() + 64);
        json.extend_from_slice(b"{\"channel\":");
        serde_json::to_writer(&mut json, &*channel).expect("writing to a Vec cannot fail");
        json.extend_from_slice(b",\"offset\":");
        json.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        json.extend_from_slice(b",\"epoch\":");
        serde_json::to_writer(&mut json, &*epoch).expect("writing to a Vec cannot fail");
        json.extend_from_slice(b",\"tag\":\"");
        json.extend_from_slice(format_tag(tag).as_bytes());
        json.extend_from_slice(b"\",\"data\":");
        let start = json.len();
        json.extend_from_slice(data);
        let data = start..json.len();
        json.push(b'}');
        Publication {
            kind: Kind::Publication,
            channel,
            offset,
            epoch,
            published_us: 0,
            tag,
            skipped: 0,
            json: Bytes::from(json),
            data,
            encoded: OnceLock::new(),
            previous: OnceLock::new(),
            delta: OnceLock::new(),
        }
    }

    /// A presence event ([`Kind::Join`] or [`Kind::Leave`]) for `member` (a [`crate::Member`]'s
    /// compact JSON), following the publication at `after` of `epoch`.
    pub fn presence_event(
        kind: Kind,
        channel: Arc<str>,
        epoch: Arc<str>,
        after: u64,
        member: &[u8],
    ) -> Self {
        let name: &[u8] = match kind {
            Kind::Join => b"join",
            Kind::Leave => b"leave",
            Kind::Publication => panic!("a publication is built by Publication::new"),
        };
        let mut json = Vec::with_capacity(member.len() + channel.len() + 24);
        json.extend_from_slice(b"{\"channel\":");
        serde_json::to_writer(&mut json, &*channel).expect("writing to a Vec cannot fail");
        json.extend_from_slice(b",\"");
        json.extend_from_slice(name);
        json.extend_from_slice(b"\":");
        let start = json.len();
        json.extend_from_slice(member);
        let data = start..json.len();
        json.push(b'}');
        Publication {
            kind,
            channel,
            offset: after,
            epoch,
            published_us: 0,
            tag: 0,
            skipped: 0,
            json: Bytes::from(json),
            data,
            encoded: OnceLock::new(),
            previous: OnceLock::new(),
            delta: OnceLock::new(),
        }
    }

    /// Whether this is a publication (not a presence event).
    pub fn is_publication(&self) -> bool {
        self.kind == Kind::Publication
    }

    /// Records when the publish was accepted (microseconds since the Unix epoch).
    pub fn published_at(mut self, published_us: u64) -> Self {
        self.published_us = published_us;
        self
    }

    /// The publication as one compact JSON object, the bytes every transport sends.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The derived form in `slot` (below [`ENCODED_SLOTS`]), made from the JSON text by `make` the
    /// first time it is asked for; later callers, on any thread, get the same bytes.
    pub fn encoded(&self, slot: usize, make: impl FnOnce(&[u8]) -> Bytes) -> Bytes {
        let slots = self.encoded.get_or_init(Default::default);
        slots[slot].get_or_init(|| make(&self.json)).clone()
    }

    /// The `data` member's compact JSON text (a presence event's member).
    pub fn data(&self) -> &[u8] {
        &self.json[self.data.clone()]
    }

    /// Records `previous` as the channel's publication before this one, when it is (same
    /// epoch, the offset before), so a delta form can be made. The node's fan-out calls it for
    /// every publication of a channel, in order; the first call wins.
    pub fn follows(&self, previous: &Publication) -> bool {
        let adjacent = self.is_publication()
            && previous.is_publication()
            && previous.epoch == self.epoch
            && previous.offset.checked_add(1) == Some(self.offset);
        if adjacent {
            let _ = self.previous.set(Previous {
                tag: previous.tag,
                data: previous.json.slice(previous.data.clone()),
            });
        }
        adjacent
    }

    /// The delta form for a subscriber whose last publication of the channel has `held_tag`
    /// at the offset before this one: `{"channel","offset","epoch","tag","delta":<merge patch>}`,
    /// made once and shared. `None` when the previous publication is not known here, is not the
    /// one the subscriber holds, or the delta form is not smaller (see [`crate::merge_patch`]).
    pub fn delta_for(&self, held_tag: Option<u32>) -> Option<Arc<Publication>> {
        let previous = self.previous.get()?;
        if held_tag != Some(previous.tag) {
            return None;
        }
        self.delta
            .get_or_init(|| self.make_delta(&previous.data))
            .clone()
    }

    fn make_delta(&self, previous: &[u8]) -> Option<Arc<Publication>> {
        let old: serde_json::Value = serde_json::from_slice(previous).ok()?;
        let new: serde_json::Value = serde_json::from_slice(self.data()).ok()?;
        let patch = serde_json::to_vec(&crate::merge_patch::diff(&old, &new)?).ok()?;
        let mut form = Publication::new(
            self.channel.clone(),
            self.offset,
            self.epoch.clone(),
            self.tag,
            &patch,
        )
        .published_at(self.published_us);
        // The same layout with `"delta":` for `"data":`, one byte longer.
        let json = std::mem::take(&mut form.json);
        let start = form.data.start;
        let mut text = Vec::with_capacity(json.len() + 1);
        text.extend_from_slice(&json[..start - b"\"data\":".len()]);
        text.extend_from_slice(b"\"delta\":");
        text.extend_from_slice(&json[start..]);
        form.data = start + 1..form.data.end + 1;
        form.json = Bytes::from(text);
        (form.json.len() < self.json.len()).then(|| Arc::new(form))
    }

    /// This publication as taken from a conflating queue after `skipped` of its channel's
    /// publications right before it were dropped (see [`Publication::skipped_form`]).
    pub fn after_skipping(&self, skipped: u64) -> Publication {
        let mut taken = self.clone();
        taken.skipped = skipped;
        taken
    }

    /// The wire form that tells a subscriber the `skipped` publications before this one will not
    /// come: `{"channel","offset","epoch","tag","skipped":N,"data"}`.
    pub fn skipped_form(&self, skipped: u64) -> Publication {
        let key: &[u8] = if self.is_delta() {
            b"\"delta\":"
        } else {
            b"\"data\":"
        };
        let start = self.data.start - key.len();
        let mut text = Vec::with_capacity(self.json.len() + 32);
        text.extend_from_slice(&self.json[..start]);
        text.extend_from_slice(b"\"skipped\":");
        text.extend_from_slice(itoa::Buffer::new().format(skipped).as_bytes());
        text.push(b',');
        let shift = text.len() - start;
        text.extend_from_slice(&self.json[start..]);
        Publication {
            json: Bytes::from(text),
            data: self.data.start + shift..self.data.end + shift,
            skipped,
            encoded: OnceLock::new(),
            previous: OnceLock::new(),
            delta: OnceLock::new(),
            ..self.clone()
        }
    }

    /// Whether this is a delta form ([`Publication::delta_for`]): its `data` is a merge patch.
    pub fn is_delta(&self) -> bool {
        self.json[..self.data.start].ends_with(b"\"delta\":")
    }
}

/// What a successful publish returns: where the publication landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    pub channel: Arc<str>,
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The publication's tag ([`Publication::tag`]), as 8 hex digits on the wire.
    #[serde(with = "tag_text")]
    pub tag: u32,
    /// The publish carried a version not greater than the channel's last one: nothing was
    /// stored, and `offset`/`epoch`/`tag` name the channel's current top. On the wire only when
    /// true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
}

/// Serde form of a tag: 8 lowercase hex digits.
mod tag_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tag: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_tag(*tag))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_tag(&text).ok_or_else(|| D::Error::custom("a tag is 8 lowercase hex digits"))
    }
}

/// Serde form of an optional tag: absent, or 8 lowercase hex digits.
mod optional_tag_text {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tag: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match tag {
            Some(tag) => super::tag_text::serialize(tag, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        super::tag_text::deserialize(d).map(Some)
    }
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

/// A position in a channel's stream: every publication up to `offset` of `epoch` was seen, the
/// one at `offset` carrying `tag` when the holder knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
    /// The tag of the publication at `offset`; without it a rollback that reused the offset
    /// under the same epoch cannot be told apart.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_tag_text"
    )]
    pub tag: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_valid_json_with_escaped_names() {
        let p = Publication::new(
            "chat:\"x\"".into(),
            7,
            "e1".into(),
            0xc0ffee,
            b"{\"a\":[1,2]}",
        );
        let v: serde_json::Value = serde_json::from_slice(p.json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel": "chat:\"x\"", "offset": 7, "epoch": "e1", "tag": "00c0ffee", "data": {"a": [1, 2]}})
        );
        assert_eq!(p.data(), b"{\"a\":[1,2]}");
    }

    #[test]
    fn delta_form_is_a_shared_merge_patch_against_the_held_previous() {
        let quote =
            |bid: u32| format!("{{\"sym\":\"ACME\",\"bid\":{bid},\"ask\":101,\"volume\":5000}}");
        let first = Publication::new("c".into(), 1, "e".into(), 10, quote(100).as_bytes());
        let second = Publication::new("c".into(), 2, "e".into(), 20, quote(99).as_bytes());
        assert!(
            second.delta_for(Some(10)).is_none(),
            "no previous known yet"
        );
        assert!(second.follows(&first));
        let delta = second.delta_for(Some(10)).expect("smaller");
        assert!(
            Arc::ptr_eq(&delta, &second.delta_for(Some(10)).unwrap()),
            "made once"
        );
        assert!(delta.is_delta() && !second.is_delta());
        let v: serde_json::Value = serde_json::from_slice(delta.json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel": "c", "offset": 2, "epoch": "e", "tag": "00000014", "delta": {"bid": 99}})
        );
        assert_eq!(delta.data(), b"{\"bid\":99}");
        assert!(
            second.delta_for(Some(11)).is_none(),
            "another publication at offset 1"
        );
        assert!(second.delta_for(None).is_none());

        let other_epoch = Publication::new("c".into(), 3, "f".into(), 30, quote(98).as_bytes());
        assert!(!other_epoch.follows(&second), "a new epoch starts over");
        let gap = Publication::new("c".into(), 4, "e".into(), 40, quote(98).as_bytes());
        assert!(!gap.follows(&second), "so does a gap");
        let whole = Publication::new("c".into(), 3, "e".into(), 30, b"{\"other\":[1,2,3]}");
        assert!(whole.follows(&second));
        assert!(whole.delta_for(Some(20)).is_none(), "not smaller: full");
    }

    #[test]
    fn tag_is_eight_lowercase_hex_digits() {
        assert_eq!(format_tag(0xab), "000000ab");
        assert_eq!(format_tag(u32::MAX), "ffffffff");
        assert_eq!(parse_tag("00c0ffee"), Some(0xc0ffee));
        assert_eq!(parse_tag("c0ffee"), None);
        assert_eq!(parse_tag("00C0FFEE"), None);
        assert_eq!(parse_tag("+0c0ffee"), None);
        let p = Publication::new("c".into(), 1, "e".into(), 7, b"1");
        assert_eq!(p.tag, 7);
    }

    #[test]
    fn ack_and_position_carry_the_tag_as_hex() {
        let ack = PublishAck {
            channel: "c".into(),
            offset: 3,
            epoch: "e".into(),
            tag: 0xab,
            suppressed: false,
        };
        assert_eq!(
            serde_json::to_value(&ack).unwrap(),
            serde_json::json!({"channel": "c", "offset": 3, "epoch": "e", "tag": "000000ab"})
        );
        let with: Position =
            serde_json::from_str(r#"{"epoch":"e","offset":3,"tag":"000000ab"}"#).unwrap();
        assert_eq!(with.tag, Some(0xab));
        let without: Position = serde_json::from_str(r#"{"epoch":"e","offset":3}"#).unwrap();
        assert_eq!(without.tag, None);
        assert!(
            serde_json::from_str::<Position>(r#"{"epoch":"e","offset":3,"tag":"AB"}"#).is_err()
        );
    }
}
