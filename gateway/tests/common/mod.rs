//! Shared helpers for the gateway integration tests: start a node on port 0, talk to it over
//! real sockets (reqwest for HTTP and SSE, tokio-tungstenite for WebSocket, a raw TCP client for
//! hand-made frames) and spawn the binary.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use gateway::{Config, Gateway, RunningGateway};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "../shared/mod.rs"]
mod shared;
// Not every test crate uses every helper.
#[allow(unused_imports)]
pub use shared::{enc, listening_addr, metric, strip_ansi};

/// Upper bound for any single awaited event: only there to fail instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, panicking with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// In-process node
// ---------------------------------------------------------------------------------------------

/// A configuration listening on an ephemeral loopback port.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.shutdown_timeout = Duration::from_secs(5);
    config
}

/// A node running in this process; shut down gracefully with [`Node::shutdown`], or simply
/// dropped at the end of the test.
pub struct Node {
    pub addr: SocketAddr,
    running: Option<RunningGateway>,
}

impl Node {
    pub async fn start(config: Config) -> Node {
        let running = within("Gateway::start", Gateway::start(config))
            .await
            .expect("gateway failed to start");
        let addr = running.local_addr();
        Node {
            addr,
            running: Some(running),
        }
    }

    pub async fn default() -> Node {
        Node::start(test_config()).await
    }

    pub async fn with(f: impl FnOnce(&mut Config)) -> Node {
        let mut config = test_config();
        f(&mut config);
        Node::start(config).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Takes the running gateway out, e.g. to shut it down from another task.
    pub fn take(&mut self) -> RunningGateway {
        self.running.take().expect("node already shut down")
    }

    pub async fn shutdown(mut self) {
        let running = self.take();
        within("graceful shutdown", running.shutdown()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("reqwest client")
}

/// Status and parsed JSON body (Value::Null when the body is not JSON).
pub async fn json_response(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = within("response body", resp.bytes()).await.expect("body");
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

pub async fn post_raw(node: &Node, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = within(
        "POST",
        http()
            .post(node.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
    .await
    .expect("POST failed");
    json_response(resp).await
}

pub async fn get(node: &Node, path: &str) -> (u16, Value) {
    let resp = within("GET", http().get(node.url(path)).send())
        .await
        .expect("GET failed");
    json_response(resp).await
}

pub async fn get_text(node: &Node, path: &str) -> (u16, String) {
    let resp = within("GET", http().get(node.url(path)).send())
        .await
        .expect("GET failed");
    let status = resp.status().as_u16();
    (
        status,
        within("text body", resp.text()).await.expect("text"),
    )
}

/// `POST /api/publish`, asserting success; returns the ack.
pub async fn publish(node: &Node, channel: &str, data: Value) -> Value {
    let (status, body) = post_raw(
        node,
        "/api/publish",
        json!({"channel": channel, "data": data}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "publish to {channel:?} failed: {body}");
    body
}

pub async fn history(node: &Node, query: &str) -> (u16, Value) {
    get(node, &format!("/api/history?{query}")).await
}

/// Asserts an error response `{"error":{"code":code,"message":..}}` with the given status.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "expected HTTP {status} {code}, got {got:?}");
    assert_eq!(
        got.1["error"]["code"], code,
        "expected error code {code:?}, got {}",
        got.1
    );
    assert!(
        got.1["error"]["message"].is_string(),
        "error without message: {}",
        got.1
    );
}

/// A channel name unique within the process, so tests never share channels by accident.
pub fn channel(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

pub async fn metrics(node: &Node) -> String {
    let (status, text) = get_text(node, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    text
}

/// Polls `/metrics` until `pred` holds for the sample (an awaited condition, not a timed sleep;
/// the short pause only keeps the loop from spinning).
pub async fn wait_metric(
    node: &Node,
    name: &str,
    labels: &[(&str, &str)],
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let desc = format!("metric {name}{labels:?}");
    within(&desc, async {
        loop {
            let text = metrics(node).await;
            if let Some(v) = metric(&text, name, labels) {
                if pred(v) {
                    return v;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// WebSocket (tokio-tungstenite)
// ---------------------------------------------------------------------------------------------

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server sent next.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    Binary(Vec<u8>),
    Ping,
    Close(Option<u16>),
    /// The connection ended without a close frame (EOF or error).
    Ended(String),
}

/// A JSON-over-WebSocket client that matches replies to requests by id and keeps the pushes it
/// met on the way.
pub struct WsClient {
    pub ws: Ws,
    next_id: u64,
    pushes: VecDeque<Value>,
}

impl WsClient {
    pub async fn connect(node: &Node) -> WsClient {
        Self::connect_path(node, "/ws").await
    }

    pub async fn connect_path(node: &Node, path: &str) -> WsClient {
        Self::connect_addr(node.addr, path).await
    }

    /// A client over an already connected TCP stream.
    pub async fn over(stream: TcpStream, addr: SocketAddr, path: &str) -> WsClient {
        let (ws, _) = within(
            "websocket handshake",
            tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}{path}"),
                MaybeTlsStream::Plain(stream),
                None,
            ),
        )
        .await
        .expect("websocket handshake failed");
        WsClient {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }

    pub async fn connect_addr(addr: SocketAddr, path: &str) -> WsClient {
        let (ws, resp) = within(
            "websocket handshake",
            tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
        )
        .await
        .expect("websocket handshake failed");
        assert_eq!(resp.status().as_u16(), 101);
        WsClient {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }

    /// A handshake with extra request headers; `Err` holds a refused handshake's status and
    /// JSON body.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, (u16, Value)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        for (k, v) in headers {
            request.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        match within(
            "websocket handshake",
            tokio_tungstenite::connect_async(request),
        )
        .await
        {
            Ok((ws, _)) => Ok(WsClient {
                ws,
                next_id: 1,
                pushes: VecDeque::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(e) => panic!("websocket handshake failed: {e}"),
        }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        within("ws send", self.ws.send(Message::text(text)))
            .await
            .expect("ws send failed");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await
    }

    /// The next event, answering nothing itself beyond what tungstenite does (pongs).
    pub async fn event(&mut self) -> WsEvent {
        loop {
            let msg = within("websocket message", self.ws.next()).await;
            return match msg {
                None => WsEvent::Ended("stream ended".into()),
                Some(Err(e)) => WsEvent::Ended(e.to_string()),
                Some(Ok(Message::Text(t))) => WsEvent::Json(
                    serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text {t:?}: {e}")),
                ),
                Some(Ok(Message::Binary(b))) => WsEvent::Binary(b.to_vec()),
                Some(Ok(Message::Ping(_))) => WsEvent::Ping,
                Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => WsEvent::Close(frame.map(|f| u16::from(f.code))),
            };
        }
    }

    /// The next JSON message (pings skipped); panics on close.
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.event().await {
                WsEvent::Json(v) => return v,
                WsEvent::Ping => continue,
                other => panic!("expected a JSON message, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code (None if the connection ended
    /// without a close frame). JSON messages before the close are returned too.
    pub async fn until_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            match self.event().await {
                WsEvent::Json(v) => seen.push(v),
                WsEvent::Binary(_) | WsEvent::Ping => {}
                WsEvent::Close(code) => return (code, seen),
                WsEvent::Ended(_) => return (None, seen),
            }
        }
    }

    /// Sends `op` with a fresh id and returns the whole reply (`result` or `error`), keeping
    /// pushes that arrive first.
    pub async fn request(&mut self, mut op: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        op["id"] = json!(id);
        self.send_json(&op).await;
        loop {
            let msg = self.recv().await;
            if msg.get("id").is_some() {
                assert_eq!(msg["id"], json!(id), "reply to another request: {msg}");
                return msg;
            }
            if msg.get("error").is_some() {
                panic!("unexpected error without id while waiting for reply {id}: {msg}");
            }
            self.pushes.push_back(msg);
        }
    }

    /// Like [`request`], asserting success and returning `result`.
    pub async fn ok(&mut self, op: Value) -> Value {
        let reply = self.request(op.clone()).await;
        assert!(
            reply.get("error").is_none() && reply.get("result").is_some(),
            "{op} failed: {reply}"
        );
        reply["result"].clone()
    }

    /// Like [`request`], asserting an error with `code`; returns the error object.
    pub async fn err(&mut self, op: Value, code: &str) -> Value {
        let reply = self.request(op.clone()).await;
        assert_eq!(
            reply["error"]["code"], code,
            "{op}: expected error {code}, got {reply}"
        );
        assert!(reply.get("result").is_none(), "{reply}");
        reply["error"].clone()
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.ok(json!({"op": "subscribe", "channel": channel}))
            .await
    }

    pub async fn subscribe_since(&mut self, channel: &str, epoch: &Value, offset: u64) -> Value {
        self.ok(json!({"op": "subscribe", "channel": channel,
                       "since": {"epoch": epoch, "offset": offset}}))
            .await
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> Value {
        self.ok(json!({"op": "publish", "channel": channel, "data": data}))
            .await
    }

    pub async fn ping(&mut self) {
        let r = self.ok(json!({"op": "ping"})).await;
        assert_eq!(r, json!({}), "ping result");
    }

    /// The next publication push (buffered ones first).
    pub async fn push(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        let msg = self.recv().await;
        assert!(
            msg.get("id").is_none() && msg.get("error").is_none(),
            "expected a publication push, got {msg}"
        );
        msg
    }

    pub fn buffered_pushes(&self) -> usize {
        self.pushes.len()
    }
}

/// Publishes `count` messages to `channel` over one pipelined WebSocket connection (writes and
/// reads run concurrently); `data(i)` makes the i-th payload (i from 0). Returns the acks' offsets
/// in order of the requests.
pub async fn publish_many(
    addr: SocketAddr,
    channel: &str,
    count: usize,
    data: impl Fn(usize) -> Value,
) -> Vec<u64> {
    let (ws, _) = within(
        "publisher handshake",
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .expect("publisher handshake");
    let (mut sink, mut stream) = ws.split();
    let frames: Vec<String> = (0..count)
        .map(|i| {
            json!({"id": i + 1, "op": "publish", "channel": channel, "data": data(i)}).to_string()
        })
        .collect();
    let writer = async move {
        for f in frames {
            sink.feed(Message::text(f)).await.expect("publisher send");
        }
        sink.flush().await.expect("publisher flush");
        sink
    };
    let reader = async move {
        let mut offsets = vec![0u64; count];
        let mut got = 0;
        while got < count {
            let msg = match within("publish ack", stream.next()).await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                other => panic!("publisher connection ended: {other:?}"),
            };
            let v: Value = serde_json::from_str(msg.as_str()).unwrap();
            let id = v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}")) as usize;
            let offset = v["result"]["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("publish failed: {v}"));
            offsets[id - 1] = offset;
            got += 1;
        }
        offsets
    };
    let (mut sink, offsets) = tokio::join!(writer, reader);
    let _ = sink.close().await;
    offsets
}

/// A publisher that keeps publishing to one channel, in paced windows of a few pipelined
/// requests, until stopped. Its `i`-th publication carries `data(i)`.
pub struct ContinuousPublisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Number of publications acknowledged so far.
    progress: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl ContinuousPublisher {
    /// Starts publishing and returns once the first window has been acknowledged.
    pub async fn start(
        addr: SocketAddr,
        channel: &str,
        data: impl Fn(usize) -> Value + Send + 'static,
    ) -> ContinuousPublisher {
        use std::sync::atomic::{AtomicBool, Ordering};
        const WINDOW: usize = 10;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (progress_tx, progress) = tokio::sync::watch::channel(0);
        let task = {
            let stop = stop.clone();
            let channel = channel.to_string();
            tokio::spawn(async move {
                let mut ws = WsClient::connect_addr(addr, "/ws").await;
                let mut offsets = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let first = offsets.len();
                    for i in first..first + WINDOW {
                        ws.send_json(&json!({"id": i, "op": "publish", "channel": channel,
                                             "data": data(i)}))
                            .await;
                    }
                    offsets.resize(first + WINDOW, 0);
                    for _ in 0..WINDOW {
                        let reply = ws.recv().await;
                        let i = reply["id"].as_u64().expect("reply id") as usize;
                        offsets[i] = reply["result"]["offset"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("publish failed: {reply}"));
                    }
                    let _ = progress_tx.send(offsets.len());
                    // Pacing only (about 2000 publications a second), so a slow reader on a
                    // loaded machine still catches up in bounded time.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                offsets
            })
        };
        let publisher = ContinuousPublisher {
            stop,
            progress,
            task,
        };
        publisher.published_at_least(1).await;
        publisher
    }

    /// How many publications have been acknowledged so far.
    pub fn published(&self) -> usize {
        *self.progress.borrow()
    }

    /// Waits until at least `n` publications have been acknowledged.
    pub async fn published_at_least(&self, n: usize) {
        let mut progress = self.progress.clone();
        within(
            "continuous publisher progress",
            progress.wait_for(|c| *c >= n),
        )
        .await
        .expect("continuous publisher stopped");
    }

    /// Stops and returns the offset of every publication, indexed by `i`.
    pub async fn stop(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        within("continuous publisher to stop", self.task)
            .await
            .expect("continuous publisher panicked")
    }
}

/// A TCP connection to `addr` whose receive buffer is tiny, so a client that stops reading
/// quickly pushes back on the server.
pub async fn small_buffer_stream(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    within("connect", socket.connect(addr))
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket over TCP, for frames a real client library refuses to make
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// Makes a masked client frame. `rsv` is the three RSV bits (0..=7).
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 7) << 4) | (opcode & 0xF));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

impl RawWs {
    /// Opens a TCP connection and completes the WebSocket handshake by hand.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let stream = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("tcp connect");
        Self::handshake(stream, addr, path).await
    }

    pub async fn handshake(mut stream: TcpStream, addr: SocketAddr, path: &str) -> RawWs {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        within("handshake write", stream.write_all(request.as_bytes()))
            .await
            .expect("handshake write");
        let mut buf = Vec::new();
        let head_end = within("handshake response", async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("handshake read");
                assert!(n > 0, "connection closed during handshake: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake not accepted: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad Sec-WebSocket-Accept: {head}"
        );
        buf.drain(..head_end);
        RawWs { stream, buf }
    }

    pub async fn send_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) {
        self.send_raw(&encode_frame(fin, rsv, opcode, payload))
            .await
            .expect("raw frame write");
    }

    /// Writes bytes, reporting failure (the server may already have closed).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("raw write", self.stream.write_all(bytes)).await
    }

    /// Reads one frame; None on EOF or connection error.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        within("raw frame", self.read_frame_inner()).await
    }

    async fn fill(&mut self, want: usize) -> bool {
        while self.buf.len() < want {
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    async fn read_frame_inner(&mut self) -> Option<Frame> {
        if !self.fill(2).await {
            return None;
        }
        let b0 = self.buf[0];
        let b1 = self.buf[1];
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let mut header = 2;
        let mut len = (b1 & 0x7f) as usize;
        if len == 126 {
            if !self.fill(4).await {
                return None;
            }
            len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
            header = 4;
        } else if len == 127 {
            if !self.fill(10).await {
                return None;
            }
            len = u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize;
            header = 10;
        }
        if !self.fill(header + len).await {
            return None;
        }
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some(Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// Reads frames until a close frame (returning its code, or Some(1005) for an empty close
    /// payload) or the end of the connection (None).
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode == OP_CLOSE {
                return Some(frame.close_code().unwrap_or(1005));
            }
        }
    }

    /// The next data frame, as JSON (control frames skipped).
    pub async fn read_json(&mut self) -> Value {
        loop {
            let frame = self.read_frame().await.expect("connection ended");
            match frame.opcode {
                OP_TEXT => return serde_json::from_slice(&frame.payload).expect("JSON"),
                OP_PING | OP_PONG => continue,
                _ => panic!("unexpected frame {frame:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------------

/// One SSE block (lines up to a blank line).
#[derive(Debug, Clone, Default)]
pub struct SseBlock {
    pub lines: Vec<String>,
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<String>,
    pub comments: Vec<String>,
}

impl SseBlock {
    /// True when the block dispatches an event (it has a data field).
    pub fn is_event(&self) -> bool {
        self.data.is_some()
    }

    pub fn json(&self) -> Value {
        let data = self.data.as_deref().expect("event without data");
        serde_json::from_str(data).unwrap_or_else(|e| panic!("event data not JSON {data:?}: {e}"))
    }

    /// The event type, "message" when absent.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }
}

pub struct Sse {
    pub status: u16,
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
    pending: Vec<String>,
    ended: bool,
}

/// A client without a whole-request timeout (SSE streams are long-lived).
pub fn sse_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(WAIT)
        .build()
        .unwrap()
}

pub fn sse_client_h2() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(WAIT)
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

impl Sse {
    /// `GET /sse?<query>` with the given extra headers; asserts nothing about the status.
    pub async fn open_with(
        client: &reqwest::Client,
        node: &Node,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let mut req = client.get(node.url(&format!("/sse?{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = within("SSE response", req.send())
            .await
            .expect("SSE request failed");
        Sse {
            status: resp.status().as_u16(),
            version: resp.version(),
            headers: resp.headers().clone(),
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            pending: Vec::new(),
            ended: false,
        }
    }

    /// Opens a stream for the channels, asserting 200 and `text/event-stream`.
    pub async fn open(node: &Node, channels: &[&str]) -> Sse {
        Self::open_query(node, &channel_query(channels)).await
    }

    pub async fn open_query(node: &Node, query: &str) -> Sse {
        let sse = Self::open_with(&sse_client(), node, query, &[]).await;
        sse.assert_stream();
        sse
    }

    #[track_caller]
    pub fn assert_stream(&self) {
        assert_eq!(self.status, 200, "SSE status");
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            ct.starts_with("text/event-stream"),
            "SSE content-type: {ct:?}"
        );
    }

    /// The whole body, for error responses.
    pub async fn body_json(mut self) -> Value {
        let mut all = Vec::new();
        while let Some(chunk) = within("body", self.stream.next()).await {
            all.extend_from_slice(&chunk.expect("body chunk"));
        }
        serde_json::from_slice(&all).unwrap_or(Value::Null)
    }

    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8(line).expect("SSE line is UTF-8"));
            }
            if self.ended {
                return None;
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => self.ended = true,
            }
        }
    }

    /// The next block, or None once the stream has ended.
    pub async fn next_block(&mut self) -> Option<SseBlock> {
        within("SSE block", async {
            let mut block = SseBlock::default();
            loop {
                let line = match self.next_line().await {
                    Some(l) => l,
                    None => return None,
                };
                if line.is_empty() {
                    if block.lines.is_empty() {
                        continue;
                    }
                    return Some(block);
                }
                self.pending.push(line.clone());
                block.lines.push(line.clone());
                if let Some(c) = line.strip_prefix(':') {
                    block.comments.push(c.trim().to_string());
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line.as_str(), ""),
                };
                match field {
                    "id" => block.id = Some(value.to_string()),
                    "event" => block.event = Some(value.to_string()),
                    "retry" => block.retry = Some(value.to_string()),
                    "data" => {
                        block.data = Some(match block.data.take() {
                            Some(d) => format!("{d}\n{value}"),
                            None => value.to_string(),
                        })
                    }
                    _ => {}
                }
            }
        })
        .await
    }

    /// The next block that dispatches an event (comment-only and retry-only blocks skipped).
    pub async fn next_event(&mut self) -> SseBlock {
        loop {
            let block = self.next_block().await.expect("SSE stream ended");
            if block.is_event() {
                return block;
            }
        }
    }

    /// Reads the preamble (`retry:` and the `connected` event) and returns the connected event.
    pub async fn connected(&mut self) -> SseBlock {
        let ev = self.next_event().await;
        assert_eq!(ev.kind(), "connected", "first event: {ev:?}");
        assert!(ev.id.is_some(), "connected event without id: {ev:?}");
        ev
    }

    /// The next publication event (message events only; panics on anything else).
    pub async fn publication(&mut self) -> (String, Value) {
        let ev = self.next_event().await;
        assert_eq!(ev.kind(), "message", "expected a publication, got {ev:?}");
        let id = ev.id.clone().expect("publication without id");
        (id, ev.json())
    }

    /// Every raw line read so far.
    pub fn lines(&self) -> &[String] {
        &self.pending
    }
}

pub fn channel_query(channels: &[&str]) -> String {
    channels
        .iter()
        .map(|c| format!("channel={}", enc(c)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `channels` of a connected event, keyed by channel.
pub fn connected_channels(ev: &SseBlock) -> HashMap<String, Value> {
    let v = ev.json();
    v["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("connected without channels: {v}"))
        .iter()
        .map(|c| (c["channel"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// A spawned `gateway` process whose stdout and stderr are drained into a channel of lines.
pub struct Proc {
    pub child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    pub output: Vec<String>,
}

pub fn gateway_command(args: &[&str], envs: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

impl Proc {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut child = gateway_command(args, envs)
            .spawn()
            .expect("spawn gateway binary");
        let (tx, rx) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx2.send(l);
            }
        });
        Proc {
            child,
            lines: rx,
            output: Vec::new(),
        }
    }

    /// Waits for the `listening on <addr>` log line and returns the address.
    pub async fn listening(&mut self) -> SocketAddr {
        within("`listening on` log line", async {
            loop {
                let line = match self.lines.recv().await {
                    Some(l) => l,
                    None => panic!(
                        "gateway exited before logging `listening on`; output:\n{}",
                        self.output.join("\n")
                    ),
                };
                self.output.push(line.clone());
                if let Some(addr) = listening_addr(&line) {
                    return addr;
                }
            }
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("child already reaped")
    }

    /// Sends SIGTERM or SIGINT ("TERM", "INT") to this child only.
    pub async fn signal(&self, sig: &str) {
        let signo = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            other => panic!("unsupported signal {other}"),
        };
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) with the pid of a child this test spawned and has not reaped.
        let rc = unsafe { libc::kill(pid, signo) };
        assert_eq!(
            rc,
            0,
            "kill -{sig} failed: {}",
            std::io::Error::last_os_error()
        );
    }

    pub async fn wait(&mut self) -> std::process::ExitStatus {
        within("gateway process exit", self.child.wait())
            .await
            .expect("wait for child")
    }
}

/// Runs the binary to completion (for config errors and --help), returning status, stdout and
/// stderr.
pub async fn run_to_exit(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let child = gateway_command(args, envs).spawn().expect("spawn gateway");
    let out = within("gateway to exit", child.wait_with_output())
        .await
        .expect("gateway output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
