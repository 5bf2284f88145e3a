//! The server HTTP API: `POST /api/publish` (one publication or a batch), `POST /api/broadcast`
//! (one data to many channels) and `GET /api/history`. The management of users and channels
//! (`/api/disconnect`, `/api/unsubscribe`, `/api/channels`) is in [`crate::http::manage`].

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::http::response::{self, Body, RequestBody};
use crate::node::Node;
use crate::protocol::{
    backplane_error, check_channel, check_idempotency_key, error_code, ErrorBody, Version,
};

/// Most publications in one batch publish.
pub(crate) const MAX_BATCH: usize = 1000;

/// `POST /api/publish`: one publication, or (with `publications`) a batch. Each field is
/// `Some` when the key is there, even with JSON `null`: a batch must come without the single
/// publish's keys, and the single publish without `publications`.
#[derive(Deserialize)]
struct PublishRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    channel: Option<Nullable<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    idempotency_key: Option<Nullable<'a>>,
    #[serde(default, deserialize_with = "present")]
    version: Option<Option<Version>>,
    #[serde(borrow, default, deserialize_with = "present")]
    publications: Option<Option<Vec<PublishItem<'a>>>>,
}

/// A string or `null`, borrowed from the body when it has no escapes.
#[derive(Deserialize)]
struct Nullable<'a>(#[serde(borrow)] Option<Cow<'a, str>>);

/// One publication of a batch.
#[derive(Deserialize)]
struct PublishItem<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(default)]
    version: Option<Version>,
}

/// A key that is there, whatever its value (`Option` alone reads `null` as absent).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

pub(crate) fn bad_request(message: impl Into<String>) -> Response<Body> {
    response::error(StatusCode::BAD_REQUEST, error_code::BAD_REQUEST, message)
}

/// The request's body, at most `api_max_body` bytes (413 beyond).
#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
pub(crate) async fn read_body<B: RequestBody>(
    node: &Node,
    request: Request<B>,
) -> Result<Bytes, Response<Body>> {
    let limit = node.config().api_max_body();
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(response::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            error_code::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )),
        Err(e) => Err(bad_request(e.to_string())),
    }
}

/// The body as `T`: 400 `malformed_json` when it is not JSON, 400 `bad_request` when it is not
/// of the expected shape.
#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response<Body>> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            error_code::BAD_REQUEST
        } else {
            error_code::MALFORMED_JSON
        };
        response::error(StatusCode::BAD_REQUEST, code, e.to_string())
    })
}

/// Checks one publication as the single publish does: the status and error to answer, whose
/// message names `at` (the publication's place in a batch or a broadcast, if any: the list's
/// field and the index).
fn check_item(
    node: &Node,
    channel: &str,
    data: &RawValue,
    idempotency_key: Option<&str>,
    at: Option<(&str, usize)>,
) -> Result<(), (StatusCode, ErrorBody)> {
    let place = |status: StatusCode, mut e: ErrorBody| {
        if let Some((list, i)) = at {
            e.message = format!("{list}[{i}]: {}", e.message);
        }
        (status, e)
    };
    check_channel(channel).map_err(|e| place(StatusCode::BAD_REQUEST, e))?;
    check_idempotency_key(idempotency_key).map_err(|e| place(StatusCode::BAD_REQUEST, e))?;
    node.policy()
        .namespaces
        .check_size(channel, data.get().len())
        .map_err(|e| place(e.status(), e))
}

/// `POST /api/publish {"channel": C, "data": <json>}` → `{"channel": C, "offset": N, "epoch": E}`.
/// A 200 means the publication is in history and will reach every current subscriber.
/// `{"publications": [{"channel", "data", "idempotency_key"?}, ...]}` publishes a batch (one
/// round trip to the backplane) and answers `{"results": [...]}`, each an ack or an error.
pub(crate) async fn publish<B: RequestBody>(
    node: &Arc<Node>,
    request: Request<B>,
) -> Response<Body> {
    let body = match read_body(node, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: PublishRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let (channel, data, key, version) = match request {
        PublishRequest {
            publications: Some(items),
            channel: None,
            data: None,
            idempotency_key: None,
            version: None,
        } => {
            let Some(items) = items else {
                return bad_request("`publications` must be a list of publications");
            };
            return publish_batch(node, &items).await;
        }
        PublishRequest {
            publications: Some(_),
            ..
        } => {
            return bad_request(
                "`publications` (a batch) cannot be combined with `channel`, `data`, \
                 `idempotency_key` or `version`",
            )
        }
        PublishRequest {
            channel: Some(Nullable(Some(channel))),
            data: Some(data),
            idempotency_key,
            version,
            ..
        } => (
            channel,
            data,
            idempotency_key.and_then(|k| k.0),
            version.flatten().map(|v| v.0),
        ),
        PublishRequest { channel: None, .. } => return bad_request("missing field `channel`"),
        PublishRequest {
            channel: Some(Nullable(None)),
            ..
        } => return bad_request("`channel` must be a string, got null"),
        PublishRequest { data: None, .. } => return bad_request("missing field `data`"),
    };
    let key = key.as_deref();
    if let Err((status, e)) = check_item(node, &channel, data, key, None) {
        return response::error(status, e.code, e.message);
    }
    let data = backplane::json::compact(data.get());
    let key = key.map(backplane::Idempotency::server);
    match node.publish(&channel, data, key, version).await {
        Ok(ack) => response::json(
            StatusCode::OK,
            serde_json::to_vec(&ack).expect("cannot fail"),
        ),
        Err(e) => {
            let error = backplane_error(&e);
            response::error(error.status(), error.code, error.message)
        }
    }
}

/// A batch: every item is checked before any is published (a bad one refuses the request with
/// its place), then all go to the backplane together; each is answered in order.
async fn publish_batch(node: &Arc<Node>, items: &[PublishItem<'_>]) -> Response<Body> {
    if items.is_empty() || items.len() > MAX_BATCH {
        return bad_request(format!(
            "`publications` must hold 1 to {MAX_BATCH} publications, got {}",
            items.len()
        ));
    }
    let mut batch = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let key = item.idempotency_key.as_deref();
        let at = Some(("publications", i));
        if let Err((status, e)) = check_item(node, &item.channel, item.data, key, at) {
            return response::error(status, e.code, e.message);
        }
        batch.push(backplane::BatchItem {
            channel: &item.channel,
            data: backplane::json::compact(item.data.get()),
            idempotency: key.map(backplane::Idempotency::server),
            version: item.version.map(|v| v.0),
        });
    }
    publish_checked(node, &batch).await
}

/// Publishes checked items together and answers `{"results": [...]}`, one per item in order:
/// its ack, or `{"channel": C, "error": {...}}`.
async fn publish_checked(node: &Node, batch: &[backplane::BatchItem<'_>]) -> Response<Body> {
    let results = node.publish_batch(batch).await;
    let mut body = Vec::with_capacity(16 + results.len() * (96 + 32));
    body.extend_from_slice(b"{\"results\":[");
    for (i, (result, item)) in results.iter().zip(batch).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        match result {
            Ok(ack) => serde_json::to_writer(&mut body, ack).expect("cannot fail"),
            Err(e) => {
                body.extend_from_slice(b"{\"channel\":");
                serde_json::to_writer(&mut body, item.channel).expect("cannot fail");
                body.extend_from_slice(b",\"error\":");
                serde_json::to_writer(&mut body, &backplane_error(e)).expect("cannot fail");
                body.push(b'}');
            }
        }
    }
    body.extend_from_slice(b"]}");
    response::json(StatusCode::OK, body)
}

/// `POST /api/broadcast {"channels": [...], "data": <json>, "idempotency_key"?}`.
#[derive(Deserialize)]
struct BroadcastRequest<'a> {
    #[serde(borrow)]
    channels: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// `POST /api/broadcast`: one data to 1 to [`MAX_BATCH`] channels, published together like a
/// batch and answered like one (`{"results": [...]}`, one per channel in order). Every channel is
/// checked first, as the single publish checks its channel; one bad channel refuses the request.
/// An `idempotency_key` applies to each channel on its own (keys live per channel).
pub(crate) async fn broadcast<B: RequestBody>(
    node: &Arc<Node>,
    request: Request<B>,
) -> Response<Body> {
    let body = match read_body(node, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: BroadcastRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let channels = &request.channels;
    if channels.is_empty() || channels.len() > MAX_BATCH {
        return bad_request(format!(
            "`channels` must hold 1 to {MAX_BATCH} channels, got {}",
            channels.len()
        ));
    }
    let key = request.idempotency_key.as_deref();
    let data = backplane::json::compact(request.data.get());
    let mut batch = Vec::with_capacity(channels.len());
    for (i, channel) in channels.iter().enumerate() {
        let at = Some(("channels", i));
        if let Err((status, e)) = check_item(node, channel, request.data, key, at) {
            return response::error(status, e.code, e.message);
        }
        batch.push(backplane::BatchItem {
            channel,
            data: data.clone(),
            idempotency: key.map(backplane::Idempotency::server),
            version: None,
        });
    }
    publish_checked(node, &batch).await
}

/// `GET /api/history?channel=C&since=N&limit=L` → publications with offset > N, oldest first.
pub(crate) async fn history(node: &Arc<Node>, query: Option<&str>) -> Response<Body> {
    let max_page = node.config().history.max_page;
    let (mut channel, mut since, mut limit) = (None, 0u64, max_page);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let bad = |what: &str| {
            response::error(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                format!("`{key}` must be {what}, got {value:?}"),
            )
        };
        match &*key {
            "channel" => channel = Some(value.to_string()),
            "since" => match value.parse() {
                Ok(n) => since = n,
                Err(_) => return bad("a non-negative integer"),
            },
            "limit" => match value.parse() {
                Ok(n) if n <= max_page => limit = n,
                _ => return bad(&format!("an integer from 0 to {max_page}")),
            },
            _ => {}
        }
    }
    let Some(channel) = channel else {
        return response::error(
            StatusCode::BAD_REQUEST,
            error_code::BAD_REQUEST,
            "the `channel` query parameter is required",
        );
    };
    if let Err(e) = check_channel(&channel) {
        return response::error(StatusCode::BAD_REQUEST, e.code, e.message);
    }
    let page = match node.history(&channel, since, limit).await {
        Ok(page) => page,
        Err(e) => {
            let error = backplane_error(&e);
            return response::error(error.status(), error.code, error.message);
        }
    };
    // Publications are already serialised: splice their bytes rather than re-encoding them.
    let size: usize = page.publications.iter().map(|p| p.json().len() + 1).sum();
    let mut body = BytesMut::with_capacity(size + channel.len() + 96);
    body.put_slice(b"{\"channel\":");
    body.put_slice(&serde_json::to_vec(&channel).expect("cannot fail"));
    body.put_slice(b",\"epoch\":");
    body.put_slice(&serde_json::to_vec(&*page.epoch).expect("cannot fail"));
    body.put_slice(format!(",\"top\":{},\"publications\":[", page.top).as_bytes());
    for (i, p) in page.publications.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(p.json());
    }
    body.put_slice(b"]}");
    response::json(StatusCode::OK, Bytes::from(body))
}

/// `GET /api/presence?channel=C[&count_only=true]`: who is in a channel, cluster-wide.
pub(crate) async fn presence(node: &Arc<Node>, query: Option<&str>) -> Response<Body> {
    match presence_query(query) {
        Ok((channel, count_only)) => presence_answer(node, &channel, count_only).await,
        Err(error) => response::error(error.status(), error.code, error.message),
    }
}

/// The `channel` and `count_only` of a presence query (`/api/presence`, `/presence`).
pub(crate) fn presence_query(query: Option<&str>) -> Result<(String, bool), ErrorBody> {
    let (mut channel, mut count_only) = (None, false);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "channel" if channel.is_some() => {
                return Err(ErrorBody::new(
                    error_code::BAD_REQUEST,
                    "give one `channel` per presence query",
                ))
            }
            "channel" => channel = Some(value.into_owned()),
            "count_only" => {
                count_only = match &*value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ErrorBody::new(
                            error_code::BAD_REQUEST,
                            format!("`count_only` must be true or false, got {value:?}"),
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    let channel = channel.ok_or_else(|| {
        ErrorBody::new(
            error_code::BAD_REQUEST,
            "the `channel` query parameter is required",
        )
    })?;
    check_channel(&channel)?;
    Ok((channel, count_only))
}

/// The presence answer of a channel the caller may see, or its error.
pub(crate) async fn presence_answer(
    node: &Arc<Node>,
    channel: &str,
    count_only: bool,
) -> Response<Body> {
    match crate::presence::read(node, channel, count_only).await {
        Ok(answer) => response::json(StatusCode::OK, answer.to_json()),
        Err(error) => response::error(error.status(), error.code, error.message),
    }
}
