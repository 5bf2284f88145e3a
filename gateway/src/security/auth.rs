//! Who a client is: connection JWTs (HS256 with rotation, RS256/ES256 from PEM files or a JWKS
//! file) and server API keys. Tokens come as `Authorization: Bearer`, `?token=` (EventSource
//! cannot set headers) or a WebSocket `connect` command.

use std::sync::Arc;

use hyper::{header, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::protocol::{error_code, ErrorBody};

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`.
    pub user: Arc<str>,
    /// The token's `channels` allow-list (`*` matches any run of characters), if it has one.
    pub channels: Option<Vec<String>>,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// The token's `info` claim (any JSON), shown with the connection in presence.
    pub info: Option<Arc<serde_json::value::RawValue>>,
    /// The token's `iat` (whole seconds since the Unix epoch), when it has one: a token issued
    /// before its user was disconnected by the server is refused for a while.
    pub issued_at: Option<u64>,
}

impl Identity {
    pub fn new(user: Arc<str>, channels: Option<Vec<String>>, expires_at: Option<u64>) -> Self {
        Identity {
            user,
            channels,
            expires_at,
            info: None,
            issued_at: None,
        }
    }

    /// The identity with the token's `iat`.
    pub fn issued_at(mut self, iat: Option<u64>) -> Self {
        self.issued_at = iat;
        self
    }

    /// The identity with the token's `info` claim.
    pub fn with_info(mut self, info: Option<Box<serde_json::value::RawValue>>) -> Self {
        self.info = info.map(Arc::from);
        self
    }

    /// Whether the token's `channels` claim lists `channel` (no claim lists nothing).
    pub fn allows(&self, channel: &str) -> bool {
        self.channels
            .as_ref()
            .is_some_and(|list| list.iter().any(|p| glob(p.as_bytes(), channel.as_bytes())))
    }
}

/// `*` matches any run of bytes (including none); every other byte matches itself.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Why a token is refused. `code()` is the error code clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No verification key is configured, so no token can be accepted.
    NotConfigured,
    /// The token's `exp` has passed.
    Expired,
    /// Anything else: bad signature, wrong algorithm, audience or issuer, malformed.
    Invalid(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::NotConfigured => error_code::AUTH_NOT_CONFIGURED,
            AuthError::Expired => error_code::TOKEN_EXPIRED,
            AuthError::Invalid(_) => error_code::INVALID_TOKEN,
        }
    }

    /// The bounded label of `gateway_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NotConfigured => "not_configured",
            AuthError::Expired => "expired",
            AuthError::Invalid(_) => "invalid",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let message = match self {
            AuthError::NotConfigured => "this gateway accepts no tokens".to_string(),
            AuthError::Expired => "the token has expired".to_string(),
            AuthError::Invalid(why) => format!("invalid token: {why}"),
        };
        ErrorBody::new(self.code(), message)
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    /// Parsed here only so that an `nbf` that is not a whole number of seconds (a float, a
    /// negative or a huge number) refuses the token: jsonwebtoken skips a `nbf` it cannot parse.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    /// Shown with the connection in presence (any JSON).
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
    /// Any JSON: only a non-negative number is used (its whole seconds); anything else counts as
    /// no `iat`, as before the claim was read.
    #[serde(default)]
    iat: Option<serde_json::Value>,
}

/// Largest `auth.jwt_leeway` the verifier uses, in seconds: jsonwebtoken adds it to the current
/// time unchecked.
const MAX_LEEWAY_SECS: u64 = 24 * 3600;

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies connection tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Verifier {
    /// Loads every configured key; a file that cannot be read or parsed is an error.
    pub fn load(config: &AuthConfig) -> Result<Verifier, String> {
        let mut keys = Vec::new();
        for secret in &config.jwt_hs256_keys {
            keys.push(Key {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        for path in &config.jwt_public_keys {
            let pem = std::fs::read(path).map_err(|e| {
                format!("auth.jwt_public_keys: cannot read {}: {e}", path.display())
            })?;
            let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                return Err(format!(
                    "auth.jwt_public_keys: {} holds no RSA or EC public key in PEM form",
                    path.display()
                ));
            };
            keys.push(Key {
                kid: None,
                algorithm,
                key,
            });
        }
        if let Some(path) = &config.jwt_jwks_file {
            let text = std::fs::read(path)
                .map_err(|e| format!("auth.jwt_jwks_file: cannot read {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                format!("auth.jwt_jwks_file: {} is not a JWKS: {e}", path.display())
            })?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => continue,
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    format!(
                        "auth.jwt_jwks_file: a key of {} is unusable: {e}",
                        path.display()
                    )
                })?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
        }
        Ok(Verifier {
            keys,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway.as_secs().min(MAX_LEEWAY_SECS),
        })
    }

    /// Checks the signature with every key of the token's algorithm (its `kid`'s key first),
    /// then `exp`, `nbf` (both with the leeway), `aud` and `iss`.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if self.keys.is_empty() {
            return Err(AuthError::NotConfigured);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        // A token that is not valid yet is refused like a wrong one (`invalid_token`).
        validation.validate_nbf = true;
        // A configured audience or issuer must also be present: jsonwebtoken checks them only
        // when the token carries them.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let mut candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        if let Some(kid) = &header.kid {
            candidates.sort_by_key(|k| k.kid.as_deref() != Some(kid));
        }
        let mut last = AuthError::Invalid("no key matches".into());
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let c = data.claims;
                    if c.sub.is_empty() {
                        return Err(AuthError::Invalid("empty `sub`".into()));
                    }
                    let iat = c.iat.as_ref().and_then(serde_json::Value::as_f64);
                    let iat = iat.filter(|t| *t >= 0.0).map(|t| t as u64);
                    return Ok(Identity::new(c.sub.into(), c.channels, c.exp)
                        .issued_at(iat)
                        .with_info(c.info));
                }
                Err(e) => match e.kind() {
                    // The signature matched: the claims are wrong whatever other key we try.
                    ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                    ErrorKind::ImmatureSignature => {
                        return Err(AuthError::Invalid(
                            "the token is not valid yet (`nbf` is in the future)".into(),
                        ))
                    }
                    ErrorKind::InvalidSignature => last = AuthError::Invalid(e.to_string()),
                    _ => return Err(AuthError::Invalid(e.to_string())),
                },
            }
        }
        Err(last)
    }
}

/// The token of a request: `Authorization: Bearer <token>`, else `?token=<token>`.
pub fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        if let Ok(value) = value.to_str() {
            if let Some((scheme, token)) = value.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    return Some(token.trim().to_string());
                }
            }
        }
    }
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Whether the request carries one of `keys` as `Authorization: apikey <key>`.
pub fn api_key_ok(keys: &[String], headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, key)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("apikey") {
        return false;
    }
    let key = key.trim().as_bytes();
    // Every key is compared in full, so timing tells nothing about which or how much matched.
    keys.iter().fold(false, |found, k| {
        constant_time_eq(k.as_bytes(), key) | found
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches() {
        assert!(glob(b"chat:*", b"chat:room1"));
        assert!(glob(b"chat:*", b"chat:"));
        assert!(!glob(b"chat:*", b"news:room1"));
        assert!(glob(b"*:room*", b"chat:room1"));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(glob(b"exact", b"exact"));
        assert!(!glob(b"exact", b"exactly"));
    }

    #[test]
    fn api_keys_need_the_scheme() {
        let keys = vec!["k1".to_string(), "k2".to_string()];
        let mut h = HeaderMap::new();
        assert!(!api_key_ok(&keys, &h));
        h.insert(header::AUTHORIZATION, "apikey k2".parse().unwrap());
        assert!(api_key_ok(&keys, &h));
        h.insert(header::AUTHORIZATION, "Bearer k2".parse().unwrap());
        assert!(!api_key_ok(&keys, &h));
        h.insert(header::AUTHORIZATION, "apikey k3".parse().unwrap());
        assert!(!api_key_ok(&keys, &h));
    }
}
