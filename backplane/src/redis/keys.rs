//! Redis key layout. Every key and the pub/sub channel of a gateway channel share one hash tag,
//! so the publish script touches a single slot and runs unchanged on Redis Cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}:{<tag>}:m` | hash | `e` epoch, `t` top offset |
//! | `{prefix}:{<tag>}:h` | stream | history: id `<offset>-0`, fields `d` data, `t` publish ms |
//! | `{prefix}:{<tag>}:i:<key>` | string | `"<offset> <epoch>"` of an idempotent publish |
//! | `{prefix}:{<tag>}:p` | pub/sub (sharded on Cluster) | `"<offset> <epoch> <us> <channel>\n<data>"` |
//!
//! `<tag>` is the channel name with `%`, `{` and `}` percent-encoded, so any channel name gives a
//! well-formed, injective hash tag.

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

    fn base(&self, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + channel.len() + 8);
        key.push_str(&self.prefix);
        key.push_str(":{");
        for c in channel.chars() {
            match c {
                '%' => key.push_str("%25"),
                '{' => key.push_str("%7B"),
                '}' => key.push_str("%7D"),
                c => key.push(c),
            }
        }
        key.push('}');
        key
    }

    pub(crate) fn meta(&self, channel: &str) -> String {
        self.base(channel) + ":m"
    }

    pub(crate) fn history(&self, channel: &str) -> String {
        self.base(channel) + ":h"
    }

    pub(crate) fn idempotency(&self, channel: &str, key: &str) -> String {
        self.base(channel) + ":i:" + key
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
            assert_eq!(meta, tag(keys.idempotency(channel, "k}")));
        }
    }
}
