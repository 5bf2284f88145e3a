//! permessage-deflate payloads (RFC 7692 §7.2): compressing a message the server sends, once per
//! publication and window size for all subscribers, and inflating a client's message within the
//! message size limit.
//!
//! Every message is compressed on its own (`server_no_context_takeover`, see
//! [`super::extension`]), so compressing needs no per-connection state: a compressor per worker
//! thread and window size is reused (zlib's state is ~256 KiB at 15 bits, too much to allocate
//! per message). Inflate state belongs to the message being read and is dropped with it.

use std::cell::RefCell;

use backplane::Publication;
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::extension::Deflate;

/// RFC 7692 §7.2.1: the empty stored block a sync flush ends with, removed from the payload.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Output grown per step while inflating, at most.
const INFLATE_STEP: usize = 64 * 1024;
/// zlib's default level: each publication is compressed once whatever its subscriber count, so
/// the better ratio is worth more than the CPU.
const LEVEL: u32 = 6;

/// The compressed payload of a publication's wire form for this agreement, compressed by the
/// first subscriber that needs it and shared by the rest; `None` when it is sent uncompressed.
pub fn shared(publication: &Publication, deflate: &Deflate) -> Option<Bytes> {
    let json = publication.json();
    if json.len() < deflate.min_size {
        return None;
    }
    let bits = deflate.server_window_bits;
    let slot = usize::from(bits - 8);
    Some(publication.encoded(slot, |json| compress(json, bits)))
}

/// Compresses one message as a whole; `None` when it is sent uncompressed.
pub fn message(data: &[u8], deflate: &Deflate) -> Option<Bytes> {
    (data.len() >= deflate.min_size).then(|| compress(data, deflate.server_window_bits))
}

thread_local! {
    /// One compressor per window size (9..=15), made on first use and reset between messages.
    static COMPRESSORS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
}

/// A raw DEFLATE stream of `data` ending in a sync flush, its 4-byte tail removed.
pub fn compress(data: &[u8], window_bits: u8) -> Bytes {
    debug_assert!((9..=15).contains(&window_bits));
    COMPRESSORS.with(|compressors| {
        let mut compressors = compressors.borrow_mut();
        let compressor = compressors[usize::from(window_bits - 9)].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(LEVEL), false, window_bits)
        });
        compressor.reset();
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        let mut input = data;
        loop {
            let before = compressor.total_in();
            compressor
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate cannot fail on valid state");
            input = &input[(compressor.total_in() - before) as usize..];
            // Done once all input is in and the flush found room to finish.
            if input.is_empty() && out.len() < out.capacity() && out.ends_with(&TAIL) {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        out.truncate(out.len() - TAIL.len());
        Bytes::from(out)
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the message size limit (close 1009).
    TooBig,
    /// Not a valid DEFLATE stream (close 1007).
    Corrupt,
}

/// Inflates one compressed message, frame by frame.
pub struct Inflater {
    decompress: Decompress,
    /// A block with BFINAL set ended the stream; anything after it is ignored.
    ended: bool,
}

impl Inflater {
    pub fn new() -> Box<Inflater> {
        Box::new(Inflater {
            decompress: Decompress::new(false),
            ended: false,
        })
    }

    /// Inflates one frame's payload onto `out`; `last` for the message's final frame. Fails as
    /// soon as `out` would pass `limit`, having allocated at most `limit + 1` bytes for it.
    pub fn inflate(
        &mut self,
        payload: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        self.feed(payload, out, limit)?;
        if last {
            self.feed(&TAIL, out, limit)?;
        }
        Ok(())
    }

    fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        while !self.ended {
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            if out.len() == out.capacity() {
                // Doubling, but never past one byte over the limit.
                let step = out
                    .len()
                    .clamp(1024, INFLATE_STEP)
                    .min(limit + 1 - out.len());
                out.reserve_exact(step);
            }
            let (in_before, out_before) = (self.decompress.total_in(), out.len());
            let status = self
                .decompress
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (self.decompress.total_in() - in_before) as usize;
            input = &input[consumed..];
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            let room = out.len() < out.capacity();
            match status {
                Status::StreamEnd => self.ended = true,
                _ if room && input.is_empty() => return Ok(()),
                // Room to write and input left, yet no progress.
                _ if room && out.len() == out_before && consumed == 0 => {
                    return Err(InflateError::Corrupt);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        Inflater::new().inflate(compressed, true, &mut out, limit)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_window_size() {
        let text: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("{{\"n\":{}}}", i % 97).into_bytes())
            .collect();
        for bits in 9..=15 {
            let compressed = compress(&text, bits);
            assert!(!compressed.ends_with(&TAIL));
            assert!(compressed.len() < text.len() / 4, "bits {bits}");
            assert_eq!(inflate_all(&compressed, text.len()).unwrap(), text);
        }
        assert_eq!(inflate_all(&compress(b"", 15), 0).unwrap(), b"");
    }

    #[test]
    fn inflates_across_frames_split_anywhere() {
        let text = b"hello hello hello hello, permessage-deflate".repeat(100);
        let compressed = compress(&text, 15);
        for cut in [0, 1, compressed.len() / 2, compressed.len()] {
            let mut inflater = Inflater::new();
            let mut out = Vec::new();
            inflater
                .inflate(&compressed[..cut], false, &mut out, text.len())
                .unwrap();
            inflater
                .inflate(&compressed[cut..], true, &mut out, text.len())
                .unwrap();
            assert_eq!(out, text);
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit_without_allocating_it() {
        let bomb = compress(&vec![0u8; 10 << 20], 15);
        assert!(bomb.len() < 20_000);
        let mut out = Vec::new();
        let result = Inflater::new().inflate(&bomb, true, &mut out, 64 * 1024);
        assert_eq!(result, Err(InflateError::TooBig));
        assert!(out.capacity() <= 64 * 1024 + 1, "{}", out.capacity());
        assert_eq!(inflate_all(&bomb, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(
            inflate_all(&[0xff, 0xff, 0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn a_publication_is_compressed_once_for_all_subscribers() {
        let publication = Publication::new("c".into(), 1, "e".into(), 0, &[b'1'; 600]);
        let deflate = Deflate {
            server_window_bits: 15,
            min_size: 256,
        };
        let first = shared(&publication, &deflate).unwrap();
        let again = shared(&publication, &deflate).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "the same bytes, not a copy");
        let narrow = Deflate {
            server_window_bits: 9,
            ..deflate
        };
        let other = shared(&publication, &narrow).unwrap();
        assert_ne!(first.as_ptr(), other.as_ptr(), "one per window size");
        assert_eq!(
            inflate_all(&other, 10_000).unwrap(),
            publication.json().to_vec()
        );
        let small = Publication::new("c".into(), 1, "e".into(), 0, b"1");
        assert_eq!(shared(&small, &deflate), None);
    }
}
