//! The HTTP server: binds the listener, serves HTTP/1.1 and cleartext HTTP/2 on one port, routes
//! requests, and shuts down in order (not ready, stop accepting, close clients, wait).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::node::Node;
use crate::response::{self, Body};
use crate::{api, assets, demo, poll, sse, ws};

/// Starts gateway nodes.
pub struct Gateway;

/// A node that is serving.
pub struct RunningGateway {
    addr: SocketAddr,
    node: Arc<Node>,
    accept: JoinHandle<()>,
    http: TaskTracker,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the backplane: {0}")]
    Backplane(#[from] backplane::BackplaneError),
}

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
        let node = Node::start(config).await?;
        let http = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(listener, node.clone(), http.clone()));
        if node.config.demo.publisher {
            tokio::spawn(demo::run_publisher(node.clone()));
        }
        tracing::info!(%addr, backplane = node.backplane.kind(), "listening on {addr}");
        Ok(RunningGateway {
            addr,
            node,
            accept,
            http,
        })
    }
}

impl RunningGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        let drain = self.node.config.drain.clone();
        self.stop(drain.delay, drain.window).await
    }

    async fn stop(self, delay: Duration, window: Duration) {
        let deadline = Instant::now() + self.node.config.server.shutdown_timeout;
        tracing::info!(?delay, ?window, "shutting down");
        self.node.set_draining();
        tokio::time::sleep(delay).await;
        self.node.stop_accepting();
        let _ = self.accept.await;
        self.http.close();
        let registry = &self.node.registry;
        if window.is_zero() {
            registry.close_all();
        } else {
            let spread = registry.close_spread(window, &self.node.metrics);
            if tokio::time::timeout_at(deadline, spread).await.is_err() {
                tracing::warn!("drain window overran the shutdown deadline");
            }
            // Connections accepted while the listener was closing.
            registry.close_all();
        }
        let all_closed = async {
            self.node.connections.wait().await;
            self.http.wait().await;
        };
        if tokio::time::timeout_at(deadline, all_closed).await.is_err() {
            tracing::warn!(
                remaining = registry.len(),
                "connections still open at the shutdown deadline"
            );
        }
        self.node.metrics.drain_remaining.set(registry.len() as i64);
        tracing::info!("stopped");
    }
}

async fn accept_loop(listener: TcpListener, node: Arc<Node>, http: TaskTracker) {
    loop {
        let stream = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        http.spawn(serve_connection(stream, node.clone()));
    }
}

async fn serve_connection(stream: TcpStream, node: Arc<Node>) {
    let _ = stream.set_nodelay(true);
    let service = {
        let node = node.clone();
        service_fn(move |request| {
            let node = node.clone();
            async move { Ok::<_, Infallible>(route(&node, request).await) }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = node.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn route(node: &Arc<Node>, mut request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let allowed = match path.as_str() {
        "/healthz" | "/readyz" | "/metrics" | "/api/history" | "/ws" | "/sse" | "/poll"
        | "/client.js" => "GET",
        "/" if node.config.demo.page => "GET",
        "/ws/echo" if node.config.websocket.echo => "GET",
        "/api/publish" => "POST",
        _ => {
            return response::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {path}"),
            )
        }
    };
    if method != allowed {
        let mut response = response::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} accepts {allowed} only"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        return response;
    }
    match path.as_str() {
        "/healthz" => response::json(StatusCode::OK, &b"{\"status\":\"ok\"}"[..]),
        "/readyz" => match node.readiness() {
            Ok(()) => response::json(StatusCode::OK, &b"{\"status\":\"ready\"}"[..]),
            Err(reason) => response::error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason),
        },
        "/metrics" => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(response::full(node.encode_metrics()))
            .expect("static parts are valid"),
        "/api/publish" => api::publish(node, request).await,
        "/api/history" => api::history(node, request.uri().query()).await,
        "/poll" => {
            // Like a new stream: a draining node sends pollers to another node at once.
            if node.is_draining() {
                return poll::no_store(shutting_down());
            }
            poll::no_store(poll::poll(node, request.uri().query()).await)
        }
        "/client.js" | "/" => {
            let if_none_match = request
                .headers()
                .get(header::IF_NONE_MATCH)
                .map(|v| v.as_bytes());
            match path.as_str() {
                "/client.js" => assets::serve(
                    assets::CLIENT_JS,
                    "text/javascript; charset=utf-8",
                    if_none_match,
                ),
                _ => assets::serve(assets::DEMO_HTML, "text/html; charset=utf-8", if_none_match),
            }
        }
        "/sse" => {
            // A draining node takes no new streams, so proxies that do not watch /readyz
            // (nginx retries 503 on another upstream) move new clients elsewhere at once.
            if node.is_draining() {
                return shutting_down();
            }
            sse::open(node, request.uri().query(), request.headers())
        }
        "/ws" | "/ws/echo" => {
            // A draining node takes no new streams, so proxies that do not watch /readyz
            // (nginx retries 503 on another upstream) move new clients elsewhere at once.
            if node.is_draining() {
                return shutting_down();
            }
            if !fastwebsockets::upgrade::is_upgrade_request(&request) {
                return response::error(
                    StatusCode::UPGRADE_REQUIRED,
                    "upgrade_required",
                    "this endpoint speaks WebSocket only",
                );
            }
            let mode = if path == "/ws" {
                ws::Mode::Protocol
            } else {
                ws::Mode::Echo
            };
            match ws::accept(node, &mut request, mode) {
                Ok(response) => response.map(|_| response::empty()),
                Err(e) => response::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            }
        }
        _ => unreachable!("every routed path is matched above"),
    }
}

fn shutting_down() -> Response<Body> {
    response::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "this node is shutting down; connect to another",
    )
}
