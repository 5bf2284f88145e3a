//! The WebSocket subscriber: one background task that holds a connection to one node at a time,
//! subscribes every channel with `since` = its position, and on a dropped connection (node
//! killed, drained with 1001 and a reconnect hint, heartbeat lost) reconnects to the next node
//! with jittered backoff and resumes — so the application sees every publication exactly once,
//! in order, or a reset first. A close that says not to reconnect (4010: the backend
//! disconnected the user) ends the subscriber instead.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::positions::{Positions, SubscribeResult};
use crate::types::{Member, Position, Publication, Reset};

/// What a [`Subscriber`] reports, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first connection is open (to `node`, one of the URLs given).
    Connected {
        /// The WebSocket URL connected to.
        node: String,
    },
    /// A later connection is open, on `node`; every channel is being resubscribed from its
    /// position.
    Reconnected {
        /// The WebSocket URL connected to.
        node: String,
    },
    /// The connection to `node` failed or dropped (`code`: the WebSocket close code, if one
    /// came); the next attempt, to the next node, starts in `retry_in`.
    Disconnected {
        /// The WebSocket URL of the connection.
        node: String,
        /// The close code the server sent, if any.
        code: Option<u16>,
        /// The close reason or the error.
        reason: String,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
    /// The server accepted a subscription; `position` is the channel's position now.
    /// `recovered: true` means the publications after the position asked for follow.
    Subscribed {
        /// The channel subscribed.
        channel: String,
        /// Whether the position asked for was recovered.
        recovered: bool,
        /// The channel's position after the answer.
        position: Position,
    },
    /// A publication, exactly once and in order per channel.
    Publication(Publication),
    /// The channel's stream could not be continued from its position (a resume answered
    /// `recovered: false`, or a live reset): publications after `offset` of `epoch` follow.
    Reset(Reset),
    /// The server ended a subscription (`reason`: `server` when the backend called
    /// `POST /api/unsubscribe` for the user, `permission_revoked`): nothing more of the channel
    /// follows, and it is no longer resubscribed.
    Unsubscribed {
        /// The channel left.
        channel: String,
        /// Why the server ended it.
        reason: String,
    },
    /// A member joined a channel whose namespace announces members (`join_leave`). Not in
    /// history: joins and leaves while disconnected are not replayed (read
    /// [`ApiClient::presence`](crate::ApiClient::presence) again after a reconnect).
    Join {
        /// The channel joined.
        channel: String,
        /// Who joined.
        member: Member,
    },
    /// A member left such a channel.
    Leave {
        /// The channel left.
        channel: String,
        /// Who left.
        member: Member,
    },
    /// The server closed the connection and said not to reconnect (`"reconnect":false` in the
    /// close reason; 4010: the backend disconnected the user, whose token is now refused). The
    /// subscriber stops: this is its last event. Reconnect with a new token, if at all.
    Ended {
        /// The WebSocket URL of the connection.
        node: String,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The server refused a subscription (`forbidden`, `invalid_channel`…). On
    /// `backplane_unavailable` the subscriber also reconnects, which subscribes again.
    Error {
        /// The channel of the refused command.
        channel: Option<String>,
        /// The server's error code.
        code: String,
        /// The server's message.
        message: String,
    },
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

/// Settings of a [`Subscriber`], built by [`Subscriber::builder`].
#[derive(Debug, Clone)]
pub struct SubscriberBuilder {
    urls: Vec<String>,
    token: Option<String>,
    positions: HashMap<String, Position>,
    backoff: Backoff,
    connect_timeout: Duration,
    ping_interval: Duration,
    pong_timeout: Duration,
    queue_capacity: usize,
}

impl SubscriberBuilder {
    /// A JWT presented as `Authorization: Bearer` on every connection.
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(String::from);
        self
    }

    /// Positions to resume from (as read from [`Subscriber::positions`] and persisted): a
    /// channel subscribed later starts after its position here.
    pub fn with_positions(mut self, positions: HashMap<String, Position>) -> Self {
        self.positions = positions;
        self
    }

    /// Reconnect delays (default 200 ms doubling up to 10 s, full jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long one connection attempt may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Heartbeat: after `ping_interval` without any frame from the server the subscriber sends
    /// a Ping; after `ping_interval + pong_timeout` it declares the connection dead and
    /// reconnects (defaults 20 s and 10 s; the server pings every 25 s by default).
    pub fn heartbeat(mut self, ping_interval: Duration, pong_timeout: Duration) -> Self {
        self.ping_interval = ping_interval;
        self.pong_timeout = pong_timeout;
        self
    }

    /// Events buffered for the application (default 1024). When it falls behind, reading from
    /// the server waits; a server that gives up on the connection (4000 slow consumer) is
    /// reconnected to and resumed from, losing nothing.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Starts the subscriber (within a Tokio runtime). It connects in the background: the first
    /// event is [`Event::Connected`] or [`Event::Disconnected`].
    pub fn connect(self) -> Result<Subscriber> {
        if self.urls.is_empty() {
            return Err(Error::Config("no WebSocket URL".into()));
        }
        let urls = self
            .urls
            .iter()
            .map(|u| ws_url(u))
            .collect::<Result<Vec<_>>>()?;
        let (commands_tx, commands) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(self.queue_capacity);
        let task = Task {
            urls,
            token: self.token,
            backoff: self.backoff,
            connect_timeout: self.connect_timeout,
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            commands,
            events: events_tx,
            positions: Positions::from_map(self.positions.clone()),
            channels: BTreeSet::new(),
            next_url: 0,
            connected_once: false,
        };
        // The task ends by itself once the Subscriber is dropped: its command channel closes
        // (the connection is closed with 1000) and its event channel refuses sends.
        tokio::spawn(task.run());
        Ok(Subscriber {
            commands: commands_tx,
            events,
            channels: HashSet::new(),
            delivered: self.positions,
        })
    }
}

/// A WebSocket subscriber to one or more gateway nodes, resuming every channel across
/// reconnects. Read its events with [`Subscriber::recv`] or as a [`Stream`].
///
/// ```no_run
/// # async fn run() -> Result<(), gateway_client::Error> {
/// use gateway_client::{Event, Subscriber};
/// let mut sub = Subscriber::connect(["ws://127.0.0.1:8080/ws", "ws://127.0.0.1:8081/ws"], None)?;
/// sub.subscribe("chat:lobby").await?;
/// while let Some(event) = sub.recv().await {
///     match event {
///         Event::Publication(p) => println!("{} {}", p.offset, p.data),
///         Event::Reset(r) => eprintln!("{}: lost messages ({})", r.channel, r.reason),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Subscriber {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    /// The channels the application subscribed: events of others (still queued after an
    /// unsubscribe) are dropped.
    channels: HashSet<String>,
    /// Positions of what the application has received (not what is still queued).
    delivered: HashMap<String, Position>,
}

impl Subscriber {
    /// Settings for a subscriber of `ws_urls`: `ws://node:8080/ws`, or the node's base URL
    /// (`http://node:8080`, to which `/ws` is added). Nodes are tried in order, the next one
    /// after each failure or drop.
    pub fn builder<I, S>(ws_urls: I) -> SubscriberBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SubscriberBuilder {
            urls: ws_urls.into_iter().map(Into::into).collect(),
            token: None,
            positions: HashMap::new(),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            queue_capacity: 1024,
        }
    }

    /// [`Subscriber::builder`] with default settings and an optional JWT, started.
    pub fn connect<I, S>(ws_urls: I, token: Option<&str>) -> Result<Subscriber>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder(ws_urls).token(token).connect()
    }

    /// Subscribes `channel`, from its position when one is known (given back with
    /// [`SubscriberBuilder::with_positions`]), else from now. The server's answer arrives as
    /// [`Event::Subscribed`] (or [`Event::Error`]).
    pub async fn subscribe(&mut self, channel: &str) -> Result<()> {
        self.channels.insert(channel.to_string());
        self.commands
            .send(Command::Subscribe(channel.to_string()))
            .await
            .map_err(|_| Error::Closed)
    }

    /// Unsubscribes `channel` and forgets its position.
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        self.channels.remove(channel);
        self.delivered.remove(channel);
        self.commands
            .send(Command::Unsubscribe(channel.to_string()))
            .await
            .map_err(|_| Error::Closed)
    }

    /// The next event; `None` once the subscriber is closed.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Each subscribed channel's position: the last publication (or reset) the application has
    /// received. Persist it and give it back with [`SubscriberBuilder::with_positions`] to
    /// resume after a restart.
    pub fn positions(&self) -> HashMap<String, Position> {
        self.delivered.clone()
    }

    /// Stops the subscriber and closes its connection (dropping it does the same).
    pub fn close(self) {}

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            let Some(event) = std::task::ready!(self.events.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let channel = match &event {
                Event::Publication(p) => Some((&p.channel, Position::of(p))),
                Event::Reset(r) => Some((
                    &r.channel,
                    Position {
                        epoch: r.epoch.clone(),
                        offset: r.offset,
                        tag: None,
                    },
                )),
                Event::Subscribed {
                    channel, position, ..
                } => Some((channel, position.clone())),
                _ => None,
            };
            if let Some((channel, position)) = channel {
                if !self.channels.contains(channel) {
                    continue;
                }
                self.delivered.insert(channel.clone(), position);
            }
            return Poll::Ready(Some(event));
        }
    }
}

impl Stream for Subscriber {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}

/// `ws://host/ws` as given; `http(s)://host[/]` becomes `ws(s)://host/ws`.
fn ws_url(url: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::Config(format!("{url}: not a URL")))?;
    let scheme = match scheme {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(Error::Config(format!("{url}: not a ws(s) or http(s) URL"))),
    };
    let rest = if rest.contains('/') && !rest.ends_with('/') {
        rest.to_string()
    } else {
        format!("{}/ws", rest.trim_end_matches('/'))
    };
    Ok(format!("{scheme}://{rest}"))
}

/// How a connection ended.
enum End {
    /// The application closed the subscriber (or dropped it).
    Closed,
    /// The connection dropped; reconnect after `reconnect_ms` when the server said so.
    Dropped {
        code: Option<u16>,
        reason: String,
        reconnect_ms: Option<u64>,
    },
    /// The server closed saying not to reconnect.
    Refused { code: u16, reason: String },
}

fn dropped(reason: impl Into<String>) -> End {
    End::Dropped {
        code: None,
        reason: reason.into(),
        reconnect_ms: None,
    }
}

enum Pending {
    Subscribe {
        channel: String,
        since: Option<Position>,
    },
    Unsubscribe,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The background task: owns the connection, the channels and their positions.
struct Task {
    urls: Vec<String>,
    token: Option<String>,
    backoff: Backoff,
    connect_timeout: Duration,
    ping_interval: Duration,
    pong_timeout: Duration,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    positions: Positions,
    /// Subscribed channels, in a stable order for resubscribing.
    channels: BTreeSet<String>,
    next_url: usize,
    connected_once: bool,
}

impl Task {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let node = self.urls[self.next_url % self.urls.len()].clone();
            let (code, reason, delay) = match self.open(&node).await {
                Ok(socket) => {
                    failures = 0;
                    let event = if self.connected_once {
                        Event::Reconnected { node: node.clone() }
                    } else {
                        Event::Connected { node: node.clone() }
                    };
                    self.connected_once = true;
                    if self.events.send(event).await.is_err() {
                        return;
                    }
                    match self.session(socket).await {
                        End::Closed => return,
                        End::Refused { code, reason } => {
                            let _ = self.events.send(Event::Ended { node, code, reason }).await;
                            return;
                        }
                        End::Dropped {
                            code,
                            reason,
                            reconnect_ms,
                        } => {
                            // A drained node names its delay; a drop gets a short random one
                            // so that the clients of a dead node spread out.
                            let delay = reconnect_ms
                                .map(Duration::from_millis)
                                .unwrap_or_else(|| self.backoff.delay(0));
                            (code, reason, delay)
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    (None, e.to_string(), self.backoff.delay(failures))
                }
            };
            self.next_url += 1;
            let event = Event::Disconnected {
                node,
                code,
                reason,
                retry_in: delay,
            };
            if self.events.send(event).await.is_err() || !self.wait(delay).await {
                return;
            }
        }
    }

    /// Waits `delay`, recording subscribe/unsubscribe commands meanwhile; false once closed.
    async fn wait(&mut self, delay: Duration) -> bool {
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return true,
                command = self.commands.recv() => match command {
                    Some(Command::Subscribe(channel)) => {
                        self.channels.insert(channel);
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        self.channels.remove(&channel);
                        self.positions.remove(&channel);
                    }
                    None => return false,
                },
            }
        }
    }

    async fn open(&self, node: &str) -> Result<Socket> {
        let mut request = node
            .into_client_request()
            .map_err(|e| Error::Config(format!("{node}: {e}")))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| Error::Config(format!("token: {e}")))?;
            request.headers_mut().insert("authorization", value);
        }
        match tokio::time::timeout(
            self.connect_timeout,
            tokio_tungstenite::connect_async(request),
        )
        .await
        {
            Ok(Ok((socket, _response))) => Ok(socket),
            Ok(Err(e)) => Err(Error::Transport(format!("{node}: {e}"))),
            Err(_) => Err(Error::Transport(format!("{node}: connect timed out"))),
        }
    }

    /// Runs one connection: subscribes every channel from its position, then relays pushes
    /// and commands until the connection ends.
    async fn session(&mut self, socket: Socket) -> End {
        let (mut sink, mut stream) = socket.split();
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut next_id = 1u64;
        let mut last_heard = Instant::now();
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.ping_interval / 2,
            self.ping_interval / 2,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let channels: Vec<String> = self.channels.iter().cloned().collect();
        for channel in channels {
            let frame = self.subscribe_frame(&channel, next_id, &mut pending);
            next_id += 1;
            if let Err(e) = sink.send(frame).await {
                return dropped(e.to_string());
            }
        }
        loop {
            tokio::select! {
                message = stream.next() => {
                    last_heard = Instant::now();
                    let message = match message {
                        None => return dropped("connection closed"),
                        Some(Err(e)) => return dropped(e.to_string()),
                        Some(Ok(message)) => message,
                    };
                    match message {
                        Message::Text(text) => {
                            if let Some(end) = self.on_text(text.as_str(), &mut pending).await {
                                return end;
                            }
                        }
                        Message::Close(frame) => return closed_by_server(frame),
                        // Pings are answered by tungstenite on the next read or write.
                        _ => {}
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Subscribe(channel)) => {
                        if self.channels.insert(channel.clone()) {
                            let frame = self.subscribe_frame(&channel, next_id, &mut pending);
                            next_id += 1;
                            if let Err(e) = sink.send(frame).await {
                                return dropped(e.to_string());
                            }
                        }
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        if self.channels.remove(&channel) {
                            self.positions.remove(&channel);
                            pending.insert(next_id, Pending::Unsubscribe);
                            let op = serde_json::json!({"id": next_id, "op": "unsubscribe", "channel": channel});
                            next_id += 1;
                            if let Err(e) = sink.send(Message::Text(op.to_string().into())).await {
                                return dropped(e.to_string());
                            }
                        }
                    }
                    None => {
                        let _ = sink.send(Message::Close(None)).await;
                        return End::Closed;
                    }
                },
                _ = heartbeat.tick() => {
                    let silent = last_heard.elapsed();
                    if silent >= self.ping_interval + self.pong_timeout {
                        return dropped("heartbeat timeout: nothing heard from the server");
                    }
                    if silent >= self.ping_interval {
                        if let Err(e) = sink.send(Message::Ping(Default::default())).await {
                            return dropped(e.to_string());
                        }
                    }
                }
            }
        }
    }

    fn subscribe_frame(
        &self,
        channel: &str,
        id: u64,
        pending: &mut HashMap<u64, Pending>,
    ) -> Message {
        let since = self.positions.get(channel).cloned();
        let mut op = serde_json::json!({"id": id, "op": "subscribe", "channel": channel});
        if let Some(since) = &since {
            op["since"] = serde_json::to_value(since).expect("a position serialises");
        }
        pending.insert(
            id,
            Pending::Subscribe {
                channel: channel.to_string(),
                since,
            },
        );
        Message::Text(op.to_string().into())
    }

    /// Handles one server message; `Some` ends the connection.
    async fn on_text(&mut self, text: &str, pending: &mut HashMap<u64, Pending>) -> Option<End> {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return None;
        };
        let mut events = Vec::new();
        let mut end = None;
        if let Some(id) = message.get("id").and_then(Value::as_u64) {
            let Some(Pending::Subscribe { channel, since }) = pending.remove(&id) else {
                return None;
            };
            if !self.channels.contains(&channel) {
                return None;
            }
            if let Some(error) = message.get("error") {
                let code = error["code"].as_str().unwrap_or_default().to_string();
                if code == "already_subscribed" {
                    return None;
                }
                if code == "backplane_unavailable" {
                    end = Some(dropped("backplane_unavailable while subscribing"));
                } else {
                    // A refusal (forbidden, invalid_channel…) would only repeat on every
                    // reconnect: the channel is no longer resubscribed.
                    self.channels.remove(&channel);
                }
                events.push(Event::Error {
                    channel: Some(channel),
                    code,
                    message: error["message"].as_str().unwrap_or_default().to_string(),
                });
            } else {
                match serde_json::from_value::<SubscribeResult>(message["result"].clone()) {
                    Ok(result) => {
                        let reset = self.positions.subscribed(&result, since.as_ref());
                        let position = self.positions.get(&channel).cloned().unwrap_or_default();
                        events.push(Event::Subscribed {
                            channel,
                            recovered: result.recovered,
                            position,
                        });
                        events.extend(reset.map(Event::Reset));
                    }
                    Err(e) => return Some(dropped(format!("bad subscribe result: {e}"))),
                }
            }
        } else if let Some(ended) = message.get("unsubscribed") {
            let channel = ended["channel"].as_str().unwrap_or_default().to_string();
            if self.channels.remove(&channel) {
                self.positions.remove(&channel);
                events.push(Event::Unsubscribed {
                    channel,
                    reason: ended["reason"].as_str().unwrap_or_default().to_string(),
                });
            }
        } else if let Some(reset) = message.get("reset") {
            match serde_json::from_value::<Reset>(reset.clone()) {
                Ok(reset) if self.channels.contains(&reset.channel) => {
                    self.positions.reset(&reset);
                    events.push(Event::Reset(reset));
                }
                Ok(_) => {}
                Err(e) => return Some(dropped(format!("bad reset: {e}"))),
            }
        } else if let Some(kind) = ["join", "leave"]
            .into_iter()
            .find(|k| message.get(k).is_some())
        {
            let channel = message["channel"].as_str().unwrap_or_default().to_string();
            match serde_json::from_value::<Member>(message[kind].clone()) {
                Ok(member) if self.channels.contains(&channel) => events.push(match kind {
                    "join" => Event::Join { channel, member },
                    _ => Event::Leave { channel, member },
                }),
                Ok(_) => {}
                Err(e) => return Some(dropped(format!("bad {kind}: {e}"))),
            }
        } else if message.get("channel").is_some() && message.get("offset").is_some() {
            match serde_json::from_value::<Publication>(message) {
                Ok(p) if self.channels.contains(&p.channel) => {
                    if self.positions.accept(&p) {
                        events.push(Event::Publication(p));
                    }
                }
                Ok(_) => {}
                Err(e) => return Some(dropped(format!("bad publication: {e}"))),
            }
        }
        for event in events {
            if self.events.send(event).await.is_err() {
                return Some(End::Closed);
            }
        }
        end
    }
}

/// A close frame from the server: 1001 carries `{"reason":"shutting_down","reconnect_ms":N}`,
/// 4010 `{"reason":"disconnected","reconnect":false}`.
fn closed_by_server(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> End {
    let Some(frame) = frame else {
        return dropped("closed by the server");
    };
    let code = u16::from(frame.code);
    let reason = frame.reason.as_str().to_string();
    let hint = serde_json::from_str::<Value>(&reason).ok();
    if hint.as_ref().and_then(|h| h.get("reconnect")) == Some(&Value::Bool(false)) {
        return End::Refused { code, reason };
    }
    let reconnect_ms = (code == 1001)
        .then_some(hint)
        .flatten()
        .and_then(|hint| hint.get("reconnect_ms").and_then(Value::as_u64));
    End::Dropped {
        code: Some(code),
        reason,
        reconnect_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_websocket_endpoints() {
        assert_eq!(ws_url("http://a:1").unwrap(), "ws://a:1/ws");
        assert_eq!(ws_url("https://a/").unwrap(), "wss://a/ws");
        assert_eq!(ws_url("ws://a:1/ws").unwrap(), "ws://a:1/ws");
        assert_eq!(ws_url("wss://a/custom/ws").unwrap(), "wss://a/custom/ws");
        assert!(ws_url("ftp://a").is_err());
        assert!(ws_url("a:1").is_err());
    }

    #[test]
    fn a_drain_close_carries_its_reconnect_hint() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: r#"{"reason":"shutting_down","reconnect_ms":250}"#.into(),
        };
        match closed_by_server(Some(frame)) {
            End::Dropped {
                code, reconnect_ms, ..
            } => assert_eq!((code, reconnect_ms), (Some(1001), Some(250))),
            _ => panic!("a drain is a drop"),
        }
    }

    #[test]
    fn a_server_disconnect_is_not_reconnected() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: CloseCode::from(4010),
            reason: r#"{"reason":"disconnected","reconnect":false}"#.into(),
        };
        assert!(matches!(
            closed_by_server(Some(frame)),
            End::Refused { code: 4010, .. }
        ));
    }
}
