//! What the node knows for security, loaded once from the configuration: the token verifier and
//! API keys, the namespace rules, and the connection and rate limits. The hooks that apply them
//! to requests and commands are in `security`.

use crate::config::Config;
use crate::security::auth::Verifier;
use crate::security::client_ip::TrustedProxies;
use crate::security::limits::Limits;
use crate::security::namespace::Namespaces;

/// Keys, namespaces and limits of one node.
pub(crate) struct Policy {
    pub(crate) verifier: Verifier,
    pub(crate) namespaces: Namespaces,
    pub(crate) limits: Limits,
    pub(crate) trusted_proxies: TrustedProxies,
}

impl Policy {
    pub(crate) fn load(config: &Config) -> Result<Policy, String> {
        Ok(Policy {
            verifier: Verifier::load(&config.auth)?,
            namespaces: Namespaces::new(&with_demo_chat(config)),
            limits: Limits::new(&config.limits),
            trusted_proxies: TrustedProxies::parse(&config.limits.trusted_proxies)?,
        })
    }
}

/// The namespace of the demo page's chat, which shows who is online.
pub(crate) const DEMO_CHAT_NAMESPACE: &str = "chat";

/// The configured namespaces, plus — while the demo page is on and `chat` is not configured —
/// a `chat` namespace like the default one with presence and join/leave, so the demo's chat shows
/// who is online out of the box.
fn with_demo_chat(config: &Config) -> crate::config::ChannelsConfig {
    let mut channels = config.channels.clone();
    if config.demo.page && !channels.namespaces.contains_key(DEMO_CHAT_NAMESPACE) {
        let chat = crate::config::NamespaceConfig {
            presence: true,
            join_leave: true,
            ..channels.default.clone()
        };
        channels
            .namespaces
            .insert(DEMO_CHAT_NAMESPACE.to_string(), chat);
    }
    channels
}
