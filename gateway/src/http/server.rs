//! The HTTP server: binds the listener, serves HTTP/1.1 and HTTP/2 (cleartext, or TLS with ALPN)
//! on one port with WebSockets over both, routes requests, and shuts down in order (not ready,
//! stop accepting, close clients, wait).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::demo;
use crate::http::gate::Kind;
use crate::http::response::{self, Body, RequestBody};
use crate::http::sse_h1::{self, FirstRequest};
use crate::http::tls::Tls;
use crate::http::{api, assets, gate, manage, openapi};
use crate::node::Node;
use crate::protocol::error_code;
use crate::security::guard;
use crate::transport::{poll, sse, ws};

/// Starts gateway nodes.
pub struct Gateway;

/// A node that is serving.
pub struct RunningGateway {
    addr: SocketAddr,
    api_addr: SocketAddr,
    node: Arc<Node>,
    accept: JoinHandle<()>,
    api_accept: Option<JoinHandle<()>>,
    http: TaskTracker,
}

pub use crate::node::StartError;

impl Gateway {
    /// Binds `config.server.listen` and serves until [`RunningGateway::shutdown`].
    pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let api_listener = match config.auth.api_listen {
            None => None,
            Some(api) => {
                let bound = TcpListener::bind(api)
                    .await
                    .map_err(|source| StartError::Bind { addr: api, source })?;
                Some(bound)
            }
        };
        let tls = Tls::load(&config.tls).map_err(StartError::Tls)?;
        let node = Node::start(config).await?;
        let http = TaskTracker::new();
        if let Some(tls) = &tls {
            tls.spawn_reloader(
                node.config().tls.reload_interval,
                node.metrics().clone(),
                node.shutdown_token().clone(),
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept = tokio::spawn(accept_loop(
            listener,
            node.clone(),
            http.clone(),
            Kind::Main,
            tls,
        ));
        let mut api_addr = addr;
        let mut api_accept = None;
        if let Some(api_listener) = api_listener {
            api_addr = api_listener
                .local_addr()
                .map_err(|source| StartError::Bind {
                    addr: api_addr,
                    source,
                })?;
            api_accept = Some(tokio::spawn(accept_loop(
                api_listener,
                node.clone(),
                http.clone(),
                Kind::Api,
                None,
            )));
        }
        if node.config().auth.api_keys.is_empty()
            && node.config().auth.api_open
            && !api_addr.ip().is_loopback()
        {
            tracing::warn!(%api_addr, "the API is open: anyone reaching {api_addr} may publish (auth.api_open)");
        }
        if node.config().demo.publisher {
            tokio::spawn(demo::run_publisher(node.clone()));
        }
        tracing::info!(%addr, scheme, backplane = node.backplane().kind(), "listening on {addr}");
        if api_addr != addr {
            tracing::info!(%api_addr, "API and metrics served on {api_addr} only");
        }
        Ok(RunningGateway {
            addr,
            api_addr,
            node,
            accept,
            api_accept,
            http,
        })
    }
}

impl RunningGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/api/*` is served: `auth.api_listen`, else the main address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Stops at once: readiness goes 503, new connections are refused, WebSockets get 1001 and SSE
    /// streams end; returns when every connection is closed or `server.shutdown_timeout` passed.
    pub async fn shutdown(self) {
        self.stop(Duration::ZERO, Duration::ZERO).await
    }

    /// Stops gradually (SIGTERM): not ready but still serving for `drain.delay`, then new
    /// connections are refused and existing ones closed in batches over `drain.window`.
    pub async fn drain(self) {
        let drain = self.node.config().drain.clone();
        self.stop(drain.delay, drain.window).await
    }

    async fn stop(self, delay: Duration, window: Duration) {
        let deadline = Instant::now() + self.node.config().server.shutdown_timeout;
        tracing::info!(?delay, ?window, "shutting down");
        self.node.set_draining();
        tokio::time::sleep(delay).await;
        self.node.stop_accepting();
        let _ = self.accept.await;
        if let Some(api_accept) = self.api_accept {
            let _ = api_accept.await;
        }
        self.http.close();
        let streams = self.node.streams();
        if window.is_zero() {
            streams.close_all();
        } else {
            let spread = streams.close_spread(window, self.node.metrics());
            if tokio::time::timeout_at(deadline, spread).await.is_err() {
                tracing::warn!("drain window overran the shutdown deadline");
            }
            // Connections accepted while the listener was closing.
            streams.close_all();
        }
        let all_closed = async {
            self.node.connection_tasks().wait().await;
            self.http.wait().await;
        };
        if tokio::time::timeout_at(deadline, all_closed).await.is_err() {
            tracing::warn!(
                remaining = streams.len(),
                "connections still open at the shutdown deadline"
            );
        }
        // The closed connections' presence leaves are queued: apply them now, so their members
        // leave at once rather than when the surviving nodes reap them after `presence.ttl`.
        match tokio::time::timeout_at(deadline, self.node.backplane().flush_presence()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "presence leaves not applied"),
            Err(_) => tracing::warn!("presence leaves still queued at the shutdown deadline"),
        }
        self.node
            .metrics()
            .drain_remaining
            .set(streams.len() as i64);
        tracing::info!("stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    node: Arc<Node>,
    http: TaskTracker,
    kind: Kind,
    tls: Option<Tls>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = node.shutdown_token().cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A trusted proxy's connections carry many clients: their requests are counted one by
        // one, against the client `X-Forwarded-For` names (`route`).
        let from_proxy = node.policy().trusted_proxies.contains(peer.ip());
        let accepted = if from_proxy {
            Ok(())
        } else {
            node.policy().limits.accept_ip(peer.ip())
        };
        if let Err(retry) = accepted {
            node.count_limit("connection_rate_per_ip");
            tracing::debug!(client = %peer.ip(), "over limits.connection_rate_per_ip");
            match &tls {
                None => http.spawn(gate::serve_refused(stream, retry)),
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let handshake = node.config().limits.handshake_timeout;
                    http.spawn(async move {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(handshake, acceptor.accept(stream)).await
                        {
                            gate::serve_refused(stream, retry).await;
                        }
                    })
                }
            };
            continue;
        }
        let peer = Peer {
            ip: peer.ip(),
            from_proxy,
        };
        http.spawn(serve_connection(
            stream,
            peer,
            node.clone(),
            kind,
            tls.clone(),
        ));
    }
}

/// The TCP peer of a connection, and whether it is one of `limits.trusted_proxies`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) ip: IpAddr,
    pub(crate) from_proxy: bool,
}

async fn serve_connection(
    stream: TcpStream,
    peer: Peer,
    node: Arc<Node>,
    kind: Kind,
    tls: Option<Tls>,
) {
    let _ = stream.set_nodelay(true);
    let send_buffer = node.config().server.send_buffer_bytes;
    if send_buffer > 0 {
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer);
    }
    #[cfg(target_os = "linux")]
    if let Some(low_water) = node.config().send_low_water() {
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(low_water);
    }
    match tls {
        None => {
            let handshake = node.config().limits.handshake_timeout;
            // Boxed: the wait for the first bytes (and its timer) would otherwise stay part of
            // this task for as long as the SSE stream it turns out to be.
            match Box::pin(sse_h1::first_request(&stream, handshake)).await {
                // Both boxed: each is large, and the task holds whichever runs, not room for both.
                FirstRequest::Sse => Box::pin(sse_h1::serve(stream, peer, node, kind)).await,
                FirstRequest::Other => {
                    Box::pin(serve_io(TokioIo::new(stream), peer, node, kind)).await
                }
                FirstRequest::Silent => node.count_limit("handshake_timeout"),
            }
        }
        // Boxed: a connection's task is as large as its largest branch, and the TLS one (the
        // handshake, rustls state inside hyper's connection) would add kilobytes to every
        // plain connection, for as long as an SSE stream lasts.
        Some(tls) => Box::pin(serve_tls(stream, peer, node, kind, tls)).await,
    }
}

async fn serve_tls(stream: TcpStream, peer: Peer, node: Arc<Node>, kind: Kind, tls: Tls) {
    let handshake = node.config().limits.handshake_timeout;
    let accept = tls.acceptor().accept(stream);
    match tokio::time::timeout(handshake, accept).await {
        Ok(Ok(stream)) => serve_io(TokioIo::new(stream), peer, node, kind).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => node.count_limit("handshake_timeout"),
    }
}

async fn serve_io<I>(io: I, peer: Peer, node: Arc<Node>, kind: Kind)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // Set by the first request: until then the connection is in its handshake (HTTP/2 preface
    // and SETTINGS, or an HTTP/1.1 request line), which must end within the handshake timeout.
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let node = node.clone();
        let requested = requested.clone();
        service_fn(move |request| {
            requested.store(true, Ordering::Relaxed);
            let node = node.clone();
            // Boxed whole, and freed once answered: the router's future is sized for its
            // largest route and the request, and hyper keeps the service's future inline in
            // every HTTP/2 stream's task (and in the HTTP/1.1 connection) for as long as the
            // response's body runs (~220 B more in every stream's task, inline).
            let answer: BoxFuture<'static, Result<Response<Body>, Infallible>> =
                Box::pin(async move { Ok(route(&node, kind, peer, request).await) });
            answer
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slowloris: a request's headers must arrive within the handshake timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config().limits.handshake_timeout);
    // RFC 8441: a client holding an HTTP/2 connection (TLS with ALPN h2, or cleartext prior
    // knowledge) opens its WebSockets as streams of it (extended CONNECT, `ws::Handshake`).
    builder.http2().enable_connect_protocol();
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // hyper's header read timeout covers HTTP/1.1 only once a request has begun; a peer that
    // sends nothing, half an HTTP/2 preface, or a preface and no request is cut off here.
    // Scoped, so the timer is not part of the connection's future once the handshake is over.
    {
        let handshake = tokio::time::sleep(node.config().limits.handshake_timeout);
        tokio::pin!(handshake);
        tokio::select! {
            result = connection.as_mut() => {
                if ended_by_header_timeout(&result) {
                    node.count_limit("handshake_timeout");
                }
                return;
            }
            _ = handshake => if !requested.load(Ordering::Relaxed) {
                node.count_limit("handshake_timeout");
                return;
            },
            // Shutting down: the select below ends the connection as it ends any other.
            _ = node.shutdown_token().cancelled() => {}
        }
    }
    drop(requested);
    tokio::select! {
        result = connection.as_mut() => {
            // hyper's header read timeout (slowloris) ends the connection with a timeout error.
            let timed_out = result
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<hyper::Error>())
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                node.count_limit("handshake_timeout");
            }
        }
        _ = node.shutdown_token().cancelled() => {
            connection.as_mut().graceful_shutdown();
            // An HTTP/2 stream whose client stopped reading cannot end: its last data waits for
            // flow control, and hyper has no reset for an upgraded stream. Once every WebSocket
            // and SSE task has ended, the connection gets `websocket.write_timeout` to finish
            // (a WebSocket's last write on HTTP/1.1 gets as long), then it is dropped.
            let abandoned = async {
                node.connection_tasks().wait().await;
                tokio::time::sleep(node.config().websocket.write_timeout).await;
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = abandoned => {}
            }
        }
    }
}

/// Whether hyper ended a connection because a request's headers did not arrive in time.
fn ended_by_header_timeout<T>(
    result: &Result<T, Box<dyn std::error::Error + Send + Sync>>,
) -> bool {
    result
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_timeout)
}

pub(crate) async fn route<B: RequestBody>(
    node: &Arc<Node>,
    kind: Kind,
    peer: Peer,
    request: Request<B>,
) -> Response<Body> {
    // The client: the peer, or behind a trusted proxy the address it names. Every per-IP limit
    // of the request (connection rate, fresh channels) is charged to it.
    let client = if peer.from_proxy {
        node.policy()
            .trusted_proxies
            .client_ip(peer.ip, request.headers())
    } else {
        peer.ip
    };
    if peer.from_proxy {
        if let Err(retry) = node.policy().limits.accept_ip(client) {
            node.count_limit("connection_rate_per_ip");
            tracing::debug!(%client, proxy = %peer.ip, "over limits.connection_rate_per_ip");
            return gate::rate_limited(retry);
        }
    }
    if let Some(response) = gate::before_route(node, kind, peer.from_proxy, &request) {
        return response;
    }
    let path = request.uri().path().to_string();
    let origin = gate::origin_of(request.headers());
    let mut response = serve(node, client, request).await;
    gate::add_cors_headers(node, &path, &origin, &mut response);
    response
}

/// Every route: its path and method are listed once, in [`ROUTES`] and [`Route::method`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Publish,
    History,
    Disconnect,
    Unsubscribe,
    Channels,
    Broadcast,
    OpenApi,
    ClientJs,
    DemoPage,
    WebSocket(ws::Mode),
    Sse,
    Poll,
    /// `GET /presence`: a client's presence query, permission-checked like `/sse`.
    Presence,
    /// `GET /api/presence`: the server API's.
    ApiPresence,
}

/// Path → route. `gateway/src/http/openapi.json` documents each of them but the demo page, the
/// client script and the conformance echo (a test holds the two to each other).
const ROUTES: &[(&str, Route)] = &[
    ("/healthz", Route::Healthz),
    ("/readyz", Route::Readyz),
    ("/metrics", Route::Metrics),
    ("/api/publish", Route::Publish),
    ("/api/history", Route::History),
    ("/api/presence", Route::ApiPresence),
    ("/api/disconnect", Route::Disconnect),
    ("/api/unsubscribe", Route::Unsubscribe),
    ("/api/channels", Route::Channels),
    ("/api/broadcast", Route::Broadcast),
    ("/api/openapi.json", Route::OpenApi),
    ("/client.js", Route::ClientJs),
    ("/", Route::DemoPage),
    ("/ws", Route::WebSocket(ws::Mode::Protocol)),
    ("/ws/echo", Route::WebSocket(ws::Mode::Echo)),
    ("/sse", Route::Sse),
    ("/poll", Route::Poll),
    ("/presence", Route::Presence),
];

impl Route {
    fn of(node: &Node, path: &str) -> Option<Route> {
        let (_, route) = ROUTES.iter().find(|(p, _)| *p == path)?;
        match route {
            Route::DemoPage if !node.config().demo.page => None,
            Route::WebSocket(ws::Mode::Echo) if !node.config().websocket.echo => None,
            route => Some(*route),
        }
    }

    fn method(self) -> &'static str {
        match self {
            Route::Publish | Route::Disconnect | Route::Unsubscribe | Route::Broadcast => "POST",
            _ => "GET",
        }
    }

    /// Whether the request's method fits this route: its own, or for a WebSocket also HTTP/2's
    /// extended CONNECT (`:protocol websocket`, RFC 8441).
    fn accepts<B>(self, request: &Request<B>) -> bool {
        request.method() == self.method()
            || matches!(self, Route::WebSocket(_))
                && ws::Handshake::of(request) == Some(ws::Handshake::ExtendedConnect)
    }
}

async fn serve<B: RequestBody>(
    node: &Arc<Node>,
    client_ip: IpAddr,
    request: Request<B>,
) -> Response<Body> {
    let path = request.uri().path();
    let Some(route) = Route::of(node, path) else {
        return response::error(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            format!("no route for {path}"),
        );
    };
    let allowed = route.method();
    if !route.accepts(&request) {
        let mut response = response::error(
            StatusCode::METHOD_NOT_ALLOWED,
            error_code::METHOD_NOT_ALLOWED,
            format!("{path} accepts {allowed} only"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        return response;
    }
    match route {
        Route::Healthz => response::json(StatusCode::OK, &b"{\"status\":\"ok\"}"[..]),
        Route::Readyz => match node.readiness() {
            Ok(()) => response::json(StatusCode::OK, &b"{\"status\":\"ready\"}"[..]),
            Err(reason) => response::error(
                StatusCode::SERVICE_UNAVAILABLE,
                error_code::NOT_READY,
                reason,
            ),
        },
        Route::Metrics => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(response::full(node.encode_metrics()))
            .expect("static parts are valid"),
        Route::Publish => api::publish(node, request).await,
        Route::History => api::history(node, request.uri().query()).await,
        Route::ApiPresence => api::presence(node, request.uri().query()).await,
        Route::Presence => {
            let query = request.uri().query();
            let (channel, count_only) = match api::presence_query(query) {
                Ok(parsed) => parsed,
                Err(e) => return response::error(e.status(), e.code, e.message),
            };
            // The token and the channel's permission, as a stream's; no connection is held.
            let admission = match admit_stream(node, route, &request) {
                Ok(admission) => admission,
                Err(response) => return response,
            };
            let response = api::presence_answer(node, &channel, count_only).await;
            drop(admission);
            response
        }
        Route::Disconnect => manage::disconnect(node, request).await,
        Route::Unsubscribe => manage::unsubscribe(node, request).await,
        Route::Channels => manage::channels(node, request.uri().query()).await,
        Route::Broadcast => api::broadcast(node, request).await,
        Route::OpenApi => response::json(StatusCode::OK, openapi::document(node.config())),
        Route::ClientJs | Route::DemoPage => {
            let if_none_match = request
                .headers()
                .get(header::IF_NONE_MATCH)
                .map(|v| v.as_bytes());
            match route {
                Route::ClientJs => assets::serve(
                    assets::CLIENT_JS,
                    "text/javascript; charset=utf-8",
                    if_none_match,
                ),
                _ => assets::serve(assets::DEMO_HTML, "text/html; charset=utf-8", if_none_match),
            }
        }
        Route::Poll => {
            // Poll answers are never cached, refusals included.
            let admission = match admit_stream(node, route, &request) {
                Ok(admission) => admission,
                Err(response) => return poll::no_store(response),
            };
            // The connection counts against the limits while the poll waits.
            let identity = admission.identity.as_ref();
            let response = poll::poll(node, request.uri().query(), client_ip, identity).await;
            drop(admission);
            poll::no_store(response)
        }
        Route::Sse => match admit_stream(node, route, &request) {
            Ok(admission) => sse::open(
                node,
                request.uri().query(),
                request.headers(),
                client_ip,
                admission.identity.as_ref(),
                request.extensions().get::<sse::InlineSlot>(),
            )
            .map(|body| guard::Expiring::wrap(node, body, admission)),
            Err(response) => response,
        },
        Route::WebSocket(mode) => {
            let Some(handshake) = ws::Handshake::of(&request) else {
                return response::error(
                    StatusCode::UPGRADE_REQUIRED,
                    error_code::UPGRADE_REQUIRED,
                    "this endpoint speaks WebSocket only",
                );
            };
            let admission = match admit_stream(node, route, &request) {
                Ok(admission) => admission,
                Err(response) => return response,
            };
            let mut request = request;
            match ws::accept(node, &mut request, handshake, mode, admission, client_ip) {
                Ok(response) => response.map(|_| response::empty()),
                Err(e) => response::error(
                    StatusCode::BAD_REQUEST,
                    error_code::BAD_REQUEST,
                    e.to_string(),
                ),
            }
        }
    }
}

/// Lets a new WebSocket (either handshake, checked by the caller), SSE stream or long-poll in,
/// or answers why not: the same checks for all of them. A draining node takes
/// none, so proxies that do not watch /readyz (nginx retries 503 on another upstream) move new
/// clients elsewhere at once. Then Origin, token and connection limits; SSE and long-poll also
/// check the permission of every channel of the query up front.
#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
fn admit_stream<B>(
    node: &Node,
    route: Route,
    request: &Request<B>,
) -> Result<guard::Admission, Response<Body>> {
    if node.is_draining() {
        return Err(response::shutting_down());
    }
    let is_websocket = matches!(route, Route::WebSocket(_));
    let query = request.uri().query();
    let admission = guard::admit(node, request.headers(), query)?;
    if !is_websocket {
        guard::check_stream_channels(node, &admission, query, route == Route::Poll)?;
    }
    Ok(admission)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// openapi.json documents exactly the routes (path and method) the router serves, but the
    /// demo page, the client script and the conformance echo.
    #[test]
    fn the_openapi_document_and_the_routes_agree() {
        let undocumented = ["/", "/client.js", "/ws/echo"];
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .filter(|(path, _)| !undocumented.contains(path))
            .map(|(path, route)| (path.to_string(), route.method().to_string()))
            .collect();
        routes.sort();
        assert_eq!(openapi::operations(), routes);
    }
}
