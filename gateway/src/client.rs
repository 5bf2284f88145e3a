//! A client session: its subscriptions and the rule that delivers each channel's publications
//! exactly once and in order, whatever the transport.
//!
//! Each subscription remembers the last offset it delivered. A live publication is written only
//! if it is the next one; an older one is a duplicate and dropped; a newer one reveals a gap,
//! which is filled from history in pages before live delivery resumes. While a subscription is
//! being set up or is catching up, live publications are not buffered — only the highest live
//! offset seen is kept — so memory stays bounded however large the gap. Publications are in
//! history before they are fanned out, so whatever was skipped live is found in history.

use std::sync::Arc;
use std::time::Duration;

use backplane::{BackplaneError, HistoryPage, Position, Publication, PublishAck};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rustc_hash::FxHashMap;

use crate::hub::ConnId;
use crate::node::Node;
use crate::protocol::{ErrorBody, SubscribeResult};
use crate::queue::{outbound, QueueReceiver, QueueSender};

/// Most commands a session runs at once; a transport stops reading commands beyond it.
pub const MAX_PENDING: usize = 256;
const FETCH_RETRY: Duration = Duration::from_secs(1);

/// What the session asks its transport to send, in order.
#[derive(Debug)]
pub enum Output {
    /// A finished command's JSON reply.
    Reply(Bytes),
    /// A subscription is set up; sent before any of the channel's publications.
    Subscribed {
        id: Option<u64>,
        result: SubscribeResult,
    },
    /// A subscription could not be set up; the channel is not subscribed.
    SubscribeFailed {
        id: Option<u64>,
        channel: Arc<str>,
        error: ErrorBody,
    },
    /// A publication read from history (resume or gap fill).
    Publication(Arc<Publication>),
    /// A publication delivered live, as fanned out.
    Live(Arc<Publication>),
    /// The channel's stream could not be continued: what was missed is lost. Delivery goes on
    /// after `offset` of `epoch`.
    Reset {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        reason: &'static str,
    },
}

/// Something for [`Session::apply`] to process.
pub enum Event {
    Live(Arc<Publication>),
    Done(Completion),
}

/// An asynchronous step of a command or a catch-up, finished.
pub enum Completion {
    Subscribed {
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: Option<Position>,
        result: Result<HistoryPage, BackplaneError>,
    },
    Page {
        gen: u64,
        channel: Arc<str>,
        result: Result<HistoryPage, BackplaneError>,
    },
    Published {
        id: Option<u64>,
        result: Result<PublishAck, BackplaneError>,
    },
}

enum State {
    /// Subscribe sent to hub and backplane; the first position is not known yet.
    Subscribing {
        live_max: u64,
    },
    /// Reading history from `delivered`; live publications only raise `live_max`.
    CatchingUp {
        live_max: u64,
    },
    Live,
}

struct Subscription {
    /// Tells this subscription's completions from those of an earlier one of the same channel.
    gen: u64,
    epoch: Arc<str>,
    delivered: u64,
    state: State,
}

/// The transport-independent state of one client connection.
pub struct Session {
    node: Arc<Node>,
    conn: ConnId,
    sender: QueueSender,
    queue: QueueReceiver,
    /// Looked up once per delivered publication: Fx hashing rather than SipHash (the keys are
    /// the client's own channels, at most `client.max_subscriptions` of them).
    subs: FxHashMap<Arc<str>, Subscription>,
    /// Commands and catch-ups in progress; `None` when there are none, so an idle session
    /// holds no allocation for them.
    pending: Option<FuturesUnordered<BoxFuture<'static, Completion>>>,
    next_gen: u64,
}

impl Session {
    pub fn new(node: Arc<Node>) -> Self {
        let (sender, queue) = outbound(node.config.client.queue_max_bytes);
        Session {
            conn: node.next_conn_id(),
            node,
            sender,
            queue,
            subs: FxHashMap::default(),
            pending: None,
            next_gen: 0,
        }
    }

    /// Whether the transport may hand over another command now.
    pub fn accepts_commands(&self) -> bool {
        self.pending.as_ref().map_or(0, FuturesUnordered::len) < MAX_PENDING
    }

    /// True once the outbound queue overflowed: the connection must be closed.
    pub fn overflowed(&self) -> bool {
        self.queue.overflowed()
    }

    /// The position delivered so far on a channel, if subscribed.
    pub fn position(&self, channel: &str) -> Option<(&Arc<str>, u64)> {
        self.subs.get(channel).map(|s| (&s.epoch, s.delivered))
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Starts a subscription; its outcome arrives later as [`Output::Subscribed`] or
    /// [`Output::SubscribeFailed`]. Immediate refusals are written to `out`.
    pub fn subscribe(
        &mut self,
        id: Option<u64>,
        channel: Arc<str>,
        since: Option<Position>,
        out: &mut Vec<Output>,
    ) {
        if self.subs.contains_key(&channel) {
            let error = ErrorBody::new(
                "already_subscribed",
                format!("already subscribed to {channel}"),
            );
            out.push(Output::SubscribeFailed { id, channel, error });
            return;
        }
        let max = self.node.config.client.max_subscriptions;
        if self.subs.len() >= max {
            let error = ErrorBody::new(
                "too_many_subscriptions",
                format!("a connection may subscribe to at most {max} channels"),
            );
            out.push(Output::SubscribeFailed { id, channel, error });
            return;
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        self.subs.insert(
            channel.clone(),
            Subscription {
                gen,
                epoch: "".into(),
                delivered: 0,
                state: State::Subscribing { live_max: 0 },
            },
        );
        // Joining the hub first means no publication fanned out from now on is missed; the
        // position read afterwards tells which of them are new.
        self.node.hub.add(&channel, self.conn, self.sender.clone());
        let node = self.node.clone();
        let page_size = self.node.config.client.history_page_size;
        self.pending().push(
            async move {
                let result = match node.reconcile(&channel).await {
                    Ok(()) => match &since {
                        Some(since) => node.history(&channel, since.offset, page_size).await,
                        None => node.history(&channel, u64::MAX, 0).await,
                    },
                    Err(e) => Err(e),
                };
                Completion::Subscribed {
                    gen,
                    channel,
                    id,
                    since,
                    result,
                }
            }
            .boxed(),
        );
    }

    /// Ends a subscription at once.
    pub fn unsubscribe(&mut self, channel: &str) -> Result<(), ErrorBody> {
        let Some(sub) = self.subs.remove(channel) else {
            return Err(ErrorBody::new(
                "not_subscribed",
                format!("not subscribed to {channel}"),
            ));
        };
        self.forget(&sub);
        self.leave_hub(channel);
        Ok(())
    }

    /// Keeps the catching-up gauge right when a subscription goes away.
    fn forget(&self, sub: &Subscription) {
        if matches!(sub.state, State::CatchingUp { .. }) {
            self.node.metrics.catching_up.dec();
        }
    }

    /// Publishes on behalf of the client; the reply arrives as [`Output::Reply`].
    pub fn publish(
        &mut self,
        id: Option<u64>,
        channel: Arc<str>,
        data: Bytes,
        idempotency_key: Option<String>,
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
                    )
                    .await;
                Completion::Published { id, result }
            }
            .boxed(),
        );
    }

    fn leave_hub(&self, channel: &str) {
        if self.node.hub.remove(channel, self.conn) {
            let node = self.node.clone();
            let channel: Arc<str> = channel.into();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = node.hub.reconcile(&*node.backplane, &channel).await {
                        tracing::warn!(%channel, error = %e, "backplane unsubscribe failed");
                    }
                });
            }
        }
    }

    /// Waits for the next live publication or finished step. Cancel-safe.
    pub async fn next(&mut self) -> Event {
        let busy = self.pending.as_ref().is_some_and(|p| !p.is_empty());
        let (queue, pending) = (&mut self.queue, &mut self.pending);
        let completion = tokio::select! {
            p = queue.recv() => return Event::Live(p),
            Some(c) = async { pending.as_mut()?.next().await }, if busy => c,
        };
        self.release_pending();
        Event::Done(completion)
    }

    /// The next event if one is ready now, so a transport can batch its writes.
    pub fn try_next(&mut self) -> Option<Event> {
        if let Some(p) = self.queue.try_recv() {
            return Some(Event::Live(p));
        }
        let completion = self.pending.as_mut()?.next().now_or_never().flatten()?;
        self.release_pending();
        Some(Event::Done(completion))
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
    pub fn apply(&mut self, event: Event, out: &mut Vec<Output>) {
        match event {
            Event::Live(p) => self.on_live(p, out),
            Event::Done(Completion::Subscribed {
                gen,
                channel,
                id,
                since,
                result,
            }) => self.on_subscribed(gen, channel, id, since, result, out),
            Event::Done(Completion::Page {
                gen,
                channel,
                result,
            }) => self.on_page(gen, channel, result, out),
            Event::Done(Completion::Published { id, result }) => {
                out.push(Output::Reply(match result {
                    Ok(ack) => crate::protocol::reply_ok(id, &ack),
                    Err(e) => crate::protocol::reply_err(id, &backplane_error(&e)),
                }));
            }
        }
    }

    fn on_live(&mut self, p: Arc<Publication>, out: &mut Vec<Output>) {
        let Some(sub) = self.subs.get_mut(&*p.channel) else {
            return;
        };
        match &mut sub.state {
            State::Subscribing { live_max } | State::CatchingUp { live_max } => {
                *live_max = (*live_max).max(p.offset);
            }
            State::Live => {
                if p.epoch != sub.epoch {
                    // The channel's history was lost and restarted: continue with the new epoch.
                    sub.epoch = p.epoch.clone();
                    sub.delivered = p.offset - 1;
                    out.push(Output::Reset {
                        channel: p.channel.clone(),
                        epoch: p.epoch.clone(),
                        offset: sub.delivered,
                        reason: "epoch_changed",
                    });
                }
                if p.offset == sub.delivered + 1 {
                    sub.delivered = p.offset;
                    out.push(Output::Live(p));
                } else if p.offset > sub.delivered + 1 {
                    sub.state = State::CatchingUp { live_max: p.offset };
                    self.node.metrics.catching_up.inc();
                    let (gen, since) = (sub.gen, sub.delivered);
                    self.fetch(gen, p.channel.clone(), since, Duration::ZERO);
                }
            }
        }
    }

    fn on_subscribed(
        &mut self,
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: Option<Position>,
        result: Result<HistoryPage, BackplaneError>,
        out: &mut Vec<Output>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.gen == gen) else {
            return;
        };
        let page = match result {
            Ok(page) => page,
            Err(e) => {
                self.subs.remove(&channel);
                self.leave_hub(&channel);
                out.push(Output::SubscribeFailed {
                    id,
                    channel,
                    error: backplane_error(&e),
                });
                return;
            }
        };
        let State::Subscribing { live_max } = sub.state else {
            return;
        };
        let first = page.publications.first().map(|p| p.offset);
        let (recovered, reason, delivered) = match &since {
            None => (false, None, page.top),
            Some(s) if *s.epoch != *page.epoch => (false, Some("epoch_changed"), page.top),
            Some(s) if s.offset > page.top => (false, Some("offset_ahead"), page.top),
            Some(s) if s.offset == page.top || first == Some(s.offset + 1) => {
                (true, None, s.offset)
            }
            Some(_) => (false, Some("history_truncated"), page.top),
        };
        if since.is_some() {
            let result = if recovered {
                "recovered"
            } else {
                "not_recovered"
            };
            self.node
                .metrics
                .resumes
                .with_label_values(&[result, reason.unwrap_or("none")])
                .inc();
        }
        sub.epoch = page.epoch.clone();
        sub.delivered = delivered;
        out.push(Output::Subscribed {
            id,
            result: SubscribeResult {
                channel: channel.clone(),
                epoch: page.epoch.clone(),
                offset: page.top,
                recovered,
                reason,
            },
        });
        let mut more = false;
        if recovered {
            more = deliver_page(
                sub,
                &channel,
                &page,
                self.node.config.client.history_page_size,
                out,
            );
        }
        self.continue_or_go_live(gen, channel, more, live_max);
    }

    fn on_page(
        &mut self,
        gen: u64,
        channel: Arc<str>,
        result: Result<HistoryPage, BackplaneError>,
        out: &mut Vec<Output>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.gen == gen) else {
            return;
        };
        let State::CatchingUp { live_max } = sub.state else {
            return;
        };
        let page = match result {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "history read failed; retrying");
                let since = sub.delivered;
                self.fetch(gen, channel, since, FETCH_RETRY);
                return;
            }
        };
        if page.epoch != sub.epoch {
            sub.epoch = page.epoch.clone();
            sub.delivered = page.top;
            sub.state = State::Live;
            self.node.metrics.catching_up.dec();
            out.push(Output::Reset {
                channel,
                epoch: page.epoch,
                offset: page.top,
                reason: "epoch_changed",
            });
            return;
        }
        let more = deliver_page(
            sub,
            &channel,
            &page,
            self.node.config.client.history_page_size,
            out,
        );
        self.continue_or_go_live(gen, channel, more, live_max);
    }

    fn continue_or_go_live(&mut self, gen: u64, channel: Arc<str>, more: bool, live_max: u64) {
        let Some(sub) = self.subs.get_mut(&channel) else {
            return;
        };
        let was_catching_up = matches!(sub.state, State::CatchingUp { .. });
        if more || live_max > sub.delivered {
            if !was_catching_up {
                self.node.metrics.catching_up.inc();
            }
            sub.state = State::CatchingUp { live_max };
            let since = sub.delivered;
            self.fetch(gen, channel, since, Duration::ZERO);
        } else {
            if was_catching_up {
                self.node.metrics.catching_up.dec();
            }
            sub.state = State::Live;
        }
    }

    fn fetch(&mut self, gen: u64, channel: Arc<str>, since: u64, delay: Duration) {
        let node = self.node.clone();
        let limit = self.node.config.client.history_page_size;
        self.pending().push(
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let result = node.history(&channel, since, limit).await;
                node.metrics.history_pages.inc();
                Completion::Page {
                    gen,
                    channel,
                    result,
                }
            }
            .boxed(),
        );
    }
}

/// Writes a page's publications that follow `sub.delivered`; reports a gap the history can no
/// longer fill as a reset. Returns whether history holds more after this page.
fn deliver_page(
    sub: &mut Subscription,
    channel: &Arc<str>,
    page: &HistoryPage,
    page_size: usize,
    out: &mut Vec<Output>,
) -> bool {
    let first = page.publications.first().map(|p| p.offset);
    let lost_to = match first {
        Some(first) if first > sub.delivered + 1 => Some(first - 1),
        None if page.top > sub.delivered => Some(page.top),
        _ => None,
    };
    if let Some(offset) = lost_to {
        sub.delivered = offset;
        out.push(Output::Reset {
            channel: channel.clone(),
            epoch: sub.epoch.clone(),
            offset,
            reason: "history_truncated",
        });
    }
    for p in &page.publications {
        if p.offset == sub.delivered + 1 {
            sub.delivered = p.offset;
            out.push(Output::Publication(p.clone()));
        }
    }
    page.publications.len() >= page_size && sub.delivered < page.top
}

/// The publish time of the oldest live publication among `outputs` (0 if none), for the
/// fan-out latency of a written batch.
pub fn oldest_live(outputs: &[Output]) -> u64 {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Live(p) if p.published_us > 0 => Some(p.published_us),
            _ => None,
        })
        .min()
        .unwrap_or(0)
}

/// The error a client sees when the backplane fails.
pub fn backplane_error(e: &BackplaneError) -> ErrorBody {
    match e {
        BackplaneError::Unavailable(_) => ErrorBody::new("backplane_unavailable", e.to_string()),
        BackplaneError::Invalid(_) => ErrorBody::new("bad_request", e.to_string()),
        BackplaneError::Conflict(_) => ErrorBody::new("idempotency_conflict", e.to_string()),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for (channel, sub) in std::mem::take(&mut self.subs) {
            self.forget(&sub);
            self.leave_hub(&channel);
        }
    }
}
