//! Channel namespaces: a channel's prefix before the first `:` names its namespace
//! (`chat:room1` → `chat`), whose rules say who may subscribe, which clients may publish, and how
//! large a publication may be. Channels of unconfigured prefixes follow `channels.default`.

use std::collections::BTreeMap;

use crate::config::{Access, ChannelsConfig, NamespaceConfig};
use crate::protocol::{error_code, ErrorBody};
use crate::security::auth::Identity;

/// What a client wants to do on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

/// The namespace table, resolved once at start.
#[derive(Debug, Clone)]
pub struct Namespaces {
    default: NamespaceConfig,
    named: BTreeMap<String, NamespaceConfig>,
}

impl Namespaces {
    pub fn new(config: &ChannelsConfig) -> Self {
        Namespaces {
            default: config.default.clone(),
            named: config.namespaces.clone(),
        }
    }

    /// The rules of `channel`'s namespace.
    pub fn get(&self, channel: &str) -> &NamespaceConfig {
        channel
            .split_once(':')
            .and_then(|(prefix, _)| self.named.get(prefix))
            .unwrap_or(&self.default)
    }

    /// Whether `identity` (None: anonymous) may do `action` on `channel`. The errors are
    /// `unauthorized` (a token would be needed) and `forbidden` (this token or nobody may).
    pub fn check(
        &self,
        action: Action,
        channel: &str,
        identity: Option<&Identity>,
    ) -> Result<(), ErrorBody> {
        let ns = self.get(channel);
        let access = match action {
            Action::Subscribe => ns.subscribe,
            Action::Publish => ns.publish,
        };
        let verb = match action {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish on",
        };
        match (access, identity) {
            (Access::Anonymous, _) => Ok(()),
            (Access::None, _) => Err(ErrorBody::new(
                error_code::FORBIDDEN,
                format!("clients may not {verb} {channel}"),
            )),
            (_, None) => Err(ErrorBody::new(
                error_code::UNAUTHORIZED,
                format!("a token is required to {verb} {channel}"),
            )),
            (Access::Authenticated, Some(_)) => Ok(()),
            (Access::Token, Some(identity)) if identity.allows(channel) => Ok(()),
            (Access::Token, Some(_)) => Err(ErrorBody::new(
                error_code::FORBIDDEN,
                format!("the token does not list channel {channel}"),
            )),
        }
    }

    /// Checks a publication's size against its namespace's limit.
    pub fn check_size(&self, channel: &str, size: usize) -> Result<(), ErrorBody> {
        let max = self.get(channel).max_message_size;
        if size > max {
            return Err(ErrorBody::new(
                error_code::MESSAGE_TOO_LARGE,
                format!("publication data is {size} bytes; {channel} allows at most {max}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> Namespaces {
        let mut config = ChannelsConfig::default();
        config.namespaces.insert(
            "chat".into(),
            NamespaceConfig {
                subscribe: Access::Token,
                publish: Access::None,
                max_message_size: 10,
                ..NamespaceConfig::default()
            },
        );
        Namespaces::new(&config)
    }

    #[test]
    fn prefixes_pick_the_namespace() {
        let ns = namespaces();
        assert_eq!(ns.get("chat:a").subscribe, Access::Token);
        assert_eq!(ns.get("chat").subscribe, Access::Anonymous);
        assert_eq!(ns.get("news:a").subscribe, Access::Anonymous);
        assert!(ns.check_size("chat:a", 11).is_err());
        assert!(ns.check_size("other", 11).is_ok());
    }

    #[test]
    fn access_rules() {
        let ns = namespaces();
        let user = Identity::new("u".into(), Some(vec!["chat:a*".into()]), None);
        let code = |r: Result<(), ErrorBody>| r.err().map(|e| e.code);
        assert_eq!(
            code(ns.check(Action::Subscribe, "chat:x", None)),
            Some("unauthorized")
        );
        assert_eq!(
            code(ns.check(Action::Subscribe, "chat:ab", Some(&user))),
            None
        );
        assert_eq!(
            code(ns.check(Action::Subscribe, "chat:b", Some(&user))),
            Some("forbidden")
        );
        assert_eq!(
            code(ns.check(Action::Publish, "chat:ab", Some(&user))),
            Some("forbidden")
        );
        assert_eq!(code(ns.check(Action::Publish, "free", None)), None);
    }
}
