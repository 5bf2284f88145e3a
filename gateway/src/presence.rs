//! Presence as clients and the server API see it: the member a connection is in the channels it
//! subscribes to, and the answer to "who is in this channel" —
//! `{"channel":C,"count":N,"users":U,"clients":[{"client":…,"user":…}]}` — the same over the
//! WebSocket `presence` command, `GET /presence` and `GET /api/presence`.

use std::sync::Arc;

use backplane::Member;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::hub::ConnId;
use crate::node::Node;
use crate::protocol::{backplane_error, error_code, ErrorBody};

/// Who a connection is, as its presence entries show it.
#[derive(Debug)]
pub(crate) struct Who {
    pub(crate) user: Arc<str>,
    pub(crate) info: Option<Arc<RawValue>>,
}

/// The member connection `conn` of this node is.
pub(crate) fn member(node: &Node, conn: ConnId, who: Option<&Who>) -> Member {
    Member {
        client: node.client_id(conn),
        user: who.map(|w| w.user.to_string()),
        info: who
            .and_then(|w| w.info.as_ref())
            .and_then(|info| RawValue::from_string(info.get().to_owned()).ok()),
    }
}

/// What presence the channel's namespace keeps: `(presence, join_leave)`.
pub(crate) fn settings(node: &Node, channel: &str) -> (bool, bool) {
    let namespace = node.policy().namespaces.get(channel);
    (
        namespace.presence,
        namespace.presence && namespace.join_leave,
    )
}

/// A channel's presence as answered.
#[derive(Debug, Serialize)]
pub(crate) struct Answer {
    channel: String,
    count: u64,
    users: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    clients: Option<Vec<Member>>,
}

impl Answer {
    pub(crate) fn to_json(&self) -> Bytes {
        serde_json::to_vec(self).expect("cannot fail").into()
    }
}

/// Reads the channel's presence across the cluster (without `clients` when `count_only`). The
/// caller has checked that it may see the channel.
pub(crate) async fn read(
    node: &Node,
    channel: &str,
    count_only: bool,
) -> Result<Answer, ErrorBody> {
    if !settings(node, channel).0 {
        return Err(ErrorBody::new(
            error_code::PRESENCE_NOT_ENABLED,
            format!("the namespace of {channel} keeps no presence"),
        ));
    }
    let presence = node
        .backplane()
        .presence(channel, !count_only)
        .await
        .map_err(|e| backplane_error(&e))?;
    Ok(Answer {
        channel: channel.to_string(),
        count: presence.count,
        users: presence.users,
        clients: presence.members,
    })
}
