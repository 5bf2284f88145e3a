//! The gate every request passes before its route (it neither binds nor accepts: `server` does):
//! what each listener serves (the internal API listener, `auth.api_listen`), API keys (and no
//! keyless API through a proxy), CORS preflights and headers, and the 429 served to a connection
//! or a proxied request over the per-IP connection rate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::Notify;

use crate::http::response::{self, Body};
use crate::node::Node;
use crate::protocol::error_code;
use crate::security::guard;
use crate::security::origin;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `server.listen`: everything, except the API and metrics when `auth.api_listen` is set.
    Main,
    /// `auth.api_listen`: `/api/*`, `/metrics`, `/healthz`, `/readyz` only.
    Api,
}

fn is_api(path: &str) -> bool {
    path.starts_with("/api/")
}

/// The plain-HTTP client transports (CORS applies to them).
fn is_stream(path: &str) -> bool {
    path == "/sse" || path == "/poll"
}

/// Answers a request before its route when the listener, the API key or CORS says so.
/// `from_proxy`: the TCP peer is one of `limits.trusted_proxies`.
pub fn before_route<B>(
    node: &Node,
    kind: Kind,
    from_proxy: bool,
    request: &Request<B>,
) -> Option<Response<Body>> {
    let path = request.uri().path();
    let separate_api = node.config().auth.api_listen.is_some();
    let internal = is_api(path) || path == "/metrics";
    let served = match kind {
        Kind::Main => !(separate_api && internal),
        Kind::Api => internal || path == "/healthz" || path == "/readyz",
    };
    if !served {
        return Some(response::error(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            format!("no route for {path} on this listener"),
        ));
    }
    let headers = request.headers();
    if (is_api(path) || is_stream(path)) && origin::is_preflight(request.method(), headers) {
        if !origin::allowed(&node.config().origin.allowed, headers) {
            return Some(origin::refused());
        }
        let methods = if is_stream(path) { "GET" } else { "GET, POST" };
        return Some(origin::preflight(headers, methods));
    }
    if is_api(path) {
        if !origin::allowed(&node.config().origin.allowed, headers) {
            return Some(origin::refused());
        }
        if let Err(response) = guard::check_api_key(node, headers) {
            return Some(response);
        }
        if let Err(response) = guard::check_keyless_api_is_direct(node, from_proxy, headers) {
            return Some(response);
        }
    }
    None
}

/// The request headers [`add_cors_headers`] needs (only `Origin`), kept while the route consumes the request.
pub fn origin_of(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    if let Some(origin) = headers.get(header::ORIGIN) {
        kept.insert(header::ORIGIN, origin.clone());
    }
    kept
}

/// Adds the CORS headers to the response of an allowed cross-origin SSE or API request.
pub fn add_cors_headers(
    node: &Node,
    path: &str,
    request: &HeaderMap,
    response: &mut Response<Body>,
) {
    if (is_api(path) || is_stream(path)) && origin::allowed(&node.config().origin.allowed, request)
    {
        origin::add_cors(request, response);
    }
}

/// 429 for one request over the per-IP connection rate (a client behind a trusted proxy,
/// whose connection to the node is shared and stays open).
pub fn rate_limited(retry: Duration) -> Response<Body> {
    guard::too_many(
        error_code::CONNECTION_RATE_LIMITED,
        "too many new connections from this address (limits.connection_rate_per_ip)",
        retry,
    )
}

/// Serves a connection refused by the per-IP connection rate: every request gets 429 with
/// `Retry-After`, then the connection closes. Either HTTP version: over TLS, ALPN may already
/// have picked h2, and a browser must read the 429 rather than a broken connection.
pub async fn serve_refused<I>(io: I, retry: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(Notify::new());
    let service = {
        let answered = answered.clone();
        service_fn(move |_request: Request<hyper::body::Incoming>| {
            answered.notify_one();
            async move {
                let mut response = guard::too_many(
                    error_code::CONNECTION_RATE_LIMITED,
                    "too many new connections from this address (limits.connection_rate_per_ip)",
                    retry,
                );
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let serve = async {
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = answered.notified() => {}
        }
        // HTTP/2: GOAWAY once the first request is in, which still gets its answer.
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
}
