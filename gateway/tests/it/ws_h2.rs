//! WebSocket over HTTP/2 (RFC 8441): a client holding an HTTP/2 connection to the node (TLS with
//! ALPN h2, or cleartext prior knowledge) opens WebSockets as extended CONNECT streams of it.
//! They behave as on HTTP/1.1 — same refusals, commands, pings, close and drain — and show in
//! `gateway_websocket_connections{http_version="2"}`.

use std::time::Duration;

use crate::support::*;
use crate::tls::{https, tls_connect, Certs};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::WebSocketStream;

type H2Ws = WsClient<TokioIo<Upgraded>>;

/// One HTTP/2 connection to the node: extended CONNECT WebSockets and plain requests share it.
struct H2 {
    sender: SendRequest<Full<Bytes>>,
    /// `https://localhost:PORT` or `http://127.0.0.1:PORT`.
    base: String,
}

impl H2 {
    async fn over_tls(node: &Node, certs: &Certs) -> H2 {
        let tls = tls_connect(node, &certs.der, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN");
        H2::handshake(TokioIo::new(tls), https(node, "")).await
    }

    /// Cleartext HTTP/2 with prior knowledge (h2c, no Upgrade from HTTP/1.1).
    async fn cleartext(node: &Node) -> H2 {
        let tcp = TcpStream::connect(node.addr).await.unwrap();
        // Small frames go out at once (no Nagle wait for the server's delayed ACK).
        tcp.set_nodelay(true).unwrap();
        H2::handshake(TokioIo::new(tcp), format!("http://{}", node.addr)).await
    }

    async fn handshake<I>(io: I, base: String) -> H2
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = within(
            "HTTP/2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        // The server announces SETTINGS_ENABLE_CONNECT_PROTOCOL in its first SETTINGS frame; an
        // extended CONNECT sent before the client read it would be refused locally. Frames are
        // read in order, so once a response arrived, so had the server's SETTINGS.
        let mut h2 = H2 { sender, base };
        let (status, _) = h2.request("GET", "/healthz", None).await;
        assert_eq!(status, 200);
        h2
    }

    /// Opens `path` as a WebSocket stream of this connection: `Err` holds a refusal's status and
    /// JSON body.
    async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<H2Ws, (u16, Value)> {
        let mut request = hyper::Request::connect(format!("{}{path}", self.base))
            .header("sec-websocket-version", "13");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Full::new(Bytes::new())).unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        self.sender.ready().await.expect("connection usable");
        let response = within(
            "extended CONNECT response",
            self.sender.send_request(request),
        )
        .await
        .expect("extended CONNECT");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            return Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
        }
        assert!(
            response.headers().get("sec-websocket-accept").is_none(),
            "RFC 8441 §5: no Sec-WebSocket-Accept on HTTP/2"
        );
        let stream = within("the CONNECT stream", hyper::upgrade::on(response))
            .await
            .expect("upgrade to the stream");
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(stream), Role::Client, None).await;
        Ok(WsClient::from_ws(ws))
    }

    /// A plain request on the same connection: status and body.
    async fn request(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        self.sender.ready().await.expect("connection usable");
        let response = within("HTTP/2 response", self.sender.send_request(request))
            .await
            .expect("HTTP/2 request");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn publish(&mut self, channel: &str, data: Value) {
        let (status, body) = self
            .request(
                "POST",
                "/api/publish",
                Some(json!({"channel": channel, "data": data})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Waits until the metric sample satisfies `pred` (read over this connection).
    async fn wait_metric(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) {
        within(&format!("metric {name}{labels:?}"), async {
            loop {
                let (_, text) = self.request("GET", "/metrics", None).await;
                if metric(&text, name, labels).is_some_and(&pred) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

const OVER_H2: [(&str, &str); 1] = [("http_version", "2")];
const OVER_H1: [(&str, &str); 1] = [("http_version", "1.1")];

#[tokio::test]
async fn websockets_run_as_streams_of_one_tls_http2_connection() {
    let certs = Certs::new();
    let node = Node::with(|c| certs.configure(c)).await;
    let mut h2 = H2::over_tls(&node, &certs).await;
    let mut a = h2.websocket("/ws", &[]).await.expect("first WebSocket");
    let mut b = h2.websocket("/ws", &[]).await.expect("second WebSocket");
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 2.0)
        .await;
    h2.wait_metric("gateway_websocket_connections", &OVER_H1, |v| v == 0.0)
        .await;
    h2.wait_metric("gateway_connections", &[("transport", "ws")], |v| v == 2.0)
        .await;

    a.subscribe("h2:news").await;
    b.subscribe("h2:news").await;
    a.ping().await;
    // A publication through the API on the same connection, and one from a WebSocket stream.
    h2.publish("h2:news", json!({"n": 1})).await;
    b.publish("h2:news", json!({"n": 2})).await;
    for client in [&mut a, &mut b] {
        assert_eq!(client.push().await["data"], json!({"n": 1}));
        assert_eq!(client.push().await["data"], json!({"n": 2}));
    }

    // The close handshake: the server echoes the client's Close, the stream ends, the
    // connection stays and carries the other WebSocket on.
    a.ws.close(Some(CloseFrame {
        code: 1000.into(),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let (code, _) = a.until_close().await;
    assert_eq!(code, Some(1000));
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 1.0)
        .await;
    h2.publish("h2:news", json!({"n": 3})).await;
    assert_eq!(b.push().await["data"], json!({"n": 3}));
}

#[tokio::test]
async fn cleartext_http2_prior_knowledge_opens_websockets_too() {
    let node = Node::default().await;
    let mut h2 = H2::cleartext(&node).await;
    let mut ws = h2.websocket("/ws", &[]).await.expect("WebSocket over h2c");
    ws.subscribe("h2c:a").await;
    h2.publish("h2c:a", json!("hello")).await;
    assert_eq!(ws.push().await["data"], json!("hello"));
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 1.0)
        .await;
    // And the echo endpoint, same reader and writer.
    let node = Node::with(|c| c.websocket.echo = true).await;
    let mut h2 = H2::cleartext(&node).await;
    let mut echo = h2.websocket("/ws/echo", &[]).await.expect("echo over h2c");
    echo.send_text("{\"echo\":true}").await;
    assert_eq!(echo.recv().await, json!({"echo": true}));
}

/// The status and JSON body of a refused HTTP/1.1 WebSocket handshake over TLS.
async fn refused_over_http1(node: &Node, certs: &Certs, headers: &[(&str, &str)]) -> (u16, Value) {
    let tls = tls_connect(node, &certs.der, &[b"http/1.1"]).await;
    let mut request = https(node, "/ws")
        .replace("https://", "wss://")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match within(
        "HTTP/1.1 handshake",
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
}

#[tokio::test]
async fn refusals_are_the_same_as_on_http1() {
    let certs = Certs::new();
    let node = Node::with(|c| {
        certs.configure(c);
        c.origin.allowed = vec!["https://app.example.com".into()];
        c.auth.jwt_hs256_keys = vec!["h2-test-secret-0123456789".into()];
    })
    .await;
    let mut h2 = H2::over_tls(&node, &certs).await;
    for (what, headers, status, code) in [
        (
            "foreign origin",
            vec![("origin", "https://evil.example.net")],
            403,
            "origin_not_allowed",
        ),
        (
            "bad token",
            vec![("authorization", "Bearer not-a-jwt")],
            401,
            "invalid_token",
        ),
    ] {
        let (h2_status, h2_body) = h2
            .websocket("/ws", &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted over HTTP/2"));
        let (h1_status, h1_body) = refused_over_http1(&node, &certs, &headers).await;
        assert_eq!((h2_status, &h2_body), (h1_status, &h1_body), "{what}");
        assert_eq!(h2_status, status, "{what}: {h2_body}");
        assert_eq!(h2_body["error"]["code"], code, "{what}: {h2_body}");
    }
    // An allowed origin gets in; the refusals left nothing behind.
    let mut ws = h2
        .websocket("/ws", &[("origin", "https://app.example.com")])
        .await
        .expect("allowed origin");
    ws.ping().await;
    h2.wait_metric(
        "gateway_auth_failures_total",
        &[("reason", "origin")],
        |v| v == 2.0,
    )
    .await;
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 1.0)
        .await;

    // Only version 13, as on HTTP/1.1 (fastwebsockets' check): 400.
    let mut request = hyper::Request::connect(https(&node, "/ws"))
        .header("sec-websocket-version", "8")
        .body(Full::new(Bytes::new()))
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = h2.sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    // An extended CONNECT for another protocol, or on a route that is not a WebSocket: 405.
    for (protocol, path) in [("webtransport", "/ws"), ("websocket", "/sse")] {
        let mut request = hyper::Request::connect(https(&node, path))
            .header("sec-websocket-version", "13")
            .body(Full::new(Bytes::new()))
            .unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
        let response = h2.sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 405, "{protocol} on {path}");
    }
}

#[tokio::test]
async fn heartbeat_closes_a_silent_stream_and_the_connection_lives_on() {
    let certs = Certs::new();
    let node = Node::with(|c| {
        certs.configure(c);
        c.websocket.ping_interval = Duration::from_millis(100);
        c.websocket.pong_timeout = Duration::from_millis(500);
    })
    .await;
    let mut h2 = H2::over_tls(&node, &certs).await;
    // Never read: tungstenite answers pings only while it is polled.
    let _silent = h2.websocket("/ws", &[]).await.expect("WebSocket");
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 1.0)
        .await;
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 0.0)
        .await;
    let (status, _) = h2.request("GET", "/healthz", None).await;
    assert_eq!(
        status, 200,
        "the HTTP/2 connection outlives its WebSocket stream"
    );
}

#[tokio::test]
async fn shutdown_closes_http2_websockets_with_1001() {
    let certs = Certs::new();
    let node = Node::with(|c| {
        certs.configure(c);
        // Far beyond the test's wait: a shutdown that waited for it would fail the test.
        c.server.shutdown_timeout = Duration::from_secs(600);
    })
    .await;
    let mut h2 = H2::over_tls(&node, &certs).await;
    let mut ws = h2.websocket("/ws", &[]).await.expect("WebSocket");
    ws.subscribe("h2:drain").await;
    // The graceful HTTP/2 shutdown (GOAWAY) waits for open streams: the WebSocket gets its
    // 1001, its stream ends, and the node stops without reaching its shutdown timeout.
    let stopped = tokio::spawn(node.shutdown());
    let (code, _) = ws.until_close().await;
    assert_eq!(code, Some(1001));
    within("node shutdown", stopped).await.unwrap();
}

#[tokio::test]
async fn a_connection_over_the_per_ip_rate_gets_429_over_http2_too() {
    let certs = Certs::new();
    let node = Node::with(|c| {
        certs.configure(c);
        c.limits.connection_rate_per_ip = 0.01;
        c.limits.connection_burst_per_ip = 1;
    })
    .await;
    let mut allowed = H2::over_tls(&node, &certs).await;
    // The next connection from this address is over the rate: ALPN still picked h2, and the
    // browser must get a 429 it can read, not a broken connection.
    let tls = tls_connect(&node, &certs.der, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake with the refusing server");
    tokio::spawn(connection);
    let request = hyper::Request::get(https(&node, "/ws"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = within("the refusal", sender.send_request(request))
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "connection_rate_limited");
    // The admitted connection goes on.
    let (status, _) = allowed.request("GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_stalled_stream_is_cut_as_slow_consumer_while_its_connection_goes_on() {
    const PAYLOAD: usize = 16 * 1024;
    const WINDOW: u64 = 8;
    const MAX_WINDOWS: u64 = 640; // 80 MB at most, far beyond any flow-control window
    let node = Node::with(|c| {
        c.client.queue_max_bytes = 256 * 1024;
        c.websocket.max_message_size = 1024 * 1024;
        c.server.shutdown_timeout = Duration::from_secs(600);
    })
    .await;
    let ch = "h2:slow";
    let mut h2 = H2::cleartext(&node).await;
    let mut slow = h2.websocket("/ws", &[]).await.expect("slow stream");
    slow.subscribe(ch).await;
    // From here on `slow` is not read: its stream window fills, then the server's queue.
    let mut fast = h2.websocket("/ws", &[]).await.expect("fast stream");
    fast.subscribe(ch).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut expect = 1;
        // Until the node's shutdown closes it (1001).
        while let WsEvent::Json(push) = fast.event().await {
            assert_eq!(
                push["offset"], expect,
                "fast stream lost or reordered a push"
            );
            if seen_tx.send(expect).is_err() {
                return;
            }
            expect += 1;
        }
    });
    let pad = "s".repeat(PAYLOAD);
    let mut last = 0;
    let mut cut = false;
    for window in 0..MAX_WINDOWS {
        for i in 0..WINDOW {
            h2.publish(ch, json!({"w": window, "i": i, "pad": pad}))
                .await;
        }
        last += WINDOW;
        fast_reached(&mut seen_rx, last).await;
        let (_, text) = h2.request("GET", "/metrics", None).await;
        if metric(&text, "gateway_slow_consumer_disconnects_total", &[]).unwrap_or(0.0) >= 1.0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "no slow consumer disconnect after {last} publications");
    h2.wait_metric("gateway_websocket_connections", &OVER_H2, |v| v == 1.0)
        .await;
    h2.publish(ch, json!("after")).await;
    fast_reached(&mut seen_rx, last + 1).await;

    // The node stops although the cut stream still holds data its client never read.
    within("node shutdown", node.shutdown()).await;
    drop(slow);
}

async fn fast_reached(seen: &mut tokio::sync::mpsc::UnboundedReceiver<u64>, last: u64) {
    within("fast stream to receive everything", async {
        while let Some(offset) = seen.recv().await {
            if offset >= last {
                return;
            }
        }
        panic!("fast stream ended before offset {last}");
    })
    .await
}
