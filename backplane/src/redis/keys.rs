//! Redis key layout. Every key and the pub/sub channel of a gateway channel share one hash tag,
//! so the publish script touches a single slot and runs unchanged on Redis Cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}:{<tag>}:m` | hash | `e` epoch, `t` top offset, `g` publication tag of the top |
//! | `{prefix}:{<tag>}:h` | stream | history: id `<offset>-0`, fields `d` data, `t` publish ms, `g` publication tag |
//! | `{prefix}:{<tag>}:i:c:<key>` | string | `"<offset> <epoch> <g> <sha1 of data>"` of a client's idempotent publish |
//! | `{prefix}:{<tag>}:i:s:<key>` | string | the same for a key of the server API |
//! | `{prefix}:{<tag>}:p` | pub/sub (sharded on Cluster) | `"<offset> <epoch> <us> <g> <channel>\n<data>"`, and presence events `"J <after> <epoch or -> <channel>\n<member>"` (`L` for a leave) |
//! | `{prefix}:{<tag>}:pn:<node>` | hash | presence: the members node `<node>` holds in the channel, client id → `"<a><user>\n<member>"` |
//! | `{prefix}:{<tag>}:pu:<node>` | hash | presence: user (as JSON) → how many of node `<node>`'s members in the channel have it; anonymous members are not counted |
//! | `{prefix}:{<tag>}:pnodes` | set | presence: the nodes with members in the channel |
//! | `{prefix}:{node.<node>}:pc` | set | presence: the channels node `<node>` has members in (what a survivor reaps) |
//! | `{prefix}:{node.<node>}:cr` | hash | the node's channel report, channel → local subscribers; expires unless the node heartbeats |
//! | `{prefix}:{nodes}:registry` | sorted set | node → its last heartbeat (Redis clock, ms) |
//!
//! `<tag>` is the channel name with `%`, `{` and `}` percent-encoded, so any channel name gives a
//! well-formed, injective hash tag. `<g>`, the publication tag, is 8 lowercase hex digits. A
//! member's `<a>` is `1` when its namespace announces joins and leaves (so a survivor reaping it
//! after a crash knows whether to), else `0`; `<user>` is the user as JSON (`null` for none), so
//! the presence script counts distinct users without parsing members; `<member>` is the
//! member's compact JSON. A node's members and user counts of a channel change in the same script
//! and expire at the same instant, so a read counts distinct users without reading every member.
//! Every key of a channel, and every key of a node, shares one hash tag,
//! so each presence script touches a single slot; the registry is one fixed key.

use crate::IdempotencyScope;

/// Builds the keys of one deployment (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// `{prefix}:{<tag>}`, the part every key of the channel starts with; room is left for the
    /// longest suffix but an idempotency key.
    pub(crate) fn base(&self, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + channel.len() + 8);
        key.push_str(&self.prefix);
        key.push_str(":{");
        if !channel.contains(['%', '{', '}']) {
            key.push_str(channel);
        } else {
            for c in channel.chars() {
                match c {
                    '%' => key.push_str("%25"),
                    '{' => key.push_str("%7B"),
                    '}' => key.push_str("%7D"),
                    c => key.push(c),
                }
            }
        }
        key.push('}');
        key
    }

    /// What follows [`Keys::base`] in an idempotency key of `scope` (the key itself comes next).
    pub(crate) fn idempotency_infix(scope: IdempotencyScope) -> &'static str {
        match scope {
            IdempotencyScope::Client => ":i:c:",
            IdempotencyScope::Server => ":i:s:",
        }
    }

    pub(crate) fn meta(&self, channel: &str) -> String {
        self.base(channel) + ":m"
    }

    pub(crate) fn history(&self, channel: &str) -> String {
        self.base(channel) + ":h"
    }

    /// Client and server keys live apart: a client can never take a key the backend will use.
    #[cfg(test)]
    pub(crate) fn idempotency(&self, channel: &str, scope: IdempotencyScope, key: &str) -> String {
        self.base(channel) + Self::idempotency_infix(scope) + key
    }

    pub(crate) fn pubsub(&self, channel: &str) -> String {
        self.base(channel) + ":p"
    }

    /// The members node `node` holds in the channel.
    pub(crate) fn presence_members(&self, channel: &str, node: &str) -> String {
        self.presence_members_prefix(channel) + node
    }

    /// [`Keys::presence_members`] without the node id (the presence read appends each node's).
    pub(crate) fn presence_members_prefix(&self, channel: &str) -> String {
        self.base(channel) + ":pn:"
    }

    /// How many of node `node`'s members in the channel each user has.
    pub(crate) fn presence_users(&self, channel: &str, node: &str) -> String {
        self.presence_users_prefix(channel) + node
    }

    /// [`Keys::presence_users`] without the node id.
    pub(crate) fn presence_users_prefix(&self, channel: &str) -> String {
        self.base(channel) + ":pu:"
    }

    /// The nodes with members in the channel.
    pub(crate) fn presence_nodes(&self, channel: &str) -> String {
        self.base(channel) + ":pnodes"
    }

    /// The channels node `node` has members in.
    pub(crate) fn node_channels(&self, node: &str) -> String {
        self.base(&format!("node.{node}")) + ":pc"
    }

    /// Node `node`'s channel report.
    pub(crate) fn node_report(&self, node: &str) -> String {
        self.base(&format!("node.{node}")) + ":cr"
    }

    /// Every node's last heartbeat.
    pub(crate) fn registry(&self) -> String {
        self.base("nodes") + ":registry"
    }

    /// The pub/sub channel a node uses to check its own pub/sub link end to end.
    pub(crate) fn health(&self, node_id: &str) -> String {
        self.base(&format!("health.{node_id}")) + ":p"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hash_tag_per_channel_even_with_braces() {
        let keys = Keys::new("gw");
        assert_eq!(keys.meta("chat:a"), "gw:{chat:a}:m");
        assert_eq!(keys.pubsub("}x{"), "gw:{%7Dx%7B}:p");
        assert_ne!(keys.meta("%7B"), keys.meta("{"), "encoding is injective");
        for channel in ["a", "}", "{}", "%"] {
            let tag = |k: String| {
                let start = k.find('{').unwrap() + 1;
                let end = start + k[start..].find('}').unwrap();
                k[start..end].to_string()
            };
            let meta = tag(keys.meta(channel));
            assert!(!meta.is_empty());
            assert_eq!(meta, tag(keys.history(channel)));
            assert_eq!(meta, tag(keys.pubsub(channel)));
            assert_eq!(
                meta,
                tag(keys.idempotency(channel, IdempotencyScope::Client, "k}"))
            );
            assert_eq!(meta, tag(keys.presence_members(channel, "n1")));
            assert_eq!(meta, tag(keys.presence_nodes(channel)));
            assert_eq!(meta, tag(keys.presence_users(channel, "n1")));
        }
        assert_eq!(
            keys.idempotency("c", IdempotencyScope::Client, "k"),
            "gw:{c}:i:c:k"
        );
        assert_eq!(
            keys.idempotency("c", IdempotencyScope::Server, "k"),
            "gw:{c}:i:s:k"
        );
        assert_eq!(keys.presence_members("c", "n1"), "gw:{c}:pn:n1");
        assert_eq!(keys.presence_nodes("c"), "gw:{c}:pnodes");
        assert_eq!(keys.presence_users("c", "n1"), "gw:{c}:pu:n1");
        assert_eq!(keys.node_channels("n1"), "gw:{node.n1}:pc");
        assert_eq!(keys.node_report("n1"), "gw:{node.n1}:cr");
        assert_eq!(keys.registry(), "gw:{nodes}:registry");
    }
}
