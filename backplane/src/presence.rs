//! Presence: which connections are members of a channel, cluster-wide, and the join and leave
//! events that ride a channel's publication path. Also the node-level reports the server API
//! reads: which channels have subscribers anywhere in the cluster.
//!
//! A member is one connection subscribed to a channel whose namespace has presence on. Members
//! are owned by the node holding the connection: it adds and removes them in order (one writer
//! per node), refreshes them in batches, and when a node dies without leaving, the surviving
//! nodes remove its members and announce each leave once.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One member of a channel's presence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    /// The connection's id, unique in the cluster.
    pub client: String,
    /// The token's `sub`, `None` for an anonymous connection.
    pub user: Option<String>,
    /// The token's `info` claim, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

impl PartialEq for Member {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client
            && self.user == other.user
            && self.info.as_ref().map(|i| i.get()) == other.info.as_ref().map(|i| i.get())
    }
}

impl Eq for Member {}

impl Member {
    /// The member as compact JSON, `{"client":..,"user":..}` plus `"info"` when present: the
    /// form a join or leave event carries ([`crate::Publication::presence_event`]).
    pub(crate) fn to_json(&self) -> Bytes {
        let text = serde_json::to_string(self).expect("a member serialises");
        // `info` is kept as the token gave it, whitespace and all.
        crate::json::compact(&text)
    }
}

/// A channel's presence as read at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// How many members (connections).
    pub count: u64,
    /// How many distinct users among them (anonymous members count as none).
    pub users: u64,
    /// Every member, when asked for (`None` for a count-only read).
    pub members: Option<Vec<Member>>,
}

/// How many local subscribers one channel has on this node, for the cluster-wide channel list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCount {
    pub channel: String,
    pub subscribers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_json_is_compact_with_info_only_when_present() {
        let anonymous = Member {
            client: "c1".into(),
            user: None,
            info: None,
        };
        assert_eq!(&anonymous.to_json()[..], br#"{"client":"c1","user":null}"#);
        let named = Member {
            client: "c2".into(),
            user: Some("u".into()),
            info: Some(RawValue::from_string("{ \"a\" : [1, 2] }".into()).unwrap()),
        };
        assert_eq!(
            &named.to_json()[..],
            br#"{"client":"c2","user":"u","info":{"a":[1,2]}}"#
        );
    }
}
