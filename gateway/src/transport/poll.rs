//! Long-poll transport (`GET /poll?channel=A&channel=B&cursor=C&timeout=S`), for networks that
//! break streaming: each request answers the publications after the cursor, or waits up to the
//! timeout for some, and hands back the cursor to send next time.
//!
//! It reuses the SSE cursor and the [`Session`] rule, so a poll resumes exactly like an SSE
//! reconnect: every publication after the cursor once, in order, on any node. A request is a
//! short-lived session: it subscribes (joining the hub before reading positions, so nothing
//! published meanwhile is missed), collects what the session outputs, and answers.
//!
//! A server unsubscribe (`POST /api/unsubscribe`) answers at once with an `unsubscribed` event, and
//! the answer's cursor no longer names the channel; a server disconnect answers 403
//! `user_disconnected`, as every later poll with the same token is.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::{header, Response, StatusCode};
use serde::Serialize;

use crate::cursor;
use crate::drain::reconnect_hint;
use crate::http::response::{self, Body};
use crate::node::Node;
use crate::protocol::{disconnected_error, error_code, ErrorBody};
use crate::security::auth::Identity;
use crate::security::guard::too_many;
use crate::session::fresh;
use crate::session::{oldest_live, unsubscribed_push, Output, Session};
use crate::transport::stream_query::{decode_cursor, verify_compact, StreamQuery};

/// Most outputs gathered into one answer once something is ready; the rest waits for the next
/// poll (the cursor says where to continue).
const BATCH: usize = 1024;

/// A validated poll request.
struct PollRequest {
    channels: Vec<Arc<str>>,
    /// The cursor's positions; channels absent from it start at live.
    cursor: crate::cursor::Cursor,
    /// How the channels absent from the cursor start (`latest=true`).
    options: crate::session::SubscribeOptions,
    timeout: Duration,
}

#[derive(Serialize)]
struct PositionOut<'a> {
    channel: &'a str,
    epoch: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    #[serde(skip)]
    tag_bits: Option<u32>,
}

/// Why an answer was sent, for `gateway_poll_responses_total{outcome}`.
#[derive(Clone, Copy)]
enum Outcome {
    /// Publications or resets.
    Data,
    /// A channel had no position yet: the answer carries its starting point.
    Positions,
    /// The timeout passed with nothing new.
    Timeout,
    /// The node began draining while the request waited.
    Drained,
    /// The server disconnected the poll's user (403).
    Disconnected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Data => "data",
            Outcome::Positions => "positions",
            Outcome::Timeout => "timeout",
            Outcome::Drained => "drained",
            Outcome::Disconnected => "disconnected",
        }
    }
}

/// Answers one poll.
pub(crate) async fn poll(
    node: &Arc<Node>,
    query: Option<&str>,
    client_ip: IpAddr,
    identity: Option<&Identity>,
) -> Response<Body> {
    let request = match parse(node, query) {
        Ok(request) => request,
        Err(e) => {
            node.metrics()
                .poll_responses
                .with_label_values(&["rejected"])
                .inc();
            return response::error(StatusCode::BAD_REQUEST, e.code, e.message);
        }
    };
    if let Err(refusal) = fresh::charge(node, client_ip, &request.channels) {
        node.metrics()
            .poll_responses
            .with_label_values(&["rejected"])
            .inc();
        let error = refusal.error();
        return too_many(error.code, error.message, refusal.retry_after());
    }
    let gauge = node.metrics().connections.with_label_values(&["poll"]);
    gauge.inc();
    let response = answer(node, request, identity).await;
    gauge.dec();
    response
}

/// Reads the query; an error is a 400 with its code.
fn parse(node: &Node, query: Option<&str>) -> Result<PollRequest, ErrorBody> {
    let max_timeout = node.config().poll.max_timeout;
    let mut timeout = max_timeout;
    let read_timeout = |key: &str, value: &str| {
        if key != "timeout" {
            return Ok(());
        }
        match value.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 && s <= max_timeout.as_secs_f64() => {
                timeout = Duration::from_secs_f64(s);
                Ok(())
            }
            _ => Err(ErrorBody::new(
                error_code::BAD_REQUEST,
                format!(
                    "`timeout` must be a number of seconds from 0 to {}, got {value:?}",
                    max_timeout.as_secs_f64()
                ),
            )),
        }
    };
    let max_channels = node.config().client.max_subscriptions;
    let request = StreamQuery::parse(query, "cursor", max_channels, read_timeout)?;
    let cursor = decode_cursor(request.cursor.as_deref(), &request.channels)?;
    Ok(PollRequest {
        channels: request.channels,
        cursor,
        options: request.options,
        timeout,
    })
}

async fn answer(
    node: &Arc<Node>,
    request: PollRequest,
    identity: Option<&Identity>,
) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + request.timeout;
    // Registered like a stream, so a drain answers waiting polls at once instead of at timeout.
    let registration = node.streams().register();
    // A poll receives joins and leaves but is no member: it holds no connection between polls.
    let mut session = Session::new(node.clone(), registration.id()).not_a_member();
    session.set_identity(identity);
    let starts = session.subscribe_from_cursor(&request.channels, &request.cursor, request.options);
    let missing_position = starts.iter().any(Option::is_none);
    let mut out = Vec::new();

    // Every channel's starting position first: the answer's cursor must cover all of them.
    let mut delivered = Vec::new();
    let mut subscribed = vec![None; request.channels.len()];
    while subscribed.iter().any(Option::is_none) {
        tokio::select! {
            event = session.next() => session.apply(event, &mut out),
            _ = registration.closing() => return draining(node),
        }
        if session.disconnected() {
            return disconnected(node, &session);
        }
        for output in out.drain(..) {
            match output {
                Output::Subscribed { result, start, .. } => {
                    let i = request
                        .channels
                        .iter()
                        .position(|c| *c == result.channel)
                        .expect("outputs only name the poll's channels");
                    subscribed[i] = Some((*result, start));
                }
                Output::SubscribeFailed { error, .. } => {
                    return response::error(error.status(), error.code, error.message);
                }
                other => delivered.push(other),
            }
        }
    }
    let (mut results, starts): (Vec<_>, Vec<_>) = subscribed.into_iter().flatten().unzip();
    verify_compact(
        node,
        &request.cursor,
        &request.channels,
        &mut results,
        &starts,
    );
    // Each reset goes before its channel's publications: publications from the reset's offset
    // + 1 follow (after `epoch_changed`, the new epoch's start rather than its top).
    let resets = results
        .into_iter()
        .zip(starts)
        .filter_map(|(result, start)| {
            Some(Output::Reset {
                reason: result.reason?,
                channel: result.channel,
                epoch: result.epoch,
                offset: start.0,
            })
        });
    delivered.splice(0..0, resets);

    let mut outcome = None;
    if has_data(&delivered) {
        outcome = Some(Outcome::Data);
    } else if missing_position {
        outcome = Some(Outcome::Positions);
    }
    while outcome.is_none() {
        tokio::select! {
            event = session.next() => {
                session.apply(event, &mut delivered);
                if has_data(&delivered) {
                    outcome = Some(Outcome::Data);
                }
            }
            _ = tokio::time::sleep_until(deadline) => outcome = Some(Outcome::Timeout),
            _ = registration.closing() => outcome = Some(Outcome::Drained),
        }
        if session.disconnected() {
            return disconnected(node, &session);
        }
    }
    // Whatever else is ready now goes into the same answer.
    session.apply_ready(&mut delivered, BATCH);
    let outcome = outcome.expect("set by the loop");
    let reconnect_ms = matches!(outcome, Outcome::Drained)
        .then(|| reconnect_hint(node.config().drain.reconnect_jitter).as_millis() as u64);
    let body = encode(&request.channels, &session, &delivered, reconnect_ms);
    record(node, outcome, &delivered);
    response::json(StatusCode::OK, body)
}

fn has_data(outputs: &[Output]) -> bool {
    outputs.iter().any(|o| {
        matches!(
            o,
            Output::History(_)
                | Output::Live(_)
                | Output::Presence(_)
                | Output::Reset { .. }
                | Output::Unsubscribed { .. }
        )
    })
}

/// 403 `user_disconnected`: the server disconnected the poll's user while it waited.
fn disconnected(node: &Node, session: &Session) -> Response<Body> {
    record(node, Outcome::Disconnected, &[]);
    let user = session.user().map_or("", |u| u);
    let e = disconnected_error(user);
    response::error(e.status(), e.code, e.message)
}

fn record(node: &Node, outcome: Outcome, delivered: &[Output]) {
    let metrics = node.metrics();
    metrics
        .poll_responses
        .with_label_values(&[outcome.label()])
        .inc();
    let count = delivered
        .iter()
        .filter(|o| matches!(o, Output::History(_) | Output::Live(_)))
        .count();
    if count > 0 {
        metrics
            .deliveries
            .with_label_values(&["poll"])
            .inc_by(count as u64);
    }
    node.observe_fanout("poll", oldest_live(delivered));
}

/// A node that drains takes no new polls: the client goes to another node.
fn draining(node: &Node) -> Response<Body> {
    node.metrics()
        .poll_responses
        .with_label_values(&["drained"])
        .inc();
    response::shutting_down()
}

/// `{"cursor": C, "positions": [...], "events": [...]}`: `events` holds publications (spliced in
/// already serialised) and `{"reset": {...}}` objects, in the order the session produced them,
/// which is the WebSocket push form. The session's positions are exactly what this answer
/// delivers, because every output the session produced is in it.
fn encode(
    channels: &[Arc<str>],
    session: &Session,
    delivered: &[Output],
    reconnect_ms: Option<u64>,
) -> Bytes {
    // A channel the server unsubscribed has no position any more: the cursor leaves it out.
    let positions: Vec<PositionOut> = channels
        .iter()
        .filter_map(|c| {
            let (epoch, offset, tag) = session.position(c)?;
            Some(PositionOut {
                channel: c,
                epoch,
                offset,
                tag: tag.map(backplane::format_tag),
                tag_bits: tag,
            })
        })
        .collect();
    let size: usize = delivered
        .iter()
        .map(|o| match o {
            Output::History(p) | Output::Live(p) | Output::Presence(p) => p.json().len() + 1,
            _ => 0,
        })
        .sum();
    let mut body = BytesMut::with_capacity(size + 256);
    body.put_slice(b"{\"cursor\":\"");
    let entries = positions
        .iter()
        .map(|p| (p.channel, p.epoch, p.offset, p.tag_bits));
    body.put_slice(cursor::encode_tagged(entries).as_bytes());
    body.put_slice(b"\",\"positions\":");
    body.put_slice(&serde_json::to_vec(&positions).expect("cannot fail"));
    if let Some(ms) = reconnect_ms {
        body.put_slice(format!(",\"reconnect_ms\":{ms}").as_bytes());
    }
    body.put_slice(b",\"events\":[");
    let mut first = true;
    for output in delivered {
        let event = match output {
            Output::History(p) | Output::Live(p) | Output::Presence(p) => p.json().clone(),
            Output::Unsubscribed { channel, reason } => unsubscribed_push(channel, reason),
            other => match other.reset_push() {
                Some(push) => push,
                None => continue,
            },
        };
        if !first {
            body.put_u8(b',');
        }
        first = false;
        body.put_slice(&event);
    }
    body.put_slice(b"]}");
    body.freeze()
}

/// `Cache-Control` for poll answers: never cached, every answer depends on the cursor and time.
pub(crate) fn no_store(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}
