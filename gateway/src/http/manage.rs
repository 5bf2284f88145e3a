//! The server API's management of users and channels: `POST /api/disconnect` and
//! `POST /api/unsubscribe`, which reach the user's connections on every node through the control
//! channel ([`crate::control`]), and `GET /api/channels`, the channels with subscribers anywhere
//! in the cluster as the nodes report them to the backplane.

use std::borrow::Cow;
use std::sync::Arc;

use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::control::{self, Command, CONTROL_CHANNEL};
use crate::http::api::{bad_request, parse_json, read_body};
use crate::http::response::{self, Body, RequestBody};
use crate::node::Node;
use crate::protocol::{backplane_error, check_channel};

/// Longest user name (a token's `sub`) the API takes, in characters (as JSON Schema counts).
pub(crate) const MAX_USER_LEN: usize = 1024;

#[derive(Deserialize)]
struct DisconnectRequest<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
}

#[derive(Deserialize)]
struct UnsubscribeRequest<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
}

#[derive(Serialize)]
struct Disconnected<'a> {
    user: &'a str,
    /// The disconnect's time (Unix seconds): tokens of the user issued at or before it are
    /// refused for `api.disconnect_window`.
    disconnected_at: u64,
}

#[derive(Serialize)]
struct Unsubscribed<'a> {
    user: &'a str,
    channel: &'a str,
}

#[derive(Serialize)]
struct Channels {
    channels: Vec<backplane::ChannelCount>,
}

#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
fn check_user(user: &str) -> Result<(), Response<Body>> {
    if user.is_empty() || user.chars().count() > MAX_USER_LEN {
        return Err(bad_request(format!(
            "`user` must be 1 to {MAX_USER_LEN} characters"
        )));
    }
    Ok(())
}

/// Publishes a control command to every node; 200 with `answer` once it is in the control
/// channel's history (every node then acts on it as it arrives).
async fn send(node: &Node, command: &Command, answer: Vec<u8>) -> Response<Body> {
    match node
        .publish(CONTROL_CHANNEL, command.to_json(), None, None)
        .await
    {
        Ok(_) => response::json(StatusCode::OK, answer),
        Err(e) => {
            let error = backplane_error(&e);
            response::error(error.status(), error.code, error.message)
        }
    }
}

/// `POST /api/disconnect {"user": U}` → `{"user": U, "disconnected_at": T}`: closes every
/// connection of U on every node (WebSocket 4010 with `{"reason":"disconnected",
/// "reconnect":false}`; SSE a `disconnect` event, then the end; a waiting long-poll 403), and
/// refuses U's tokens issued at or before T for `api.disconnect_window`.
pub(crate) async fn disconnect<B: RequestBody>(
    node: &Arc<Node>,
    request: Request<B>,
) -> Response<Body> {
    let body = match read_body(node, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: DisconnectRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    if let Err(response) = check_user(&request.user) {
        return response;
    }
    let at = control::now_unix();
    let answer = Disconnected {
        user: &request.user,
        disconnected_at: at,
    };
    let answer = serde_json::to_vec(&answer).expect("cannot fail");
    let command = Command::Disconnect {
        user: request.user.into_owned(),
        at,
    };
    send(node, &command, answer).await
}

/// `POST /api/unsubscribe {"user": U, "channel": C}` → `{"user": U, "channel": C}`: every
/// connection of U on every node leaves C and is told so (`{"unsubscribed": {"channel": C,
/// "reason": "server"}}`).
pub(crate) async fn unsubscribe<B: RequestBody>(
    node: &Arc<Node>,
    request: Request<B>,
) -> Response<Body> {
    let body = match read_body(node, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: UnsubscribeRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    if let Err(response) = check_user(&request.user) {
        return response;
    }
    if let Err(e) = check_channel(&request.channel) {
        return response::error(StatusCode::BAD_REQUEST, e.code, e.message);
    }
    let answer = Unsubscribed {
        user: &request.user,
        channel: &request.channel,
    };
    let answer = serde_json::to_vec(&answer).expect("cannot fail");
    let command = Command::Unsubscribe {
        user: request.user.into_owned(),
        channel: request.channel.into_owned(),
    };
    send(node, &command, answer).await
}

/// `GET /api/channels?prefix=P` → `{"channels": [{"channel": C, "subscribers": N}, ...]}`: the
/// channels starting with P (all without it) that have subscribers on any live node, sorted by
/// name. This node reports its own counts first, so its subscribers are counted as of now; the
/// other nodes' as of their last report (`api.channels_report_interval`).
pub(crate) async fn channels(node: &Arc<Node>, query: Option<&str>) -> Response<Body> {
    let mut prefix = String::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key == "prefix" {
            prefix = value.into_owned();
        }
    }
    if let Err(e) = node.report_channels().await {
        tracing::debug!(error = %e, "channel report failed");
    }
    match node.channels(&prefix).await {
        Ok(mut channels) => {
            channels.retain(|c| !control::is_reserved(&c.channel));
            let body = serde_json::to_vec(&Channels { channels }).expect("cannot fail");
            response::json(StatusCode::OK, body)
        }
        Err(e) => {
            let error = backplane_error(&e);
            response::error(error.status(), error.code, error.message)
        }
    }
}
