//! Express delivery: live publications written by the fan-out itself into the sockets of
//! WebSocket connections that have nothing else to do, batched per socket, without waking their
//! tasks. Waking one task per subscriber per publication (a queue push, a wake-up, a poll and a
//! `select!`) was most of the node's user-space CPU on the fan-out path.
//!
//! A connection's task hands its socket over ([`Express`]) when it is idle and every
//! subscription is live and plain (no delta, nothing held, no read in flight), its queue is
//! empty and its writes are flushed. From then on the fan-out appends each publication that
//! follows a channel's last delivered offset as a frame to the connection's [`Express`] buffer,
//! under the queue's lock, and after the publication's fan-out [`Flushes`] writes each touched
//! socket once, without waiting: publications that arrive while a round of writes runs are
//! batched into the next. Anything else — a gap, another epoch, a presence event, a socket that
//! would block, a full buffer — refuses: the publication is queued as before and the task, woken,
//! takes the socket back with what is still unsent, and the channels' positions, before it writes
//! or applies anything. So a connection's frames keep one order, and its session sees every
//! offset the express path delivered.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use backplane::Publication;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::queue::QueueSender;
use crate::send_batch;
use crate::transport::ws::frame::{server_header, OpCode};

/// Touched connections one task writes before the rest are left to other tasks, so a
/// publication to many subscribers is written out on every worker thread.
const WRITES_PER_TASK: usize = 256;

/// A live channel's position, handed between the session and the express path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lane {
    pub(crate) channel: Arc<str>,
    pub(crate) epoch: Arc<str>,
    /// The offset last delivered.
    pub(crate) delivered: u64,
    /// The tag of the publication at `delivered`, when known.
    pub(crate) tag: Option<u32>,
}

/// A connection's socket while the fan-out writes to it (see the module doc).
pub(crate) struct Express {
    socket: Arc<TcpStream>,
    lanes: Vec<Lane>,
    /// Frames appended and not yet written.
    out: Vec<u8>,
    /// Deliveries in `out` not counted yet.
    frames: u64,
    /// Publish time of the oldest publication in `out` (0 if none), for the fan-out latency.
    oldest_us: u64,
    /// False once a publication was refused: the task is taking the socket back.
    live: bool,
    deliveries: prometheus::IntCounter,
    latency: prometheus::Histogram,
}

/// What the express path did with a publication.
pub(crate) enum Offer {
    /// Appended; `first` when the buffer was empty, so the connection needs a write.
    Taken { first: bool },
    /// Delivered already (its offset is not past the channel's): nothing to do, as the session
    /// would do nothing with it.
    Stale,
    /// Not for the express path: queue it for the task.
    Refused,
}

/// What the task takes back: frames still to write and how many deliveries they hold.
pub(crate) struct Unsent {
    pub(crate) bytes: Vec<u8>,
    pub(crate) frames: u64,
    pub(crate) oldest_us: u64,
}

impl Express {
    pub(crate) fn new(
        socket: Arc<TcpStream>,
        lanes: Vec<Lane>,
        deliveries: prometheus::IntCounter,
        latency: prometheus::Histogram,
    ) -> Box<Self> {
        Box::new(Express {
            socket,
            lanes,
            out: Vec::new(),
            frames: 0,
            oldest_us: 0,
            live: true,
            deliveries,
            latency,
        })
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    /// Appends `p` as a frame if it is its channel's next publication and `out` stays within
    /// `max_bytes` (the connection's queue bound).
    pub(crate) fn offer(&mut self, p: &Publication, max_bytes: usize) -> Offer {
        if !p.is_publication() || p.skipped > 0 {
            return Offer::Refused;
        }
        // The publications' own names are kept once matched: a pointer comparison then finds
        // the lane and checks the epoch, for a channel's every later publication.
        let found = self
            .lanes
            .iter_mut()
            .find(|l| Arc::ptr_eq(&l.channel, &p.channel) || l.channel == p.channel);
        let Some(lane) = found else {
            return Offer::Refused;
        };
        if !Arc::ptr_eq(&lane.epoch, &p.epoch) {
            if lane.epoch != p.epoch {
                return Offer::Refused;
            }
            lane.epoch = p.epoch.clone();
        }
        if !Arc::ptr_eq(&lane.channel, &p.channel) {
            lane.channel = p.channel.clone();
        }
        if p.offset <= lane.delivered {
            return Offer::Stale;
        }
        let json = p.json();
        let (head, len) = server_header(true, false, OpCode::Text, json.len());
        if p.offset != lane.delivered + 1 || self.out.len() + len + json.len() > max_bytes {
            return Offer::Refused;
        }
        let first = self.out.is_empty();
        self.out.extend_from_slice(&head[..len]);
        self.out.extend_from_slice(json);
        lane.delivered = p.offset;
        lane.tag = Some(p.tag);
        self.frames += 1;
        if self.oldest_us == 0 {
            self.oldest_us = p.published_us;
        }
        Offer::Taken { first }
    }

    /// Marks the socket for taking back: nothing more is appended.
    pub(crate) fn refuse(&mut self) {
        self.live = false;
    }

    /// The socket and the bytes to write, if any.
    pub(crate) fn pending(&self) -> Option<(RawFd, &[u8])> {
        (!self.out.is_empty()).then(|| (self.socket.as_raw_fd(), &self.out[..]))
    }

    /// Writes what is buffered without waiting. False when the socket did not take all of it
    /// (it would block, or failed): the task must take over, and write the rest itself. `now_us`
    /// is when the round of writes began, for the fan-out latency.
    pub(crate) fn flush(&mut self, now_us: u64) -> bool {
        let Some((_, bytes)) = self.pending() else {
            return true;
        };
        // Straight to the socket rather than through tokio's readiness (which the task's own
        // writes keep): a socket that would block is found by the send itself. MSG_NOSIGNAL, as
        // std's own sends: a peer gone is an error, not a signal.
        let socket = socket2::SockRef::from(&*self.socket);
        let sent = match socket.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
            Ok(n) => n.min(i32::MAX as usize) as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        self.sent(sent, now_us)
    }

    /// Takes in what a send of [`Express::pending`] returned (bytes sent, a negative errno, or
    /// [`send_batch::UNKNOWN`]); false as for [`Express::flush`].
    pub(crate) fn sent(&mut self, result: i32, now_us: u64) -> bool {
        if result == send_batch::UNKNOWN {
            // Whether the bytes went out cannot be told: the connection ends (its task's write
            // fails) and the client resumes from what it received.
            let _ = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Both);
            return false;
        }
        // Would block, or failed: the task's own write finds out which.
        let Ok(sent) = usize::try_from(result) else {
            return false;
        };
        if sent < self.out.len() {
            // The rest waits for the task, which waits for the socket.
            self.out.drain(..sent);
            return false;
        }
        // Kept for the next publication: freeing it here, on another thread than the fan-out
        // that allocates it, made the two threads contend for the allocator. It goes when the
        // task takes the socket back, at the latest at its heartbeat.
        self.out.clear();
        self.deliveries.inc_by(std::mem::take(&mut self.frames));
        let oldest_us = std::mem::take(&mut self.oldest_us);
        crate::metrics::observe_fanout_at(&self.latency, oldest_us, now_us);
        true
    }

    /// The channels' positions and what is still unsent.
    pub(crate) fn into_parts(self) -> (Vec<Lane>, Unsent) {
        let Express {
            lanes,
            out,
            frames,
            oldest_us,
            ..
        } = self;
        let unsent = Unsent {
            bytes: out,
            frames,
            oldest_us,
        };
        (lanes, unsent)
    }
}

/// How a round's sockets are written: in io_uring batches ([`send_batch`], where the kernel
/// allows it) or one `send` each (`server.batched_sends = false`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Sends {
    #[default]
    Batched,
    OneByOne,
}

/// The connections the fan-out appended to and has not written yet, and the task writing them.
pub(crate) struct Flushes {
    state: Mutex<Pending>,
    sends: Sends,
}

#[derive(Default)]
struct Pending {
    touched: Vec<QueueSender>,
    /// A task is writing (and will look at `touched` again before it ends).
    running: bool,
}

impl Flushes {
    pub(crate) fn new(sends: Sends) -> Self {
        Flushes {
            state: Mutex::default(),
            sends,
        }
    }

    /// Writes `touched` soon: by the task already writing, or a new one.
    pub(crate) fn add(self: &Arc<Self>, mut touched: Vec<QueueSender>) {
        let mut state = self.state.lock();
        if state.touched.is_empty() {
            std::mem::swap(&mut state.touched, &mut touched);
        } else {
            state.touched.append(&mut touched);
        }
        if std::mem::replace(&mut state.running, true) {
            return;
        }
        drop(state);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let flushes = self.clone();
                runtime.spawn(async move {
                    // A round at a time, other tasks in between: the rounds of a busy node
                    // follow each other without end.
                    while flushes.round() {
                        tokio::task::yield_now().await;
                    }
                });
            }
            // A fan-out driven by plain code (unit tests): every round here and now.
            Err(_) => while self.round() {},
        }
    }

    /// Writes the connections touched so far, each socket once (what is touched while a round
    /// is written goes out in the next). False when there was none: the writing task ends.
    fn round(&self) -> bool {
        let mut round = {
            let mut state = self.state.lock();
            if state.touched.is_empty() {
                state.running = false;
                return false;
            }
            std::mem::take(&mut state.touched)
        };
        // Beyond one task's share, the rest goes to other tasks that other worker threads may
        // take.
        while round.len() > WRITES_PER_TASK {
            let rest = round.split_off(WRITES_PER_TASK);
            let share = std::mem::replace(&mut round, rest);
            let sends = self.sends;
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move { write_all(&share, sends) });
                }
                Err(_) => write_all(&share, sends),
            }
        }
        write_all(&round, self.sends);
        true
    }
}

fn write_all(touched: &[QueueSender], sends: Sends) {
    let now_us = backplane::now_us();
    for batch in touched.chunks(send_batch::BATCH) {
        flush(batch, now_us, sends);
    }
}

/// Writes one batch of connections, each socket once.
fn flush(batch: &[QueueSender], now_us: u64, sends: Sends) {
    match sends {
        Sends::Batched => crate::queue::flush_express(batch, now_us, send_batch::send_all),
        Sends::OneByOne => crate::queue::flush_express(batch, now_us, |_, _| false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{outbound, Pushed, Received};
    use backplane::Kind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn publication(channel: &str, epoch: &str, offset: u64) -> Arc<Publication> {
        let data = format!("{offset}");
        Arc::new(Publication::new(
            channel.into(),
            offset,
            epoch.into(),
            offset as u32,
            data.as_bytes(),
        ))
    }

    /// The frame a WebSocket connection writes for `p`.
    fn frame(p: &Publication) -> Vec<u8> {
        let (head, len) = server_header(true, false, OpCode::Text, p.json().len());
        [&head[..len], &p.json()[..]].concat()
    }

    /// A connected pair of real TCP sockets: the node's side and the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    fn express(socket: Arc<TcpStream>, lanes: Vec<Lane>) -> Box<Express> {
        let metrics = crate::metrics::Metrics::new();
        Express::new(
            socket,
            lanes,
            metrics.deliveries.with_label_values(&["ws"]),
            metrics.fanout_latency.with_label_values(&["ws"]),
        )
    }

    fn lane(channel: &str, epoch: &str, delivered: u64) -> Lane {
        Lane {
            channel: channel.into(),
            epoch: epoch.into(),
            delivered,
            tag: None,
        }
    }

    /// Only each channel's next publication is taken; what the session would drop is dropped,
    /// and everything else is left to the session.
    #[tokio::test]
    async fn takes_each_channels_next_publication_only() {
        let (socket, mut client) = socket_pair().await;
        let mut e = express(socket, vec![lane("a", "e1", 5), lane("b", "e1", 0)]);
        let next = publication("a", "e1", 6);
        assert!(matches!(
            e.offer(&next, 1 << 20),
            Offer::Taken { first: true }
        ));
        assert!(matches!(e.offer(&next, 1 << 20), Offer::Stale));
        assert!(
            matches!(e.offer(&publication("a", "e1", 8), 1 << 20), Offer::Refused),
            "a gap"
        );
        assert!(
            matches!(e.offer(&publication("a", "e2", 7), 1 << 20), Offer::Refused),
            "an epoch"
        );
        assert!(
            matches!(e.offer(&publication("c", "e1", 1), 1 << 20), Offer::Refused),
            "no lane"
        );
        let join = Publication::presence_event(Kind::Join, "a".into(), "e1".into(), 6, b"{}");
        assert!(
            matches!(e.offer(&join, 1 << 20), Offer::Refused),
            "a presence event"
        );
        let mut skipped = (*publication("a", "e1", 7)).clone();
        skipped.skipped = 1;
        assert!(
            matches!(e.offer(&skipped, 1 << 20), Offer::Refused),
            "a conflated one"
        );
        let b1 = publication("b", "e1", 1);
        assert!(matches!(
            e.offer(&b1, 1 << 20),
            Offer::Taken { first: false }
        ));
        let a7 = publication("a", "e1", 7);
        assert!(
            matches!(e.offer(&a7, frame(&next).len()), Offer::Refused),
            "past the bound"
        );

        assert!(e.flush(backplane::now_us()));
        let expected = [frame(&next), frame(&b1)].concat();
        let mut got = vec![0; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        let (lanes, unsent) = e.into_parts();
        assert_eq!(lanes[0].delivered, 6);
        assert_eq!(lanes[0].tag, Some(6));
        assert_eq!(lanes[1].delivered, 1);
        assert!(unsent.bytes.is_empty() && unsent.frames == 0);
    }

    /// Through the queue: while the socket is handed over, the next publication goes to it; a
    /// refused one is queued behind what was appended, and the task takes the socket back with
    /// the channels' positions.
    #[tokio::test]
    async fn a_refused_publication_waits_in_the_queue_for_the_task() {
        let (socket, _client) = socket_pair().await;
        let (tx, mut rx) = outbound(1 << 20);
        let queued = publication("a", "e1", 1);
        assert!(matches!(tx.push(&queued, false), Pushed::Queued));
        assert!(
            !rx.hand_over(express(socket.clone(), vec![lane("a", "e1", 0)])),
            "not while a publication waits"
        );
        assert!(rx.try_recv().is_some());
        assert!(rx.hand_over(express(socket, vec![lane("a", "e1", 1)])));
        assert!(matches!(
            tx.push(&publication("a", "e1", 2), false),
            Pushed::Express { first: true }
        ));
        assert!(matches!(
            tx.push(&publication("a", "e1", 3), false),
            Pushed::Express { first: false }
        ));
        let gap = publication("a", "e1", 5);
        assert!(matches!(tx.push(&gap, false), Pushed::Queued));
        assert!(
            matches!(tx.push(&publication("a", "e1", 6), false), Pushed::Queued),
            "refused once, the queue takes everything until the task takes the socket back"
        );
        match rx.recv().await {
            Received::Publication(p) => assert_eq!(p.offset, 5),
            _ => panic!("the gap is queued"),
        }
        let (lanes, unsent) = rx.take_back().expect("still handed over").into_parts();
        assert_eq!(
            lanes,
            vec![Lane {
                tag: Some(3),
                ..lane("a", "e1", 3)
            }]
        );
        assert_eq!(unsent.frames, 2, "appended, never written");
        assert!(rx.take_back().is_none());
    }

    fn flush_one(tx: &QueueSender, sends: Sends) {
        flush(std::slice::from_ref(tx), backplane::now_us(), sends);
    }

    #[tokio::test]
    async fn a_socket_that_would_block_is_handed_back_with_what_it_did_not_take() {
        would_block_hands_back(Sends::Batched).await;
        would_block_hands_back(Sends::OneByOne).await;
    }

    /// A socket that stops taking data is handed back: the task is woken with nothing queued,
    /// and what the socket did not take comes back to it, so the peer gets every frame in order.
    async fn would_block_hands_back(sends: Sends) {
        let (socket, mut client) = socket_pair().await;
        socket2::SockRef::from(&*socket)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .unwrap();
        let (tx, mut rx) = outbound(1 << 20);
        assert!(rx.hand_over(express(socket.clone(), vec![lane("a", "e1", 0)])));
        let mut expected = Vec::new();
        let mut offset = 0;
        // The client reads nothing, so the socket's buffers fill and a write stops short.
        while !matches!(recv_now(&mut rx), Some(Received::HandedBack)) {
            offset += 1;
            let p = publication("a", "e1", offset);
            assert!(matches!(
                tx.push(&p, false),
                Pushed::Express { first: true }
            ));
            expected.extend(frame(&p));
            flush_one(&tx, sends);
            assert!(offset < 1_000_000, "the buffers never filled");
        }
        let next = publication("a", "e1", offset + 1);
        assert!(
            matches!(tx.push(&next, false), Pushed::Queued),
            "handed back"
        );
        let (lanes, unsent) = rx.take_back().unwrap().into_parts();
        assert_eq!(lanes[0].delivered, offset);
        assert!(!unsent.bytes.is_empty());

        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "the frames arrive whole and in order");
        });
        // As the task writes it: through the connection's write half, waiting for the socket.
        let mut write = crate::transport::ws::socket::SocketWrite::Tcp(socket);
        write.write_all(&unsent.bytes).await.unwrap();
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn a_socket_whose_peer_is_gone_is_handed_back() {
        peer_gone_hands_back(Sends::Batched).await;
        peer_gone_hands_back(Sends::OneByOne).await;
    }

    /// A peer gone is found by a send: the socket goes back to the task, whose own write then
    /// ends the connection.
    async fn peer_gone_hands_back(sends: Sends) {
        let (socket, client) = socket_pair().await;
        drop(client);
        let (tx, mut rx) = outbound(1 << 20);
        assert!(rx.hand_over(express(socket, vec![lane("a", "e1", 0)])));
        // The first sends may still be taken: the peer's reset answers them. Bounded only as a
        // guard against a hang, not as a measure of speed.
        let refused = async {
            let mut offset = 0;
            while !matches!(recv_now(&mut rx), Some(Received::HandedBack)) {
                offset += 1;
                let p = publication("a", "e1", offset);
                assert!(matches!(tx.push(&p, false), Pushed::Express { .. }));
                flush_one(&tx, sends);
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), refused)
            .await
            .expect("sends to a closed peer kept succeeding");
        let (_, unsent) = rx.take_back().unwrap().into_parts();
        assert!(
            !unsent.bytes.is_empty(),
            "what was refused stays for the task"
        );
    }

    /// When what a batch sent cannot be told, the connection ends rather than risk a frame sent
    /// twice or never: its client reads the end of the stream, reconnects and resumes.
    #[tokio::test]
    async fn a_send_whose_outcome_is_unknown_ends_the_connection() {
        let (socket, mut client) = socket_pair().await;
        let (tx, mut rx) = outbound(1 << 20);
        assert!(rx.hand_over(express(socket, vec![lane("a", "e1", 0)])));
        let p = publication("a", "e1", 1);
        assert!(matches!(
            tx.push(&p, false),
            Pushed::Express { first: true }
        ));
        let batch = std::slice::from_ref(&tx);
        crate::queue::flush_express(batch, backplane::now_us(), |sends, results| {
            results.clear();
            results.resize(sends.len(), send_batch::UNKNOWN);
            true
        });
        assert!(matches!(recv_now(&mut rx), Some(Received::HandedBack)));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the stream ended, with nothing sent");
    }

    fn recv_now(rx: &mut crate::queue::QueueReceiver) -> Option<Received> {
        use futures_util::FutureExt;
        rx.recv().now_or_never()
    }
}
