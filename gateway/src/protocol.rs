//! The client protocol's wire forms: commands a client sends, replies and errors it gets back,
//! and the channel-name rule shared by every transport and the HTTP API.

use std::borrow::Cow;

use backplane::{BackplaneError, Position};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::session::delivery::ANY_EPOCH;

/// Every WebSocket close code the gateway sends: RFC 6455's and the application's own (4000–4999,
/// listed in docs/protocol.md).
pub mod close_code {
    /// The node is shutting down (the reason carries a reconnect hint).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A binary message on the protocol endpoint.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text message or close reason that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than `websocket.max_message_size`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The connection's outbound queue overflowed; reconnect and resume from your positions.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// The client answered no ping within the pong timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
    /// The `connect` command's token is invalid (or no key is configured to check it).
    pub const UNAUTHORIZED: u16 = 4002;
    /// The connection's token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The command rate stayed above `limits.command_rate` for a whole burst.
    pub const RATE_LIMITED: u16 = 4008;
    /// No subscription within `limits.idle_timeout`.
    pub const IDLE: u16 = 4009;
    /// The server disconnected the connection's user (`POST /api/disconnect`); the reason is
    /// [`super::DISCONNECTED_REASON`]: do not reconnect with the same token.
    pub const DISCONNECTED: u16 = 4010;
    /// The user has `limits.max_connections_per_user` connections already.
    pub const TOO_MANY_USER_CONNECTIONS: u16 = 4029;
}

/// Every error code a client or API caller can get, in `{"error": {"code": ...}}` and in
/// command replies (listed in docs/protocol.md).
pub mod error_code {
    /// The request or command is not of the expected shape.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The text is not JSON.
    pub const MALFORMED_JSON: &str = "malformed_json";
    /// A command's `op` is not one the gateway knows.
    pub const UNKNOWN_OP: &str = "unknown_op";
    /// A channel name breaks the channel rule.
    pub const INVALID_CHANNEL: &str = "invalid_channel";
    /// Subscribe to a channel the connection holds already.
    pub const ALREADY_SUBSCRIBED: &str = "already_subscribed";
    /// Unsubscribe from a channel the connection does not hold.
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    /// Over `client.max_subscriptions`.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    /// An SSE `Last-Event-ID` or poll `cursor` that does not decode.
    pub const INVALID_CURSOR: &str = "invalid_cursor";
    /// An SSE stream or poll whose channels would need a cursor longer than the server accepts
    /// back (400): fewer or shorter channel names.
    pub const CURSOR_TOO_LONG: &str = "cursor_too_long";
    /// The backplane cannot be reached; try again (503).
    pub const BACKPLANE_UNAVAILABLE: &str = "backplane_unavailable";
    /// An idempotency key reused with other data within the window (409); nothing was stored.
    pub const IDEMPOTENCY_CONFLICT: &str = "idempotency_conflict";
    /// A command over `limits.command_rate`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A publication over its namespace's size limit.
    pub const MESSAGE_TOO_LARGE: &str = "message_too_large";
    /// An API body over the size limit (413).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// `connect` on an authenticated connection.
    pub const ALREADY_CONNECTED: &str = "already_connected";
    /// A channel that needs a token, without one (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A channel or user the token does not allow (403).
    pub const FORBIDDEN: &str = "forbidden";
    /// A token that does not verify.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// A token past its `exp`.
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// A token, but no key to check it with.
    pub const AUTH_NOT_CONFIGURED: &str = "auth_not_configured";
    /// `/api/*` without a configured key.
    pub const INVALID_API_KEY: &str = "invalid_api_key";
    /// An `Origin` outside `origin.allowed` (403).
    pub const ORIGIN_NOT_ALLOWED: &str = "origin_not_allowed";
    /// Over `limits.max_connections` (429).
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    /// Over `limits.max_connections_per_user` (429).
    pub const TOO_MANY_USER_CONNECTIONS: &str = "too_many_user_connections";
    /// Over `limits.connection_rate_per_ip` (429).
    pub const CONNECTION_RATE_LIMITED: &str = "connection_rate_limited";
    /// Over `limits.fresh_channels_per_request` or `limits.fresh_channels_per_second` (429).
    pub const TOO_MANY_FRESH_CHANNELS: &str = "too_many_fresh_channels";
    /// `/sse` with an `Accept` that rules out `text/event-stream` (406).
    pub const NOT_ACCEPTABLE: &str = "not_acceptable";
    /// No such route on this listener (404).
    pub const NOT_FOUND: &str = "not_found";
    /// The route takes another method (405).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// `/ws` without a WebSocket upgrade (426).
    pub const UPGRADE_REQUIRED: &str = "upgrade_required";
    /// Presence of a channel whose namespace has none (`presence = false`) (400).
    pub const PRESENCE_NOT_ENABLED: &str = "presence_not_enabled";
    /// The node is draining: go to another (503).
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// `/readyz` of a node that does not take traffic (503).
    pub const NOT_READY: &str = "not_ready";
    /// A token of a user the server disconnected (`POST /api/disconnect`), issued before the
    /// disconnect (403; WebSocket `connect`: close 4010): get a new token.
    pub const DISCONNECTED: &str = "user_disconnected";
}

/// The close reason of [`close_code::DISCONNECTED`], JSON like the 1001 reason's reconnect hint:
/// the client must not reconnect (with the same token).
pub const DISCONNECTED_REASON: &str = r#"{"reason":"disconnected","reconnect":false}"#;

/// The refusal of a token issued before its user was disconnected.
pub fn disconnected_error(user: &str) -> ErrorBody {
    ErrorBody::new(
        error_code::DISCONNECTED,
        format!(
            "user {user:?} was disconnected by the server: this token was issued before that; \
             get a new token"
        ),
    )
}

/// Why a subscription's stream could not be continued (`reason` of a subscribe result or a
/// reset).
pub mod reset_reason {
    /// The channel's history was lost and restarted under a new epoch.
    pub const EPOCH_CHANGED: &str = "epoch_changed";
    /// The position is beyond the channel's newest offset.
    pub const OFFSET_AHEAD: &str = "offset_ahead";
    /// History no longer holds what followed the position.
    pub const HISTORY_TRUNCATED: &str = "history_truncated";
    /// The publication at the position is not the one the client saw (its tag differs): the
    /// store lost acknowledged writes and reused the offset under the same epoch.
    pub const HISTORY_DIVERGED: &str = "history_diverged";
    /// A compact cursor's position could not be checked against what history holds now (its
    /// group's check differs: an epoch changed, the store reused an offset, or a channel of the
    /// group could not be recovered).
    pub const POSITION_UNVERIFIED: &str = "position_unverified";
}

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// A protocol-level error: a stable snake_case code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of a refused request, stream or poll: 503 when the backplane is down (try
    /// again, maybe on another node), 401 without a needed token, 403 without a permission, 413
    /// over a size limit, 400 otherwise.
    pub fn status(&self) -> hyper::StatusCode {
        use hyper::StatusCode;
        match self.code {
            error_code::BACKPLANE_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            error_code::IDEMPOTENCY_CONFLICT => StatusCode::CONFLICT,
            error_code::TOO_MANY_FRESH_CHANNELS => StatusCode::TOO_MANY_REQUESTS,
            error_code::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
            error_code::FORBIDDEN | error_code::DISCONNECTED => StatusCode::FORBIDDEN,
            error_code::MESSAGE_TOO_LARGE | error_code::PAYLOAD_TOO_LARGE => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// The error a client sees when the backplane fails.
pub fn backplane_error(e: &BackplaneError) -> ErrorBody {
    match e {
        BackplaneError::Unavailable(_) => {
            ErrorBody::new(error_code::BACKPLANE_UNAVAILABLE, e.to_string())
        }
        BackplaneError::Invalid(_) => ErrorBody::new(error_code::BAD_REQUEST, e.to_string()),
        BackplaneError::Conflict(_) => {
            ErrorBody::new(error_code::IDEMPOTENCY_CONFLICT, e.to_string())
        }
    }
}

/// `client.max_subscriptions`: a connection, stream or poll may hold at most `max` channels.
pub fn check_subscription_count(count: usize, max: usize) -> Result<(), ErrorBody> {
    if count > max {
        return Err(ErrorBody::new(
            error_code::TOO_MANY_SUBSCRIPTIONS,
            format!("a connection may subscribe to at most {max} channels"),
        ));
    }
    Ok(())
}

/// Checks a channel name: 1 to 255 bytes, no whitespace or control characters.
pub fn check_channel(channel: &str) -> Result<(), ErrorBody> {
    if channel.is_empty() {
        return Err(ErrorBody::new(
            error_code::INVALID_CHANNEL,
            "channel must not be empty",
        ));
    }
    if channel.len() > MAX_CHANNEL_LEN {
        return Err(ErrorBody::new(
            error_code::INVALID_CHANNEL,
            format!("channel is longer than {MAX_CHANNEL_LEN} bytes"),
        ));
    }
    if channel.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ErrorBody::new(
            error_code::INVALID_CHANNEL,
            "channel must not contain whitespace or control characters",
        ));
    }
    if crate::control::is_reserved(channel) {
        return Err(ErrorBody::new(
            error_code::INVALID_CHANNEL,
            format!(
                "channels starting with {:?} are the gateway's own",
                crate::control::RESERVED_PREFIX
            ),
        ));
    }
    Ok(())
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Checks an optional idempotency key: 1 to 256 bytes.
pub fn check_idempotency_key(key: Option<&str>) -> Result<(), ErrorBody> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN => Err(ErrorBody::new(
            error_code::BAD_REQUEST,
            format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes"),
        )),
        _ => Ok(()),
    }
}

/// A client command, as parsed from one WebSocket text message.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        id: Option<u64>,
        channel: Cow<'a, str>,
        since: Option<Position>,
        /// `"since": "latest"`: the channel's newest publication first, then live ones.
        latest: bool,
        /// `"delta": true`: live publications as merge patches when smaller.
        delta: bool,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: Cow<'a, str>,
    },
    Publish {
        id: Option<u64>,
        channel: Cow<'a, str>,
        data: &'a RawValue,
        idempotency_key: Option<Cow<'a, str>>,
        /// The producer's version of the value ([`backplane::BatchItem::version`]).
        version: Option<u64>,
    },
    Ping {
        id: Option<u64>,
    },
    /// Reads a channel's presence (members only unless `count_only`).
    Presence {
        id: Option<u64>,
        channel: Cow<'a, str>,
        count_only: bool,
    },
    /// Authenticates the connection; only as the first command.
    Connect {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
    /// Replaces the connection's token before it expires.
    Refresh {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
}

impl Command<'_> {
    /// The command's id.
    pub fn id(&self) -> Option<u64> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Ping { id }
            | Command::Presence { id, .. }
            | Command::Connect { id, .. }
            | Command::Refresh { id, .. } => *id,
        }
    }
}

/// Why a message is not a command; answered with an error reply, the connection stays.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandError {
    pub id: Option<u64>,
    pub error: ErrorBody,
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    since: Option<Since>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    idempotency_key: Option<Cow<'a, str>>,
    version: Option<Version>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(default)]
    count_only: bool,
    #[serde(default)]
    delta: bool,
}

/// A subscribe's `since`: a position, or `"latest"` (the channel's newest publication first).
#[derive(Deserialize)]
#[serde(untagged)]
enum Since {
    Latest(LatestWord),
    Position(Position),
}

#[derive(Deserialize)]
enum LatestWord {
    #[serde(rename = "latest")]
    Latest,
}

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

impl<'a> Command<'a> {
    /// Parses one command. Syntax errors give `malformed_json`; JSON of the wrong shape gives
    /// `bad_request` or `unknown_op`, with the command's id when it can be read.
    pub fn parse(text: &'a [u8]) -> Result<Command<'a>, CommandError> {
        let raw: RawCommand<'a> = serde_json::from_slice(text).map_err(|e| {
            if e.is_data() {
                let id = serde_json::from_slice::<IdOnly>(text)
                    .ok()
                    .and_then(|c| c.id);
                CommandError {
                    id,
                    error: ErrorBody::new(error_code::BAD_REQUEST, e.to_string()),
                }
            } else {
                CommandError {
                    id: None,
                    error: ErrorBody::new(error_code::MALFORMED_JSON, e.to_string()),
                }
            }
        })?;
        let id = raw.id;
        let fail = |code, message: &str| CommandError {
            id,
            error: ErrorBody::new(code, message),
        };
        let Some(op) = raw.op else {
            return Err(fail(error_code::BAD_REQUEST, "missing field `op`"));
        };
        let channel = |c: Option<Cow<'a, str>>| {
            let channel =
                c.ok_or_else(|| fail(error_code::BAD_REQUEST, "missing field `channel`"))?;
            check_channel(&channel).map_err(|error| CommandError { id, error })?;
            Ok(channel)
        };
        match &*op {
            "subscribe" => {
                let channel = channel(raw.channel)?;
                let (since, latest) = match raw.since {
                    None => (None, false),
                    Some(Since::Latest(LatestWord::Latest)) => (None, true),
                    Some(Since::Position(p)) => (Some(p), false),
                };
                if since.as_ref().is_some_and(|s| s.epoch == ANY_EPOCH) {
                    return Err(fail(
                        error_code::BAD_REQUEST,
                        "`since.epoch` \"*\" is reserved",
                    ));
                }
                Ok(Command::Subscribe {
                    id,
                    channel,
                    since,
                    latest,
                    delta: raw.delta,
                })
            }
            "unsubscribe" => Ok(Command::Unsubscribe {
                id,
                channel: channel(raw.channel)?,
            }),
            "publish" => {
                let channel = channel(raw.channel)?;
                let data = raw
                    .data
                    .ok_or_else(|| fail(error_code::BAD_REQUEST, "missing field `data`"))?;
                check_idempotency_key(raw.idempotency_key.as_deref())
                    .map_err(|error| CommandError { id, error })?;
                Ok(Command::Publish {
                    id,
                    channel,
                    data,
                    idempotency_key: raw.idempotency_key,
                    version: raw.version.map(|v| v.0),
                })
            }
            "ping" => Ok(Command::Ping { id }),
            "presence" => Ok(Command::Presence {
                id,
                channel: channel(raw.channel)?,
                count_only: raw.count_only,
            }),
            "connect" | "refresh" => {
                let token = raw
                    .token
                    .ok_or_else(|| fail(error_code::BAD_REQUEST, "missing field `token`"))?;
                if token.is_empty() || token.len() > MAX_TOKEN_LEN {
                    return Err(fail(
                        error_code::BAD_REQUEST,
                        "token must be 1 to 8192 bytes",
                    ));
                }
                Ok(if op == "connect" {
                    Command::Connect { id, token }
                } else {
                    Command::Refresh { id, token }
                })
            }
            other => Err(fail(
                error_code::UNKNOWN_OP,
                &format!("unknown op `{other}`"),
            )),
        }
    }
}

/// The subscribe result sent to a client.
#[derive(Debug, Clone, Serialize)]
pub struct SubscribeResult {
    pub channel: std::sync::Arc<str>,
    pub epoch: std::sync::Arc<str>,
    pub offset: u64,
    pub recovered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The tag of the publication at `offset`, when the channel has one.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_tag"
    )]
    pub tag: Option<u32>,
    /// Asked for the latest value: whether the channel's newest publication follows (false: the
    /// channel has none in history — never published, or it expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<bool>,
}

fn serialize_tag<S: serde::Serializer>(tag: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match tag {
        Some(tag) => s.serialize_str(&backplane::format_tag(*tag)),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
struct ReplyOk<'a, T: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    result: &'a T,
}

#[derive(Serialize)]
struct ReplyErr<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    error: &'a ErrorBody,
}

/// `{"id": N, "result": ...}`
pub fn reply_ok<T: Serialize>(id: Option<u64>, result: &T) -> Bytes {
    serde_json::to_vec(&ReplyOk { id, result })
        .expect("reply serialisation cannot fail")
        .into()
}

/// `{"id": N, "error": {"code": ..., "message": ...}}`
pub fn reply_err(id: Option<u64>, error: &ErrorBody) -> Bytes {
    serde_json::to_vec(&ReplyErr { id, error })
        .expect("reply serialisation cannot fail")
        .into()
}

/// A channel's stream could not be continued: what was missed is lost, delivery goes on after
/// `offset` of `epoch`. The data of an SSE `reset` event; inside `{"reset": ...}` on WebSocket and
/// long-poll.
#[derive(Serialize)]
pub struct Reset<'a> {
    pub channel: &'a str,
    pub epoch: &'a str,
    pub offset: u64,
    pub reason: &'a str,
}

impl Reset<'_> {
    /// `{"channel":C,"epoch":E,"offset":N,"reason":R}`
    pub fn to_json(&self) -> Bytes {
        serde_json::to_vec(self).expect("cannot fail").into()
    }

    /// `{"reset":{"channel":C,"epoch":E,"offset":N,"reason":R}}`
    pub fn to_push(&self) -> Bytes {
        #[derive(Serialize)]
        struct Push<'a> {
            reset: &'a Reset<'a>,
        }
        serde_json::to_vec(&Push { reset: self })
            .expect("cannot fail")
            .into()
    }
}

/// A publish's `version`: an unsigned integer. JSON has one number type, so an integral float
/// (`29497.0`, which JSON Schema counts as an integer) is read too, exactly up to 2^53.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u64);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Version;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an unsigned integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Version, E> {
                Ok(Version(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Version, E> {
                u64::try_from(v)
                    .map(Version)
                    .map_err(|_| E::custom("`version` must not be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Version, E> {
                const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
                if v.fract() == 0.0 && (0.0..=EXACT).contains(&v) {
                    Ok(Version(v as u64))
                } else {
                    Err(E::custom(format!(
                        "`version` must be an unsigned integer, got {v}"
                    )))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_an_unsigned_integer_written_either_way() {
        let version = |v: &str| serde_json::from_str::<Version>(v).map(|v| v.0).ok();
        assert_eq!(version("5"), Some(5));
        assert_eq!(
            version("29497.0"),
            Some(29497),
            "an integral float is an integer"
        );
        assert_eq!(version("18446744073709551615"), Some(u64::MAX));
        assert_eq!(version("5.5"), None);
        assert_eq!(version("-1"), None);
        assert_eq!(version("1e300"), None);
        assert_eq!(version("\"5\""), None);
    }

    fn code(text: &str) -> (Option<u64>, &'static str) {
        let e = Command::parse(text.as_bytes()).unwrap_err();
        (e.id, e.error.code)
    }

    #[test]
    fn parses_every_op() {
        let c = Command::parse(
            br#"{"id":1,"op":"subscribe","channel":"a","since":{"epoch":"e","offset":3}}"#,
        )
        .unwrap();
        assert!(
            matches!(c, Command::Subscribe { id: Some(1), ref channel, since: Some(ref s), .. } if channel == "a" && s.offset == 3)
        );
        let c =
            Command::parse(br#"{"id":2,"op":"publish","channel":"a","data":{"x": [1]}}"#).unwrap();
        assert!(matches!(c, Command::Publish { data, .. } if data.get() == r#"{"x": [1]}"#));
        assert!(matches!(
            Command::parse(br#"{"op":"ping","id":4}"#).unwrap(),
            Command::Ping { id: Some(4) }
        ));
        assert!(matches!(
            Command::parse(br#"{"op":"unsubscribe","channel":"a"}"#).unwrap(),
            Command::Unsubscribe { id: None, .. }
        ));
    }

    #[test]
    fn errors_carry_codes_and_ids() {
        assert_eq!(code("{nope"), (None, "malformed_json"));
        assert_eq!(code(r#"{"id":7,"op":"dance"}"#), (Some(7), "unknown_op"));
        assert_eq!(
            code(r#"{"id":8,"op":"subscribe"}"#),
            (Some(8), "bad_request")
        );
        assert_eq!(
            code(r#"{"id":9,"op":"publish","channel":"a"}"#),
            (Some(9), "bad_request")
        );
        assert_eq!(
            code(r#"{"id":10,"op":"subscribe","channel":""}"#),
            (Some(10), "invalid_channel")
        );
        assert_eq!(
            code(r#"{"id":11,"op":"subscribe","channel":5}"#),
            (Some(11), "bad_request")
        );
        assert_eq!(code(r#"[1,2]"#), (None, "bad_request"));
    }

    #[test]
    fn error_statuses() {
        let status = |code| ErrorBody::new(code, "").status().as_u16();
        assert_eq!(status(error_code::BACKPLANE_UNAVAILABLE), 503);
        assert_eq!(status(error_code::UNAUTHORIZED), 401);
        assert_eq!(status(error_code::FORBIDDEN), 403);
        assert_eq!(status(error_code::MESSAGE_TOO_LARGE), 413);
        assert_eq!(status(error_code::BAD_REQUEST), 400);
        // An `Invalid` backplane error is the caller's fault, whatever the endpoint.
        let invalid = backplane_error(&BackplaneError::Invalid("not JSON".into()));
        assert_eq!(invalid.status().as_u16(), 400);
    }

    #[test]
    fn channel_rule() {
        assert!(check_channel("chat:room-1/x").is_ok());
        assert!(check_channel("a b").is_err());
        assert!(check_channel("a\nb").is_err());
        assert!(check_channel(&"x".repeat(256)).is_err());
        assert!(check_channel(&"x".repeat(255)).is_ok());
        assert!(check_channel("$gateway:control").is_err());
        assert!(check_channel("$gateway:x").is_err());
        assert!(check_channel("$other:x").is_ok());
    }
}
