//! WebSocket transport (`GET /ws`, and `GET /ws/echo` for conformance runs): the upgrade, a reader
//! task that turns frames into messages, and the connection task that owns the socket's write
//! half, the client session, the heartbeat and the close handshake. Both endpoints share the same
//! reader, limits and writer; only what is done with a message differs.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::client::{oldest_live, Output, Session};
use crate::drain::{reconnect_hint, Registration};
use crate::node::Node;
use crate::protocol::{reply_err, reply_ok, Command};
use crate::security::{Admission, Guard, Verdict};
use crate::ws_message::{Assembler, Message, MessageError};

/// Application close codes (4000–4999), listed in docs/protocol.md.
pub mod close_code {
    /// The connection's outbound queue overflowed; reconnect and resume from your positions.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// The client answered no ping within the pong timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
}

/// What the connection does with the messages it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The client protocol.
    Protocol,
    /// Echo every message back (conformance testing).
    Echo,
}

type Io = TokioIo<Upgraded>;
type Reader = WebSocketRead<ReadHalf<Io>>;
type Writer = WebSocketWrite<BufWriter<WriteHalf<Io>>>;

/// Longest wait for the peer's Close after the server sent its own.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Outputs written per batch before the task looks at its other duties again.
const BATCH: usize = 256;

/// Upgrades the request and starts the connection task, tracked by the node.
pub fn accept(
    node: &Arc<Node>,
    request: &mut hyper::Request<hyper::body::Incoming>,
    mode: Mode,
    admission: Admission,
) -> Result<hyper::Response<http_body_util::Empty<Bytes>>, WebSocketError> {
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(request)?;
    let guard = Guard::new(node.clone(), admission, mode == Mode::Protocol);
    let node = node.clone();
    node.connections.clone().spawn(async move {
        match upgrade.await {
            Ok(ws) => {
                let (mut reader, writer) = ws.split(|io| {
                    let (r, w) = tokio::io::split(io);
                    (r, BufWriter::new(w))
                });
                reader.set_auto_close(true);
                reader.set_auto_pong(true);
                // fastwebsockets refuses frames of at least this size before reading them.
                reader.set_max_message_size(node.config.websocket.max_message_size + 1);
                run(node, reader, writer, mode, guard).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    Ok(response)
}

/// What the reader task hands to the connection task.
#[derive(Debug)]
enum Inbound {
    Message(Message),
    /// A frame the protocol obliges us to send (pong, or the echo of the peer's close).
    Control(OpCode, Vec<u8>),
    /// The peer broke the protocol; close with this code.
    Failed(u16, &'static str),
    /// The peer answered a ping.
    Pong,
}

async fn run(node: Arc<Node>, reader: Reader, writer: Writer, mode: Mode, guard: Guard) {
    let (tx, rx) = mpsc::channel(16);
    let activity = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_loop(
        reader,
        tx,
        node.config.websocket.max_message_size,
        activity.clone(),
    ));
    let transport = if mode == Mode::Echo { "echo" } else { "ws" };
    let gauge = node.metrics.connections.with_label_values(&[transport]);
    gauge.inc();
    let mut conn = Connection {
        heartbeat: Heartbeat::new(&node, activity),
        registration: node.registry.register(),
        guard,
        node,
        writer,
        rx,
    };
    let session = (mode == Mode::Protocol).then(|| Session::new(conn.node.clone()));
    conn.serve(session).await;
    gauge.dec();
    reader.abort();
}

async fn read_loop(
    mut reader: Reader,
    tx: mpsc::Sender<Inbound>,
    max_message_size: usize,
    activity: Arc<AtomicBool>,
) {
    let mut assembler = Assembler::new(max_message_size);
    loop {
        let result = reader
            .read_frame(&mut |frame: Frame<'_>| {
                let tx = tx.clone();
                // RFC 6455 §5.5: control frames carry at most 125 bytes; fastwebsockets checks
                // only pings, so an oversized close is failed here instead of being echoed.
                let control = if frame.payload.len() > 125 {
                    Inbound::Failed(1002, "control frame longer than 125 bytes")
                } else {
                    Inbound::Control(frame.opcode, frame.payload.to_vec())
                };
                async move { tx.send(control).await }
            })
            .await;
        activity.store(true, Ordering::Relaxed);
        let frame = match result {
            Ok(frame) => frame,
            Err(e) => {
                if let Some((code, reason)) = close_code_for(&e) {
                    let _ = tx.send(Inbound::Failed(code, reason)).await;
                }
                return;
            }
        };
        let inbound = match frame.opcode {
            // The echo of the peer's close went out through the obligated send.
            OpCode::Close => return,
            OpCode::Ping => continue,
            OpCode::Pong => Inbound::Pong,
            _ => match assembler.push(frame) {
                Ok(None) => continue,
                Ok(Some(message)) => Inbound::Message(message),
                Err(MessageError::TooBig) => Inbound::Failed(1009, "message too big"),
                Err(MessageError::InvalidUtf8) => Inbound::Failed(1007, "invalid UTF-8 in text"),
                Err(MessageError::Protocol(reason)) => Inbound::Failed(1002, reason),
            },
        };
        let failed = matches!(inbound, Inbound::Failed(..));
        if tx.send(inbound).await.is_err() || failed {
            return;
        }
    }
}

/// The RFC 6455 close code for a read error, or `None` when the transport itself is gone.
fn close_code_for(e: &WebSocketError) -> Option<(u16, &'static str)> {
    match e {
        WebSocketError::InvalidUTF8 => Some((1007, "invalid UTF-8")),
        WebSocketError::FrameTooLarge => Some((1009, "message too big")),
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed
        | WebSocketError::SendError(_) => None,
        // An invalid close code was already answered with 1002 through the obligated send.
        WebSocketError::InvalidCloseCode => None,
        _ => Some((1002, "protocol error")),
    }
}

struct Connection {
    node: Arc<Node>,
    registration: Registration,
    writer: Writer,
    rx: mpsc::Receiver<Inbound>,
    heartbeat: Heartbeat,
    /// Security hooks: command rate, connect/refresh, permissions, token expiry, idle timeout.
    guard: Guard,
}

/// Why the connection ends.
enum End {
    /// Send a Close frame with this code and reason, then wait briefly for the peer's.
    Close(u16, Cow<'static, str>),
    /// The peer closed or vanished, or a write failed: nothing more to send.
    Gone,
}

impl Connection {
    async fn serve(&mut self, mut session: Option<Session>) {
        let mut out: Vec<Output> = Vec::new();
        let end = loop {
            let accepts = session.as_ref().is_none_or(Session::accepts_commands);
            let step = tokio::select! {
                _ = self.registration.closing() => Err(End::Close(1001, self.going_away())),
                (code, reason) = self.guard.deadline() => Err(End::Close(code, reason.into())),
                inbound = self.rx.recv(), if accepts => self.on_inbound(inbound, session.as_mut(), &mut out).await,
                event = next_event(&mut session) => {
                    if let Some(session) = session.as_mut() {
                        session.apply(event, &mut out);
                    }
                    Ok(())
                }
                _ = self.heartbeat.expired() => match self.heartbeat.check() {
                    Beat::Idle => Ok(()),
                    Beat::Ping => self.send(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await,
                    Beat::Dead => Err(End::Close(close_code::HEARTBEAT_TIMEOUT, "no pong".into())),
                },
            };
            if let Err(end) = step {
                break end;
            }
            if let Some(session) = session.as_mut() {
                while out.len() < BATCH {
                    match session.try_next() {
                        Some(event) => session.apply(event, &mut out),
                        None => break,
                    }
                }
                if session.overflowed() {
                    break End::Close(close_code::SLOW_CONSUMER, "slow consumer".into());
                }
            }
            if let Err(end) = self.write_outputs(&mut out).await {
                break end;
            }
        };
        if let End::Close(code, reason) = end {
            self.close(code, &reason).await;
        }
    }

    /// The 1001 close reason: JSON with a jittered reconnect delay, so clients closed together
    /// by a drain do not all come back in the same instant.
    fn going_away(&self) -> Cow<'static, str> {
        let hint = reconnect_hint(self.node.config.drain.reconnect_jitter);
        format!(
            "{{\"reason\":\"shutting_down\",\"reconnect_ms\":{}}}",
            hint.as_millis()
        )
        .into()
    }

    async fn on_inbound(
        &mut self,
        inbound: Option<Inbound>,
        session: Option<&mut Session>,
        out: &mut Vec<Output>,
    ) -> Result<(), End> {
        match inbound {
            None => Err(End::Gone),
            Some(Inbound::Failed(code, reason)) => Err(End::Close(code, reason.into())),
            Some(Inbound::Pong) => {
                self.heartbeat.pong();
                Ok(())
            }
            Some(Inbound::Control(opcode, payload)) => {
                let frame = Frame::new(true, opcode, None, Payload::Owned(payload));
                self.send(frame).await?;
                if opcode == OpCode::Close {
                    return Err(End::Gone);
                }
                Ok(())
            }
            Some(Inbound::Message(message)) => match session {
                None => {
                    let frame = match &message {
                        Message::Text(t) => Frame::text(Payload::Borrowed(t)),
                        Message::Binary(b) => Frame::binary(Payload::Borrowed(b)),
                    };
                    self.send(frame).await
                }
                Some(session) => match message {
                    Message::Binary(_) => {
                        Err(End::Close(1003, "binary messages are not supported".into()))
                    }
                    Message::Text(text) => {
                        let count = session.subscription_count();
                        let parsed = Command::parse(&text);
                        match self.guard.on_command(&parsed, count) {
                            Verdict::Proceed => {
                                handle_command(&self.node, session, parsed, out);
                                Ok(())
                            }
                            Verdict::Reply(reply) => {
                                out.push(Output::Reply(reply));
                                Ok(())
                            }
                            Verdict::Close(reply, code, reason) => {
                                self.write_outputs(out).await?;
                                self.send(Frame::text(Payload::Owned(reply.to_vec())))
                                    .await?;
                                Err(End::Close(code, reason))
                            }
                        }
                    }
                },
            },
        }
    }

    /// Writes one frame and flushes, bounded by the write timeout.
    async fn send(&mut self, frame: Frame<'_>) -> Result<(), End> {
        let timeout = self.node.config.websocket.write_timeout;
        let write = async {
            self.writer.write_frame(frame).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    /// Writes the session's outputs as one batch and flushes, bounded by the write timeout.
    async fn write_outputs(&mut self, out: &mut Vec<Output>) -> Result<(), End> {
        if out.is_empty() {
            return Ok(());
        }
        let timeout = self.node.config.websocket.write_timeout;
        let mut delivered = 0;
        let oldest_live = oldest_live(out);
        let writer = &mut self.writer;
        let write = async {
            for output in out.drain(..) {
                let text = match output {
                    Output::Publication(p) | Output::Live(p) => {
                        delivered += 1;
                        writer
                            .write_frame(Frame::text(Payload::Borrowed(p.json())))
                            .await?;
                        continue;
                    }
                    Output::Reply(bytes) => bytes,
                    Output::Subscribed { id, result } => reply_ok(id, &result),
                    Output::SubscribeFailed { id, error, .. } => reply_err(id, &error),
                    Output::Reset {
                        channel,
                        epoch,
                        offset,
                        reason,
                    } => reset_push(&channel, &epoch, offset, reason),
                };
                writer
                    .write_frame(Frame::text(Payload::Borrowed(&text)))
                    .await?;
            }
            writer.flush().await
        };
        let result = tokio::time::timeout(timeout, write).await;
        out.clear();
        if delivered > 0 {
            self.node
                .metrics
                .deliveries
                .with_label_values(&["ws"])
                .inc_by(delivered);
        }
        if matches!(result, Ok(Ok(()))) {
            self.node.observe_fanout("ws", oldest_live);
        }
        match result {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    /// Sends Close and waits briefly for the peer's Close before the socket is dropped.
    async fn close(&mut self, code: u16, reason: &str) {
        if self
            .send(Frame::close(code, reason.as_bytes()))
            .await
            .is_err()
        {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(inbound) = self.rx.recv().await {
                if matches!(inbound, Inbound::Control(OpCode::Close, _)) {
                    break;
                }
            }
        })
        .await;
    }
}

async fn next_event(session: &mut Option<Session>) -> crate::client::Event {
    match session {
        Some(session) => session.next().await,
        None => std::future::pending().await,
    }
}

fn handle_command(
    node: &Node,
    session: &mut Session,
    parsed: Result<Command<'_>, crate::protocol::CommandError>,
    out: &mut Vec<Output>,
) {
    let command = match parsed {
        Ok(command) => command,
        Err(e) => {
            node.metrics
                .protocol_errors
                .with_label_values(&[e.error.code])
                .inc();
            out.push(Output::Reply(reply_err(e.id, &e.error)));
            return;
        }
    };
    match command {
        Command::Subscribe { id, channel, since } => {
            session.subscribe(id, channel.into(), since, out)
        }
        Command::Unsubscribe { id, channel } => {
            out.push(Output::Reply(match session.unsubscribe(&channel) {
                Ok(()) => reply_ok(id, &serde_json::Map::new()),
                Err(error) => reply_err(id, &error),
            }));
        }
        Command::Publish {
            id,
            channel,
            data,
            idempotency_key,
        } => session.publish(
            id,
            channel.into(),
            backplane::json::compact(data.get()),
            idempotency_key.map(|k| k.into_owned()),
        ),
        Command::Ping { id } => out.push(Output::Reply(reply_ok(id, &serde_json::Map::new()))),
        // Answered by the guard.
        Command::Connect { .. } | Command::Refresh { .. } => {}
    }
}

/// `{"reset":{"channel":C,"epoch":E,"offset":N,"reason":R}}`
fn reset_push(channel: &str, epoch: &str, offset: u64, reason: &str) -> Bytes {
    #[derive(Serialize)]
    struct Reset<'a> {
        channel: &'a str,
        epoch: &'a str,
        offset: u64,
        reason: &'a str,
    }
    #[derive(Serialize)]
    struct Push<'a> {
        reset: Reset<'a>,
    }
    let push = Push {
        reset: Reset {
            channel,
            epoch,
            offset,
            reason,
        },
    };
    serde_json::to_vec(&push).expect("cannot fail").into()
}

/// Server-side liveness check: a connection silent for the ping interval is pinged; one still
/// silent a pong timeout later is dead (the classic silent drop).
struct Heartbeat {
    sleep: Pin<Box<Sleep>>,
    awaiting_pong: bool,
    interval: Duration,
    timeout: Duration,
    activity: Arc<AtomicBool>,
}

enum Beat {
    Idle,
    Ping,
    Dead,
}

impl Heartbeat {
    fn new(node: &Node, activity: Arc<AtomicBool>) -> Self {
        let interval = node.config.websocket.ping_interval;
        Heartbeat {
            sleep: Box::pin(tokio::time::sleep(interval)),
            awaiting_pong: false,
            interval,
            timeout: node.config.websocket.pong_timeout,
            activity,
        }
    }

    /// A pong restarts the idle period at once rather than when the pong timeout fires.
    fn pong(&mut self) {
        if self.awaiting_pong {
            self.awaiting_pong = false;
            self.activity.store(false, Ordering::Relaxed);
            self.sleep.as_mut().reset(Instant::now() + self.interval);
        }
    }

    async fn expired(&mut self) {
        self.sleep.as_mut().await
    }

    fn check(&mut self) -> Beat {
        let now = Instant::now();
        if self.activity.swap(false, Ordering::Relaxed) {
            self.awaiting_pong = false;
            self.sleep.as_mut().reset(now + self.interval);
            Beat::Idle
        } else if self.awaiting_pong {
            Beat::Dead
        } else {
            self.awaiting_pong = true;
            self.sleep.as_mut().reset(now + self.timeout);
            Beat::Ping
        }
    }
}
