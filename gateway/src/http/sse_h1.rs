//! An HTTP/1.1 path of the gateway's own for `GET /sse` on a plain connection. hyper's HTTP/1.1
//! connection keeps a 16 KiB read buffer and an 8 KiB header buffer for the whole life of a
//! response (its builder has no smaller sizes), which made an idle SSE stream cost 4.4× a
//! WebSocket. Here the request head is read and parsed (httparse) into a buffer that is gone
//! once the request is built, the router answers it exactly as it answers hyper's requests, and
//! the stream's loop then runs in this connection's task, writing its events straight to the
//! socket (`sse_socket`), chunked, with a buffer that exists only while bytes move: no second
//! task, no body channel. One response per connection (`Connection: close`): an event stream
//! lasts until one side ends it. Every other request, TLS and HTTP/2 stay with hyper.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::gate::Kind;
use crate::http::response::{self, Body};
use crate::http::server::{route, Peer};
use crate::http::sse_socket::SocketSink;
use crate::node::Node;
use crate::protocol::error_code;
use crate::transport::bounded::bounded;
use crate::transport::sse::{Accepted, InlineSlot};

/// The longest request head read: room for the longest cursor (64 KiB) in `Last-Event-ID`.
const MAX_HEAD: usize = 96 * 1024;
/// The most header fields a request may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// What a connection's first bytes say.
pub(crate) enum FirstRequest {
    /// `GET /sse` (query or not): this path serves it.
    Sse,
    /// Anything else, or not enough bytes to tell: hyper serves it.
    Other,
    /// Nothing arrived within the handshake timeout: the connection is dropped.
    Silent,
}

/// Looks at the connection's first bytes without taking them, waiting at most `timeout`.
pub(crate) async fn first_request(stream: &TcpStream, timeout: Duration) -> FirstRequest {
    let mut first = [0u8; 9];
    match bounded(timeout, stream.peek(&mut first)).await {
        Some(Ok(n)) if matches!(&first[..n], b"GET /sse?" | b"GET /sse ") => FirstRequest::Sse,
        Some(_) => FirstRequest::Other,
        None => FirstRequest::Silent,
    }
}

/// Serves the connection's one request (`GET /sse…`) and closes it.
pub(crate) async fn serve(stream: TcpStream, peer: Peer, node: Arc<Node>, kind: Kind) {
    // Boxed and gone once answered: what reading, routing and the head need (the request, the
    // router's future sized for every route) is not part of this task while the stream runs.
    let Some((accepted, sink)) = Box::pin(answer(stream, peer, node, kind)).await else {
        return;
    };
    accepted.run(sink).await.finish().await;
}

/// Reads the request and answers it: a refusal, written whole, or the head of an accepted
/// stream, which is returned with its socket to run.
async fn answer(
    mut stream: TcpStream,
    peer: Peer,
    node: Arc<Node>,
    kind: Kind,
) -> Option<(Accepted, SocketSink)> {
    let timeout = node.config().limits.handshake_timeout;
    let (mut request, http10) = match tokio::time::timeout(timeout, read_head(&mut stream)).await {
        Ok(Ok(read)) => read,
        Ok(Err(Some(refusal))) => {
            let _ = write_response(&mut stream, &node, refusal).await;
            return None;
        }
        // The client left before its request was whole.
        Ok(Err(None)) => return None,
        Err(_) => {
            node.count_limit("handshake_timeout");
            return None;
        }
    };
    // The router leaves an accepted stream here for this task to run.
    let slot = InlineSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = Box::pin(route(&node, kind, peer, request)).await;
    let Some(accepted) = slot.take() else {
        let _ = write_response(&mut stream, &node, response).await;
        return None;
    };
    let limit = node.config().sse_write_timeout();
    let (parts, body) = response.into_parts();
    let chunked = !http10;
    write_within(&mut stream, &head(&parts, None, chunked), limit)
        .await
        .ok()?;
    Some((accepted, SocketSink::new(stream, body, chunked, limit)))
}

/// Reads and parses the request head. `Err(None)`: the client closed; `Err(Some(_))`: the
/// answer to a request that cannot be served. The flag: the request is HTTP/1.0 (no chunking).
async fn read_head(
    stream: &mut TcpStream,
) -> Result<(Request<Empty<Bytes>>, bool), Option<Response<Body>>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let room = MAX_HEAD - buf.len();
        if room == 0 {
            return Err(Some(refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request head is longer than {MAX_HEAD} bytes"),
            )));
        }
        buf.reserve(room.min(16 * 1024));
        match (&mut *stream).take(room as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return build(&parsed).map_err(Some),
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Some(refusal(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("more than {MAX_HEADERS} header fields"),
                )))
            }
            Err(e) => {
                return Err(Some(refusal(
                    StatusCode::BAD_REQUEST,
                    format!("malformed request: {e}"),
                )))
            }
        }
    }
}

/// The request a parsed head describes, as the router takes it.
#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
fn build(
    parsed: &httparse::Request<'_, '_>,
) -> Result<(Request<Empty<Bytes>>, bool), Response<Body>> {
    let bad = |message: &str| refusal(StatusCode::BAD_REQUEST, message.to_string());
    let uri: Uri = parsed
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| bad("the request target is not a valid URI"))?;
    let http10 = parsed.version == Some(0);
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .version(if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        })
        .body(Empty::new())
        .expect("method, URI and version are valid");
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| bad("a header name is not valid"))?;
        let value = HeaderValue::from_bytes(header.value)
            .map_err(|_| bad("a header value is not valid"))?;
        request.headers_mut().append(name, value);
    }
    let has_body = request
        .headers()
        .contains_key(hyper::header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(bad("a GET /sse request has no body"));
    }
    Ok((request, http10))
}

fn refusal(status: StatusCode, message: String) -> Response<Body> {
    response::error(status, error_code::BAD_REQUEST, message)
}

/// Writes a whole response (a refusal) and closes the connection. `Err` when the client is gone
/// or too slow.
async fn write_response(
    stream: &mut TcpStream,
    node: &Node,
    response: Response<Body>,
) -> Result<(), ()> {
    let limit = node.config().sse_write_timeout();
    let (parts, body) = response.into_parts();
    // Refusals are whole in memory: collecting them does not wait.
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(never) => match never {},
    };
    let mut bytes = head(&parts, Some(body.len() as u64), false);
    bytes.extend_from_slice(&body);
    write_within(stream, &bytes, limit).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// A response's head: its status and headers, then the framing: `length` bytes, chunked, or
/// (HTTP/1.0) until the connection closes.
fn head(parts: &hyper::http::response::Parts, length: Option<u64>, chunked: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    let _ = write!(head, "HTTP/1.1 {} {reason}\r\n", parts.status.as_u16());
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let _ = write!(
        head,
        "date: {}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    match length {
        Some(n) => {
            let _ = write!(head, "content-length: {n}\r\n");
        }
        None if chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

async fn write_within(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> Result<(), ()> {
    match bounded(limit, stream.write_all(bytes)).await {
        Some(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
