//! permessage-deflate negotiation (RFC 7692 §5, §7.1): reads the client's offers from
//! `Sec-WebSocket-Extensions` and picks the first one this server can honour.
//!
//! What the server always answers, whatever was offered:
//! - `server_no_context_takeover`: every message the server sends is compressed on its own, so a
//!   publication compresses to the same bytes for every subscriber and is compressed once
//!   ([`super::deflate::shared`]); a connection keeps no compressor.
//! - `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets a server ask for it even when the
//!   client did not offer it): clients send short commands, for which a shared window gains
//!   little, while keeping one would cost every connection an inflate window for its whole life.
//!   With it, inflate state lives only while a compressed message is being read.
//!
//! `server_max_window_bits=N` is honoured for N in 9..=15 (echoed in the answer); N = 8 makes the
//! offer unacceptable, as zlib cannot produce a raw DEFLATE stream with a 256-byte window.
//! `client_max_window_bits` needs no answer: the server inflates with a 32 KiB window, which
//! reads any smaller one. An offer with an unknown, repeated or malformed parameter is declined,
//! and the next offer is tried (§5.1).

use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};

use crate::config::{Compression, WebSocketConfig};

/// What a connection agreed on: every message is compressed on its own in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The LZ77 window of messages the server sends, 9..=15.
    pub server_window_bits: u8,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: usize,
}

/// The permessage-deflate agreement for this upgrade request and the `Sec-WebSocket-Extensions`
/// value to answer with, or `None` (no offer could be honoured, or compression is off). Used by
/// every WebSocket upgrade path (HTTP/1.1 and HTTP/2).
pub fn negotiate(headers: &HeaderMap, config: &WebSocketConfig) -> Option<(Deflate, HeaderValue)> {
    if config.compression == Compression::Off {
        return None;
    }
    let offers = headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_outside_quotes::<b','>);
    for offer in offers {
        if let Some(server_bits) = accept_offer(offer) {
            let mut answer = String::from(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            );
            if let Some(bits) = server_bits {
                answer.push_str(&format!("; server_max_window_bits={bits}"));
            }
            let deflate = Deflate {
                server_window_bits: server_bits.unwrap_or(15),
                min_size: config.compression_min_size,
            };
            let value = HeaderValue::from_str(&answer).expect("ASCII");
            return Some((deflate, value));
        }
    }
    None
}

/// `Some(server_max_window_bits asked for)` when this offer is a permessage-deflate offer the
/// server can honour.
fn accept_offer(offer: &str) -> Option<Option<u8>> {
    let mut parts = split_outside_quotes::<b';'>(offer);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                let bits = window_bits(value?)?;
                if bits < 9 {
                    return None;
                }
                server_bits = Some(bits);
                2
            }
            "client_max_window_bits" => {
                if let Some(value) = value {
                    window_bits(value)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    Some(server_bits)
}

/// RFC 7692 §7.1.2: a window size is a decimal 8..=15 without leading zeros.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|inner| !inner.contains('"')),
        None => Some(value),
    }
}

/// Splits on `SEP` outside double quotes, trimming whitespace and skipping empty elements.
fn split_outside_quotes<const SEP: u8>(text: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' {
            quoted = !quoted;
        } else if b == SEP && !quoted {
            pieces.push(&text[start..i]);
            start = i + 1;
        }
    }
    pieces.push(&text[start..]);
    pieces
        .into_iter()
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(offers: &[&str]) -> Option<(u8, String)> {
        let mut headers = HeaderMap::new();
        for offer in offers {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(offer).unwrap(),
            );
        }
        let config = WebSocketConfig::default();
        negotiate(&headers, &config)
            .map(|(d, v)| (d.server_window_bits, v.to_str().unwrap().to_owned()))
    }

    const BASE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn accepts_the_browser_offer() {
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]),
            Some((15, BASE.into()))
        );
        assert_eq!(answer(&["permessage-deflate"]), Some((15, BASE.into())));
    }

    #[test]
    fn honours_server_window_bits_and_picks_the_first_acceptable_offer() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10; client_no_context_takeover"]),
            Some((10, format!("{BASE}; server_max_window_bits=10")))
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=\"12\""]),
            Some((12, format!("{BASE}; server_max_window_bits=12")))
        );
        // 8 cannot be honoured, a typo is declined: the next offer is taken.
        assert_eq!(
            answer(&[
                "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_windowbits=9",
                "x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"
            ]),
            Some((15, BASE.into()))
        );
    }

    #[test]
    fn declines_malformed_offers() {
        for offer in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(answer(&[offer]), None, "{offer}");
        }
        assert_eq!(answer(&[]), None);
    }

    #[test]
    fn compression_off_never_negotiates() {
        let mut headers = HeaderMap::new();
        headers.insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        let config = WebSocketConfig {
            compression: Compression::Off,
            ..WebSocketConfig::default()
        };
        assert!(negotiate(&headers, &config).is_none());
    }
}
