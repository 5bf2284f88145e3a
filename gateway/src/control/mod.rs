//! Server control of client connections across the cluster (`POST /api/disconnect`,
//! `POST /api/unsubscribe`): a command is published on the reserved channel
//! [`CONTROL_CHANNEL`] through the normal backplane publish, so it is kept in history and
//! gap-filled like any channel's publications; every node subscribes to it at start and its hub
//! hands the channel's publications to the node's [`Registry`] instead of to subscribers.

mod registry;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub(crate) use registry::{now_unix, Registry};

/// Channel names with this prefix belong to the gateway: no client or API caller may use them.
pub(crate) const RESERVED_PREFIX: &str = "$gateway:";

/// The channel that carries control commands to every node.
pub(crate) const CONTROL_CHANNEL: &str = "$gateway:control";

/// What the node's control handler asks one local connection to do. Delivered through the
/// connection's outbound queue ([`crate::queue`]), which already wakes its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// Close the connection: its user was disconnected by the server (WebSocket 4010).
    Disconnect,
    /// Leave this channel, telling the client (`reason: "server"`).
    Unsubscribe(Arc<str>),
}

/// One command on [`CONTROL_CHANNEL`]: `{"disconnect":{"user":U,"at":T}}` or
/// `{"unsubscribe":{"user":U,"channel":C}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Command {
    /// Close every connection of `user`, and refuse its tokens issued (`iat`) at or before `at`
    /// (Unix seconds) for `api.disconnect_window`.
    Disconnect { user: String, at: u64 },
    /// Make every connection of `user` leave `channel`.
    Unsubscribe { user: String, channel: String },
}

impl Command {
    /// The command's compact JSON, as published.
    pub(crate) fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec(self).expect("cannot fail").into()
    }
}

/// Whether a channel name is the gateway's own (`$gateway:…`).
pub(crate) fn is_reserved(channel: &str) -> bool {
    channel.starts_with(RESERVED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_one_json_form() {
        let disconnect = Command::Disconnect {
            user: "u".into(),
            at: 7,
        };
        assert_eq!(
            &disconnect.to_json()[..],
            br#"{"disconnect":{"user":"u","at":7}}"#
        );
        let unsubscribe = Command::Unsubscribe {
            user: "u".into(),
            channel: "c".into(),
        };
        let json = unsubscribe.to_json();
        assert_eq!(&json[..], br#"{"unsubscribe":{"user":"u","channel":"c"}}"#);
        assert_eq!(
            serde_json::from_slice::<Command>(&json).unwrap(),
            unsubscribe
        );
    }
}
