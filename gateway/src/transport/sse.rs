//! Server-Sent Events transport (`GET /sse?channel=A&channel=B`): one WHATWG event stream per
//! request, over HTTP/1.1 or HTTP/2. Every event's `id:` is a compact cursor holding the position
//! of every channel of the stream, so EventSource's automatic `Last-Event-ID` resumes all of them
//! exactly once.
//!
//! The server may end a channel of the stream (`POST /api/unsubscribe`: an `unsubscribed` event)
//! or the whole stream (`POST /api/disconnect`: a `disconnect` event saying not to reconnect,
//! then the end; a reconnect with the same token is refused with 403).
//!
//! The stream's loop is the same on every path; only where its bytes go differs (`sse_sink`):
//! over HTTP/2 and TLS the stream is the body hyper writes ([`SseBody`], driven by hyper's polls
//! in hyper's task), on the own HTTP/1.x path (`http::sse_h1`) the connection's task runs the
//! loop and writes to the socket itself.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use backplane::Kind;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{header, HeaderMap, Response, StatusCode};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::cursor::{Cursor, StreamCursor};
use crate::drain::{reconnect_hint, Registration};
use crate::http::response::{self, Body};
use crate::node::Node;
use crate::protocol::{error_code, Reset, SubscribeResult, DISCONNECTED_REASON};
use crate::security::auth::Identity;
use crate::security::guard::too_many;
use crate::session::fresh;
use crate::session::{oldest_live, Output, Session};
use crate::transport::sse_sink::{BufferSink, EventSink};
use crate::transport::stream_query::{decode_cursor, verify_compact, StreamQuery, Subscribed};

const BATCH: usize = 256;
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// Where `open` leaves an accepted stream for the connection's task to run (the own HTTP/1.x
/// path puts one in the request's extensions) instead of making it the response's body.
#[derive(Clone, Default)]
pub(crate) struct InlineSlot(Arc<Mutex<Option<Accepted>>>);

impl InlineSlot {
    pub(crate) fn take(&self) -> Option<Accepted> {
        self.0.lock().take()
    }
}

/// A stream accepted and subscribing, before it writes anything.
pub(crate) struct Accepted {
    node: Arc<Node>,
    session: Session,
    cursor: Cursor,
    registration: Registration,
    positions: StreamCursor,
}

impl Accepted {
    /// Runs the stream into `sink` until it ends; gives the sink back to finish the response.
    /// A plain function: an async one would keep room for `self` beside the stream it becomes.
    pub(crate) fn run<S: EventSink>(self, sink: S) -> impl Future<Output = S> {
        let stream = SseStream::new(self.node, sink, self.positions);
        stream.run(self.session, self.cursor, self.registration)
    }
}

/// An SSE stream as the response body hyper sends (HTTP/2, and HTTP/1.x over TLS). hyper's task
/// for the stream polls it when the client has room; each poll applies what is ready and hands
/// over its events as one frame. No task or channel of its own: an idle stream is this struct,
/// its session and its heartbeat timer (a task and a body channel cost ~1.7 KB per stream).
pub(crate) struct SseBody {
    node: Arc<Node>,
    registration: Registration,
    state: BodyState,
    gauge: prometheus::IntGauge,
    /// Counts the stream among the node's connection tasks, which a shutdown waits for.
    _tracked: TaskTrackerToken,
}

enum BodyState {
    /// Subscribing and writing the stream's start: a future of its own, freed once done.
    Opening(BoxFuture<'static, Opened>),
    Live(Box<LiveStream>),
    /// The last bytes are handed over: the body ends.
    Done,
}

type Opened = (SseStream<BufferSink>, Session, Result<(), ()>);

/// A started stream: what the body's polls drive.
struct LiveStream {
    stream: SseStream<BufferSink>,
    session: Session,
    heartbeat: Interval,
    outputs: Vec<Output>,
}

/// What a poll of a started stream gives.
enum Burst {
    More(Bytes),
    /// The stream is over, after these bytes.
    Last(Option<Bytes>),
}

impl SseBody {
    fn new(accepted: Accepted) -> Self {
        let node = accepted.node.clone();
        let gauge = node.metrics().connections.with_label_values(&["sse"]);
        gauge.inc();
        let mut stream = SseStream::new(accepted.node, BufferSink::default(), accepted.positions);
        let (mut session, cursor) = (accepted.session, accepted.cursor);
        let opening = async move {
            let result = stream.open(&mut session, cursor).await;
            (stream, session, result)
        };
        SseBody {
            _tracked: node.connection_tasks().token(),
            node,
            registration: accepted.registration,
            state: BodyState::Opening(Box::pin(opening)),
            gauge,
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let frame = |bytes| Poll::Ready(Some(Ok(Frame::data(bytes))));
        loop {
            if matches!(this.state, BodyState::Done) {
                return Poll::Ready(None);
            }
            if Pin::new(&mut this.registration.closing())
                .poll(cx)
                .is_ready()
            {
                // Tell EventSource when to come back (jittered), after what is whole; then end.
                this.state = BodyState::Done;
                return frame(Bytes::from(retry_hint(&this.node)));
            }
            match &mut this.state {
                BodyState::Opening(opening) => {
                    let (mut stream, session, result) = ready!(opening.as_mut().poll(cx));
                    let start = stream.sink.take();
                    // What the start gathered is gone with its frame: an idle stream holds none.
                    stream.release();
                    // A user disconnected during the start has had its `disconnect` event.
                    this.state = match result {
                        Ok(()) if !session.disconnected() => {
                            BodyState::Live(Box::new(LiveStream::new(stream, session)))
                        }
                        _ => BodyState::Done,
                    };
                    if let Some(start) = start {
                        return frame(start);
                    }
                }
                BodyState::Live(live) => match ready!(live.poll_burst(cx)) {
                    Burst::More(bytes) => return frame(bytes),
                    Burst::Last(bytes) => {
                        this.state = BodyState::Done;
                        if let Some(bytes) = bytes {
                            return frame(bytes);
                        }
                    }
                },
                BodyState::Done => {}
            }
        }
    }
}

impl LiveStream {
    fn new(stream: SseStream<BufferSink>, session: Session) -> Self {
        let mut heartbeat = tokio::time::interval(stream.node.config().sse.heartbeat_interval);
        heartbeat.reset();
        // Looked at only when idle: ticks missed while busy are not made up in a burst.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        LiveStream {
            stream,
            session,
            heartbeat,
            outputs: Vec::new(),
        }
    }

    /// The stream's loop (as [`SseStream::stream`] runs it), one burst per call.
    fn poll_burst(&mut self, cx: &mut Context<'_>) -> Poll<Burst> {
        loop {
            if self.session.disconnected() {
                let _ = at_once(self.stream.disconnect());
                return Poll::Ready(Burst::Last(self.stream.sink.take()));
            }
            // Cancel-safe, so a fresh one per poll loses nothing.
            let next = std::pin::pin!(self.session.next()).poll(cx);
            match next {
                Poll::Ready(event) => self.session.apply(event, &mut self.outputs),
                Poll::Pending => {
                    ready!(self.heartbeat.poll_tick(cx));
                    // Give back what the last bursts left allocated (as the WebSocket does).
                    self.outputs = Vec::new();
                    self.stream.release();
                    let _ = at_once(self.stream.sink.send(HEARTBEAT));
                }
            }
            self.session.apply_ready(&mut self.outputs, BATCH);
            if self.session.overflowed() {
                // The client reconnects with its Last-Event-ID and resumes losslessly.
                return Poll::Ready(Burst::Last(self.stream.sink.take()));
            }
            if self.outputs.len() >= BATCH {
                // A whole batch waited for this poll: the client reads slower than the channels
                // publish (hyper polls only when it has room), so conflating channels conflate
                // what is still behind it, as when a socket stalls.
                self.session.socket_stalled();
            }
            if !self.outputs.is_empty() {
                let _ = at_once(self.stream.emit(&mut self.outputs));
            }
            if let Some(bytes) = self.stream.sink.take() {
                return Poll::Ready(Burst::More(bytes));
            }
        }
    }
}

/// The `retry:` that ends a drained stream: when EventSource is to come back (jittered).
fn retry_hint(node: &Node) -> String {
    let hint = reconnect_hint(node.config().drain.reconnect_jitter);
    let retry = hint.max(Duration::from_millis(1)).as_millis();
    format!("retry: {retry}\n\n")
}

/// Runs a write into a [`BufferSink`], which never waits, to its end.
fn at_once<T>(write: impl Future<Output = T>) -> T {
    write.now_or_never().expect("a buffer sink never waits")
}

/// Validates the request and starts the stream: as the response's body ([`SseBody`]), or with
/// `inline` left there for the caller to run (the response's body then carries no bytes, only
/// what wraps it).
pub(crate) fn open(
    node: &Arc<Node>,
    query: Option<&str>,
    headers: &HeaderMap,
    client_ip: IpAddr,
    identity: Option<&Identity>,
    inline: Option<&InlineSlot>,
) -> Response<Body> {
    if !accepts_event_stream(headers) {
        return response::error(
            StatusCode::NOT_ACCEPTABLE,
            error_code::NOT_ACCEPTABLE,
            "this endpoint only produces text/event-stream",
        );
    }
    let request = StreamQuery::parse(
        query,
        "last_event_id",
        node.config().client.max_subscriptions,
        |_, _| Ok(()),
    );
    let request = match request {
        Ok(request) => request,
        Err(e) => return response::error(StatusCode::BAD_REQUEST, e.code, e.message),
    };
    // EventSource keeps the original URL when it reconnects, so its header is the newer position.
    let header_cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let channels = request.channels;
    let options = request.options;
    let cursor = match decode_cursor(header_cursor.or(request.cursor.as_deref()), &channels) {
        Ok(cursor) => cursor,
        Err(e) => return response::error(StatusCode::BAD_REQUEST, e.code, e.message),
    };
    if let Err(refusal) = fresh::charge(node, client_ip, &channels) {
        let error = refusal.error();
        return too_many(error.code, error.message, refusal.retry_after());
    }

    let registration = node.streams().register();
    let mut session = Session::new(node.clone(), registration.id());
    session.set_identity(identity);
    session.subscribe_from_cursor(&channels, &cursor, options);

    let accepted = Accepted {
        node: node.clone(),
        session,
        cursor,
        registration,
        positions: StreamCursor::new(channels),
    };
    let body = match inline {
        Some(slot) => {
            *slot.0.lock() = Some(accepted);
            StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, Infallible>,
            >())
            .boxed_unsync()
        }
        None => SseBody::new(accepted).boxed_unsync(),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("static parts are valid")
}

/// True unless `Accept` is present and rules out `text/event-stream`.
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    let mut present = false;
    for value in headers.get_all(header::ACCEPT) {
        present = true;
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
            });
            if !refused && matches!(media.as_str(), "text/event-stream" | "text/*" | "*/*") {
                return true;
            }
        }
    }
    !present
}

/// One SSE response's loop: its session and the position of every channel for the cursor.
struct SseStream<S> {
    node: Arc<Node>,
    sink: S,
    /// Every channel's position, in request order: what each event's id says.
    positions: StreamCursor,
    /// An event's head (`id:`, `event:`), reused from event to event and freed when the stream
    /// goes idle.
    head: String,
    /// Metric children looked up once, not per batch (a lookup hashes the labels).
    deliveries: prometheus::IntCounter,
    fanout_latency: prometheus::Histogram,
}

#[derive(Serialize)]
struct Connected<'a> {
    channels: &'a [SubscribeResult],
}

#[derive(Serialize)]
struct Unsubscribed<'a> {
    channel: &'a str,
    reason: &'a str,
}

#[derive(Serialize)]
struct StreamError<'a> {
    channel: &'a str,
    code: &'a str,
    message: &'a str,
}

impl<S: EventSink> SseStream<S> {
    fn new(node: Arc<Node>, sink: S, positions: StreamCursor) -> Self {
        let metrics = node.metrics();
        SseStream {
            deliveries: metrics.deliveries.with_label_values(&["sse"]),
            fanout_latency: metrics.fanout_latency.with_label_values(&["sse"]),
            node,
            sink,
            positions,
            head: String::new(),
        }
    }

    /// The stream until it ends; gives back the sink. A plain function returning the future:
    /// an async fn keeps room for its arguments beside the locals they are moved into (the
    /// stream and its session twice, ~530 B of every idle stream).
    #[allow(clippy::manual_async_fn)]
    fn run(
        mut self,
        mut session: Session,
        cursor: Cursor,
        registration: Registration,
    ) -> impl Future<Output = S> {
        async move {
            let gauge = self.node.metrics().connections.with_label_values(&["sse"]);
            gauge.inc();
            let closing = tokio::select! {
                _ = self.stream(&mut session, cursor) => false,
                _ = registration.closing() => true,
            };
            if closing {
                // Tell EventSource when to come back (jittered), then end the stream.
                if self
                    .sink
                    .send(retry_hint(&self.node).as_bytes())
                    .await
                    .is_ok()
                {
                    let _ = self.sink.flush(true).await;
                }
            }
            gauge.dec();
            self.sink
        }
    }

    /// Runs until the client leaves, the node shuts down or the client falls too far behind.
    /// `Err` means the client is gone.
    async fn stream(&mut self, session: &mut Session, cursor: Cursor) -> Result<(), ()> {
        // Its own future: what it gathers is freed before the stream settles into its loop.
        Box::pin(self.open(session, cursor)).await?;
        self.release();
        let mut out = Vec::new();
        let mut heartbeat = tokio::time::interval(self.node.config().sse.heartbeat_interval);
        heartbeat.reset();
        loop {
            tokio::select! {
                _ = self.sink.closed() => return Err(()),
                _ = heartbeat.tick() => {
                    // Give back what the last burst left allocated (as the WebSocket does).
                    out = Vec::new();
                    self.sink.send_shared(Bytes::from_static(HEARTBEAT)).await?;
                }
                event = session.next() => session.apply(event, &mut out),
            }
            session.apply_ready(&mut out, BATCH);
            if session.overflowed() {
                // The client reconnects with its Last-Event-ID and resumes losslessly.
                return Ok(());
            }
            if out.is_empty() {
                // A heartbeat, or steps that produced nothing to send: idle.
                self.sink.flush(true).await?;
                self.release();
            } else {
                // Not boxed: that would be an allocation per burst on the fan-out path.
                self.emit(&mut out).await?;
            }
            if self.sink.take_waited() {
                session.socket_stalled();
            }
            if session.disconnected() {
                return self.disconnect().await;
            }
        }
    }

    /// The server disconnected the stream's user: say so, then end the stream.
    async fn disconnect(&mut self) -> Result<(), ()> {
        let data = Bytes::from_static(DISCONNECTED_REASON.as_bytes());
        self.send_event(Some("disconnect"), false, data).await?;
        self.sink.flush(true).await
    }

    /// The stream's start: `retry:`, every channel subscribed (so the `connected` event's id is
    /// a cursor), `connected`, the resets of positions not recovered, then what arrived meanwhile.
    async fn open(&mut self, session: &mut Session, cursor: Cursor) -> Result<(), ()> {
        let retry = self.node.config().sse.retry.as_millis();
        let retry = format!("retry: {retry}\n\n");
        self.sink.send(retry.as_bytes()).await?;
        self.sink.flush(true).await?;

        // Every channel's starting position first, so the `connected` event's id is a cursor.
        let mut out = Vec::new();
        let mut held = Vec::new();
        let count = self.positions.channels().len();
        let mut results: Vec<Option<Subscribed>> = vec![None; count];
        while results.iter().any(Option::is_none) {
            tokio::select! {
                _ = self.sink.closed() => return Err(()),
                event = session.next() => session.apply(event, &mut out),
            }
            if session.disconnected() {
                return self.disconnect().await;
            }
            for output in out.drain(..) {
                match output {
                    Output::Subscribed { result, start, .. } => {
                        let i = self.index(&result.channel);
                        // Where delivery starts, not the result's top: after `epoch_changed`
                        // the new epoch follows from its start, and a cursor naming the top
                        // would skip it on reconnect.
                        self.positions.set(i, &result.epoch, start.0, start.1);
                        results[i] = Some((*result, start));
                    }
                    Output::SubscribeFailed { channel, error, .. } => {
                        let data = serde_json::to_vec(&StreamError {
                            channel: &channel,
                            code: error.code,
                            message: &error.message,
                        })
                        .expect("cannot fail");
                        self.send_event(Some("error"), false, Bytes::from(data))
                            .await?;
                        return self.sink.flush(true).await;
                    }
                    other => held.push(other),
                }
            }
        }
        let (mut results, starts): (Vec<_>, Vec<_>) = results.into_iter().flatten().unzip();
        verify_compact(
            &self.node,
            &cursor,
            self.positions.channels(),
            &mut results,
            &starts,
        );
        let connected = serde_json::to_vec(&Connected { channels: &results }).expect("cannot fail");
        self.send_event(Some("connected"), true, Bytes::from(connected))
            .await?;
        for result in &results {
            if let Some(reason) = result.reason {
                // Publications from the reset's offset + 1 follow: the stream's start.
                let start = self.positions.offset(self.index(&result.channel));
                self.emit_reset(&result.channel, &result.epoch, start, reason)
                    .await?;
            }
        }
        self.emit(&mut held).await
    }

    /// Gives back what bursts left allocated (the event head, the sink's buffer).
    fn release(&mut self) {
        self.head = String::new();
        self.sink.release();
    }

    fn index(&self, channel: &str) -> usize {
        self.positions
            .index(channel)
            .expect("outputs only name the stream's channels")
    }

    async fn emit(&mut self, outputs: &mut Vec<Output>) -> Result<(), ()> {
        let mut delivered = 0;
        let oldest_live = oldest_live(outputs);
        let result = async {
            for output in outputs.drain(..) {
                match output {
                    Output::History(p) | Output::Live(p) => {
                        let i = self.index(&p.channel);
                        self.positions.set(i, &p.epoch, p.offset, Some(p.tag));
                        delivered += 1;
                        self.send_event(None, true, p.json().clone()).await?;
                    }
                    Output::Reset {
                        channel,
                        epoch,
                        offset,
                        reason,
                    } => self.emit_reset(&channel, &epoch, offset, reason).await?,
                    // Named events without an id: they move no position, and a plain
                    // `onmessage` handler sees publications only.
                    Output::Presence(event) => {
                        let name = match event.kind {
                            Kind::Join => "join",
                            _ => "leave",
                        };
                        self.send_event(Some(name), false, event.json().clone())
                            .await?
                    }
                    Output::Unsubscribed { channel, reason } => {
                        let data = Unsubscribed {
                            channel: &channel,
                            reason,
                        };
                        let data = serde_json::to_vec(&data).expect("cannot fail");
                        self.send_event(Some("unsubscribed"), true, Bytes::from(data))
                            .await?;
                    }
                    Output::Reply(_)
                    | Output::Subscribed { .. }
                    | Output::SubscribeFailed { .. } => {}
                }
            }
            Ok(())
        }
        .await;
        outputs.clear();
        // The burst is over: write it out.
        let result = match result {
            Ok(()) => self.sink.flush(true).await,
            Err(()) => Err(()),
        };
        if result.is_ok() {
            crate::metrics::observe_fanout(&self.fanout_latency, oldest_live);
        }
        if delivered > 0 {
            self.deliveries.inc_by(delivered);
        }
        result
    }

    async fn emit_reset(
        &mut self,
        channel: &str,
        epoch: &Arc<str>,
        offset: u64,
        reason: &str,
    ) -> Result<(), ()> {
        let i = self.index(channel);
        self.positions.set(i, epoch, offset, None);
        let data = Reset {
            channel,
            epoch,
            offset,
            reason,
        }
        .to_json();
        self.send_event(Some("reset"), true, data).await
    }

    /// Queues one event; `data` is one line of compact JSON, shared, not copied where the sink
    /// need not.
    async fn send_event(
        &mut self,
        event: Option<&str>,
        with_id: bool,
        data: Bytes,
    ) -> Result<(), ()> {
        let head = &mut self.head;
        head.clear();
        head.reserve(128);
        if with_id {
            head.push_str("id: ");
            self.positions.write(head);
            head.push('\n');
        }
        if let Some(event) = event {
            head.push_str("event: ");
            head.push_str(event);
            head.push('\n');
        }
        head.push_str("data: ");
        self.sink.send(self.head.as_bytes()).await?;
        self.sink.send_shared(data).await?;
        self.sink.send_shared(Bytes::from_static(b"\n\n")).await?;
        self.sink.flush(false).await
    }
}
