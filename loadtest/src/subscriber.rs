//! One subscription as a client sees it, in the dialect of the system under test: the gateway's
//! WebSocket protocol or its SSE stream (HTTP/1.1 or HTTP/2), the peers' plain WebSocket, or
//! Socket.IO. Each turns the server's pushes into `Event`s and keeps the position it would
//! resume from.

use std::net::IpAddr;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::net;
use crate::socketio::{self, SioClient};
use crate::system::SystemKind;

/// How a client reaches the gateway (peers speak WebSocket only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Ws,
    /// SSE over HTTP/1.1: one connection per stream.
    Sse,
    /// SSE over cleartext HTTP/2: many streams share a connection.
    SseH2,
}

/// Where and what to subscribe.
pub struct Target<'a> {
    pub kind: SystemKind,
    pub transport: Transport,
    /// `http://host:port` of the node.
    pub origin: &'a str,
    pub channel: &'a str,
    pub source: IpAddr,
    /// The HTTP client SSE requests go through (its pool decides connection sharing).
    pub http: Option<&'a reqwest::Client>,
}

/// The position a client resumes from after a drop.
#[derive(Clone, Debug, Default)]
pub enum Resume {
    #[default]
    Fresh,
    /// Gateway WebSocket: `since` of the subscribe command.
    Position {
        epoch: String,
        offset: u64,
    },
    /// Gateway SSE: the last event id.
    Cursor(String),
    SocketIo(socketio::Session),
    /// Peers without history: nothing to resume from.
    Nothing,
}

/// The server's answer to a subscribe.
#[derive(Debug, Clone, Copy)]
pub struct Subscribed {
    /// The channel's newest offset when the subscription started (0 where the server does not say).
    pub base: u64,
    /// Whether the requested position was recovered (`None` for fresh subscriptions).
    pub recovered: Option<bool>,
}

#[derive(Debug)]
pub enum Event {
    Publication {
        offset: u64,
        ts_us: Option<u64>,
    },
    /// The server could not continue the stream (gateway `reset`).
    Reset,
    /// The connection ended; `reconnect_ms` is the server's drain hint.
    Closed {
        reason: String,
        reconnect_ms: Option<u64>,
    },
}

type Ws = WebSocketStream<TcpStream>;

pub struct Subscriber {
    conn: Conn,
    resume: Resume,
}

enum Conn {
    GatewayWs(Box<Ws>),
    PlainWs(Box<Ws>),
    Sse(Box<SseStream>),
    SocketIo(Box<SioClient>),
}

impl Subscriber {
    pub async fn connect(t: &Target<'_>, resume: &Resume) -> Result<(Self, Subscribed), String> {
        match (t.kind, t.transport) {
            (SystemKind::Gateway, Transport::Ws) => gateway_ws(t, resume).await,
            (SystemKind::Gateway, _) => gateway_sse(t, resume).await,
            (SystemKind::Socketio, _) => {
                let port = net::socket_addr(t.origin)?.port();
                let session = match resume {
                    Resume::SocketIo(s) => Some(s),
                    _ => None,
                };
                let (client, recovered) =
                    SioClient::connect(port, t.source, t.channel, session).await?;
                let sub = Subscribed {
                    base: 0,
                    recovered: session.map(|_| recovered),
                };
                let resume = Resume::SocketIo(client.session());
                let conn = Conn::SocketIo(Box::new(client));
                Ok((Subscriber { conn, resume }, sub))
            }
            (SystemKind::Ws | SystemKind::Uws, _) => {
                let url = format!("{}/ws?channel={}", ws_origin(t.origin), t.channel);
                let ws = open_ws(&url, t).await?;
                let sub = Subscribed {
                    base: 0,
                    recovered: None,
                };
                let conn = Conn::PlainWs(Box::new(ws));
                let resume = Resume::Nothing;
                Ok((Subscriber { conn, resume }, sub))
            }
        }
    }

    /// The position to resume from: just after the last publication returned by `next`.
    pub fn resume(&self) -> Resume {
        match &self.conn {
            Conn::SocketIo(c) => Resume::SocketIo(c.session()),
            _ => self.resume.clone(),
        }
    }

    pub async fn next(&mut self) -> Event {
        match &mut self.conn {
            Conn::GatewayWs(ws) | Conn::PlainWs(ws) => loop {
                let msg = match ws.next().await {
                    None => return closed("connection closed", None),
                    Some(Err(e)) => return closed(&format!("read: {e}"), None),
                    Some(Ok(m)) => m,
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (f.code, f.reason.to_string()))
                            .unwrap_or((CloseCode::Status, String::new()));
                        let hint = (code == CloseCode::Away)
                            .then(|| reconnect_hint(&reason))
                            .flatten();
                        return closed(&format!("close {code}: {reason}"), hint);
                    }
                    _ => continue,
                };
                let Ok(push) = serde_json::from_str::<Push>(&text) else {
                    continue;
                };
                if let Some(r) = push.reset {
                    self.resume = Resume::Position {
                        epoch: r.epoch,
                        offset: r.offset,
                    };
                    return Event::Reset;
                }
                let Some(offset) = push.offset else { continue };
                if let Resume::Position { offset: o, epoch } = &mut self.resume {
                    *o = offset;
                    if let Some(e) = push.epoch.filter(|e| e != epoch) {
                        *epoch = e;
                    }
                }
                return Event::Publication {
                    offset,
                    ts_us: push.data.and_then(|d| d.ts),
                };
            },
            Conn::Sse(s) => loop {
                match s.next_event().await {
                    Err(e) => return closed(&e, s.retry_ms),
                    Ok(ev) => {
                        if let Some(id) = ev.id {
                            self.resume = Resume::Cursor(id);
                        }
                        match ev.event.as_deref() {
                            None | Some("message") => {
                                let Ok(push) = serde_json::from_str::<Push>(&ev.data) else {
                                    continue;
                                };
                                let Some(offset) = push.offset else { continue };
                                return Event::Publication {
                                    offset,
                                    ts_us: push.data.and_then(|d| d.ts),
                                };
                            }
                            Some("reset") => return Event::Reset,
                            Some("error") => {
                                return closed(&format!("error event: {}", ev.data), None)
                            }
                            _ => continue,
                        }
                    }
                }
            },
            Conn::SocketIo(c) => match c.next().await {
                None => closed("connection closed", None),
                Some(Err(e)) => closed(&e, None),
                Some(Ok(d)) => Event::Publication {
                    offset: d.offset,
                    ts_us: d.data.get("ts").and_then(|v| v.as_u64()),
                },
            },
        }
    }

    /// Ends the connection politely.
    pub async fn close(self) {
        match self.conn {
            Conn::GatewayWs(mut ws) | Conn::PlainWs(mut ws) => {
                let _ = SinkExt::close(&mut *ws).await;
            }
            Conn::Sse(_) => {}
            Conn::SocketIo(c) => c.close().await,
        }
    }
}

fn closed(reason: &str, reconnect_ms: Option<u64>) -> Event {
    Event::Closed {
        reason: reason.to_string(),
        reconnect_ms,
    }
}

fn ws_origin(http: &str) -> String {
    http.replacen("http", "ws", 1)
}

async fn open_ws(url: &str, t: &Target<'_>) -> Result<Ws, String> {
    let tcp = net::connect(net::socket_addr(t.origin)?, t.source)
        .await
        .map_err(|e| format!("connect {}: {e}", t.origin))?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config()))
        .await
        .map_err(|e| format!("handshake {url}: {e}"))?;
    Ok(ws)
}

/// Client WebSocket settings: tungstenite's default 128 KiB read buffer per connection, zeroed
/// at every connect, would make the load generator the bottleneck of a reconnect storm.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// `{"reason":"shutting_down","reconnect_ms":N}` → N.
fn reconnect_hint(reason: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(reason)
        .ok()?
        .get("reconnect_ms")?
        .as_u64()
}

/// The fields of a server push the load generator reads; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Push {
    id: Option<u64>,
    offset: Option<u64>,
    /// A publication's epoch: the position takes it from the publication, since a channel with
    /// no publication yet subscribes with the empty epoch.
    epoch: Option<String>,
    result: Option<SubscribeResult>,
    error: Option<serde_json::Value>,
    data: Option<Stamp>,
    reset: Option<ResetPush>,
}

/// The publisher's timestamp inside a publication's data.
#[derive(Deserialize)]
struct Stamp {
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct SubscribeResult {
    epoch: Option<String>,
    offset: Option<u64>,
    recovered: Option<bool>,
}

#[derive(Deserialize)]
struct ResetPush {
    epoch: String,
    offset: u64,
}

async fn gateway_ws(t: &Target<'_>, resume: &Resume) -> Result<(Subscriber, Subscribed), String> {
    let mut ws = open_ws(&format!("{}/ws", ws_origin(t.origin)), t).await?;
    let since = match resume {
        Resume::Position { epoch, offset } => {
            format!(
                r#","since":{{"epoch":{},"offset":{offset}}}"#,
                json_str(epoch)
            )
        }
        _ => String::new(),
    };
    let cmd = format!(
        r#"{{"id":1,"op":"subscribe","channel":{}{since}}}"#,
        json_str(t.channel)
    );
    ws.send(Message::text(cmd))
        .await
        .map_err(|e| format!("send: {e}"))?;
    while let Some(msg) = ws.next().await {
        let msg = msg.map_err(|e| format!("read: {e}"))?;
        let Message::Text(text) = msg else {
            if let Message::Close(f) = msg {
                return Err(format!("closed while subscribing: {f:?}"));
            }
            continue;
        };
        let push: Push = serde_json::from_str(&text).map_err(|e| format!("json: {e}"))?;
        if push.id != Some(1) {
            continue;
        }
        if let Some(e) = push.error {
            return Err(format!("subscribe refused: {e}"));
        }
        let r = push.result.ok_or("subscribe reply without result")?;
        let base = r.offset.ok_or("subscribe reply without offset")?;
        let recovered =
            matches!(resume, Resume::Position { .. }).then_some(r.recovered == Some(true));
        let epoch = r.epoch.unwrap_or_default();
        // Recovered: publications after `since` follow; otherwise delivery starts after `base`.
        let from = match (resume, recovered) {
            (Resume::Position { offset, .. }, Some(true)) => *offset,
            _ => base,
        };
        let sub = Subscribed { base, recovered };
        let resume = Resume::Position {
            epoch,
            offset: from,
        };
        return Ok((
            Subscriber {
                conn: Conn::GatewayWs(Box::new(ws)),
                resume,
            },
            sub,
        ));
    }
    Err("closed before the subscribe reply".into())
}

async fn gateway_sse(t: &Target<'_>, resume: &Resume) -> Result<(Subscriber, Subscribed), String> {
    let http = t.http.ok_or("SSE needs an HTTP client")?;
    let mut req = http
        .get(format!("{}/sse?channel={}", t.origin, t.channel))
        .header("accept", "text/event-stream");
    if let Resume::Cursor(c) = resume {
        req = req.header("last-event-id", c.as_str());
    }
    let resp = req.send().await.map_err(|e| format!("sse: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("sse status {}", resp.status()));
    }
    let mut stream = SseStream::new(resp);
    loop {
        let ev = stream.next_event().await?;
        match ev.event.as_deref() {
            Some("connected") => {
                let v: serde_json::Value =
                    serde_json::from_str(&ev.data).map_err(|e| format!("connected: {e}"))?;
                let ch = &v["channels"][0];
                let base = ch["offset"].as_u64().ok_or("connected without offset")?;
                let recovered = matches!(resume, Resume::Cursor(_))
                    .then(|| ch["recovered"].as_bool() == Some(true));
                let resume = Resume::Cursor(ev.id.ok_or("connected without id")?);
                return Ok((
                    Subscriber {
                        conn: Conn::Sse(Box::new(stream)),
                        resume,
                    },
                    Subscribed { base, recovered },
                ));
            }
            Some("error") => return Err(format!("sse error: {}", ev.data)),
            _ => continue,
        }
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One server-sent event.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// A `text/event-stream` body split into events by the test kit's parser (the same one every
/// test reads the gateway's SSE with).
struct SseStream {
    resp: reqwest::Response,
    parser: testkit::SseParser,
    /// The last `retry:` value (the drain hint at the end of a stream).
    retry_ms: Option<u64>,
}

impl SseStream {
    fn new(resp: reqwest::Response) -> Self {
        SseStream {
            resp,
            parser: testkit::SseParser::new(),
            retry_ms: None,
        }
    }

    async fn next_event(&mut self) -> Result<SseEvent, String> {
        loop {
            while let Some(block) = self.parser.next_block() {
                if let Some(retry) = &block.retry {
                    self.retry_ms = retry.parse().ok();
                }
                if let Some(data) = block.data {
                    return Ok(SseEvent {
                        id: block.id,
                        event: block.event,
                        data,
                    });
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.parser.push(&chunk),
                Ok(None) => return Err("stream ended".into()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_parse_what_the_generator_reads() {
        let p: Push = serde_json::from_str(
            r#"{"channel":"c","offset":7,"epoch":"e","data":{"ts":123,"seq":1,"pad":"xx"}}"#,
        )
        .unwrap();
        assert_eq!(p.offset, Some(7));
        assert_eq!(p.data.unwrap().ts, Some(123));
        let r: Push = serde_json::from_str(
            r#"{"id":1,"result":{"channel":"c","epoch":"e","offset":3,"recovered":true}}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some(1));
        assert_eq!(r.result.unwrap().recovered, Some(true));
        let reset: Push = serde_json::from_str(
            r#"{"reset":{"channel":"c","epoch":"f","offset":9,"reason":"x"}}"#,
        )
        .unwrap();
        assert_eq!(reset.reset.unwrap().offset, 9);
    }

    #[test]
    fn drain_hint_is_read_from_the_close_reason() {
        assert_eq!(
            reconnect_hint(r#"{"reason":"shutting_down","reconnect_ms":420}"#),
            Some(420)
        );
        assert_eq!(reconnect_hint("bye"), None);
    }
}
