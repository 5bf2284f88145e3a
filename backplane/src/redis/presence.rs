//! Presence on Redis: the backplane's handle on its presence tasks, the member encoding and the
//! presence read. The writer that applies this node's changes is [`super::presence_writer`]; the
//! heartbeat, the reaping of dead nodes and the channel reports are [`super::registry`]; the key
//! layout is in [`super::keys`].
//!
//! - One writer per node: joins and leaves go through an unbounded queue to one task that sends
//!   whatever is queued as one batch, per channel one script call (`presence_apply.lua`) carrying
//!   that channel's changes in order. The script announces each join and leave on the channel's
//!   pub/sub channel, placed after the channel's top offset read in the same step, so the events
//!   keep their place among the channel's publications (the pub/sub link holds them in order,
//!   see [`super::channel_state`]).
//! - The writer re-asserts the node's members every `presence_ttl / 3`, one script call per
//!   channel and 1,000 members, through the same queue order, so a refresh never re-adds a member
//!   that left. The keys carry a backstop expiry of three TTLs for when every node is gone.
//! - No ghosts: every node heartbeats into the registry every `presence_ttl / 6`; one whose
//!   heartbeat is older than `presence_ttl / 2` is dead, and any survivor reaps it channel by
//!   channel (`presence_reap.lua` reads and deletes its members in one step, so each leave is
//!   announced once however many survivors reap at once).
//! - Events are at most once: a node that re-reads a channel from history (its held messages
//!   overflowed, or pub/sub reconnected) drops the events it held; history does not have them.

use std::sync::{Arc, LazyLock};

use redis::Script;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use super::Shared;
use crate::{BackplaneError, Member, Presence};

pub(crate) static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("presence_event.lua"),
        include_str!("presence_apply.lua")
    ))
});
pub(crate) static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("presence_event.lua"),
        include_str!("presence_reap.lua")
    ))
});
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("presence_read.lua")));

/// One presence change of this node, queued for the writer.
pub(crate) enum Change {
    Join {
        channel: Arc<str>,
        client: String,
        /// The member as stored ([`stored_member`]).
        value: Vec<u8>,
    },
    Leave {
        channel: Arc<str>,
        client: String,
        announce: bool,
    },
    /// Answered once every change queued before it is applied.
    Flush(oneshot::Sender<Result<(), BackplaneError>>),
}

/// A member as its hash stores it: `"<a><user JSON>\n<member JSON>"`, `<a>` = `1` when its
/// namespace announces joins and leaves.
pub(crate) fn stored_member(member: &Member, announce: bool) -> Vec<u8> {
    let json = member.to_json();
    let mut value = Vec::with_capacity(json.len() + 24);
    value.push(if announce { b'1' } else { b'0' });
    serde_json::to_writer(&mut value, &member.user).expect("writing to a Vec cannot fail");
    value.push(b'\n');
    value.extend_from_slice(&json);
    value
}

/// The backplane's handle on its presence tasks.
pub(crate) struct PresenceTasks {
    /// The writer's queue.
    pub(crate) changes: mpsc::UnboundedSender<Change>,
    pub(crate) writer: AbortHandle,
    /// The heartbeat and the reaper. They hold the shared state, so they are stopped with the
    /// backplane; the writer ends by itself once its queue is closed and drained.
    pub(crate) timers: Vec<AbortHandle>,
}

impl PresenceTasks {
    /// Stops every presence task at once, as a crash would: nothing queued is applied, no
    /// member leaves, the heartbeat stops.
    pub(crate) fn abort(&self) {
        self.writer.abort();
        self.timers.iter().for_each(AbortHandle::abort);
    }
}

impl Drop for PresenceTasks {
    fn drop(&mut self) {
        self.timers.iter().for_each(AbortHandle::abort);
    }
}

/// Reads the channel's presence in one script call.
pub(crate) async fn read(
    shared: &Shared,
    channel: &str,
    members: bool,
) -> Result<Presence, BackplaneError> {
    let keys = &shared.keys;
    let mut invocation = READ.key(keys.presence_nodes(channel));
    invocation
        .arg(keys.presence_members_prefix(channel))
        .arg(keys.presence_users_prefix(channel))
        .arg(if members { "1" } else { "0" });
    let (count, users, list): (u64, u64, Vec<Vec<u8>>) = shared.commands.run(&invocation).await?;
    let members = if members {
        let parsed: Result<Vec<Member>, _> =
            list.iter().map(|m| serde_json::from_slice(m)).collect();
        Some(parsed.map_err(|e| {
            BackplaneError::Unavailable(format!("a stored presence member is not valid: {e}"))
        })?)
    } else {
        None
    };
    Ok(Presence {
        count,
        users,
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_member_leads_with_its_announce_flag_and_user() {
        let member = Member {
            client: "c".into(),
            user: Some("u \"1\"".into()),
            info: None,
        };
        assert_eq!(
            stored_member(&member, true),
            b"1\"u \\\"1\\\"\"\n{\"client\":\"c\",\"user\":\"u \\\"1\\\"\"}".to_vec()
        );
        let anonymous = Member {
            user: None,
            ..member
        };
        assert_eq!(
            stored_member(&anonymous, false),
            b"0null\n{\"client\":\"c\",\"user\":null}".to_vec()
        );
    }
}
