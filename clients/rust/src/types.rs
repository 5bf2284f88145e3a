//! The wire objects a client sees: publications, publish acks, history pages, positions and
//! resets, as `docs/protocol.md` defines them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One publication: `(epoch, offset, tag)` names it, even when a store lost acknowledged writes
/// and reused their offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// The channel it was published on.
    pub channel: String,
    /// Its offset: 1, 2, 3… with no gaps within an epoch.
    pub offset: u64,
    /// The epoch of the channel's history it belongs to.
    pub epoch: String,
    /// 8 lowercase hex digits, random per publication (absent only from old servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The published JSON.
    pub data: Value,
}

/// The answer to a publish: the publication is in history and reaches every current subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    /// The channel published on.
    pub channel: String,
    /// The offset the publication was stored at.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// The publication's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The publish was versioned and its version not greater than the channel's last one:
    /// nothing was stored; `offset`, `epoch` and `tag` name the channel's current top.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
}

/// A channel with subscribers somewhere in the cluster (`GET /api/channels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCount {
    /// The channel's name.
    pub channel: String,
    /// Its subscriptions over every node (WebSocket, SSE, waiting long-polls).
    pub subscribers: u64,
}

/// One member of a channel's presence: a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The connection's id, unique in the cluster.
    pub client: String,
    /// The token's `sub`; `None` for an anonymous connection.
    pub user: Option<String>,
    /// The token's `info` claim, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Who is in a channel (`GET /api/presence`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// The channel asked about.
    pub channel: String,
    /// Members (connections).
    pub count: u64,
    /// Distinct users among them.
    pub users: u64,
    /// Every member; `None` for a count-only read.
    #[serde(default)]
    pub clients: Option<Vec<Member>>,
}

/// One page of `GET /api/history`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HistoryPage {
    /// The channel read.
    pub channel: String,
    /// The channel's epoch, `""` for a channel with no publication.
    pub epoch: String,
    /// The channel's newest offset when the page was read.
    pub top: u64,
    /// Publications after `since`, oldest first.
    pub publications: Vec<Publication>,
}

/// A channel position: "I have every publication of `epoch` up to `offset`, and the one at
/// `offset` carries `tag`". Offset 0 is the start of any epoch. Serialises as the `since` of a
/// subscribe, so an application can persist it as JSON and give it back later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    /// The epoch (`""` at offset 0 of a channel never seen).
    #[serde(default)]
    pub epoch: String,
    /// The offset of the last publication had.
    pub offset: u64,
    /// The tag of the publication at `offset`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl Position {
    /// The start of a channel: every publication it has.
    pub fn start() -> Position {
        Position::default()
    }

    /// The position just after `publication`.
    pub fn of(publication: &Publication) -> Position {
        Position {
            epoch: publication.epoch.clone(),
            offset: publication.offset,
            tag: publication.tag.clone(),
        }
    }

    /// The position just after an acknowledged publish.
    pub fn of_ack(ack: &PublishAck) -> Position {
        Position {
            epoch: ack.epoch.clone(),
            offset: ack.offset,
            tag: ack.tag.clone(),
        }
    }
}

/// The stream of a channel could not be continued from the client's position: what lay between
/// is lost, and delivery goes on with the publications after `offset` of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The channel concerned.
    pub channel: String,
    /// `epoch_changed`, `history_truncated`, `history_diverged` or `offset_ahead`.
    pub reason: String,
    /// The epoch delivery continues in.
    pub epoch: String,
    /// Delivery continues with the publication after this offset.
    pub offset: u64,
}
