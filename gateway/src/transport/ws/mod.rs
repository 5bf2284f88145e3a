//! WebSocket transport (`GET /ws`, and `GET /ws/echo` for conformance runs): the opening
//! handshake (HTTP/1.1 Upgrade, or extended CONNECT on an HTTP/2 stream) and one task per
//! connection that reads frames, owns the write half, the client session, the heartbeat
//! and the close handshake. Both endpoints share the same reader, limits and writer; only what is
//! done with a message differs. fastwebsockets does the HTTP upgrade; frames are read and written
//! here ([`frame_reader`], [`frame`]), as permessage-deflate needs RSV1, which it cannot carry.

pub(crate) mod batch_writer;
pub(crate) mod deflate;
pub(crate) mod extension;
pub(crate) mod frame;
pub(crate) mod frame_reader;
pub(crate) mod message;
pub(crate) mod read_gate;
pub(crate) mod socket;

use std::borrow::Cow;
use std::future::poll_fn;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::WebSocketError;
use futures_util::future::BoxFuture;
use futures_util::stream::{Stream, StreamExt};
use hyper::header::SEC_WEBSOCKET_EXTENSIONS;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

use crate::drain::{reconnect_hint, Registration};
use crate::express::Express;
use crate::metrics::observe_fanout;
use crate::node::Node;
use crate::protocol::{close_code, reply_err, reply_ok, Command, DISCONNECTED_REASON};
use crate::security::guard::{Admission, Guard, Verdict};
use crate::session::{oldest_live, unsubscribed_push, Event, Output, Session};
use crate::transport::ws::batch_writer::BatchWriter;
use crate::transport::ws::extension::Deflate;
use crate::transport::ws::frame::{close_code_allowed, server_header, Frame, OpCode};
use crate::transport::ws::frame_reader::{FrameReader, ReadError, ReadLimits};
use crate::transport::ws::message::{Assembler, Message, MessageError};
use crate::transport::ws::read_gate::ReadGate;
use crate::transport::ws::socket::{SocketRead, SocketWrite};

/// What the connection does with the messages it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The client protocol.
    Protocol,
    /// Echo every message back (conformance testing).
    Echo,
}

type Io = TokioIo<Upgraded>;
type Writer = BatchWriter<SocketWrite>;
type ReadResult = Result<Frame, ReadError>;

/// Longest wait for the peer's Close after the server sent its own.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Outputs written per batch before the task looks at its other duties again.
const BATCH: usize = 256;

/// How a request opens a WebSocket: each needs its own answer, then both run the same
/// connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// RFC 6455: `GET` with `Upgrade: websocket` on HTTP/1.1, answered 101.
    Upgrade,
    /// RFC 8441: `CONNECT` with `:protocol websocket` on an HTTP/2 stream, answered 200; the
    /// stream then carries the frames.
    ExtendedConnect,
}

impl Handshake {
    /// The handshake `request` attempts, or `None` for a plain request.
    pub(crate) fn of<B>(request: &hyper::Request<B>) -> Option<Handshake> {
        if request.method() == hyper::Method::CONNECT {
            let websocket = request
                .extensions()
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
            return (websocket && request.version() == hyper::Version::HTTP_2)
                .then_some(Handshake::ExtendedConnect);
        }
        fastwebsockets::upgrade::is_upgrade_request(request).then_some(Handshake::Upgrade)
    }

    /// The `http_version` label of `gateway_websocket_connections`.
    fn http_version(self) -> &'static str {
        match self {
            Handshake::Upgrade => "1.1",
            Handshake::ExtendedConnect => "2",
        }
    }
}

type Answer = hyper::Response<http_body_util::Empty<Bytes>>;

/// Answers the handshake `request` attempts (see [`Handshake::of`]) and starts the connection
/// task, tracked by the node. The caller has admitted the connection (origin, token, limits).
pub(crate) fn accept<B>(
    node: &Arc<Node>,
    request: &mut hyper::Request<B>,
    handshake: Handshake,
    mode: Mode,
    admission: Admission,
    client_ip: IpAddr,
) -> Result<Answer, WebSocketError> {
    // permessage-deflate is negotiated once, for both handshakes (RFC 8441 §5 keeps the
    // header's meaning on HTTP/2); the answer goes into either response.
    let deflate = extension::negotiate(request.headers(), &node.config().websocket);
    let params = deflate.as_ref().map(|(d, _)| *d);
    let mut response = match handshake {
        Handshake::Upgrade => {
            let (response, upgrade) = fastwebsockets::upgrade::upgrade(request)?;
            let io = async move { upgrade.await.map(|ws| ws.into_inner()) };
            spawn_connection(node, io, handshake, mode, admission, params, client_ip);
            response
        }
        Handshake::ExtendedConnect => {
            let (response, stream) = accept_extended_connect(request)?;
            let io = async move { stream.await.map(TokioIo::new) };
            spawn_connection(node, io, handshake, mode, admission, params, client_ip);
            response
        }
    };
    if let Some((_, answer)) = deflate {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    Ok(response)
}

/// RFC 8441 §5: the same version check as on HTTP/1.1, but no key and no `Sec-WebSocket-Accept`
/// (the stream itself is the proof); a 200 opens the stream for frames.
fn accept_extended_connect<B>(
    request: &mut hyper::Request<B>,
) -> Result<(Answer, hyper::upgrade::OnUpgrade), WebSocketError> {
    let version = request.headers().get("sec-websocket-version");
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err(WebSocketError::InvalidSecWebsocketVersion);
    }
    let stream = hyper::upgrade::on(request);
    let response = hyper::Response::new(http_body_util::Empty::new());
    Ok((response, stream))
}

/// Starts the connection task once the handshake's stream is ready: the same reader, writer,
/// limits and session whichever HTTP version carries it.
fn spawn_connection<E: std::fmt::Display + Send + 'static>(
    node: &Arc<Node>,
    io: impl std::future::Future<Output = Result<Io, E>> + Send + 'static,
    handshake: Handshake,
    mode: Mode,
    admission: Admission,
    deflate: Option<Deflate>,
    client_ip: IpAddr,
) {
    // What the connection is built from waits for the upgrade on the heap: a future keeps room
    // for everything it captured for its whole life, beside the connection it was moved into.
    let setup = Box::new(Setup {
        guard: Guard::new(node.clone(), admission, mode == Mode::Protocol),
        node: node.clone(),
        deflate,
        client_ip,
    });
    // The task's future is most of an idle connection's memory: it holds only the upgrade, then
    // the connection and its `serve` future. Everything else is built by plain functions, whose
    // locals a future would otherwise keep room for beside the connection they were moved into.
    node.connection_tasks().clone().spawn(async move {
        // Not matched in place: a `match` keeps its scrutinee's room until its end.
        let io = match io.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, ?handshake, "websocket upgrade failed");
                return;
            }
        };
        // In a block of its own: `node`, moved into the connection, would otherwise keep its
        // room in the task beside it (8 B that made every idle connection's cell 128 B larger).
        let (mut connection, open, gauge) = {
            // Moved out of a temporary, so the box is freed here rather than with the task.
            let Setup {
                node,
                guard,
                deflate,
                client_ip,
            } = *{ setup };
            let open = node
                .metrics()
                .websockets
                .with_label_values(&[handshake.http_version()]);
            open.inc();
            let transport = if mode == Mode::Echo { "echo" } else { "ws" };
            let gauge = node.metrics().connections.with_label_values(&[transport]);
            gauge.inc();
            let connection = connection(node, io, transport, guard, deflate, client_ip);
            (connection, open, gauge)
        };
        connection.serve(mode).await;
        gauge.dec();
        open.dec();
    });
}

/// What a connection is built from once its upgrade completes (see [`spawn_connection`]).
struct Setup {
    node: Arc<Node>,
    guard: Guard,
    deflate: Option<Deflate>,
    client_ip: IpAddr,
}

/// The connection state of an upgraded stream; `transport` labels its metrics.
fn connection(
    node: Arc<Node>,
    io: Io,
    transport: &str,
    guard: Guard,
    deflate: Option<Deflate>,
    client_ip: IpAddr,
) -> Connection<ReadGate<Frames>> {
    let (read, write) = socket::split(io);
    let max_message_size = node.config().websocket.max_message_size;
    let limits = ReadLimits {
        // A compressed frame may be a little longer than what it inflates to (stored blocks);
        // the message limit proper applies to the inflated size.
        max_payload: match deflate {
            Some(_) => max_message_size + max_message_size / 1024 + 64,
            None => max_message_size,
        },
        rsv1_allowed: deflate.is_some(),
    };
    Connection {
        deliveries: node.metrics().deliveries.with_label_values(&[transport]),
        fanout_latency: node
            .metrics()
            .fanout_latency
            .with_label_values(&[transport]),
        heartbeat: Heartbeat::new(&node),
        registration: node.streams().register(),
        assembler: Assembler::new(max_message_size),
        frames: ReadGate::new(Box::pin(frames(read, limits))),
        reading: true,
        deflate,
        guard,
        node,
        writer: BatchWriter::new(write),
        client_ip,
    }
}

/// The peer's frames, boxed so the connection owns them (see [`frames`]).
type Frames = Pin<Box<dyn Stream<Item = ReadResult> + Send>>;

/// The peer's frames, one at a time. The read in progress lives inside the stream, so a
/// `select!` that picks another branch never loses part of a frame. Pings and Closes come too:
/// the connection task answers them itself, in order with its other writes.
fn frames(read: SocketRead, limits: ReadLimits) -> impl Stream<Item = ReadResult> + Send {
    let reader = FrameReader::new(read, limits);
    futures_util::stream::unfold(reader, |mut reader| async move {
        let result = reader.next().await;
        Some((result, reader))
    })
}

/// The RFC 6455 close code for a read error, or `None` when the transport itself is gone.
fn close_code_for(e: &ReadError) -> Option<(u16, &'static str)> {
    match e {
        ReadError::Protocol(reason) => Some((close_code::PROTOCOL_ERROR, reason)),
        ReadError::TooBig => Some((close_code::MESSAGE_TOO_BIG, "message too big")),
        ReadError::Gone => None,
    }
}

/// RFC 6455 §5.5 and §7.4: a peer's Close is at most 125 bytes, empty or a valid code followed
/// by UTF-8; anything else is answered with this close code instead of an echo.
fn check_close(payload: &[u8]) -> Result<(), (u16, &'static str)> {
    if payload.len() > 125 {
        return Err((
            close_code::PROTOCOL_ERROR,
            "control frame longer than 125 bytes",
        ));
    }
    match payload {
        [] => Ok(()),
        [_] => Err((close_code::PROTOCOL_ERROR, "protocol error")),
        [high, low, reason @ ..] => {
            if std::str::from_utf8(reason).is_err() {
                return Err((close_code::INVALID_PAYLOAD, "invalid UTF-8"));
            }
            if !close_code_allowed(u16::from_be_bytes([*high, *low])) {
                return Err((close_code::PROTOCOL_ERROR, "invalid close code"));
            }
            Ok(())
        }
    }
}

struct Connection<F> {
    node: Arc<Node>,
    registration: Registration,
    writer: Writer,
    /// The peer's frames (see [`frames`]).
    frames: F,
    /// False once reading failed or the peer closed: nothing more is read.
    reading: bool,
    /// The permessage-deflate agreement, if one was made.
    deflate: Option<Deflate>,
    assembler: Assembler,
    heartbeat: Heartbeat,
    /// Security hooks: command rate, connect/refresh, permissions, token expiry, idle timeout.
    guard: Guard,
    /// This transport's metric children, looked up once: a label lookup hashes the labels, and
    /// the fan-out path would pay it per batch.
    deliveries: prometheus::IntCounter,
    fanout_latency: prometheus::Histogram,
    /// Charged for the fresh channels the connection subscribes to.
    client_ip: IpAddr,
}

/// A write bounded by the write timeout (`transport::bounded`); a failed or late one ends the
/// connection.
async fn bounded<E>(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), End> {
    match crate::transport::bounded::bounded(limit, write).await {
        Some(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}

/// Why the connection ends.
enum End {
    /// Send a Close frame with this code and reason, then wait briefly for the peer's.
    Close(u16, Cow<'static, str>),
    /// Write the outputs gathered so far (the reply that explains the close among them), then
    /// close as above.
    CloseAfterReply(u16, Cow<'static, str>),
    /// The peer closed or vanished, or a write failed: nothing more to send.
    Gone,
}

impl<F: Stream<Item = ReadResult> + Unpin> Connection<F> {
    async fn serve(&mut self, mode: Mode) {
        let conn = self.registration.id();
        let mut session = (mode == Mode::Protocol).then(|| {
            Session::new(self.node.clone(), conn).charge_fresh_channels_to(self.client_ip)
        });
        if let Some(session) = session.as_mut() {
            session.set_identity(self.guard.identity());
        }
        let mut out: Vec<Output> = Vec::new();
        let end = loop {
            let accepts = session.as_ref().is_none_or(Session::accepts_commands);
            let step = tokio::select! {
                // In a fixed order, not from a random start (one wake-up per delivery is the
                // hot path): the queue last, so one that never runs dry starves neither the
                // reads nor the heartbeat (deliveries are also taken after every branch, by
                // `apply_ready`); the peer's frames before the heartbeat, so a pong already
                // read counts before the heartbeat judges the connection.
                biased;
                _ = self.registration.closing() => Err(End::Close(close_code::GOING_AWAY, self.going_away())),
                (code, reason) = self.guard.deadline() => Err(End::Close(code, reason.into())),
                frame = self.frames.next(), if accepts => match session.as_mut() {
                    Some(session) => {
                        self.take_back(session);
                        self.on_frame(frame, Some(session), &mut out).await
                    }
                    // Boxed: the echo endpoint is for conformance runs, and its state inline
                    // would enlarge every client connection's future.
                    None => Box::pin(self.echo_frames(frame, &mut out)).await,
                },
                _ = self.heartbeat.expired() => {
                    if let Some(session) = session.as_mut() {
                        self.take_back(session);
                    }
                    // Give back what the last burst of traffic left allocated; a flush with
                    // nothing to write frees the write buffer.
                    out = Vec::new();
                    match self.heartbeat.check(&self.node) {
                        Beat::Idle => self.flush().await,
                        Beat::Ping => match self.flush().await {
                            Ok(()) => self.send(OpCode::Ping, b"").await,
                            gone => gone,
                        },
                        Beat::Dead => Err(End::Close(close_code::HEARTBEAT_TIMEOUT, "no pong".into())),
                    }
                }
                event = next_event(&mut session) => {
                    if let Some(session) = session.as_mut() {
                        self.take_back(session);
                        session.apply(event, &mut out);
                    }
                    Ok(())
                }
            };
            if let Err(end) = step {
                break end;
            }
            if let Some(session) = session.as_mut() {
                // A `connect` may just have named the user.
                if session.user().is_none() {
                    session.set_identity(self.guard.identity());
                }
                session.apply_ready(&mut out, BATCH);
                self.guard.note_subscriptions(session.has_subscriptions());
                if session.overflowed() {
                    break End::Close(close_code::SLOW_CONSUMER, "slow consumer".into());
                }
                if session.disconnected() {
                    break End::CloseAfterReply(
                        close_code::DISCONNECTED,
                        DISCONNECTED_REASON.into(),
                    );
                }
            }
            // A batch of command replies is a one-off: its output vector and write buffer are
            // given back at once, not at the next heartbeat (most connections are idle after
            // subscribing). Deliveries recur: their room is kept until the heartbeat, so a
            // busy connection does not allocate per wake-up.
            let delivered = out.iter().any(is_delivery);
            let replies_only = !out.is_empty() && !delivered;
            if let Err(end) = self.write_outputs(&mut out).await {
                break end;
            }
            // What express delivery left unwritten, taken back with nothing else to send.
            if !self.writer.is_flushed() {
                if let Err(end) = self.flush().await {
                    break end;
                }
            }
            if self.writer.take_waited() {
                if let Some(session) = session.as_mut() {
                    session.socket_stalled();
                }
            }
            if replies_only {
                out = Vec::new();
                // A flush with nothing to write frees the write buffer.
                if let Err(end) = self.flush().await {
                    break end;
                }
            }
            // A connection that just delivered is likely to deliver again: the fan-out may
            // write to its socket until something needs the task.
            if delivered {
                if let Some(session) = session.as_mut() {
                    self.hand_over(session);
                }
            }
        };
        if let Some(session) = session.as_mut() {
            self.take_back(session);
        }
        match end {
            // Once per connection, on the heap: see `push_frame`.
            End::Close(code, reason) => Box::pin(self.close(code, &reason)).await,
            End::CloseAfterReply(code, reason) => {
                if self.write_outputs(&mut out).await.is_ok() {
                    Box::pin(self.close(code, &reason)).await;
                }
            }
            End::Gone => {}
        }
    }

    /// Hands the socket to express delivery ([`crate::express`]) if the session is ready for
    /// it: a plain TCP socket without compression, every write done.
    fn hand_over(&mut self, session: &mut Session) {
        if self.deflate.is_some() || !self.writer.is_flushed() {
            return;
        }
        let Some(socket) = self.writer.get_ref().tcp() else {
            return;
        };
        let (deliveries, latency) = (&self.deliveries, &self.fanout_latency);
        let handed = session.hand_over(|lanes| {
            Express::new(socket.clone(), lanes, deliveries.clone(), latency.clone())
        });
        if handed {
            self.node.metrics().express_handovers.inc();
        }
    }

    /// Takes the socket back from express delivery, if it has it, before the task applies or
    /// writes anything: what it did not write yet goes first.
    fn take_back(&mut self, session: &mut Session) {
        let Some(unsent) = session.take_back() else {
            return;
        };
        if unsent.frames > 0 {
            self.deliveries.inc_by(unsent.frames);
            observe_fanout(&self.fanout_latency, unsent.oldest_us);
            self.writer.adopt(unsent.bytes);
        }
    }

    /// The 1001 close reason: JSON with a jittered reconnect delay, so clients closed together
    /// by a drain do not all come back in the same instant.
    fn going_away(&self) -> Cow<'static, str> {
        let hint = reconnect_hint(self.node.config().drain.reconnect_jitter);
        format!(
            "{{\"reason\":\"shutting_down\",\"reconnect_ms\":{}}}",
            hint.as_millis()
        )
        .into()
    }

    async fn on_frame(
        &mut self,
        frame: Option<ReadResult>,
        session: Option<&mut Session>,
        out: &mut Vec<Output>,
    ) -> Result<(), End> {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                self.reading = false;
                return Err(match close_code_for(&e) {
                    Some((code, reason)) => End::Close(code, reason.into()),
                    None => End::Gone,
                });
            }
            None => {
                self.reading = false;
                return Err(End::Gone);
            }
        };
        self.heartbeat.activity();
        match frame.opcode {
            OpCode::Close => {
                self.reading = false;
                match check_close(&frame.payload) {
                    Ok(()) => {
                        self.send(OpCode::Close, &frame.payload).await?;
                        Err(End::Gone)
                    }
                    Err((code, reason)) => Err(End::Close(code, reason.into())),
                }
            }
            // The reader already refused control frames longer than 125 bytes.
            OpCode::Ping => self.send(OpCode::Pong, &frame.payload).await,
            OpCode::Pong => {
                self.heartbeat.pong(&self.node);
                Ok(())
            }
            _ => match self.assembler.push(frame) {
                Ok(None) => Ok(()),
                Ok(Some(message)) => self.on_message(message, session, out).await,
                Err(e) => {
                    self.reading = false;
                    Err(match e {
                        MessageError::TooBig => {
                            End::Close(close_code::MESSAGE_TOO_BIG, "message too big".into())
                        }
                        MessageError::InvalidUtf8 => {
                            End::Close(close_code::INVALID_PAYLOAD, "invalid UTF-8 in text".into())
                        }
                        MessageError::BadCompression => End::Close(
                            close_code::INVALID_PAYLOAD,
                            "invalid compressed data".into(),
                        ),
                        MessageError::Protocol(reason) => {
                            End::Close(close_code::PROTOCOL_ERROR, reason.into())
                        }
                    })
                }
            },
        }
    }

    /// Echo mode: answers `first`, then every frame that is already read or readable without
    /// waiting (a client with several messages in flight sends them together), and flushes once:
    /// one write per burst rather than one per message.
    async fn echo_frames(
        &mut self,
        first: Option<ReadResult>,
        out: &mut Vec<Output>,
    ) -> Result<(), End> {
        let mut frame = first;
        let mut answered = 0;
        let result = loop {
            if let Err(end) = self.on_frame(frame, None, out).await {
                break Err(end);
            }
            answered += 1;
            if answered == BATCH {
                break Ok(());
            }
            // Polled with this task's context: when nothing is ready the read stays registered
            // (and in progress inside the stream) for the next `select!`.
            match poll_fn(|cx| Poll::Ready(self.frames.poll_next_unpin(cx))).await {
                Poll::Ready(next) => frame = next,
                Poll::Pending => break Ok(()),
            }
        };
        match result {
            Ok(()) => self.flush().await,
            // The peer stopped sending (or its Close was answered): what was echoed before still
            // goes out, as it did when each echo was flushed on its own.
            Err(End::Gone) if !self.reading => {
                let _ = self.flush().await;
                Err(End::Gone)
            }
            // A Close frame follows the echoes (see `close`), or the write failed.
            Err(end) => Err(end),
        }
    }

    async fn on_message(
        &mut self,
        message: Message,
        session: Option<&mut Session>,
        out: &mut Vec<Output>,
    ) -> Result<(), End> {
        match session {
            None => {
                let (opcode, data) = match &message {
                    Message::Text(t) => (OpCode::Text, t),
                    Message::Binary(b) => (OpCode::Binary, b),
                };
                let compressed = self
                    .deflate
                    .as_ref()
                    .and_then(|d| deflate::message(data, d));
                // Flushed by `echo_frames` once the burst is answered.
                match &compressed {
                    Some(deflated) => written(self.push_frame(opcode, true, deflated)).await,
                    None => written(self.push_frame(opcode, false, data)).await,
                }
            }
            Some(session) => match message {
                Message::Binary(_) => Err(End::Close(
                    close_code::UNSUPPORTED_DATA,
                    "binary messages are not supported".into(),
                )),
                Message::Text(text) => {
                    let parsed = Command::parse(&text);
                    match self.guard.on_command(&parsed) {
                        Verdict::Proceed => {
                            session.run_command(parsed, out);
                            Ok(())
                        }
                        Verdict::Reply(reply) => {
                            out.push(Output::Reply(reply));
                            Ok(())
                        }
                        Verdict::Refreshed(reply) => {
                            out.push(Output::Reply(reply));
                            let guard = &self.guard;
                            session.unsubscribe_revoked(|c| guard.may_subscribe(c), out);
                            Ok(())
                        }
                        // Written by the connection loop: writing here, inside the frame
                        // branch, would enlarge every connection's future for a rare path.
                        Verdict::Close(reply, code, reason) => {
                            out.push(Output::Reply(reply));
                            Err(End::CloseAfterReply(code, reason))
                        }
                    }
                }
            },
        }
    }

    /// Writes one control frame and flushes, bounded by the write timeout.
    async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), End> {
        written(self.push_frame(opcode, false, payload)).await?;
        self.flush().await
    }

    /// Adds one unfragmented frame to the batch: `None` when it joined the batch in memory, as
    /// almost every frame does; else the write that must happen first (the batch written out,
    /// and a frame of the buffer's size or more straight after it), on the heap. A plain
    /// function, so a caller's future holds one pointer for that rare write rather than its
    /// state, which would enlarge every connection's future, idle or not.
    fn push_frame<'a>(
        &'a mut self,
        opcode: OpCode,
        rsv1: bool,
        payload: &'a [u8],
    ) -> Option<BoxFuture<'a, Result<(), End>>> {
        let (head, len) = server_header(true, rsv1, opcode, payload.len());
        if self.writer.buffer(&head[..len], payload) {
            return None;
        }
        let timeout = self.node.config().websocket.write_timeout;
        let writer = &mut self.writer;
        let write = async move {
            writer.write_all(&head[..len]).await?;
            writer.write_all(payload).await
        };
        Some(Box::pin(bounded(timeout, write)))
    }

    /// Flushes, bounded by the write timeout.
    async fn flush(&mut self) -> Result<(), End> {
        let timeout = self.node.config().websocket.write_timeout;
        bounded(timeout, self.writer.flush()).await
    }

    /// Writes the session's outputs as one batch and flushes, bounded by the write timeout.
    async fn write_outputs(&mut self, out: &mut Vec<Output>) -> Result<(), End> {
        if out.is_empty() {
            return Ok(());
        }
        let oldest_live = oldest_live(out);
        // The frames and the flush are two futures awaited one after the other: in one, the
        // flush's state was laid out beside the loop's, and this future is part of every
        // connection's (idle ones included).
        let (delivered, mut result) = self.push_outputs(out).await;
        if result.is_ok() {
            result = self.flush().await;
        }
        if delivered > 0 {
            self.deliveries.inc_by(delivered);
        }
        if result.is_ok() {
            observe_fanout(&self.fanout_latency, oldest_live);
        }
        result
    }

    /// Adds the outputs to the write batch as frames (writing out a batch that outgrew the
    /// buffer); returns how many were deliveries, and whether a write failed.
    async fn push_outputs(&mut self, out: &mut Vec<Output>) -> (u64, Result<(), End>) {
        let mut delivered = 0;
        let mut result = Ok(());
        for output in out.drain(..) {
            let deflate = self.deflate.as_ref();
            // A publication's text is borrowed, not cloned: its count is shared by every
            // subscriber, and touching it per delivery bounces it between cores.
            let owned: Bytes;
            let compressed: Option<Bytes>;
            let text: &[u8] = match &output {
                Output::History(p) | Output::Live(p) => {
                    delivered += 1;
                    // Compressed once per publication and window size, shared by all.
                    compressed = deflate.and_then(|d| deflate::shared(p, d));
                    p.json()
                }
                Output::Presence(event) => {
                    compressed = deflate.and_then(|d| deflate::shared(event, d));
                    event.json()
                }
                _ => {
                    owned = match output {
                        Output::Reply(bytes) => bytes,
                        Output::Subscribed { id, result, .. } => reply_ok(id, &result),
                        Output::SubscribeFailed { id, error, .. } => reply_err(id, &error),
                        Output::Unsubscribed { channel, reason } => {
                            unsubscribed_push(&channel, reason)
                        }
                        reset => reset.reset_push().expect("a reset has a push form"),
                    };
                    compressed = deflate.and_then(|d| deflate::message(&owned, d));
                    &owned
                }
            };
            let pushed = match &compressed {
                Some(deflated) => written(self.push_frame(OpCode::Text, true, deflated)).await,
                None => written(self.push_frame(OpCode::Text, false, text)).await,
            };
            if let Err(end) = pushed {
                result = Err(end);
                break;
            }
        }
        out.clear();
        (delivered, result)
    }

    /// Sends Close and waits briefly for the peer's Close before the socket is dropped.
    async fn close(&mut self, code: u16, reason: &str) {
        let payload = [&code.to_be_bytes()[..], reason.as_bytes()].concat();
        if self.send(OpCode::Close, &payload).await.is_err() || !self.reading {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(frame)) = self.frames.next().await {
                if frame.opcode == OpCode::Close {
                    break;
                }
            }
        })
        .await;
    }
}

/// Waits for the write [`Connection::push_frame`] left, if it left one.
async fn written(write: Option<BoxFuture<'_, Result<(), End>>>) -> Result<(), End> {
    match write {
        Some(write) => write.await,
        None => Ok(()),
    }
}

/// Whether `output` carries a channel's message (a publication or presence event) rather than
/// a reply to the client's command.
fn is_delivery(output: &Output) -> bool {
    matches!(
        output,
        Output::Live(_) | Output::History(_) | Output::Presence(_)
    )
}

async fn next_event(session: &mut Option<Session>) -> Event {
    match session {
        Some(session) => session.next().await,
        None => std::future::pending().await,
    }
}

/// Server-side liveness check: a connection silent for the ping interval is pinged; one still
/// silent a pong timeout later is dead (the classic silent drop). The interval and timeout are
/// read from the node's config when needed rather than kept per connection.
struct Heartbeat {
    sleep: Pin<Box<Sleep>>,
    awaiting_pong: bool,
    /// A frame arrived since the last check.
    activity: bool,
}

enum Beat {
    Idle,
    Ping,
    Dead,
}

impl Heartbeat {
    fn new(node: &Node) -> Self {
        Heartbeat {
            sleep: Box::pin(tokio::time::sleep(node.config().websocket.ping_interval)),
            awaiting_pong: false,
            activity: false,
        }
    }

    /// A pong restarts the idle period at once rather than when the pong timeout fires.
    fn pong(&mut self, node: &Node) {
        if self.awaiting_pong {
            self.awaiting_pong = false;
            self.activity = false;
            let interval = node.config().websocket.ping_interval;
            self.sleep.as_mut().reset(Instant::now() + interval);
        }
    }

    fn activity(&mut self) {
        self.activity = true;
    }

    async fn expired(&mut self) {
        self.sleep.as_mut().await
    }

    fn check(&mut self, node: &Node) -> Beat {
        let now = Instant::now();
        let websocket = &node.config().websocket;
        if std::mem::take(&mut self.activity) {
            self.awaiting_pong = false;
            self.sleep.as_mut().reset(now + websocket.ping_interval);
            Beat::Idle
        } else if self.awaiting_pong {
            Beat::Dead
        } else {
            self.awaiting_pong = true;
            self.sleep.as_mut().reset(now + websocket.pong_timeout);
            Beat::Ping
        }
    }
}
