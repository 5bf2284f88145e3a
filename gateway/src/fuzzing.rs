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
                | Command::Publish { channel, .. } => {
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

/// SSE cursor parsing (`Last-Event-ID`, `?last_event_id=`): never panics, and what decodes
/// re-encodes to a cursor that decodes to the same positions.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(positions) = cursor::decode(text) {
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
