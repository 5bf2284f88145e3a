//! A JSON-over-WebSocket client (tokio-tungstenite) that matches replies to requests by id and
//! keeps the pushes it met on the way; plus a TCP stream with a tiny receive buffer for
//! slow-consumer tests.

use std::collections::VecDeque;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http::Endpoint;
use crate::wait::within;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The handshake every WebSocket client of the kit makes (`ws://addr/path`, Nagle off so small
/// frames go out at once), asserting 101; `who` names the client in a failure.
pub async fn handshake(who: &str, addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, resp) = within(
        &format!("{who}: websocket handshake with {url}"),
        tokio_tungstenite::connect_async_with_config(&url, None, true),
    )
    .await
    .unwrap_or_else(|e| panic!("{who}: websocket handshake with {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 101, "{who}: handshake with {url}");
    ws
}

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
/// met on the way. `S` is the transport: plain TCP by default, or e.g. a TLS stream through a
/// proxy ([`WsClient::from_ws`]).
pub struct WsClient<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    next_id: u64,
    pushes: VecDeque<Value>,
}

impl<S> WsClient<S> {
    /// A client over a WebSocket already upgraded by the caller.
    pub fn from_ws(ws: WebSocketStream<S>) -> WsClient<S> {
        WsClient {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }
}

impl WsClient {
    pub async fn connect(node: &impl Endpoint) -> WsClient {
        Self::connect_path(node, "/ws").await
    }

    pub async fn connect_path(node: &impl Endpoint, path: &str) -> WsClient {
        Self::connect_addr(node.addr(), path).await
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
        WsClient::from_ws(handshake("websocket client", addr, path).await)
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
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
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

/// A TCP connection to `addr` whose receive buffer is tiny, so a client that stops reading
/// quickly pushes back on the server.
pub async fn small_buffer_stream(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    within("connect", socket.connect(addr))
        .await
        .expect("connect")
}
