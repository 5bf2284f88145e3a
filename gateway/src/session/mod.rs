//! The driver of a client session: runs the history reads and publishes the pure delivery rule
//! (`delivery`) asks for, joins and leaves the hub, reads the connection's queue and counts the
//! session's metrics, and dispatches the client's commands and the server's control commands
//! (`POST /api/disconnect`, `/api/unsubscribe`). Transports feed it commands and write what it
//! outputs.

pub(crate) mod channel_map;
pub(crate) mod delivery;
pub(crate) mod fresh;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use backplane::{BackplaneError, Position, Publication, PublishAck};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use crate::control::Control;
use crate::cursor::Cursor;
use crate::express::{Express, Lane, Unsent};
use crate::hub::ConnId;
use crate::node::Node;
use crate::presence::{self, Who};
use crate::protocol::{
    backplane_error, error_code, reply_err, reply_ok, Command, CommandError, ErrorBody,
};
use crate::queue::{outbound, QueueReceiver, QueueSender, Received};
use crate::security::auth::Identity;
pub(crate) use crate::session::delivery::Output;
pub(crate) use crate::session::delivery::SubscribeOptions;
use crate::session::delivery::{Deliveries, Effect, Input};

/// Most commands a session runs at once; a transport stops reading commands beyond it.
pub const MAX_PENDING: usize = 256;
const FETCH_RETRY: Duration = Duration::from_secs(1);

/// Something for [`Session::apply`] to process.
pub(crate) enum Event {
    Live(Arc<Publication>),
    Done(Completion),
    /// A command of the node's control handler ([`crate::control`]).
    Control(Control),
    /// The fan-out gave the connection's socket back ([`Session::take_back`]); nothing to
    /// apply.
    HandedBack,
}

/// An asynchronous step of a command or a catch-up, finished.
pub(crate) enum Completion {
    /// A history read the delivery rule asked for.
    Read(Input),
    Published {
        id: Option<u64>,
        result: Result<PublishAck, BackplaneError>,
    },
    /// A command answered by a read (`presence`): its reply.
    Replied(Bytes),
}

/// The transport-independent state of one client connection.
pub(crate) struct Session {
    node: Arc<Node>,
    conn: ConnId,
    sender: QueueSender,
    queue: QueueReceiver,
    deliveries: Deliveries,
    /// Commands and catch-ups in progress; `None` when there are none, so an idle session
    /// holds no allocation for them.
    pending: Option<FuturesUnordered<BoxFuture<'static, Completion>>>,
    /// The client's address when each subscribe is charged for fresh channels ([`fresh`]);
    /// `None` when the transport charged the whole request up front (SSE, long-poll).
    charged_ip: Option<IpAddr>,
    /// Who the connection is, once it authenticated (presence shows it).
    who: Option<Box<Who>>,
    /// Whether the session's subscriptions make it a presence member (not a long-poll's, which
    /// holds no connection between polls).
    member: bool,
    /// The user the session is registered under in the node's control registry, once known.
    user: Option<Arc<str>>,
    /// The server disconnected the user: the transport must end the connection (4010).
    disconnected: bool,
    /// Channels the server unsubscribed while they were still subscribing: each is left as soon
    /// as its subscription is set up, so the client learns its start and then the end.
    unsubscribe_when_subscribed: Vec<Arc<str>>,
}

impl Session {
    pub(crate) fn new(node: Arc<Node>, conn: ConnId) -> Self {
        let client = &node.config().client;
        let (sender, queue) = outbound(client.queue_max_bytes);
        Session {
            deliveries: Deliveries::new(client.history_page_size, client.max_subscriptions),
            conn,
            node,
            sender,
            queue,
            pending: None,
            charged_ip: None,
            who: None,
            member: true,
            user: None,
            disconnected: false,
            unsubscribe_when_subscribed: Vec::new(),
        }
    }

    /// A session whose subscriptions are not presence members (a long-poll).
    pub(crate) fn not_a_member(mut self) -> Self {
        self.member = false;
        self
    }

    /// Records who the connection is (after `connect`, or from the request's token): presence
    /// entries made from now on show it, and the session is registered under its token's user,
    /// so `POST /api/disconnect` and `/api/unsubscribe` reach it. A token the server
    /// disconnected (a race with the checks at the handshake or `connect`) marks the session
    /// disconnected instead. Idempotent.
    pub(crate) fn set_identity(&mut self, identity: Option<&Identity>) {
        let Some(identity) = identity else { return };
        self.who = Some(Box::new(Who {
            user: identity.user.clone(),
            info: identity.info.clone(),
        }));
        if self.user.as_ref() == Some(&identity.user) {
            return;
        }
        let registry = self.node.control();
        if let Some(old) = self.user.take() {
            registry.unregister(&old, self.conn);
        }
        if registry.register(
            &identity.user,
            identity.issued_at,
            self.conn,
            self.sender.clone(),
        ) {
            self.user = Some(identity.user.clone());
        } else {
            self.disconnected = true;
        }
    }

    /// The user of the session, once registered.
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// True once the server disconnected the session's user: the connection must end, and the
    /// client must not reconnect with the same token.
    pub(crate) fn disconnected(&self) -> bool {
        self.disconnected
    }

    /// Charges every later subscribe to a fresh channel to `ip` (WebSocket: one command at a
    /// time).
    pub(crate) fn charge_fresh_channels_to(mut self, ip: IpAddr) -> Self {
        self.charged_ip = Some(ip);
        self
    }

    /// Whether the transport may hand over another command now.
    pub(crate) fn accepts_commands(&self) -> bool {
        self.pending.as_ref().map_or(0, FuturesUnordered::len) < MAX_PENDING
    }

    /// The transport's socket stopped taking data: conflating channels conflate their backlog
    /// now (see [`QueueReceiver::conflate_backlog`]).
    pub(crate) fn socket_stalled(&mut self) {
        let dropped = self.queue.conflate_backlog();
        if dropped > 0 {
            self.node.metrics().conflated_publications.inc_by(dropped);
        }
    }

    /// True once the outbound queue overflowed: the connection must be closed.
    pub(crate) fn overflowed(&self) -> bool {
        self.queue.overflowed()
    }

    /// The position delivered so far on a channel, if subscribed (with the tag there when
    /// known).
    pub(crate) fn position(&self, channel: &str) -> Option<(&Arc<str>, u64, Option<u32>)> {
        self.deliveries.position(channel)
    }

    /// Starts a subscription; its outcome arrives later as [`Output::Subscribed`] or
    /// [`Output::SubscribeFailed`]. Immediate refusals are written to `out`.
    pub(crate) fn subscribe(
        &mut self,
        id: Option<u64>,
        channel: Arc<str>,
        since: Option<Position>,
        options: SubscribeOptions,
        out: &mut Vec<Output>,
    ) {
        let from_latest = self.node.policy().namespaces.get(&channel).subscribe_from
            == crate::config::SubscribeFrom::Latest;
        let options = SubscribeOptions {
            latest: since.is_none() && (options.latest || from_latest),
            delta: options.delta,
        };
        let gen = match self.deliveries.subscribe_with(&channel, options) {
            Ok(gen) => gen,
            Err(error) => {
                if error.code == error_code::TOO_MANY_SUBSCRIPTIONS {
                    self.node.count_limit("max_subscriptions");
                }
                out.push(Output::SubscribeFailed {
                    id,
                    channel,
                    error: Box::new(error),
                });
                return;
            }
        };
        if let Some(ip) = self.charged_ip {
            if let Err(refusal) = fresh::charge(&self.node, ip, std::slice::from_ref(&channel)) {
                // Not joined anywhere yet: forgetting the subscription undoes it.
                let _ = self.deliveries.unsubscribe(&channel);
                out.push(Output::SubscribeFailed {
                    id,
                    channel,
                    error: Box::new(refusal.error()),
                });
                return;
            }
        }
        // Joining the hub first means no publication fanned out from now on is missed; the
        // position read afterwards tells which of them are new.
        self.node
            .hub()
            .add(&channel, self.conn, self.sender.clone());
        let node = self.node.clone();
        let page_size = self.node.config().client.history_page_size;
        self.pending().push(
            async move {
                let page = match node.reconcile(&channel).await {
                    Ok(()) => match &since {
                        Some(since) => node.history(&channel, since.offset, page_size).await,
                        None => node.history(&channel, u64::MAX, 0).await,
                    },
                    Err(e) => Err(e),
                };
                Completion::Read(Input::Subscribed {
                    gen,
                    channel,
                    id,
                    since,
                    from_start: false,
                    page,
                })
            }
            .boxed(),
        );
    }

    /// Reads a resumed channel's new epoch from its start ([`Effect::ReadFromStart`]).
    fn read_from_start(&mut self, gen: u64, channel: Arc<str>, id: Option<u64>, since: Position) {
        let node = self.node.clone();
        let limit = self.node.config().client.history_page_size;
        self.pending().push(
            async move {
                let page = node.history(&channel, 0, limit).await;
                Completion::Read(Input::Subscribed {
                    gen,
                    channel,
                    id,
                    since: Some(since),
                    from_start: true,
                    page,
                })
            }
            .boxed(),
        );
    }

    /// Reads the page after `since` for a subscription from the latest value
    /// ([`Effect::ReadLatest`]).
    fn read_latest(&mut self, gen: u64, channel: Arc<str>, id: Option<u64>, since: u64) {
        let node = self.node.clone();
        let limit = self.node.config().client.history_page_size;
        self.pending().push(
            async move {
                let page = node.history(&channel, since, limit).await;
                Completion::Read(Input::Subscribed {
                    gen,
                    channel,
                    id,
                    since: None,
                    from_start: false,
                    page,
                })
            }
            .boxed(),
        );
    }

    /// Subscribes a stream's channels (SSE, long-poll), each from its position in `cursor`
    /// or, with `options`, from the latest value (else from now). Returns each channel's starting offset and tag, `None` for a channel the
    /// cursor does not name. A compact cursor's positions name no epoch: they resume in whatever
    /// epoch each channel has, and [`verify_compact`](crate::transport::stream_query) checks
    /// them once subscribed.
    pub(crate) fn subscribe_from_cursor(
        &mut self,
        channels: &[Arc<str>],
        cursor: &Cursor,
        options: SubscribeOptions,
    ) -> Vec<Option<(u64, Option<u32>)>> {
        let mut out = Vec::new();
        let since: Vec<Option<Position>> = match cursor {
            Cursor::Positions(entries) => channels
                .iter()
                .map(|channel| {
                    let e = entries.iter().find(|e| *e.channel == **channel)?;
                    Some(Position {
                        epoch: e.epoch.as_str().into(),
                        offset: e.offset,
                        tag: e.tag,
                    })
                })
                .collect(),
            Cursor::Compact(compact) => compact
                .offsets()
                .map(|offset| {
                    Some(Position {
                        epoch: delivery::ANY_EPOCH.into(),
                        offset,
                        tag: None,
                    })
                })
                .collect(),
        };
        let starts = channels
            .iter()
            .zip(since)
            .map(|(channel, since)| {
                let start = since.as_ref().map(|s| (s.offset, s.tag));
                self.subscribe(None, channel.clone(), since, options, &mut out);
                start
            })
            .collect();
        debug_assert!(
            out.is_empty(),
            "fresh sessions accept every distinct channel"
        );
        starts
    }

    /// Ends a subscription at once.
    pub(crate) fn unsubscribe(&mut self, channel: &str) -> Result<(), ErrorBody> {
        let catching_up = self.deliveries.catching_up();
        let was_member = self.deliveries.unsubscribe(channel)?;
        self.count_catching_up(catching_up);
        self.leave_hub(channel);
        if was_member {
            self.leave_presence(channel);
        }
        Ok(())
    }

    /// The connection became a member of the channel: enters its presence if it keeps any.
    fn join_presence(&self, channel: &str) {
        let (presence, announce) = presence::settings(&self.node, channel);
        if presence && self.member {
            let member = presence::member(&self.node, self.conn, self.who.as_deref());
            self.node
                .backplane()
                .presence_join(channel, member, announce);
            self.node.metrics().presence_members.inc();
        }
    }

    /// The connection is no longer a member of the channel.
    fn leave_presence(&self, channel: &str) {
        let (presence, announce) = presence::settings(&self.node, channel);
        if presence && self.member {
            let client = self.node.client_id(self.conn);
            self.node
                .backplane()
                .presence_leave(channel, &client, announce);
            self.node.metrics().presence_members.dec();
        }
    }

    /// Whether the session holds a subscription (one still subscribing included).
    pub(crate) fn has_subscriptions(&self) -> bool {
        self.deliveries.channels().next().is_some()
    }

    /// After a `refresh`: ends every subscription the connection's new token no longer allows
    /// (`allowed` says), telling the client with an `unsubscribed` push each (reason
    /// `permission_revoked`).
    pub(crate) fn unsubscribe_revoked(
        &mut self,
        allowed: impl Fn(&str) -> bool,
        out: &mut Vec<Output>,
    ) {
        let revoked: Vec<Arc<str>> = self
            .deliveries
            .channels()
            .filter(|channel| !allowed(channel))
            .cloned()
            .collect();
        for channel in revoked {
            if self.unsubscribe(&channel).is_ok() {
                out.push(Output::Unsubscribed {
                    channel,
                    reason: "permission_revoked",
                });
            }
        }
    }

    /// Runs a control command: a disconnect marks the session for the transport to end; an
    /// unsubscribe ends the channel's subscription now, or once it is set up.
    fn control(&mut self, command: Control, out: &mut Vec<Output>) {
        match command {
            Control::Disconnect => self.disconnected = true,
            Control::Unsubscribe(channel) => {
                if self.deliveries.is_subscribing(&channel) {
                    if !self.unsubscribe_when_subscribed.contains(&channel) {
                        self.unsubscribe_when_subscribed.push(channel);
                    }
                } else if self.unsubscribe(&channel).is_ok() {
                    out.push(Output::Unsubscribed {
                        channel,
                        reason: "server",
                    });
                }
            }
        }
    }

    /// Leaves the channels the server unsubscribed while they were subscribing, once `out`
    /// holds their outcome.
    fn unsubscribe_deferred(&mut self, out: &mut Vec<Output>, from: usize) {
        let mut settled = Vec::new();
        for output in &out[from..] {
            let channel = match output {
                Output::Subscribed { result, .. } => &result.channel,
                Output::SubscribeFailed { channel, .. } => channel,
                _ => continue,
            };
            if let Some(i) = self
                .unsubscribe_when_subscribed
                .iter()
                .position(|c| c == channel)
            {
                settled.push(self.unsubscribe_when_subscribed.swap_remove(i));
            }
        }
        for channel in settled {
            if self.unsubscribe(&channel).is_ok() {
                out.push(Output::Unsubscribed {
                    channel,
                    reason: "server",
                });
            }
        }
    }

    /// Runs one client command the guard let through (`connect` and `refresh` are the guard's);
    /// a command that did not parse is answered with its error.
    pub(crate) fn run_command(
        &mut self,
        parsed: Result<Command<'_>, CommandError>,
        out: &mut Vec<Output>,
    ) {
        let command = match parsed {
            Ok(command) => command,
            Err(e) => {
                self.node
                    .metrics()
                    .protocol_errors
                    .with_label_values(&[e.error.code])
                    .inc();
                out.push(Output::Reply(reply_err(e.id, &e.error)));
                return;
            }
        };
        match command {
            Command::Subscribe {
                id,
                channel,
                since,
                latest,
                delta,
            } => {
                let options = SubscribeOptions { latest, delta };
                self.subscribe(id, channel.into(), since, options, out)
            }
            Command::Unsubscribe { id, channel } => {
                out.push(Output::Reply(match self.unsubscribe(&channel) {
                    Ok(()) => reply_ok(id, &serde_json::Map::new()),
                    Err(error) => reply_err(id, &error),
                }));
            }
            Command::Publish {
                id,
                channel,
                data,
                idempotency_key,
                version,
            } => self.publish(
                id,
                channel.into(),
                backplane::json::compact(data.get()),
                idempotency_key.map(|k| k.into_owned()),
                version,
            ),
            Command::Ping { id } => out.push(Output::Reply(reply_ok(id, &serde_json::Map::new()))),
            Command::Presence {
                id,
                channel,
                count_only,
            } => {
                let node = self.node.clone();
                let channel = channel.into_owned();
                self.pending().push(
                    async move {
                        Completion::Replied(
                            match presence::read(&node, &channel, count_only).await {
                                Ok(answer) => reply_ok(id, &answer),
                                Err(error) => reply_err(id, &error),
                            },
                        )
                    }
                    .boxed(),
                );
            }
            // Answered by the guard.
            Command::Connect { .. } | Command::Refresh { .. } => {}
        }
    }

    /// Publishes on behalf of the client; the reply arrives as [`Output::Reply`].
    pub(crate) fn publish(
        &mut self,
        id: Option<u64>,
        channel: Arc<str>,
        data: Bytes,
        idempotency_key: Option<String>,
        version: Option<u64>,
    ) {
        let node = self.node.clone();
        self.pending().push(
            async move {
                let result = node
                    .publish(
                        &channel,
                        data,
                        idempotency_key
                            .as_deref()
                            .map(backplane::Idempotency::client),
                        version,
                    )
                    .await;
                Completion::Published { id, result }
            }
            .boxed(),
        );
    }

    fn leave_hub(&self, channel: &str) {
        if self.node.hub().remove(channel, self.conn) {
            let node = self.node.clone();
            let channel: Arc<str> = channel.into();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = node.hub().reconcile(node.backplane(), &channel).await {
                        tracing::warn!(%channel, error = %e, "backplane unsubscribe failed");
                    }
                });
            }
        }
    }

    /// Hands the connection's socket to the fan-out ([`crate::express`]) when nothing is in
    /// flight and every subscription is live and plain; `make` builds the express state from
    /// the channels' positions. Returns whether it was handed over.
    pub(crate) fn hand_over(&mut self, make: impl FnOnce(Vec<Lane>) -> Box<Express>) -> bool {
        if self.pending.is_some()
            || !self.unsubscribe_when_subscribed.is_empty()
            || self.queue.conflating()
        {
            return false;
        }
        match self.deliveries.lanes() {
            Some(lanes) => self.queue.hand_over(make(lanes)),
            None => false,
        }
    }

    /// Takes the socket back from the fan-out, if it has it: the channels continue after what
    /// it delivered, and what it did not write yet is returned, to be written first.
    pub(crate) fn take_back(&mut self) -> Option<Unsent> {
        let (lanes, unsent) = self.queue.take_back()?.into_parts();
        self.deliveries.resume_lanes(lanes);
        Some(unsent)
    }

    /// Waits for the next live publication or finished step. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Event {
        let busy = self.pending.as_ref().is_some_and(|p| !p.is_empty());
        let (queue, pending) = (&mut self.queue, &mut self.pending);
        let completion = tokio::select! {
            // In a fixed order, without a random start (this runs on every delivery): steps in
            // flight first, as they are rare and finite, while a busy channel's queue may never
            // run dry and would starve a subscribe's history read behind it.
            biased;
            Some(c) = async { pending.as_mut()?.next().await }, if busy => c,
            received = queue.recv() => return match received {
                Received::Publication(p) => Event::Live(p),
                Received::Control(command) => Event::Control(command),
                Received::HandedBack => Event::HandedBack,
            },
        };
        self.release_pending();
        Event::Done(completion)
    }

    /// The next event if one is ready now.
    fn try_next(&mut self) -> Option<Event> {
        if let Some(command) = self.queue.try_control() {
            return Some(Event::Control(command));
        }
        // Steps in flight before the queue, as in `next`.
        let done = self.pending.as_mut().and_then(|p| p.next().now_or_never());
        if let Some(completion) = done.flatten() {
            self.release_pending();
            return Some(Event::Done(completion));
        }
        self.queue.try_recv().map(Event::Live)
    }

    /// Applies whatever is ready now until `out` holds `batch` outputs, so a transport writes
    /// one batch rather than one output at a time — but one at a time while the queue
    /// conflates (see [`QueueReceiver::conflating`]).
    pub(crate) fn apply_ready(&mut self, out: &mut Vec<Output>, batch: usize) {
        let batch = if self.queue.conflating() { 1 } else { batch };
        while out.len() < batch {
            match self.try_next() {
                Some(event) => self.apply(event, out),
                None => break,
            }
        }
    }

    fn pending(&mut self) -> &mut FuturesUnordered<BoxFuture<'static, Completion>> {
        self.pending.get_or_insert_with(FuturesUnordered::new)
    }

    /// Frees the set of steps in progress once it is empty.
    fn release_pending(&mut self) {
        if self
            .pending
            .as_ref()
            .is_some_and(FuturesUnordered::is_empty)
        {
            self.pending = None;
        }
    }

    /// Applies an event, writing what must be sent to `out`.
    pub(crate) fn apply(&mut self, event: Event, out: &mut Vec<Output>) {
        let input = match event {
            Event::Control(command) => return self.control(command, out),
            Event::Live(p) => Input::Live(p),
            Event::HandedBack => return,
            Event::Done(Completion::Read(input)) => input,
            Event::Done(Completion::Published { id, result }) => {
                out.push(Output::Reply(match result {
                    Ok(ack) => reply_ok(id, &ack),
                    Err(e) => reply_err(id, &backplane_error(&e)),
                }));
                return;
            }
            Event::Done(Completion::Replied(reply)) => {
                out.push(Output::Reply(reply));
                return;
            }
        };
        if let Input::Page {
            channel,
            page: Err(e),
            ..
        } = &input
        {
            tracing::warn!(%channel, error = %e, "history read failed; retrying");
        }
        let catching_up = self.deliveries.catching_up();
        // Empty unless the rule asks for something: no allocation on the live path.
        let mut effects = Vec::new();
        let from = out.len();
        self.deliveries.apply(input, out, &mut effects);
        self.count_catching_up(catching_up);

        for effect in effects {
            match effect {
                Effect::Fetch {
                    gen,
                    channel,
                    since,
                    retry,
                } => self.fetch(gen, channel, since, retry),
                Effect::ReadFromStart {
                    gen,
                    channel,
                    id,
                    since,
                } => self.read_from_start(gen, channel, id, since),
                Effect::ReadLatest {
                    gen,
                    channel,
                    id,
                    since,
                } => self.read_latest(gen, channel, id, since),
                Effect::LeaveHub(channel) => self.leave_hub(&channel),
                Effect::Joined(channel) => self.join_presence(&channel),
                Effect::Resumed { recovered, reason } => {
                    self.node.count_resumes(recovered, reason, 1);
                }
            }
        }
        if !self.unsubscribe_when_subscribed.is_empty() {
            self.unsubscribe_deferred(out, from);
        }
    }

    /// Moves the catching-up gauge by what the rule changed since it counted `before`.
    fn count_catching_up(&self, before: usize) {
        let now = self.deliveries.catching_up();
        if now != before {
            let gauge = &self.node.metrics().catching_up;
            gauge.add(now as i64 - before as i64);
        }
    }

    fn fetch(&mut self, gen: u64, channel: Arc<str>, since: u64, retry: bool) {
        let node = self.node.clone();
        let limit = self.node.config().client.history_page_size;
        self.pending().push(
            async move {
                if retry {
                    tokio::time::sleep(FETCH_RETRY).await;
                }
                let page = node.history(&channel, since, limit).await;
                node.metrics().history_pages.inc();
                Completion::Read(Input::Page { gen, channel, page })
            }
            .boxed(),
        );
    }
}

/// `{"unsubscribed": {"channel": C, "reason": R}}`: the server ended a subscription.
pub(crate) fn unsubscribed_push(channel: &str, reason: &str) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "unsubscribed": {"channel": channel, "reason": reason}
    }))
    .expect("cannot fail")
    .into()
}

/// The publish time of the oldest live publication among `outputs` (0 if none), for the
/// fan-out latency of a written batch.
pub(crate) fn oldest_live(outputs: &[Output]) -> u64 {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Live(p) if p.published_us > 0 => Some(p.published_us),
            _ => None,
        })
        .min()
        .unwrap_or(0)
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(user) = self.user.take() {
            self.node.control().unregister(&user, self.conn);
        }
        let catching_up = self.deliveries.catching_up();
        let channels = self.deliveries.unsubscribe_all();
        self.count_catching_up(catching_up);
        for (channel, was_member) in channels {
            self.leave_hub(&channel);
            if was_member {
                self.leave_presence(&channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Runs the session until `out` holds an output `done` accepts.
    async fn run_until(session: &mut Session, out: &mut Vec<Output>, done: fn(&Output) -> bool) {
        let wait = async {
            while !out.iter().any(done) {
                let event = session.next().await;
                session.apply(event, out);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the session produced the output");
    }

    /// A server unsubscribe that arrives while the channel is still subscribing is applied once
    /// the subscription is set up: the client learns the start, then the end.
    #[tokio::test]
    async fn a_server_unsubscribe_during_the_subscribe_waits_for_it() {
        let node = Node::start(Config::default()).await.unwrap();
        let mut session = Session::new(node.clone(), 1);
        let mut out = Vec::new();
        session.subscribe(Some(1), "c".into(), None, Default::default(), &mut out);
        session.apply(Event::Control(Control::Unsubscribe("c".into())), &mut out);
        assert!(out.is_empty(), "nothing before the subscription is set up");
        run_until(&mut session, &mut out, |o| {
            matches!(o, Output::Unsubscribed { .. })
        })
        .await;
        let kinds: Vec<&str> = out
            .iter()
            .map(|o| match o {
                Output::Subscribed { .. } => "subscribed",
                Output::Unsubscribed { reason, .. } => reason,
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["subscribed", "server"]);
        assert!(!session.has_subscriptions());
    }

    /// A subscribe's read in flight is taken before queued publications: a busy channel whose
    /// queue never runs dry must not hold up another channel's subscribe behind it.
    #[tokio::test]
    async fn a_subscribe_is_not_held_up_behind_a_busy_queue() {
        let node = Node::start(Config::default()).await.unwrap();
        let mut session = Session::new(node.clone(), 1);
        let mut out = Vec::new();
        session.subscribe(Some(1), "busy".into(), None, Default::default(), &mut out);
        run_until(&mut session, &mut out, |o| {
            matches!(o, Output::Subscribed { .. })
        })
        .await;
        for n in 0..100 {
            let data = bytes::Bytes::from(n.to_string());
            node.publish("busy", data, None, None).await.unwrap();
        }
        out.clear();
        session.subscribe(Some(2), "other".into(), None, Default::default(), &mut out);
        run_until(&mut session, &mut out, |o| {
            matches!(o, Output::Subscribed { .. })
        })
        .await;
        let live_before = out
            .iter()
            .take_while(|o| !matches!(o, Output::Subscribed { .. }))
            .filter(|o| matches!(o, Output::Live(_)))
            .count();
        assert!(
            live_before < 100,
            "the subscribe waited for all {live_before} queued publications"
        );
    }

    /// A disconnect marks the session; an unsubscribe of a channel it does not hold is nothing.
    #[tokio::test]
    async fn a_disconnect_marks_the_session() {
        let node = Node::start(Config::default()).await.unwrap();
        let mut session = Session::new(node.clone(), 1);
        let mut out = Vec::new();
        session.apply(Event::Control(Control::Unsubscribe("x".into())), &mut out);
        assert!(out.is_empty() && !session.disconnected());
        session.apply(Event::Control(Control::Disconnect), &mut out);
        assert!(session.disconnected());
    }
}
