//! A minimal Socket.IO v4 client (Engine.IO v4, WebSocket transport only) for the Socket.IO
//! peer: connect with a channel, receive "pub" events, resume a session with connection-state
//! recovery.
//!
//! Wire format, one Engine.IO packet per WebSocket text frame: `0{..}` open, `2` ping (answered
//! with `3` pong), `4` message carrying a Socket.IO packet. Socket.IO packets on the main
//! namespace: `40{auth}` CONNECT (the server answers `40{"sid":..,"pid":..}`), `41` DISCONNECT,
//! `42["event",arg..]` EVENT, `44{..}` CONNECT_ERROR. With recovery on, every broadcast event
//! carries its offset in the Redis stream as a last extra string argument; resuming sends that
//! offset and the session's pid in the CONNECT auth, and the server replays what was missed
//! (before its CONNECT answer) and answers with the same pid.

use std::collections::VecDeque;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

/// What connection-state recovery needs to resume: the private session id and the offset of the
/// last broadcast received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub pid: String,
    pub offset: Option<String>,
}

/// One "pub" event: `{"channel": C, "offset": N, "data": D}`.
#[derive(Clone, Debug, PartialEq)]
pub struct SioDelivery {
    pub channel: String,
    pub offset: u64,
    pub data: Value,
}

/// A connected Socket.IO socket on the main namespace.
pub struct SioClient {
    ws: Socket,
    session: Session,
    /// Events replayed by a recovery, which arrive before the CONNECT answer.
    replayed: VecDeque<SioDelivery>,
}

/// A decoded Engine.IO / Socket.IO frame, as far as this client cares.
enum Packet {
    Ping,
    Connect { pid: Option<String> },
    Event(Vec<Value>),
    Ended(String),
    Other,
}

impl SioClient {
    /// Opens the Engine.IO socket on `ws://127.0.0.1:PORT/socket.io/` from `source` (as every
    /// other client of a run, so the peers get the same source ports), reads the open packet,
    /// connects to the main namespace with auth `{"channel": C}` (plus `pid` and `offset` when
    /// resuming), and waits for the CONNECT answer. Returns the client and whether the server
    /// recovered the session, i.e. answered with the pid it was given. No timeout of its own.
    pub async fn connect(
        port: u16,
        source: std::net::IpAddr,
        channel: &str,
        resume: Option<&Session>,
    ) -> Result<(SioClient, bool), String> {
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        // An 8 KiB read buffer, as the other clients use (tungstenite's default is 128 KiB).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(8 * 1024);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = crate::net::connect(addr, source)
            .await
            .map_err(|e| format!("socket.io connect {addr}: {e}"))?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(&url, tcp, Some(config))
            .await
            .map_err(|e| format!("socket.io connect {url}: {e}"))?;
        let mut client = SioClient {
            ws,
            session: resume.cloned().unwrap_or_default(),
            replayed: VecDeque::new(),
        };
        match client.read_text().await? {
            Some(open) if open.starts_with('0') => {}
            other => return Err(format!("expected an Engine.IO open packet, got {other:?}")),
        }
        let mut auth = json!({ "channel": channel });
        if let Some(s) = resume {
            auth["pid"] = json!(s.pid);
            if let Some(offset) = &s.offset {
                auth["offset"] = json!(offset);
            }
        }
        client.send_text(format!("40{auth}")).await?;
        loop {
            let Some(text) = client.read_text().await? else {
                return Err("socket.io: closed before CONNECT".to_string());
            };
            match decode(&text) {
                Packet::Ping => client.send_text("3".to_string()).await?,
                Packet::Connect { pid } => {
                    let pid = pid.unwrap_or_default();
                    let recovered = resume.is_some_and(|s| s.pid == pid);
                    if !recovered {
                        client.session = Session { pid, offset: None };
                    }
                    return Ok((client, recovered));
                }
                Packet::Event(args) => {
                    if let Some(d) = client.accept_event(args)? {
                        client.replayed.push_back(d);
                    }
                }
                Packet::Ended(why) => return Err(format!("socket.io connect: {why}")),
                Packet::Other => {}
            }
        }
    }

    /// The next "pub" event. Answers pings on the way and records each broadcast's offset into
    /// the session. None when the connection ended (closed, reset or disconnected by the server).
    pub async fn next(&mut self) -> Option<Result<SioDelivery, String>> {
        if let Some(d) = self.replayed.pop_front() {
            return Some(Ok(d));
        }
        loop {
            let text = match self.read_text().await {
                Ok(Some(text)) => text,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            match decode(&text) {
                Packet::Ping => {
                    if let Err(e) = self.send_text("3".to_string()).await {
                        return Some(Err(e));
                    }
                }
                Packet::Event(args) => match self.accept_event(args) {
                    Ok(Some(d)) => return Some(Ok(d)),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                },
                Packet::Ended(_) => return None,
                Packet::Connect { .. } | Packet::Other => {}
            }
        }
    }

    pub fn session(&self) -> Session {
        self.session.clone()
    }

    /// Disconnects from the namespace (`41`), then closes the WebSocket.
    pub async fn close(mut self) {
        let _ = self.send_text("41".to_string()).await;
        let _ = self.ws.close(None).await;
    }

    /// Records the event's recovery offset, and decodes it when it is a "pub".
    fn accept_event(&mut self, mut args: Vec<Value>) -> Result<Option<SioDelivery>, String> {
        // Like socket.io-client: a string last argument after the event's own is the offset.
        if args.len() > 2 {
            if let Some(Value::String(offset)) = args.last() {
                self.session.offset = Some(offset.clone());
            }
        }
        if args.first().and_then(Value::as_str) != Some("pub") || args.len() < 2 {
            return Ok(None);
        }
        let mut publication = args.swap_remove(1);
        let channel = publication["channel"].as_str().map(str::to_string);
        let offset = publication["offset"].as_u64();
        match (channel, offset) {
            (Some(channel), Some(offset)) => Ok(Some(SioDelivery {
                channel,
                offset,
                data: publication["data"].take(),
            })),
            _ => Err(format!("malformed pub event: {publication}")),
        }
    }

    /// The next text frame; binary and control frames are skipped. None at the end of the stream.
    async fn read_text(&mut self) -> Result<Option<String>, String> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(text))) => return Ok(Some(text.as_str().to_owned())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("socket.io read: {e}")),
            }
        }
    }

    async fn send_text(&mut self, text: String) -> Result<(), String> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| format!("socket.io send: {e}"))
    }
}

/// Decodes one Engine.IO packet (and the Socket.IO packet inside a message) on namespace "/".
fn decode(text: &str) -> Packet {
    let mut chars = text.chars();
    match chars.next() {
        Some('1') => return Packet::Ended("engine.io close".to_string()),
        Some('2') => return Packet::Ping,
        Some('4') => {}
        _ => return Packet::Other,
    }
    let sio = chars.as_str();
    let Some(kind) = sio.chars().next() else {
        return Packet::Other;
    };
    // Namespace "/" has no prefix; this client uses no acks, so no packet id follows the type.
    let payload = &sio[kind.len_utf8()..];
    match kind {
        '0' => Packet::Connect {
            pid: serde_json::from_str::<Value>(payload)
                .ok()
                .and_then(|v| v["pid"].as_str().map(str::to_string)),
        },
        '1' => Packet::Ended("disconnected by the server".to_string()),
        '2' => match serde_json::from_str::<Vec<Value>>(payload) {
            Ok(args) => Packet::Event(args),
            Err(_) => Packet::Other,
        },
        '4' => Packet::Ended(format!("connect error {payload}")),
        _ => Packet::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_engine_and_socket_packets() {
        assert!(matches!(decode("2"), Packet::Ping));
        assert!(matches!(decode("1"), Packet::Ended(_)));
        assert!(matches!(decode("41"), Packet::Ended(_)));
        assert!(matches!(decode("44{\"message\":\"no\"}"), Packet::Ended(_)));
        match decode("40{\"sid\":\"s\",\"pid\":\"p\"}") {
            Packet::Connect { pid } => assert_eq!(pid.as_deref(), Some("p")),
            _ => panic!("not a connect"),
        }
        match decode("42[\"pub\",{\"channel\":\"c\",\"offset\":3,\"data\":1},\"17-0\"]") {
            Packet::Event(args) => assert_eq!(args.len(), 3),
            _ => panic!("not an event"),
        }
    }
}
