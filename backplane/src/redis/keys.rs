//! Redis key layout. Every key and the pub/sub channel of a gateway channel share one hash tag,
//! so the publish script touches a single slot and runs unchanged on Redis Cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}:{<tag>}:m` | hash | `e` epoch, `t` top offset, `g` publication tag of the top |
//! | `{prefix}:{<tag>}:h` | stream | history: id `<offset>-0`, fields `d` data, `t` publish ms, `g` publication tag |
//! | `{prefix}:{<tag>}:i:c:<key>` | string | `"<offset> <epoch> <g> <sha1 of data>"` of a client's idempotent publish |
//! | `{prefix}:{<tag>}:i:s:<key>` | string | the same for a key of the server API |
//! | `{prefix}:{<tag>}:p` | pub/sub (sharded on Cluster) | `"<offset> <epoch> <us> <g> <channel>\n<data>"` |
//!
//! `<tag>` is the channel name with `%`, `{` and `}` percent-encoded, so any channel name gives a
//! well-formed, injective hash tag. `<g>`, the publication tag, is 8 lowercase hex digits.

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
        }
        assert_eq!(
            keys.idempotency("c", IdempotencyScope::Client, "k"),
            "gw:{c}:i:c:k"
        );
        assert_eq!(
            keys.idempotency("c", IdempotencyScope::Server, "k"),
            "gw:{c}:i:s:k"
        );
    }
}
