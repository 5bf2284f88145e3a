//! The HTTP server: binds the listener, serves HTTP/1.1 and cleartext HTTP/2 on one port, routes
//! requests, and shuts down in order (not ready, stop accepting, close clients, wait).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::body::Incoming;
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
use crate::http::response::{self, Body};
use crate::http::tls::Tls;
use crate::http::{api, assets, gate};
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
        if let Err(retry) = node.policy().limits.accept_ip(peer.ip()) {
            node.count_limit("connection_rate_per_ip");
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
        http.spawn(serve_connection(
            stream,
            node.clone(),
            kind,
            tls.clone(),
            peer.ip(),
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    node: Arc<Node>,
    kind: Kind,
    tls: Option<Tls>,
    client_ip: IpAddr,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_io(TokioIo::new(stream), node, kind, client_ip).await,
        // Boxed: a connection's task is as large as its largest branch, and the TLS one (the
        // handshake, rustls state inside hyper's connection) would add kilobytes to every
        // plain connection, for as long as an SSE stream lasts.
        Some(tls) => Box::pin(serve_tls(stream, node, kind, tls, client_ip)).await,
    }
}

async fn serve_tls(stream: TcpStream, node: Arc<Node>, kind: Kind, tls: Tls, client_ip: IpAddr) {
    let handshake = node.config().limits.handshake_timeout;
    let accept = tls.acceptor().accept(stream);
    match tokio::time::timeout(handshake, accept).await {
        Ok(Ok(stream)) => serve_io(TokioIo::new(stream), node, kind, client_ip).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => node.count_limit("handshake_timeout"),
    }
}

async fn serve_io<I>(io: I, node: Arc<Node>, kind: Kind, client_ip: IpAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = {
        let node = node.clone();
        service_fn(move |request| {
            let node = node.clone();
            async move { Ok::<_, Infallible>(route(&node, kind, client_ip, request).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slowloris: a request's headers must arrive within the handshake timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config().limits.handshake_timeout);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
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
            let _ = connection.await;
        }
    }
}

async fn route(
    node: &Arc<Node>,
    kind: Kind,
    client_ip: IpAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    if let Some(response) = gate::before_route(node, kind, &request) {
        return response;
    }
    let path = request.uri().path().to_string();
    let origin = gate::origin_of(request.headers());
    let mut response = serve(node, client_ip, request).await;
    gate::add_cors_headers(node, &path, &origin, &mut response);
    response
}

/// Every route: its path and method are listed once, in [`Route::of`] and [`Route::method`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Publish,
    History,
    ClientJs,
    DemoPage,
    WebSocket(ws::Mode),
    Sse,
    Poll,
}

impl Route {
    fn of(node: &Node, path: &str) -> Option<Route> {
        Some(match path {
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/api/publish" => Route::Publish,
            "/api/history" => Route::History,
            "/client.js" => Route::ClientJs,
            "/" if node.config().demo.page => Route::DemoPage,
            "/ws" => Route::WebSocket(ws::Mode::Protocol),
            "/ws/echo" if node.config().websocket.echo => Route::WebSocket(ws::Mode::Echo),
            "/sse" => Route::Sse,
            "/poll" => Route::Poll,
            _ => return None,
        })
    }

    fn method(self) -> &'static str {
        match self {
            Route::Publish => "POST",
            _ => "GET",
        }
    }
}

async fn serve(node: &Arc<Node>, client_ip: IpAddr, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let Some(route) = Route::of(node, path) else {
        return response::error(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            format!("no route for {path}"),
        );
    };
    let allowed = route.method();
    if request.method() != allowed {
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
            let response = poll::poll(node, request.uri().query(), client_ip).await;
            drop(admission);
            poll::no_store(response)
        }
        Route::Sse => match admit_stream(node, route, &request) {
            Ok(admission) => sse::open(node, request.uri().query(), request.headers(), client_ip)
                .map(|body| guard::Expiring::wrap(node, body, admission)),
            Err(response) => response,
        },
        Route::WebSocket(mode) => {
            let admission = match admit_stream(node, route, &request) {
                Ok(admission) => admission,
                Err(response) => return response,
            };
            let mut request = request;
            match ws::accept(node, &mut request, mode, admission, client_ip) {
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

/// Lets a new WebSocket, SSE stream or long-poll in, or answers why not. A draining node takes
/// none, so proxies that do not watch /readyz (nginx retries 503 on another upstream) move new
/// clients elsewhere at once. Then Origin, token and connection limits; SSE and long-poll also
/// check the permission of every channel of the query up front.
#[allow(clippy::result_large_err)] // a refusal is a whole response, built once on a cold path
fn admit_stream(
    node: &Node,
    route: Route,
    request: &Request<Incoming>,
) -> Result<guard::Admission, Response<Body>> {
    if node.is_draining() {
        return Err(response::shutting_down());
    }
    let is_websocket = matches!(route, Route::WebSocket(_));
    if is_websocket && !fastwebsockets::upgrade::is_upgrade_request(request) {
        return Err(response::error(
            StatusCode::UPGRADE_REQUIRED,
            error_code::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only",
        ));
    }
    let query = request.uri().query();
    let admission = guard::admit(node, request.headers(), query)?;
    if !is_websocket {
        guard::check_stream_channels(node, &admission, query)?;
    }
    Ok(admission)
}
