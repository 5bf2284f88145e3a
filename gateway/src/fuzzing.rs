//! Entry points shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with cargo-fuzz) and the
//! corpus replay test (`tests/fuzz_corpus.rs`, run by `make test`). Each one feeds arbitrary bytes
//! to an input parser the outside world reaches and checks the properties that must hold for any
//! input; a panic is a finding.

use crate::config::Config;
use crate::cursor;
use crate::protocol::{reply_err, Command};

/// Client command parsing (`/ws` text messages): never panics; an error always carries a known
/// code and serialises to a JSON reply; a parsed command's channel obeys the channel rule.
pub fn command(data: &[u8]) {
    match Command::parse(data) {
        Ok(command) => {
            match &command {
                Command::Subscribe { channel, .. }
                | Command::Unsubscribe { channel, .. }
                | Command::Publish { channel, .. }
                | Command::Presence { channel, .. } => {
                    assert!(crate::protocol::check_channel(channel).is_ok());
                }
                Command::Connect { token, .. } | Command::Refresh { token, .. } => {
                    assert!(!token.is_empty());
                }
                Command::Ping { .. } => {}
            }
            if let Command::Publish { data, .. } = &command {
                let compact = backplane::json::compact(data.get());
                serde_json::from_slice::<serde_json::Value>(&compact)
                    .expect("compacted data is JSON");
            }
        }
        Err(e) => {
            assert!(matches!(
                e.error.code,
                "malformed_json" | "bad_request" | "unknown_op" | "invalid_channel"
            ));
            let reply = reply_err(e.id, &e.error);
            serde_json::from_slice::<serde_json::Value>(&reply).expect("replies are JSON");
        }
    }
}

/// Cursor parsing (`Last-Event-ID`, `?last_event_id=`, a poll's `cursor`), both forms: never
/// panics; a full cursor re-encodes to one that decodes to the same positions, and a compact one
/// checks against any channel list without panicking.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cursor::decode_any(text) {
        Ok(cursor::Cursor::Positions(positions)) => {
            let again = cursor::encode_tagged(
                positions
                    .iter()
                    .map(|e| (e.channel.as_str(), e.epoch.as_str(), e.offset, e.tag)),
            );
            assert_eq!(
                cursor::decode(&again).expect("re-encoded cursor"),
                positions
            );
        }
        Ok(cursor::Cursor::Compact(compact)) => {
            let channels: Vec<std::sync::Arc<str>> = compact
                .offsets()
                .enumerate()
                .map(|(i, _)| i.to_string().into())
                .collect();
            if compact.fits(&channels) {
                let recovered = vec![Some((std::sync::Arc::from("e"), None)); channels.len()];
                compact.verify(&channels, &recovered);
            }
        }
        Err(_) => {}
    }
}

/// Configuration parsing and validation (the TOML file): never panics; an accepted configuration
/// validates again and resolves every channel to a namespace.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        config
            .validate()
            .expect("an accepted configuration validates");
        let _ = crate::security::namespace::Namespaces::new(&config.channels).get("chat:room1");
    }
}

/// The WebSocket read side (`/ws` bytes after the upgrade): the first byte picks the limits
/// (whether permessage-deflate was negotiated, a small or large size limit), the rest is the
/// stream. Never panics; every frame read obeys RFC 6455's single-frame rules (masked, known
/// opcode, no RSV bit but RSV1 on a data frame with deflate, control frames whole and ≤ 125
/// bytes, within the limit); reassembling them never yields a message over the limit or text
/// that is not UTF-8, however far a compressed message would inflate.
pub fn frame_reader(data: &[u8]) {
    use crate::transport::ws::frame::OpCode;
    use crate::transport::ws::frame_reader::{parse_all, ReadLimits};
    use crate::transport::ws::message::{Assembler, Message};

    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let max_payload = if knobs & 2 == 0 { 256 } else { 1 << 16 };
    let limits = ReadLimits {
        max_payload,
        rsv1_allowed: knobs & 1 == 1,
    };
    let (frames, _error) = parse_all(stream, limits);
    let mut assembler = Assembler::new(max_payload);
    for frame in frames {
        assert!(frame.payload.len() <= max_payload);
        assert!(!frame.compressed || limits.rsv1_allowed);
        if frame.opcode.is_control() {
            assert!(frame.fin && frame.payload.len() <= 125 && !frame.compressed);
            continue;
        }
        assert!(!frame.compressed || frame.opcode != OpCode::Continuation);
        match assembler.push(frame) {
            Ok(Some(Message::Text(text))) => {
                assert!(text.len() <= max_payload);
                std::str::from_utf8(&text).expect("a text message is UTF-8");
            }
            Ok(Some(Message::Binary(binary))) => assert!(binary.len() <= max_payload),
            Ok(None) => {}
            Err(_) => return,
        }
    }
}
