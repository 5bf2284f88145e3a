//! The security hooks the transports call: admission of a streaming connection (Origin, token,
//! connection limits), the per-command guard of a WebSocket connection (command rate, `connect`
//! and `refresh` — which revokes what the new token no longer allows —, channel permissions,
//! token expiry, idle timeout while no subscription is held), the channel check of SSE
//! streams and long-polls, and the API key check. What they check against is the node's `policy`. Each refusal is counted in `gateway_limit_rejections_total` or
//! `gateway_auth_failures_total`.
//!
//! Refusals are whole HTTP responses returned as `Err`: large, but built once on a cold path.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::cursor;
use crate::http::response::{self, Body};
use crate::node::Node;
use crate::protocol::{
    close_code, error_code, reply_err, reply_ok, Command, CommandError, ErrorBody,
};
use crate::security::auth::{AuthError, Identity};
use crate::security::limits::{Permit, Refusal, TokenBucket};
use crate::security::namespace::Action;

/// A streaming connection let in: who it is, and its place in the connection counts.
pub(crate) struct Admission {
    pub(crate) identity: Option<Identity>,
    pub(crate) permit: Permit,
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub(crate) fn too_many(
    code: &'static str,
    message: impl Into<String>,
    retry: Duration,
) -> Response<Body> {
    let mut response = response::error(StatusCode::TOO_MANY_REQUESTS, code, message);
    let secs = retry.as_secs_f64().ceil().max(1.0) as u64;
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs.to_string()).expect("digits"),
    );
    response
}

fn refusal_response(refusal: Refusal) -> Response<Body> {
    too_many(
        refusal.code(),
        match refusal {
            Refusal::Node => "this node has reached limits.max_connections",
            Refusal::User => "this user has reached limits.max_connections_per_user",
        },
        Duration::from_secs(1),
    )
}

fn auth_response(e: &AuthError) -> Response<Body> {
    let body = e.body();
    response::error(StatusCode::UNAUTHORIZED, body.code, body.message)
}

/// Lets a WebSocket or SSE connection in, or answers why not: 403 for a foreign Origin, 401 for a
/// bad token (header or `?token=`), 429 over a connection limit.
pub(crate) fn admit(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Admission, Response<Body>> {
    if !crate::security::origin::allowed(&node.config().origin.allowed, headers) {
        node.count_auth("origin");
        return Err(crate::security::origin::refused());
    }
    let policy = node.policy();
    let identity = match crate::security::auth::request_token(headers, query) {
        None => None,
        Some(token) => match policy.verifier.verify(&token) {
            Ok(identity) if node.control().refuses(&identity.user, identity.issued_at) => {
                node.count_auth("disconnected");
                let e = crate::protocol::disconnected_error(&identity.user);
                return Err(response::error(e.status(), e.code, e.message));
            }
            Ok(identity) => Some(identity),
            Err(e) => {
                node.count_auth(e.reason());
                return Err(auth_response(&e));
            }
        },
    };
    let mut permit = policy.limits.admit().map_err(|refusal| {
        node.count_limit(refusal.label());
        refusal_response(refusal)
    })?;
    if let Some(identity) = &identity {
        policy
            .limits
            .admit_user(&mut permit, &identity.user)
            .map_err(|refusal| {
                node.count_limit(refusal.label());
                refusal_response(refusal)
            })?;
    }
    Ok(Admission { identity, permit })
}

/// Longest request target hyper accepts (`http::Uri`); a longer one is answered 414.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// How long the cursor of an SSE stream or a poll may grow so that it is accepted back: at most
/// [`cursor::MAX_CURSOR_LEN`], and for a poll (`cursor_in_url`) whatever the next request's URL
/// leaves once its other parameters are in.
fn cursor_budget(query: &str, cursor_in_url: bool) -> usize {
    if !cursor_in_url {
        return cursor::MAX_CURSOR_LEN;
    }
    let others: usize = query
        .split('&')
        .filter(|pair| !pair.starts_with("cursor="))
        .map(|pair| pair.len() + 1)
        .sum();
    let fixed = "/poll?".len() + others + "cursor=".len();
    MAX_URI_LEN
        .saturating_sub(fixed)
        .min(cursor::MAX_CURSOR_LEN)
}

/// Checks that an SSE stream's or a long-poll's connection may subscribe to each `channel` of the
/// query (401/403), and that the cursor of these channels can never grow beyond what the server
/// accepts back (400 `cursor_too_long`; `cursor_in_url`: a poll, whose cursor rides in the URL).
pub(crate) fn check_stream_channels(
    node: &Node,
    admission: &Admission,
    query: Option<&str>,
    cursor_in_url: bool,
) -> Result<(), Response<Body>> {
    let query = query.unwrap_or("");
    let channels: Vec<Cow<'_, str>> = form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == "channel")
        .map(|(_, channel)| channel)
        .collect();
    let longest = cursor::longest_encoding(channels.iter().map(|c| c.as_ref()));
    let budget = cursor_budget(query, cursor_in_url);
    if longest > budget {
        return Err(response::error(
            StatusCode::BAD_REQUEST,
            error_code::CURSOR_TOO_LONG,
            format!(
                "the cursor of these channels could grow to {longest} bytes, over the {budget} \
                 bytes a cursor may hold (at most {} bytes; a poll's whole URL at most {MAX_URI_LEN}): \
                 use fewer or shorter channel names, or several streams",
                cursor::MAX_CURSOR_LEN
            ),
        ));
    }
    for channel in channels {
        if let Err(e) =
            node.policy()
                .namespaces
                .check(Action::Subscribe, &channel, admission.identity.as_ref())
        {
            node.count_auth(e.code);
            return Err(response::error(e.status(), e.code, e.message));
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch.
fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The farthest an expiry timer is set: a token whose `exp` lies beyond it (up to `u64::MAX`
/// seconds) is treated as expiring then, rather than overflowing the clock.
const FARTHEST_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a token expiring at `exp` (Unix seconds) must end its connection, on the Tokio clock.
/// Every step saturates: `exp` comes from the client.
fn expiry_instant(exp: u64, leeway: Duration) -> Instant {
    let left = Duration::from_secs(exp.saturating_sub(now_unix()))
        .saturating_add(leeway)
        .min(FARTHEST_EXPIRY);
    let now = Instant::now();
    now.checked_add(left)
        .or_else(|| now.checked_add(FARTHEST_EXPIRY / 100))
        .unwrap_or(now)
}

/// What a WebSocket connection does with a command after the guard looked at it.
pub(crate) enum Verdict {
    /// Run it.
    Proceed,
    /// Do not run it; send this reply instead.
    Reply(Bytes),
    /// Send this reply, then close with this code and reason.
    Close(Bytes, u16, Cow<'static, str>),
    /// A `refresh` was accepted: send this reply, then end the subscriptions the new token no
    /// longer allows ([`Guard::may_subscribe`]).
    Refreshed(Bytes),
}

/// The security state of one WebSocket connection.
pub(crate) struct Guard {
    node: Arc<Node>,
    permit: Permit,
    commands: u64,
    /// What only a token, a command rate or an idle timeout needs: `None` until one applies,
    /// so a connection on a node without them holds one pointer for it.
    state: Option<Box<Secured>>,
}

/// The part of a [`Guard`] that exists once a token, a command rate or an idle timeout applies.
#[derive(Default)]
struct Secured {
    identity: Option<Identity>,
    bucket: Option<TokenBucket>,
    /// Commands refused by the rate limit since the last accepted one.
    refused_in_row: u32,
    expiry: Option<Pin<Box<Sleep>>>,
    /// `limits.idle_timeout`, when it applies to this connection.
    idle_timeout: Option<Duration>,
    /// Runs while the connection holds no subscription.
    idle: Option<Pin<Box<Sleep>>>,
}

#[derive(Serialize)]
struct Connected<'a> {
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
}

impl Guard {
    /// `idle` arms the idle timeout (the protocol endpoint; not the echo endpoint).
    pub(crate) fn new(node: Arc<Node>, admission: Admission, idle: bool) -> Guard {
        let limits = &node.config().limits;
        let bucket = (limits.command_rate > 0.0)
            .then(|| TokenBucket::new(limits.command_rate, limits.command_burst));
        let idle_timeout = (idle && !limits.idle_timeout.is_zero()).then_some(limits.idle_timeout);
        let state = (bucket.is_some() || idle_timeout.is_some()).then(|| {
            Box::new(Secured {
                bucket,
                idle_timeout,
                idle: idle_timeout.map(|timeout| Box::pin(tokio::time::sleep(timeout))),
                ..Secured::default()
            })
        });
        let mut guard = Guard {
            node,
            permit: admission.permit,
            commands: 0,
            state,
        };
        if let Some(identity) = admission.identity {
            guard.set_identity(identity);
        }
        guard
    }

    fn set_identity(&mut self, identity: Identity) {
        let leeway = self.node.config().auth.jwt_leeway;
        let state = self.state.get_or_insert_with(Box::default);
        state.expiry = identity
            .expires_at
            .map(|exp| Box::pin(tokio::time::sleep_until(expiry_instant(exp, leeway))));
        state.identity = Some(identity);
    }

    /// Tells the guard whether the connection holds a subscription now (after every step): the
    /// idle timeout runs from the moment it holds none — at the start, and again after its last
    /// subscription ended or failed — and stops while it holds one.
    pub(crate) fn note_subscriptions(&mut self, subscribed: bool) {
        let Some(state) = self.state.as_deref_mut() else {
            return;
        };
        let Some(timeout) = state.idle_timeout else {
            return;
        };
        if subscribed {
            state.idle = None;
        } else if state.idle.is_none() {
            state.idle = Some(Box::pin(tokio::time::sleep(timeout)));
        }
    }

    /// Who the connection is, once a token said so.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.state.as_ref()?.identity.as_ref()
    }

    /// Whether the connection, with its current token, may subscribe to `channel`.
    pub(crate) fn may_subscribe(&self, channel: &str) -> bool {
        self.node
            .policy()
            .namespaces
            .check(Action::Subscribe, channel, self.identity())
            .is_ok()
    }

    /// Resolves when the connection must close: its token expired, or it stayed idle.
    pub(crate) async fn deadline(&mut self) -> (u16, &'static str) {
        let Some(state) = self.state.as_deref_mut() else {
            return std::future::pending().await;
        };
        let expiry = async {
            match state.expiry.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let idle = async {
            match state.idle.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = expiry => {
                self.node.count_auth("expired");
                (close_code::TOKEN_EXPIRED, "token expired")
            }
            _ = idle => {
                self.node.count_limit("idle_timeout");
                (close_code::IDLE, "no subscription for limits.idle_timeout")
            }
        }
    }

    /// Looks at one parsed (or unparsable) command; `connect` and `refresh` are answered here.
    pub(crate) fn on_command(&mut self, parsed: &Result<Command<'_>, CommandError>) -> Verdict {
        let id = match parsed {
            Ok(command) => command.id(),
            Err(e) => e.id,
        };
        let state = self.state.as_deref_mut();
        if let Some((bucket, refused_in_row)) =
            state.and_then(|s| Some((s.bucket.as_mut()?, &mut s.refused_in_row)))
        {
            if let Err(wait) = bucket.take() {
                self.node.count_limit("command_rate");
                *refused_in_row += 1;
                let error = ErrorBody::new(
                    error_code::RATE_LIMITED,
                    format!(
                        "more than limits.command_rate commands; retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                );
                let burst = self.node.config().limits.command_burst.max(1);
                if *refused_in_row > burst {
                    return Verdict::Close(
                        reply_err(id, &error),
                        close_code::RATE_LIMITED,
                        "command rate exceeded".into(),
                    );
                }
                return Verdict::Reply(reply_err(id, &error));
            }
            *refused_in_row = 0;
        }
        let Ok(command) = parsed else {
            return Verdict::Proceed;
        };
        self.commands += 1;
        let first = self.commands == 1;
        let namespaces = &self.node.policy().namespaces;
        let refuse = |error: ErrorBody| {
            self.node
                .metrics()
                .protocol_errors
                .with_label_values(&[error.code])
                .inc();
            Verdict::Reply(reply_err(id, &error))
        };
        match command {
            Command::Connect { token, .. } => {
                if self.identity().is_some() {
                    return refuse(ErrorBody::new(
                        error_code::ALREADY_CONNECTED,
                        "the connection is authenticated already",
                    ));
                }
                if !first {
                    return refuse(ErrorBody::new(
                        error_code::BAD_REQUEST,
                        "connect must be the first command",
                    ));
                }
                self.authenticate(id, token, false)
            }
            Command::Refresh { token, .. } => {
                if self.identity().is_none() {
                    return refuse(ErrorBody::new(
                        error_code::BAD_REQUEST,
                        "refresh needs an authenticated connection: send connect first",
                    ));
                }
                self.authenticate(id, token, true)
            }
            // Who is in a channel is shown to those who may subscribe to it.
            Command::Subscribe { channel, .. } | Command::Presence { channel, .. } => {
                if let Err(e) = namespaces.check(Action::Subscribe, channel, self.identity()) {
                    self.node.count_auth(e.code);
                    return refuse(e);
                }
                Verdict::Proceed
            }
            Command::Publish { channel, data, .. } => {
                if let Err(e) = namespaces.check(Action::Publish, channel, self.identity()) {
                    self.node.count_auth(e.code);
                    return refuse(e);
                }
                if let Err(e) = namespaces.check_size(channel, data.get().len()) {
                    self.node.count_limit("message_size");
                    return refuse(e);
                }
                Verdict::Proceed
            }
            Command::Unsubscribe { .. } | Command::Ping { .. } => Verdict::Proceed,
        }
    }

    fn authenticate(&mut self, id: Option<u64>, token: &str, refresh: bool) -> Verdict {
        let identity = match self.node.policy().verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => {
                self.node.count_auth(e.reason());
                let code = if e == AuthError::Expired {
                    close_code::TOKEN_EXPIRED
                } else {
                    close_code::UNAUTHORIZED
                };
                return Verdict::Close(reply_err(id, &e.body()), code, e.code().into());
            }
        };
        if self
            .node
            .control()
            .refuses(&identity.user, identity.issued_at)
        {
            self.node.count_auth("disconnected");
            let error = crate::protocol::disconnected_error(&identity.user);
            return Verdict::Close(
                reply_err(id, &error),
                close_code::DISCONNECTED,
                crate::protocol::DISCONNECTED_REASON.into(),
            );
        }
        if refresh {
            let current = self.identity().map(|i| &i.user);
            if current != Some(&identity.user) {
                self.node.count_auth("user_mismatch");
                let error = ErrorBody::new(
                    error_code::FORBIDDEN,
                    "refresh must keep the connection's user (`sub`)",
                );
                return Verdict::Reply(reply_err(id, &error));
            }
        } else if let Err(refusal) = self
            .node
            .policy()
            .limits
            .admit_user(&mut self.permit, &identity.user)
        {
            self.node.count_limit(refusal.label());
            let error = ErrorBody::new(refusal.code(), "this user has too many connections");
            return Verdict::Close(
                reply_err(id, &error),
                close_code::TOO_MANY_USER_CONNECTIONS,
                refusal.code().into(),
            );
        }
        let reply = reply_ok(
            id,
            &Connected {
                user: &identity.user,
                expires_at: identity.expires_at,
            },
        );
        self.set_identity(identity);
        if refresh {
            Verdict::Refreshed(reply)
        } else {
            Verdict::Reply(reply)
        }
    }
}

/// Whether `/api/*` may be called with these headers: the key when keys are configured.
pub(crate) fn check_api_key(node: &Node, headers: &HeaderMap) -> Result<(), Response<Body>> {
    let keys = &node.config().auth.api_keys;
    if keys.is_empty() || crate::security::auth::api_key_ok(keys, headers) {
        return Ok(());
    }
    node.count_auth("api_key");
    let mut response = response::error(
        StatusCode::UNAUTHORIZED,
        error_code::INVALID_API_KEY,
        "the API needs `Authorization: apikey <key>` with a configured key",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("apikey"));
    Err(response)
}

/// A node without API keys serves `/api/*` only where its API address is private (loopback,
/// `config` refuses the rest unless `auth.api_open`). Behind a proxy the TCP peer is the proxy,
/// so loopback says nothing about the client: a keyless API refuses a request that came through
/// a proxy (from `limits.trusted_proxies`, or carrying `X-Forwarded-For`, `Forwarded` or
/// `X-Real-IP`) unless `auth.api_open` says the API is meant to be open.
pub(crate) fn check_keyless_api_is_direct(
    node: &Node,
    from_proxy: bool,
    headers: &HeaderMap,
) -> Result<(), Response<Body>> {
    let auth = &node.config().auth;
    if !auth.api_keys.is_empty()
        || auth.api_open
        || !(from_proxy || crate::security::client_ip::is_forwarded(headers))
    {
        return Ok(());
    }
    node.count_auth("api_key");
    let mut response = response::error(
        StatusCode::UNAUTHORIZED,
        error_code::INVALID_API_KEY,
        "this node has no auth.api_keys and the request came through a proxy: the API is served \
         without a key to direct loopback clients only (set auth.api_keys, or auth.api_open)",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("apikey"));
    Err(response)
}

/// A response body that ends when the connection's token expires (SSE streams), and holds the
/// connection's permit for as long as it lives.
pub(crate) struct Expiring {
    inner: Body,
    expiry: Option<Pin<Box<Sleep>>>,
    _permit: Permit,
}

impl Expiring {
    pub(crate) fn wrap(node: &Node, inner: Body, admission: Admission) -> Body {
        let expiry = admission
            .identity
            .as_ref()
            .and_then(|i| i.expires_at)
            .map(|exp| {
                Box::pin(tokio::time::sleep_until(expiry_instant(
                    exp,
                    node.config().auth.jwt_leeway,
                )))
            });
        http_body_util::BodyExt::boxed_unsync(Expiring {
            inner,
            expiry,
            _permit: admission.permit,
        })
    }
}

impl hyper::body::Body for Expiring {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Some(expiry) = self.expiry.as_mut() {
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_instants_saturate_instead_of_overflowing() {
        let now = Instant::now();
        // Table: exp, leeway; none may panic, each lies between now and the farthest expiry.
        for (exp, leeway) in [
            (u64::MAX, Duration::ZERO),
            (u64::MAX, Duration::MAX),
            (0, Duration::MAX),
            (0, Duration::ZERO),
            (now_unix() + 60, Duration::from_secs(5)),
        ] {
            let at = expiry_instant(exp, leeway);
            assert!(at >= now, "{exp} {leeway:?}");
            assert!(at <= Instant::now() + FARTHEST_EXPIRY, "{exp} {leeway:?}");
        }
        // An ordinary token expires no later than it says (plus the leeway).
        let soon = expiry_instant(now_unix() + 60, Duration::from_secs(5));
        assert!(soon <= Instant::now() + Duration::from_secs(66));
    }
}
