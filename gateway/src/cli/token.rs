//! `gateway token`: mints an HS256 connection token with the node's own configured key, for
//! development and tests (production tokens come from the application's backend).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;

use crate::config::AuthConfig;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// A token for `sub`, valid from now for `ttl`, allowed `channels` (patterns, `*` matches any
/// run) when given; signed with the first of `auth.jwt_hs256_keys`, carrying the configured
/// audience and issuer so that this node accepts it.
pub fn mint(
    auth: &AuthConfig,
    sub: &str,
    channels: Option<&[String]>,
    ttl: Duration,
) -> Result<String, String> {
    let key = auth.jwt_hs256_keys.first().ok_or(
        "auth.jwt_hs256_keys is empty: the token is signed with its first key \
         (set it in the config file or GATEWAY__AUTH__JWT_HS256_KEYS)",
    )?;
    if sub.is_empty() {
        return Err("--sub must not be empty".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let exp = now
        .checked_add(ttl.as_secs().max(1))
        .ok_or("--ttl is too long")?;
    let claims = Claims {
        sub,
        iat: now,
        nbf: now,
        exp,
        channels,
        aud: auth.jwt_audience.as_deref(),
        iss: auth.jwt_issuer.as_deref(),
    };
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::auth::Verifier;

    fn auth() -> AuthConfig {
        AuthConfig {
            jwt_hs256_keys: vec!["0123456789abcdef-dev-key".into()],
            jwt_audience: Some("gw".into()),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn the_node_accepts_what_it_mints() {
        let channels = vec!["chat:*".to_string()];
        let token = mint(&auth(), "alice", Some(&channels), Duration::from_secs(3600)).unwrap();
        let identity = Verifier::load(&auth()).unwrap().verify(&token).unwrap();
        assert_eq!(&*identity.user, "alice");
        assert!(identity.allows("chat:room1"));
        assert!(!identity.allows("news"));
    }

    #[test]
    fn without_a_key_it_says_which_key_to_set() {
        let err = mint(
            &AuthConfig::default(),
            "alice",
            None,
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(err.contains("auth.jwt_hs256_keys"), "{err}");
    }

    #[test]
    fn another_nodes_key_does_not_verify_it() {
        let token = mint(&auth(), "alice", None, Duration::from_secs(60)).unwrap();
        let mut other = auth();
        other.jwt_hs256_keys = vec!["another-key-of-16-bytes".into()];
        assert!(Verifier::load(&other).unwrap().verify(&token).is_err());
    }
}
