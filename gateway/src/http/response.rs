//! HTTP response bodies and the JSON error shape every endpoint shares:
//! `{"error": {"code": "<snake_case>", "message": "..."}}`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{header, Response, StatusCode};

use crate::protocol::{error_code, ErrorBody};

/// The body type of every response.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request body the routes take: hyper's, or none for a request the gateway read itself (an
/// SSE request on its own HTTP/1.1 path, `http::sse_h1`).
pub(crate) trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response with the given status.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static parts are valid")
}

/// A JSON error response.
pub(crate) fn error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response<Body> {
    #[derive(serde::Serialize)]
    struct Wrapper<'a> {
        error: &'a ErrorBody,
    }
    let body = ErrorBody::new(code, message);
    json(
        status,
        serde_json::to_vec(&Wrapper { error: &body }).expect("cannot fail"),
    )
}

/// 503 for a new stream, poll or WebSocket on a draining node: proxies and clients go to another.
pub(crate) fn shutting_down() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        error_code::SHUTTING_DOWN,
        "this node is shutting down; connect to another",
    )
}
