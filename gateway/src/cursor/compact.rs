//! The compact cursor of SSE event ids: every channel's position in about two bytes, so an
//! event's `id:` costs about what the stream's offsets do, not what its channel names and epochs
//! do.
//!
//! A stream's request names its channels and EventSource reconnects with the same URL, so the id
//! need not repeat them. It holds, in the request's channel order, each channel's offset and
//! whether the tag there is known, and for every group of [`GROUP`] channels one 32-bit check of
//! their names, epochs, offsets and tags. Epochs and tags themselves are not carried: a resume
//! recovers each channel from its offset in whatever epoch the channel has now, then compares
//! each group's check with the one computed from what the node read. A group that differs (an
//! epoch changed, the store reused an offset, or one of its channels could not be recovered) has
//! every channel that was recovered reset with `position_unverified` instead, so nothing passes
//! silently; a group whose epochs or tags changed still matches with probability 2^-32.
//!
//! Form: `~`, then base64url (no padding) of: the channel count (varint), a 32-bit fingerprint of
//! the channel list, the smallest offset (varint), `(offset - smallest) << 1 | tag known` per
//! channel (varint), one 32-bit check per group (little-endian). Offsets relative to the smallest
//! keep a long-lived ticker's seven-digit offsets to a byte or two each when its symbols tick at
//! similar rates. `~` is not a base64url character, so the full cursor form is told apart by
//! its first byte.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use xxhash_rust::xxh3::xxh3_64;

/// Channels per check: a changed channel resets at most `GROUP - 1` others with it, and each
/// channel costs `4 / GROUP` bytes of check.
pub const GROUP: usize = 4;

/// The first character of a compact cursor.
pub const PREFIX: char = '~';

/// A compact cursor sent back by a client, not yet checked against the stream's channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactCursor {
    fingerprint: u32,
    /// Per channel, in request order: the offset and whether a tag was known there.
    offsets: Vec<(u64, bool)>,
    checks: Vec<u32>,
}

impl CompactCursor {
    /// Reads a cursor that starts with [`PREFIX`].
    pub fn decode(text: &str) -> Result<Self, String> {
        let body = text
            .strip_prefix(PREFIX)
            .ok_or("a compact cursor starts with `~`")?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| format!("cursor is not base64url: {e}"))?;
        let mut reader = Reader(&bytes);
        let invalid = || "cursor does not hold positions".to_string();
        let count = reader.varint().ok_or_else(invalid)?;
        // Every channel takes at least one byte: a count beyond that is not worth allocating.
        let count = usize::try_from(count)
            .ok()
            .filter(|&n| n <= bytes.len())
            .ok_or_else(invalid)?;
        let fingerprint = reader.u32().ok_or_else(invalid)?;
        let base = reader.varint().ok_or_else(invalid)?;
        let offsets = (0..count)
            .map(|_| {
                let v = reader.varint()?;
                Some(((v >> 1).checked_add(base)?, v & 1 == 1))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid)?;
        let checks = (0..count.div_ceil(GROUP))
            .map(|_| reader.u32())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid)?;
        if !reader.0.is_empty() {
            return Err(invalid());
        }
        Ok(CompactCursor {
            fingerprint,
            offsets,
            checks,
        })
    }

    /// Each channel's offset, in request order.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.offsets.iter().map(|&(offset, _)| offset)
    }

    /// Whether the cursor was issued for a stream over exactly `channels`, in this order.
    pub fn fits(&self, channels: &[Arc<str>]) -> bool {
        self.offsets.len() == channels.len() && self.fingerprint == fingerprint(channels)
    }

    /// Which channels' positions are verified, given for each channel (in request order) the
    /// epoch it was recovered in and the tag the node read at its offset, or `None` when it was
    /// not recovered. A channel is verified when its whole group is recovered and the group's
    /// check matches. The cursor must [`fit`](Self::fits) `channels`.
    pub fn verify(
        &self,
        channels: &[Arc<str>],
        recovered: &[Option<(Arc<str>, Option<u32>)>],
    ) -> Vec<bool> {
        debug_assert!(self.fits(channels) && recovered.len() == channels.len());
        let mut scratch = Vec::new();
        let mut verified = vec![false; channels.len()];
        for (group, check) in self.checks.iter().enumerate() {
            let range = group * GROUP..((group + 1) * GROUP).min(channels.len());
            let entries: Option<Vec<_>> = range
                .clone()
                .map(|i| {
                    let (epoch, tag) = recovered[i].as_ref()?;
                    let (offset, tagged) = self.offsets[i];
                    Some((&*channels[i], &**epoch, offset, tag.filter(|_| tagged)))
                })
                .collect();
            let Some(entries) = entries else { continue };
            if group_check(&mut scratch, entries) == *check {
                verified[range].fill(true);
            }
        }
        verified
    }
}

/// A channel's position in a stream: epoch, offset, the tag there when known.
type Position = (Arc<str>, u64, Option<u32>);

/// The positions of one stream's channels and their group checks, kept up to date as positions
/// move, so writing an event's id hashes nothing and a move rehashes only its own group.
#[derive(Debug)]
pub struct StreamCursor {
    /// Exactly as long as the list: it lives as long as the stream (a parsed list keeps room
    /// to grow).
    channels: Box<[Arc<str>]>,
    positions: Box<[Position]>,
    fingerprint: u32,
    checks: Vec<u32>,
    scratch: Vec<u8>,
}

impl StreamCursor {
    /// Every channel at offset 0 until [`set`](Self::set).
    pub fn new(channels: Vec<Arc<str>>) -> Self {
        let empty: Arc<str> = Arc::from("");
        let mut cursor = StreamCursor {
            fingerprint: fingerprint(&channels),
            positions: vec![(empty, 0, None); channels.len()].into_boxed_slice(),
            checks: vec![0; channels.len().div_ceil(GROUP)],
            channels: channels.into_boxed_slice(),
            scratch: Vec::new(),
        };
        for group in 0..cursor.checks.len() {
            cursor.update_check(group);
        }
        cursor
    }

    /// The stream's channels, in request order.
    pub fn channels(&self) -> &[Arc<str>] {
        &self.channels
    }

    /// The index of `channel` in the stream.
    pub fn index(&self, channel: &str) -> Option<usize> {
        self.channels.iter().position(|c| **c == *channel)
    }

    /// Channel `i`'s offset.
    pub fn offset(&self, i: usize) -> u64 {
        self.positions[i].1
    }

    /// Moves channel `i` to `offset` of `epoch` (with the tag there when known).
    pub fn set(&mut self, i: usize, epoch: &Arc<str>, offset: u64, tag: Option<u32>) {
        let position = &mut self.positions[i];
        if !Arc::ptr_eq(&position.0, epoch) {
            position.0 = epoch.clone();
        }
        (position.1, position.2) = (offset, tag);
        self.update_check(i / GROUP);
    }

    /// Appends the cursor to `out`.
    pub fn write(&mut self, out: &mut String) {
        let bytes = &mut self.scratch;
        bytes.clear();
        put_varint(bytes, self.channels.len() as u64);
        bytes.extend_from_slice(&self.fingerprint.to_le_bytes());
        let base = self.positions.iter().map(|p| p.1).min().unwrap_or(0);
        put_varint(bytes, base);
        for &(_, offset, tag) in &self.positions {
            // Offsets come from a signed 64-bit counter (Redis INCR): the shift loses nothing.
            put_varint(bytes, (offset - base) << 1 | u64::from(tag.is_some()));
        }
        for check in &self.checks {
            bytes.extend_from_slice(&check.to_le_bytes());
        }
        out.push(PREFIX);
        URL_SAFE_NO_PAD.encode_string(&bytes[..], out);
    }

    fn update_check(&mut self, group: usize) {
        let range = group * GROUP..((group + 1) * GROUP).min(self.channels.len());
        let entries = range.map(|i| {
            let (epoch, offset, tag) = &self.positions[i];
            (&*self.channels[i], &**epoch, *offset, *tag)
        });
        self.checks[group] = group_check(&mut self.scratch, entries);
    }
}

/// The check of one group's positions `(channel, epoch, offset, tag)`.
fn group_check<'a>(
    scratch: &mut Vec<u8>,
    entries: impl IntoIterator<Item = (&'a str, &'a str, u64, Option<u32>)>,
) -> u32 {
    scratch.clear();
    for (channel, epoch, offset, tag) in entries {
        put_str(scratch, channel);
        // Offset 0 names no epoch: every epoch starts there, and a resume from it is one.
        put_str(scratch, if offset == 0 { "" } else { epoch });
        scratch.extend_from_slice(&offset.to_le_bytes());
        match tag {
            Some(tag) => {
                scratch.push(1);
                scratch.extend_from_slice(&tag.to_le_bytes());
            }
            None => scratch.push(0),
        }
    }
    xxh3_64(scratch) as u32
}

/// A 32-bit fingerprint of a channel list, in order.
fn fingerprint(channels: &[Arc<str>]) -> u32 {
    let mut bytes = Vec::new();
    for channel in channels {
        put_str(&mut bytes, channel);
    }
    xxh3_64(&bytes) as u32
}

/// A length-prefixed string, so no two lists of names hash the same bytes.
fn put_str(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// LEB128: 7 bits per byte, low first, the high bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads the binary form front to back.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only hold the top bit; anything more overflows.
            if shift == 63 && bits > 1 {
                return None;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(n: usize) -> Vec<Arc<str>> {
        (0..n)
            .map(|i| Arc::from(format!("prices:SYM{i:02}")))
            .collect()
    }

    /// A stream over `n` channels, channel i at offset 1000 + i of epoch `e{i}` with tag i.
    fn stream(n: usize) -> StreamCursor {
        let mut stream = StreamCursor::new(channels(n));
        for i in 0..n {
            stream.set(
                i,
                &Arc::from(format!("e{i}")),
                1000 + i as u64,
                Some(i as u32),
            );
        }
        stream
    }

    fn written(stream: &mut StreamCursor) -> String {
        let mut out = String::new();
        stream.write(&mut out);
        out
    }

    /// What a node reads when every channel is still where the stream left it.
    fn unchanged(n: usize) -> Vec<Option<(Arc<str>, Option<u32>)>> {
        (0..n)
            .map(|i| Some((Arc::from(format!("e{i}")), Some(i as u32))))
            .collect()
    }

    #[test]
    fn round_trips_offsets_and_verifies_unchanged_positions() {
        let mut stream = stream(10);
        let cursor = CompactCursor::decode(&written(&mut stream)).unwrap();
        assert!(cursor.fits(&channels(10)));
        assert_eq!(
            cursor.offsets().collect::<Vec<_>>(),
            (1000..1010).collect::<Vec<_>>()
        );
        assert_eq!(cursor.verify(&channels(10), &unchanged(10)), vec![true; 10]);
    }

    #[test]
    fn a_changed_epoch_or_tag_resets_its_group_only() {
        let mut stream = stream(10);
        let cursor = CompactCursor::decode(&written(&mut stream)).unwrap();
        let mut read = unchanged(10);
        read[5].as_mut().unwrap().0 = Arc::from("another epoch");
        read[9].as_mut().unwrap().1 = Some(12345);
        let expected: Vec<bool> = (0..10).map(|i| i < 4).collect();
        assert_eq!(cursor.verify(&channels(10), &read), expected);
        // A channel that was not recovered leaves its group unverifiable.
        let mut read = unchanged(10);
        read[0] = None;
        let expected: Vec<bool> = (0..10).map(|i| i >= 4).collect();
        assert_eq!(cursor.verify(&channels(10), &read), expected);
    }

    #[test]
    fn a_tag_the_stream_did_not_know_is_not_required() {
        let mut stream = StreamCursor::new(channels(2));
        stream.set(0, &Arc::from("e0"), 7, None);
        stream.set(1, &Arc::from("e1"), 0, None);
        let cursor = CompactCursor::decode(&written(&mut stream)).unwrap();
        // The node knows the tag at 7, and offset 0 is a start in any epoch.
        let read = vec![
            Some((Arc::from("e0"), Some(99))),
            Some((Arc::from("any"), None)),
        ];
        assert_eq!(cursor.verify(&channels(2), &read), vec![true, true]);
    }

    #[test]
    fn refuses_another_channel_list() {
        let mut stream = stream(3);
        let cursor = CompactCursor::decode(&written(&mut stream)).unwrap();
        let mut reordered = channels(3);
        reordered.swap(0, 1);
        assert!(!cursor.fits(&reordered));
        assert!(!cursor.fits(&channels(4)));
    }

    #[test]
    fn fifty_channels_take_a_few_bytes_each() {
        // The seed-003 stream: 50 symbols, each a few publications in.
        let mut stream = StreamCursor::new(channels(50));
        for i in 0..50 {
            stream.set(i, &Arc::from("7a2ded1609588a1d"), 2, Some(0xdead_beef));
        }
        let id = written(&mut stream);
        assert!(id.len() <= 150, "{} bytes: {id}", id.len());
        // A day into a 20-ticks-per-second ticker: seven-digit offsets, close to each other.
        for i in 0..50 {
            let offset = 1_728_000 + 37 * i as u64;
            stream.set(i, &Arc::from("7a2ded1609588a1d"), offset, Some(7));
        }
        let id = written(&mut stream);
        assert!(id.len() <= 220, "{} bytes: {id}", id.len());
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for value in [0, 1, 127, 128, 16383, 16384, u64::MAX >> 1, u64::MAX] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            let mut reader = Reader(&bytes);
            assert_eq!(reader.varint(), Some(value));
            assert!(reader.0.is_empty());
        }
        // Eleven bytes, or a tenth byte beyond the top bit, overflow.
        assert_eq!(Reader(&[0xff; 11]).varint(), None);
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert_eq!(Reader(&too_big).varint(), None);
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", "~", "~%%", "~AAAA", "~AQAAAAA", "W1tdXQ"] {
            assert!(CompactCursor::decode(text).is_err(), "{text:?}");
        }
        // A count larger than the bytes that follow.
        let mut bytes = Vec::new();
        put_varint(&mut bytes, 1 << 40);
        let text = format!("~{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert!(CompactCursor::decode(&text).is_err());
        // Trailing bytes.
        let mut stream = stream(1);
        let mut id = written(&mut stream);
        let mut raw = URL_SAFE_NO_PAD.decode(&id[1..]).unwrap();
        raw.push(0);
        id = format!("~{}", URL_SAFE_NO_PAD.encode(&raw));
        assert!(CompactCursor::decode(&id).is_err());
    }
}
