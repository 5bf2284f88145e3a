//! The server HTTP API: `POST /api/publish` and `GET /api/history`.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::http::response::{self, Body};
use crate::node::Node;
use crate::protocol::{backplane_error, check_channel, check_idempotency_key, error_code};

#[derive(Deserialize)]
struct PublishRequest<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<std::borrow::Cow<'a, str>>,
}

/// `POST /api/publish {"channel": C, "data": <json>}` → `{"channel": C, "offset": N, "epoch": E}`.
/// A 200 means the publication is in history and will reach every current subscriber.
pub(crate) async fn publish(node: &Arc<Node>, request: Request<Incoming>) -> Response<Body> {
    let limit = node.config().api_max_body();
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return response::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_code::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {limit} bytes"),
            )
        }
        Err(e) => {
            return response::error(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                e.to_string(),
            );
        }
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) if e.is_data() => {
            return response::error(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                e.to_string(),
            )
        }
        Err(e) => {
            return response::error(
                StatusCode::BAD_REQUEST,
                error_code::MALFORMED_JSON,
                e.to_string(),
            )
        }
    };
    if let Err(e) = check_channel(&request.channel) {
        return response::error(StatusCode::BAD_REQUEST, e.code, e.message);
    }
    if let Err(e) = check_idempotency_key(request.idempotency_key.as_deref()) {
        return response::error(StatusCode::BAD_REQUEST, e.code, e.message);
    }
    if let Err(e) = node
        .policy()
        .namespaces
        .check_size(&request.channel, request.data.get().len())
    {
        return response::error(e.status(), e.code, e.message);
    }
    let data = backplane::json::compact(request.data.get());
    let key = request
        .idempotency_key
        .as_deref()
        .map(backplane::Idempotency::server);
    match node.publish(&request.channel, data, key).await {
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
