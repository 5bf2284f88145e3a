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
            namespaces: Namespaces::new(&config.channels),
            limits: Limits::new(&config.limits),
            trusted_proxies: TrustedProxies::parse(&config.limits.trusted_proxies)?,
        })
    }
}
