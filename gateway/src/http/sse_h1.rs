//! An HTTP/1.1 path of the gateway's own for `GET /sse` on a plain connection. hyper's HTTP/1.1
//! connection keeps a 16 KiB read buffer and an 8 KiB header buffer for the whole life of a
//! response (its builder has no smaller sizes), which made an idle SSE stream cost 4.4× a
//! WebSocket. Here the request head is read and parsed (httparse) into a buffer that is gone
//! once the request is built, the router answers it exactly as it answers hyper's requests, and
//! the response is written straight to the socket, chunked, with a buffer that exists only while
//! bytes move. One response per connection (`Connection: close`): an event stream lasts until
//! one side ends it. Every other request, TLS and HTTP/2 stay with hyper.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::gate::Kind;
use crate::http::response::{self, Body};
use crate::http::server::{route, Peer};
use crate::node::Node;
use crate::protocol::error_code;
use crate::transport::bounded::bounded;

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
pub(crate) async fn serve(mut stream: TcpStream, peer: Peer, node: Arc<Node>, kind: Kind) {
    let timeout = node.config().limits.handshake_timeout;
    let (request, http10) = match tokio::time::timeout(timeout, read_head(&mut stream)).await {
        Ok(Ok(read)) => read,
        Ok(Err(Some(refusal))) => {
            let _ = write_response(&mut stream, &node, refusal, false).await;
            return;
        }
        // The client left before its request was whole.
        Ok(Err(None)) => return,
        Err(_) => {
            node.count_limit("handshake_timeout");
            return;
        }
    };
    // Boxed and gone once answered: the router's future is sized for every route (a poll, a
    // publish), and held inline it would stay part of this connection's task for the life of
    // the stream.
    let response = Box::pin(route(&node, kind, peer, request)).await;
    let _ = write_response(&mut stream, &node, response, http10).await;
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

/// Writes the response: the head, then the body as it comes (chunked on HTTP/1.1), until it
/// ends or the client leaves. `Err` when the client is gone or too slow.
async fn write_response(
    stream: &mut TcpStream,
    node: &Node,
    response: Response<Body>,
    http10: bool,
) -> Result<(), ()> {
    let limit = node.config().sse_write_timeout();
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let chunked = length.is_none() && !http10;
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
    // Not kept for the stream's life: the headers are in `head` now.
    drop(parts);
    write_within(stream, &head, limit).await?;
    drop(head);

    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(Ok(frame)) = frame else { break };
                // What else is ready goes in the same chunk and write: an event is three frames.
                let mut pieces: Vec<Bytes> = frame.into_data().into_iter().collect();
                while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
                    pieces.extend(frame.into_data());
                }
                let out = framed(&pieces, chunked);
                if !out.is_empty() {
                    write_within(stream, &out, limit).await?;
                }
            }
            gone = client_gone(stream) => if gone { return Err(()) },
        }
    }
    if chunked {
        write_within(stream, b"0\r\n\r\n", limit).await?;
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// The bytes of `pieces` as one write: one chunk when chunked (none for no bytes, since an
/// empty chunk would end the body).
fn framed(pieces: &[Bytes], chunked: bool) -> Vec<u8> {
    let total: usize = pieces.iter().map(Bytes::len).sum();
    let mut out = Vec::with_capacity(total + 12);
    if total == 0 {
        return out;
    }
    if chunked {
        let _ = write!(out, "{total:x}\r\n");
    }
    for piece in pieces {
        out.extend_from_slice(piece);
    }
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn write_within(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> Result<(), ()> {
    match bounded(limit, stream.write_all(bytes)).await {
        Some(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Waits until the client sends something: `true` when it closed or the connection broke;
/// `false` after bytes that are read and dropped (nothing is served after this response).
async fn client_gone(stream: &TcpStream) -> bool {
    if stream.readable().await.is_err() {
        return true;
    }
    let mut sink = [0u8; 256];
    match stream.try_read(&mut sink) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}
