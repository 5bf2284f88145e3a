//! The delivery rule of one session, pure: no tokio, no node, no I/O. It holds a session's
//! subscriptions and decides, for every event, what the client is sent and which history read
//! comes next; the driver (`session`) runs those reads, touches the hub and counts metrics.
//!
//! Each subscription remembers the last offset it delivered. A live publication is written only
//! if it is the next one; an older one is a duplicate and dropped; a newer one reveals a gap,
//! which is filled from history in pages before live delivery resumes. While a subscription is
//! being set up or is catching up, live publications are not buffered — only the highest live
//! offset seen is kept — so memory stays bounded however large the gap. Publications are in
//! history before they are fanned out, so whatever was skipped live is found in history.
//!
//! A new epoch is delivered from its start: its first page is read before the one reset that
//! announces it, so the reset says exactly where delivery goes on. Offset 0 carries no epoch: a
//! subscription that delivered nothing adopts a new epoch silently, and a resume from offset 0 of
//! any epoch is a resume from the start. A resume whose tag differs from the tag history has at
//! the position is not recovered (`history_diverged`): the store reused the offset.
//!
//! A subscription from the latest value reads the channel's top, then resumes from the offset
//! before it: the newest publication is delivered from history, then live ones, by the same rule
//! as any resume. When that publication is no longer in history, it starts at the top instead.
//!
//! A subscription that asked for deltas gets a live publication in its delta form (shared, made
//! once per node) only when the last publication it sent the client is the very one the delta is
//! against: a position the client brought (a resume, a cursor) says nothing of whether it still
//! has that publication's data. Anything from history goes in full, and so does the first
//! publication after subscribing, a reset or an epoch change.

use std::sync::Arc;

use crate::express::Lane;
use crate::protocol::{
    backplane_error, check_subscription_count, error_code, reset_reason, ErrorBody, Reset,
    SubscribeResult,
};
use crate::session::channel_map::ChannelMap;
use backplane::{BackplaneError, HistoryPage, Position, Publication};
use bytes::Bytes;

/// What the session asks its transport to send, in order.
#[derive(Debug)]
pub(crate) enum Output {
    /// A finished command's JSON reply.
    Reply(Bytes),
    /// A subscription is set up; sent before any of the channel's publications.
    Subscribed {
        id: Option<u64>,
        /// Boxed, as is a failure's error: every output in a batch is as large as its largest
        /// kind, and these come once per subscription.
        result: Box<SubscribeResult>,
        /// The offset delivery continues after, and the tag there when known: the requested
        /// position when recovered, the new epoch's start after `epoch_changed` (before the
        /// first publication delivered from it), else `result.offset`. What a cursor names
        /// until the channel's first delivered publication.
        start: (u64, Option<u32>),
    },
    /// A subscription could not be set up; the channel is not subscribed.
    SubscribeFailed {
        id: Option<u64>,
        channel: Arc<str>,
        error: Box<ErrorBody>,
    },
    /// A publication read from history (resume or gap fill).
    History(Arc<Publication>),
    /// A publication delivered live, as fanned out.
    Live(Arc<Publication>),
    /// A presence event (join or leave) of a subscribed channel, in its place among the
    /// channel's publications; it moves no position.
    Presence(Arc<Publication>),
    /// The channel's stream could not be continued: what was missed is lost. Delivery goes on
    /// after `offset` of `epoch`.
    Reset {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        reason: &'static str,
    },
    /// The server ended a subscription (`reason`: `permission_revoked` after a `refresh`,
    /// `server` by `POST /api/unsubscribe`); nothing more of the channel follows.
    Unsubscribed {
        channel: Arc<str>,
        reason: &'static str,
    },
}

impl Output {
    /// The `{"reset": ...}` push of an [`Output::Reset`] (WebSocket, long-poll); `None` for any
    /// other output.
    pub(crate) fn reset_push(&self) -> Option<Bytes> {
        match self {
            Output::Reset {
                channel,
                epoch,
                offset,
                reason,
            } => Some(
                Reset {
                    channel,
                    epoch,
                    offset: *offset,
                    reason,
                }
                .to_push(),
            ),
            _ => None,
        }
    }
}

/// What happened to the session's subscriptions.
pub(crate) enum Input {
    /// A live publication fanned out to the connection.
    Live(Arc<Publication>),
    /// The first read of a subscription (its top, and with `since` the page after it).
    Subscribed {
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: Option<Position>,
        /// Whether the page was read from offset 0 rather than after `since` (asked for by
        /// [`Effect::ReadFromStart`]).
        from_start: bool,
        page: Result<HistoryPage, BackplaneError>,
    },
    /// A history page asked for by [`Effect::Fetch`].
    Page {
        gen: u64,
        channel: Arc<str>,
        page: Result<HistoryPage, BackplaneError>,
    },
}

/// What the driver must do besides sending outputs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Read the page of `channel` after `since`; `retry` after a failed read (wait first).
    Fetch {
        gen: u64,
        channel: Arc<str>,
        since: u64,
        retry: bool,
    },
    /// A resume met another epoch: read its first page from offset 0 and feed it back as
    /// [`Input::Subscribed`] with `from_start`, so the result can say where delivery goes on.
    ReadFromStart {
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: Position,
    },
    /// A subscription from the latest value learnt the channel's top: read the page after
    /// `since` (the offset before it) and feed it back as [`Input::Subscribed`] without `since`.
    ReadLatest {
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: u64,
    },
    /// The subscription ended without an unsubscribe command: leave the hub.
    LeaveHub(Arc<str>),
    /// The subscription is set up (its `subscribed` result is out): the connection is now a
    /// member of the channel.
    Joined(Arc<str>),
    /// A resume was decided, for `gateway_resumes_total`.
    Resumed {
        recovered: bool,
        reason: Option<&'static str>,
    },
}

enum State {
    /// Joined the hub; the first read is in flight, its position not known yet.
    Subscribing {
        live_max: u64,
    },
    /// Reading history from `delivered`; live publications only raise `live_max`.
    CatchingUp {
        live_max: u64,
    },
    Live,
}

/// How a subscription starts, besides its position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SubscribeOptions {
    /// With no position: deliver the channel's newest publication first (the latest value),
    /// then live ones.
    pub(crate) latest: bool,
    /// Live publications in their delta form when it is smaller and applies.
    pub(crate) delta: bool,
}

/// Where a subscription from the latest value is in its two reads.
enum Latest {
    /// Not asked for, or decided.
    No,
    /// Asked for; the first read (the channel's top) is in flight.
    Wanted,
    /// The first read found the channel at `top` of `epoch`; the page after `top - 1` is in
    /// flight.
    Reading { epoch: Arc<str>, top: u64 },
}

struct Subscription {
    /// Tells this subscription's reads from those of an earlier one of the same channel.
    gen: u64,
    epoch: Arc<str>,
    delivered: u64,
    /// The tag of the publication at `delivered`, when known.
    tag: Option<u32>,
    /// Another epoch seen live while not live; `live_max` counts its offsets.
    newer_epoch: Option<Arc<str>>,
    /// The `since` of the catch-up read in flight.
    reading_since: u64,
    state: State,
    /// Presence events that arrived while not live, held until delivery passes the
    /// publication each follows (at most [`HELD_EVENTS`]; they are at-most-once).
    held_events: Vec<Arc<Publication>>,
    latest: Latest,
    delta: bool,
    /// Offset and tag of the last publication this subscription sent, in `epoch`: the only
    /// base a delta may be sent against.
    sent: Option<(u64, u32)>,
}

/// Presence events a subscription holds while catching up; later ones are dropped.
const HELD_EVENTS: usize = 64;

impl Subscription {
    /// Writes the held presence events that follow publications delivered already.
    fn release_events(&mut self, out: &mut Vec<Output>) {
        if self.held_events.is_empty() {
            return;
        }
        let (epoch, delivered) = (&self.epoch, self.delivered);
        let newer = self.newer_epoch.as_ref();
        let mut kept = Vec::new();
        for event in self.held_events.drain(..) {
            let ahead = event.epoch == *epoch && event.offset > delivered;
            if ahead || newer == Some(&event.epoch) {
                kept.push(event);
            } else {
                out.push(Output::Presence(event));
            }
        }
        self.held_events = kept;
    }

    /// Whether the subscription is set up: its first read landed and was answered.
    fn is_set_up(&self) -> bool {
        !matches!(self.state, State::Subscribing { .. })
    }

    /// Writes every held presence event (the subscription went live).
    fn release_all_events(&mut self, out: &mut Vec<Output>) {
        out.extend(self.held_events.drain(..).map(Output::Presence));
    }
}

/// The subscriptions of one session and the rule that delivers each channel exactly once, in
/// order.
pub(crate) struct Deliveries {
    /// Looked up once per delivered publication (the keys are the client's own channels, at
    /// most `client.max_subscriptions` of them).
    subs: ChannelMap<Subscription>,
    next_gen: u64,
    page_size: usize,
    max_subscriptions: usize,
    /// How many subscriptions are catching up, for the `gateway_catching_up` gauge.
    catching_up: usize,
}

/// How a resume (a subscribe with a position) turned out.
struct Resume {
    recovered: bool,
    reason: Option<&'static str>,
    /// The offset delivery continues after.
    continue_after: u64,
    /// The tag of the publication at `continue_after`, when known.
    tag: Option<u32>,
    /// Whether the first page is delivered (recovered, or a new epoch from its start).
    deliver_page: bool,
    /// For a subscription from the latest value: whether the newest publication is delivered.
    latest: Option<bool>,
}

/// The epoch of a position that names none (a compact SSE cursor's): it matches whichever epoch
/// the channel has, and the transport checks what was recovered afterwards. No node issues it
/// (epochs are 16 hex digits), and neither a WebSocket `since` nor a full cursor may carry it.
pub(crate) const ANY_EPOCH: &str = "*";

fn is_any_epoch(epoch: &str) -> bool {
    epoch == ANY_EPOCH
}

/// Where a new epoch is delivered from: before its first retained publication, or after its top
/// when history holds none.
fn start_of(page: &HistoryPage) -> u64 {
    page.publications.first().map_or(page.top, |p| p.offset - 1)
}

/// Where a subscription with `since` continues, given the first read of its channel; `None`
/// when the channel is in another epoch and the page was not read from its start.
fn decide_resume(since: Option<&Position>, page: &HistoryPage, from_start: bool) -> Option<Resume> {
    let first = page.publications.first().map(|p| p.offset);
    let at_top = |recovered, reason| Resume {
        recovered,
        reason,
        continue_after: page.top,
        tag: page.top_tag,
        deliver_page: false,
        latest: None,
    };
    let recovered_after = |offset, tag| Resume {
        recovered: true,
        reason: None,
        continue_after: offset,
        tag,
        deliver_page: true,
        latest: None,
    };
    let Some(s) = since else {
        return Some(at_top(false, None));
    };
    let diverged = matches!((s.tag, page.since_tag), (Some(held), Some(now)) if held != now);
    let same_epoch = *s.epoch == *page.epoch || (is_any_epoch(&s.epoch) && !page.epoch.is_empty());
    Some(match s {
        // Offset 0 carries no epoch: every epoch starts there.
        s if s.offset == 0 && (first == Some(1) || page.top == 0) => recovered_after(0, None),
        s if s.offset == 0 => at_top(false, Some(reset_reason::HISTORY_TRUNCATED)),
        _ if !same_epoch && !from_start => return None,
        _ if !same_epoch => Resume {
            recovered: false,
            reason: Some(reset_reason::EPOCH_CHANGED),
            continue_after: start_of(page),
            tag: page
                .publications
                .is_empty()
                .then_some(page.top_tag)
                .flatten(),
            deliver_page: true,
            latest: None,
        },
        s if s.offset > page.top => at_top(false, Some(reset_reason::OFFSET_AHEAD)),
        _ if diverged => at_top(false, Some(reset_reason::HISTORY_DIVERGED)),
        s if s.offset == page.top || first == Some(s.offset + 1) => {
            recovered_after(s.offset, s.tag.or(page.since_tag))
        }
        _ => at_top(false, Some(reset_reason::HISTORY_TRUNCATED)),
    })
}

/// Where a subscription from the latest value continues, given the page read after `top - 1`
/// where its first read found the channel at `top` of `epoch` (`None`: no publication then).
/// The newest publication is delivered only if it is still the first one the page holds in that
/// epoch; otherwise (expired, trimmed, or the channel restarted) delivery starts at the top.
fn decide_latest(first_read: Option<(&Arc<str>, u64)>, page: &HistoryPage) -> Resume {
    let first = page.publications.first().map(|p| p.offset);
    match first_read {
        Some((epoch, top)) if *epoch == page.epoch && first == Some(top) => Resume {
            recovered: false,
            reason: None,
            continue_after: top - 1,
            tag: page.since_tag,
            deliver_page: true,
            latest: Some(true),
        },
        _ => Resume {
            recovered: false,
            reason: None,
            continue_after: page.top,
            tag: page.top_tag,
            deliver_page: false,
            latest: Some(false),
        },
    }
}

impl Deliveries {
    pub(crate) fn new(page_size: usize, max_subscriptions: usize) -> Self {
        Deliveries {
            subs: ChannelMap::default(),
            next_gen: 0,
            page_size,
            max_subscriptions,
            catching_up: 0,
        }
    }

    /// The position delivered so far on a channel, if subscribed: epoch, offset and the tag of
    /// the publication there when known.
    pub(crate) fn position(&self, channel: &str) -> Option<(&Arc<str>, u64, Option<u32>)> {
        self.subs
            .get(channel)
            .map(|s| (&s.epoch, s.delivered, s.tag))
    }

    /// Every channel's position, when each subscription is live and plain (no delta, no latest
    /// value pending, nothing held): what express delivery needs to continue every channel
    /// exactly as [`Deliveries::apply`] would ([`crate::express`]). `None` otherwise, or with
    /// no subscription.
    pub(crate) fn lanes(&self) -> Option<Vec<Lane>> {
        if self.subs.len() == 0 {
            return None;
        }
        let mut lanes = Vec::with_capacity(self.subs.len());
        for (channel, sub) in self.subs.iter() {
            let plain = matches!(sub.state, State::Live)
                && !sub.delta
                && sub.held_events.is_empty()
                && sub.newer_epoch.is_none()
                && matches!(sub.latest, Latest::No);
            if !plain {
                return None;
            }
            lanes.push(Lane {
                channel: channel.clone(),
                epoch: sub.epoch.clone(),
                delivered: sub.delivered,
                tag: sub.tag,
            });
        }
        Some(lanes)
    }

    /// Takes back the positions express delivery reached: what it delivered counts as
    /// delivered here, so the next publication continues after it.
    pub(crate) fn resume_lanes(&mut self, lanes: Vec<Lane>) {
        for lane in lanes {
            let Some(sub) = self.subs.get_mut(&lane.channel) else {
                continue;
            };
            if matches!(sub.state, State::Live)
                && sub.epoch == lane.epoch
                && lane.delivered > sub.delivered
            {
                sub.delivered = lane.delivered;
                sub.tag = lane.tag;
                sub.sent = lane.tag.map(|tag| (lane.delivered, tag));
            }
        }
    }

    /// Whether the channel's subscription is still being set up (its first read in flight).
    pub(crate) fn is_subscribing(&self, channel: &str) -> bool {
        self.subs
            .get(channel)
            .is_some_and(|s| matches!(s.state, State::Subscribing { .. }))
    }

    /// The channels subscribed (subscribing ones included).
    pub(crate) fn channels(&self) -> impl Iterator<Item = &Arc<str>> {
        self.subs.keys()
    }

    /// How many subscriptions are reading history to fill a gap or resume.
    pub(crate) fn catching_up(&self) -> usize {
        self.catching_up
    }

    /// Starts a subscription; returns the generation its first read must carry
    /// ([`Input::Subscribed`]).
    #[cfg(test)]
    pub(crate) fn subscribe(&mut self, channel: &Arc<str>) -> Result<u64, ErrorBody> {
        self.subscribe_with(channel, SubscribeOptions::default())
    }

    /// [`Deliveries::subscribe`] with options; `latest` applies when the first read comes
    /// without a position.
    pub(crate) fn subscribe_with(
        &mut self,
        channel: &Arc<str>,
        options: SubscribeOptions,
    ) -> Result<u64, ErrorBody> {
        if self.subs.contains_key(channel) {
            return Err(ErrorBody::new(
                error_code::ALREADY_SUBSCRIBED,
                format!("already subscribed to {channel}"),
            ));
        }
        check_subscription_count(self.subs.len() + 1, self.max_subscriptions)?;
        self.next_gen += 1;
        let gen = self.next_gen;
        let sub = Subscription {
            gen,
            epoch: "".into(),
            delivered: 0,
            tag: None,
            newer_epoch: None,
            reading_since: 0,
            state: State::Subscribing { live_max: 0 },
            held_events: Vec::new(),
            latest: if options.latest {
                Latest::Wanted
            } else {
                Latest::No
            },
            delta: options.delta,
            sent: None,
        };
        self.subs.insert_new(channel.clone(), sub);
        Ok(gen)
    }

    /// Ends a subscription at once; reads still in flight for it are ignored when they land.
    /// Returns whether it was set up ([`Effect::Joined`] was issued for it).
    pub(crate) fn unsubscribe(&mut self, channel: &str) -> Result<bool, ErrorBody> {
        match self.subs.remove(channel) {
            Some(sub) => {
                self.forget(&sub);
                Ok(sub.is_set_up())
            }
            None => Err(ErrorBody::new(
                error_code::NOT_SUBSCRIBED,
                format!("not subscribed to {channel}"),
            )),
        }
    }

    /// Ends every subscription; returns their channels and whether each was set up (the
    /// session is going away).
    pub(crate) fn unsubscribe_all(&mut self) -> Vec<(Arc<str>, bool)> {
        let subs = self.subs.take_all();
        subs.into_iter()
            .map(|(channel, sub)| {
                self.forget(&sub);
                (channel, sub.is_set_up())
            })
            .collect()
    }

    fn forget(&mut self, sub: &Subscription) {
        if matches!(sub.state, State::CatchingUp { .. }) {
            self.catching_up -= 1;
        }
    }

    /// Applies one input, appending what must be sent to `out` and what the driver must do to
    /// `effects`.
    pub(crate) fn apply(&mut self, input: Input, out: &mut Vec<Output>, effects: &mut Vec<Effect>) {
        match input {
            Input::Live(p) => self.on_live(p, out, effects),
            Input::Subscribed {
                gen,
                channel,
                id,
                since,
                from_start,
                page,
            } => self.on_subscribed(gen, channel, id, since, from_start, page, out, effects),
            Input::Page { gen, channel, page } => self.on_page(gen, channel, page, out, effects),
        }
    }

    fn on_live(&mut self, p: Arc<Publication>, out: &mut Vec<Output>, effects: &mut Vec<Effect>) {
        if !p.is_publication() {
            return self.on_presence_event(p, out, effects);
        }
        let Some(sub) = self.subs.get_mut(&p.channel) else {
            return;
        };
        match &mut sub.state {
            State::Subscribing { live_max } | State::CatchingUp { live_max } => {
                let newest = sub.newer_epoch.as_ref().unwrap_or(&sub.epoch);
                if p.epoch == *newest {
                    *live_max = (*live_max).max(p.offset);
                } else if p.epoch != sub.epoch {
                    // Another epoch: read it from its start once the read in flight lands.
                    sub.newer_epoch = Some(p.epoch.clone());
                    *live_max = p.offset;
                }
            }
            State::Live => {
                if p.epoch != sub.epoch {
                    if sub.delivered > 0 {
                        // The channel's history was lost and restarted: read the new epoch
                        // from its start, then reset to where it begins.
                        sub.newer_epoch = Some(p.epoch.clone());
                        sub.state = State::CatchingUp { live_max: p.offset };
                        self.catching_up += 1;
                        sub.reading_since = 0;
                        effects.push(Effect::Fetch {
                            gen: sub.gen,
                            channel: p.channel.clone(),
                            since: 0,
                            retry: false,
                        });
                        return;
                    }
                    // Nothing delivered yet: offset 0 belongs to every epoch.
                    sub.epoch = p.epoch.clone();
                    sub.tag = None;
                }
                // A conflating queue may have dropped some before it, and says how many: they
                // are skipped, not a gap to fill.
                let missed = p.offset.saturating_sub(sub.delivered + 1);
                if p.offset > sub.delivered && missed > 0 && missed <= p.skipped {
                    sub.delivered = p.offset;
                    sub.tag = Some(p.tag);
                    sub.sent = Some((p.offset, p.tag));
                    out.push(Output::Live(Arc::new(p.skipped_form(missed))));
                } else if p.offset == sub.delivered + 1 {
                    let base = sub.sent.filter(|(offset, _)| offset + 1 == p.offset);
                    let delta = match base {
                        Some((_, tag)) if sub.delta => p.delta_for(Some(tag)),
                        _ => None,
                    };
                    sub.delivered = p.offset;
                    sub.tag = Some(p.tag);
                    sub.sent = Some((p.offset, p.tag));
                    out.push(Output::Live(delta.unwrap_or(p)));
                } else if p.offset > sub.delivered + 1 {
                    sub.state = State::CatchingUp { live_max: p.offset };
                    self.catching_up += 1;
                    sub.reading_since = sub.delivered;
                    effects.push(Effect::Fetch {
                        gen: sub.gen,
                        channel: p.channel.clone(),
                        since: sub.delivered,
                        retry: false,
                    });
                }
            }
        }
    }

    /// A join or leave: written once the publication it follows is delivered. Live, it is
    /// normally delivered at once; one that follows a publication not delivered yet reveals a
    /// gap, read like any other, and waits for it.
    fn on_presence_event(
        &mut self,
        event: Arc<Publication>,
        out: &mut Vec<Output>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(sub) = self.subs.get_mut(&event.channel) else {
            return;
        };
        let ahead = event.epoch == sub.epoch && event.offset > sub.delivered;
        match &mut sub.state {
            State::Live if !ahead => out.push(Output::Presence(event)),
            State::Live => {
                sub.state = State::CatchingUp {
                    live_max: event.offset,
                };
                self.catching_up += 1;
                sub.reading_since = sub.delivered;
                effects.push(Effect::Fetch {
                    gen: sub.gen,
                    channel: event.channel.clone(),
                    since: sub.delivered,
                    retry: false,
                });
                sub.held_events.push(event);
            }
            State::Subscribing { live_max } | State::CatchingUp { live_max } => {
                if event.epoch == *sub.newer_epoch.as_ref().unwrap_or(&sub.epoch) {
                    *live_max = (*live_max).max(event.offset);
                }
                if sub.held_events.len() < HELD_EVENTS {
                    sub.held_events.push(event);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_subscribed(
        &mut self,
        gen: u64,
        channel: Arc<str>,
        id: Option<u64>,
        since: Option<Position>,
        from_start: bool,
        page: Result<HistoryPage, BackplaneError>,
        out: &mut Vec<Output>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.gen == gen) else {
            return;
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                self.subs.remove(&channel);
                effects.push(Effect::LeaveHub(channel.clone()));
                out.push(Output::SubscribeFailed {
                    id,
                    channel,
                    error: Box::new(backplane_error(&e)),
                });
                return;
            }
        };
        let State::Subscribing { live_max } = sub.state else {
            return;
        };
        let latest = match std::mem::replace(&mut sub.latest, Latest::No) {
            _ if since.is_some() => None,
            Latest::No => None,
            Latest::Wanted if page.top > 0 => {
                // Resume from just before the top: one more read, then the rule of a resume.
                let (epoch, top) = (page.epoch.clone(), page.top);
                sub.latest = Latest::Reading { epoch, top };
                effects.push(Effect::ReadLatest {
                    gen,
                    channel,
                    id,
                    since: top - 1,
                });
                return;
            }
            Latest::Wanted => Some(decide_latest(None, &page)),
            Latest::Reading { epoch, top } => Some(decide_latest(Some((&epoch, top)), &page)),
        };
        let Some(resume) = latest.or_else(|| decide_resume(since.as_ref(), &page, from_start))
        else {
            let since = since.expect("only a resume reads again");
            effects.push(Effect::ReadFromStart {
                gen,
                channel,
                id,
                since,
            });
            return;
        };
        // A compact cursor's recovered positions are counted once the transport checked them.
        let checked_later =
            resume.recovered && since.as_ref().is_some_and(|s| is_any_epoch(&s.epoch));
        if since.is_some() && !checked_later {
            effects.push(Effect::Resumed {
                recovered: resume.recovered,
                reason: resume.reason,
            });
        }
        sub.epoch = page.epoch.clone();
        sub.delivered = resume.continue_after;
        sub.tag = resume.tag;
        effects.push(Effect::Joined(channel.clone()));
        out.push(Output::Subscribed {
            id,
            start: (resume.continue_after, resume.tag),
            result: Box::new(SubscribeResult {
                channel: channel.clone(),
                epoch: page.epoch.clone(),
                offset: page.top,
                recovered: resume.recovered,
                reason: resume.reason,
                tag: page.top_tag,
                latest: resume.latest,
            }),
        });
        let more = resume.deliver_page && deliver_page(sub, &channel, &page, self.page_size, out);
        self.continue_or_go_live(channel, more, live_max, false, out, effects);
    }

    fn on_page(
        &mut self,
        gen: u64,
        channel: Arc<str>,
        page: Result<HistoryPage, BackplaneError>,
        out: &mut Vec<Output>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.gen == gen) else {
            return;
        };
        let State::CatchingUp { mut live_max } = sub.state else {
            return;
        };
        let retry = |sub: &Subscription, effects: &mut Vec<Effect>| {
            effects.push(Effect::Fetch {
                gen,
                channel: channel.clone(),
                since: sub.reading_since,
                retry: true,
            });
        };
        let page = match page {
            Ok(page) => page,
            Err(_) => return retry(sub, effects),
        };
        if page.epoch != sub.epoch {
            if sub.reading_since != 0 {
                // Read the new epoch from its start before announcing it: one reset, exact.
                sub.reading_since = 0;
                effects.push(Effect::Fetch {
                    gen,
                    channel,
                    since: 0,
                    retry: false,
                });
                return;
            }
            if sub.delivered > 0 {
                let offset = start_of(&page);
                out.push(Output::Reset {
                    channel: channel.clone(),
                    epoch: page.epoch.clone(),
                    offset,
                    reason: reset_reason::EPOCH_CHANGED,
                });
                sub.delivered = offset;
                sub.tag = page
                    .publications
                    .is_empty()
                    .then_some(page.top_tag)
                    .flatten();
            }
            if sub.newer_epoch.as_ref() != Some(&page.epoch) {
                // The live offsets seen belong to another epoch.
                live_max = 0;
            }
            sub.epoch = page.epoch.clone();
            sub.sent = None;
        } else if page.top < sub.delivered {
            // History went back in this epoch (a store rollback the link has not rotated yet):
            // wait rather than read it again at once.
            return retry(sub, effects);
        }
        let before = (sub.delivered, out.len());
        let more = deliver_page(sub, &channel, &page, self.page_size, out);
        let progressed = (sub.delivered, out.len()) != before;
        self.continue_or_go_live(channel, more, live_max, !progressed, out, effects);
    }

    /// After a page: read the next one while history or live traffic is ahead, else go live.
    /// `retry` waits before that read (the page brought nothing new).
    fn continue_or_go_live(
        &mut self,
        channel: Arc<str>,
        more: bool,
        live_max: u64,
        retry: bool,
        out: &mut Vec<Output>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel) else {
            return;
        };
        if sub.newer_epoch.as_ref() == Some(&sub.epoch) {
            sub.newer_epoch = None;
        }
        let was_catching_up = matches!(sub.state, State::CatchingUp { .. });
        let since = match sub.newer_epoch {
            Some(_) => Some(0),
            None => (more || live_max > sub.delivered).then_some(sub.delivered),
        };
        if let Some(since) = since {
            if !was_catching_up {
                self.catching_up += 1;
            }
            sub.state = State::CatchingUp { live_max };
            sub.reading_since = since;
            effects.push(Effect::Fetch {
                gen: sub.gen,
                channel,
                since,
                retry,
            });
        } else {
            if was_catching_up {
                self.catching_up -= 1;
            }
            sub.state = State::Live;
            sub.release_all_events(out);
        }
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
        Some(first) if first > sub.delivered + 1 => Some((first - 1, None)),
        None if page.top > sub.delivered => Some((page.top, page.top_tag)),
        _ => None,
    };
    if let Some((offset, tag)) = lost_to {
        sub.delivered = offset;
        sub.tag = tag;
        out.push(Output::Reset {
            channel: channel.clone(),
            epoch: sub.epoch.clone(),
            offset,
            reason: reset_reason::HISTORY_TRUNCATED,
        });
    }
    for p in &page.publications {
        if p.offset == sub.delivered + 1 {
            sub.release_events(out);
            sub.delivered = p.offset;
            sub.tag = Some(p.tag);
            sub.sent = Some((p.offset, p.tag));
            out.push(Output::History(p.clone()));
        }
    }
    sub.release_events(out);
    page.publications.len() >= page_size && sub.delivered < page.top
}

#[cfg(test)]
mod tests {
    //! Each case is a script: steps fed to one session's [`Deliveries`] (page size 3), each with
    //! the transcript it must produce — outputs first, then effects, one line each.

    use super::*;

    const CHANNEL: &str = "c";
    const PAGE_SIZE: usize = 3;

    /// A batch of outputs is as large as its largest kind times its length, and an idle
    /// connection keeps room for one: the rare large kinds stay boxed.
    #[test]
    fn an_output_takes_at_most_64_bytes() {
        assert!(std::mem::size_of::<Output>() <= 64);
    }

    enum Step {
        /// Subscribe to `c`, from a position or from now.
        Sub(Option<(&'static str, u64)>),
        /// Subscribe to `c` from a position with a tag: epoch, offset, tag.
        SubTagged(&'static str, u64, u32),
        /// Subscribe to `c` from its latest value (no position).
        SubLatest,
        /// Subscribe to `c` asking for deltas, from a position or from now.
        SubDelta(Option<(&'static str, u64)>),
        /// Subscribe to another channel.
        SubTo(&'static str),
        /// The first read of `c` lands: epoch, top, offsets of the page.
        First(&'static str, u64, &'static [u64]),
        /// The first read lands with the tag history has at `since`: epoch, top, offsets, tag.
        FirstTagged(&'static str, u64, &'static [u64], u32),
        /// The re-read from offset 0 asked for by `read from start` lands.
        FirstFromStart(&'static str, u64, &'static [u64]),
        /// The first read of `c` fails.
        FirstFails,
        /// The first read of an earlier subscription of `c` lands.
        StaleFirst(&'static str, u64, &'static [u64]),
        /// A catch-up page of `c` lands: epoch, top, offsets.
        Page(&'static str, u64, &'static [u64]),
        /// A catch-up read of `c` fails.
        PageFails,
        /// A catch-up page of an earlier subscription of `c` lands.
        StalePage(&'static str, u64, &'static [u64]),
        /// A live publication of `c`: epoch, offset.
        Live(&'static str, u64),
        /// A live publication of `c` taken from a conflating queue: epoch, offset, skipped.
        LiveSkipped(&'static str, u64, u64),
        /// A join of `c` following the publication at `after`: epoch, after.
        Join(&'static str, u64),
        Unsub,
        /// Records the position of `c` and the catching-up count.
        At,
    }
    use Step::*;

    /// A step and the transcript it must produce.
    type ScriptStep = (Step, &'static [&'static str]);

    /// A quote whose price is its offset, tagged with its offset: one member changes from one
    /// publication to the next, so its delta form is smaller.
    fn publication(epoch: &str, offset: u64) -> Arc<Publication> {
        let data = format!("{{\"symbol\":\"ACME\",\"currency\":\"EUR\",\"price\":{offset}}}");
        Arc::new(Publication::new(
            CHANNEL.into(),
            offset,
            epoch.into(),
            offset as u32,
            data.as_bytes(),
        ))
    }

    fn page(epoch: &str, top: u64, offsets: &[u64]) -> Result<HistoryPage, BackplaneError> {
        Ok(HistoryPage {
            epoch: epoch.into(),
            top,
            publications: offsets.iter().map(|o| publication(epoch, *o)).collect(),
            since_tag: None,
            top_tag: (top > 0).then_some(top as u32),
        })
    }

    fn describe_output(output: &Output) -> String {
        match output {
            Output::Reply(_) => "reply".into(),
            Output::Subscribed { result: r, .. } => match r.reason {
                _ if r.recovered => format!("subscribed {}@{} recovered", r.epoch, r.offset),
                _ if r.latest == Some(true) => {
                    format!("subscribed {}@{} latest", r.epoch, r.offset)
                }
                _ if r.latest == Some(false) => {
                    format!("subscribed {}@{} no latest", r.epoch, r.offset)
                }
                Some(reason) => format!("subscribed {}@{} {reason}", r.epoch, r.offset),
                None => format!("subscribed {}@{}", r.epoch, r.offset),
            },
            Output::SubscribeFailed { error, .. } => format!("failed {}", error.code),
            Output::History(p) => format!("history {}", p.offset),
            Output::Live(p) if p.is_delta() => format!("delta {}", p.offset),
            Output::Live(p) if p.skipped > 0 => format!("live {} skipped {}", p.offset, p.skipped),
            Output::Live(p) => format!("live {}", p.offset),
            Output::Presence(p) => format!("join after {}", p.offset),
            Output::Reset {
                epoch,
                offset,
                reason,
                ..
            } => format!("reset {epoch}@{offset} {reason}"),
            Output::Unsubscribed { channel, reason } => format!("unsubscribed {channel} {reason}"),
        }
    }

    fn describe_effect(effect: &Effect) -> String {
        match effect {
            Effect::Fetch {
                since,
                retry: false,
                ..
            } => format!("fetch {since}"),
            Effect::Fetch {
                since, retry: true, ..
            } => format!("retry {since}"),
            Effect::ReadFromStart { .. } => "read from start".into(),
            Effect::ReadLatest { since, .. } => format!("read latest {since}"),
            Effect::LeaveHub(_) => "leave".into(),
            Effect::Joined(_) => "joined".into(),
            Effect::Resumed {
                recovered: true, ..
            } => "resumed".into(),
            Effect::Resumed { reason, .. } => format!("not resumed {}", reason.unwrap_or("?")),
        }
    }

    /// Runs a script with `max_subscriptions` 2; panics at the first step whose transcript
    /// differs.
    fn run(name: &str, script: &[ScriptStep]) {
        let mut deliveries = Deliveries::new(PAGE_SIZE, 2);
        let channel: Arc<str> = CHANNEL.into();
        let (mut gen, mut since) = (0, None);
        let mut last_live: Option<Arc<Publication>> = None;
        for (i, (step, expected)) in script.iter().enumerate() {
            let mut lines = Vec::new();
            let input = match step {
                Sub(from) => {
                    since = from.map(|(epoch, offset)| Position {
                        epoch: epoch.into(),
                        offset,
                        tag: None,
                    });
                    match deliveries.subscribe(&channel) {
                        Ok(g) => gen = g,
                        Err(e) => lines.push(format!("refused {}", e.code)),
                    }
                    None
                }
                SubTagged(epoch, offset, tag) => {
                    since = Some(Position {
                        epoch: (*epoch).into(),
                        offset: *offset,
                        tag: Some(*tag),
                    });
                    gen = deliveries.subscribe(&channel).expect("subscribed");
                    None
                }
                SubDelta(from) => {
                    since = from.map(|(epoch, offset)| Position {
                        epoch: epoch.into(),
                        offset,
                        tag: None,
                    });
                    let options = SubscribeOptions {
                        delta: true,
                        ..SubscribeOptions::default()
                    };
                    gen = deliveries
                        .subscribe_with(&channel, options)
                        .expect("subscribed");
                    None
                }
                SubLatest => {
                    since = None;
                    let options = SubscribeOptions {
                        latest: true,
                        ..SubscribeOptions::default()
                    };
                    gen = deliveries
                        .subscribe_with(&channel, options)
                        .expect("subscribed");
                    None
                }
                SubTo(other) => {
                    if let Err(e) = deliveries.subscribe(&Arc::from(*other)) {
                        lines.push(format!("refused {}", e.code));
                    }
                    None
                }
                First(epoch, top, offsets) => Some((true, gen, page(epoch, *top, offsets))),
                FirstTagged(epoch, top, offsets, tag) => {
                    let mut tagged = page(epoch, *top, offsets);
                    if let Ok(p) = &mut tagged {
                        p.since_tag = Some(*tag);
                    }
                    Some((true, gen, tagged))
                }
                FirstFromStart(epoch, top, offsets) => {
                    Some((true, gen, page(epoch, *top, offsets)))
                }
                FirstFails => Some((true, gen, failed())),
                StaleFirst(epoch, top, offsets) => {
                    Some((true, gen - 1, page(epoch, *top, offsets)))
                }
                Page(epoch, top, offsets) => Some((false, gen, page(epoch, *top, offsets))),
                PageFails => Some((false, gen, failed())),
                StalePage(epoch, top, offsets) => {
                    Some((false, gen - 1, page(epoch, *top, offsets)))
                }
                Live(..) | LiveSkipped(..) | Join(..) | Unsub | At => None,
            };
            let (mut out, mut effects) = (Vec::new(), Vec::new());
            match (step, input) {
                (_, Some((true, gen, page))) => {
                    let input = Input::Subscribed {
                        gen,
                        channel: channel.clone(),
                        id: None,
                        since: since.clone(),
                        from_start: matches!(step, FirstFromStart(..)),
                        page,
                    };
                    deliveries.apply(input, &mut out, &mut effects);
                }
                (_, Some((false, gen, page))) => {
                    let input = Input::Page {
                        gen,
                        channel: channel.clone(),
                        page,
                    };
                    deliveries.apply(input, &mut out, &mut effects);
                }
                (Live(epoch, offset), None) => {
                    // As the hub does: every live publication follows the one before, if adjacent.
                    let p = publication(epoch, *offset);
                    if let Some(previous) = &last_live {
                        p.follows(previous);
                    }
                    last_live = Some(p.clone());
                    deliveries.apply(Input::Live(p), &mut out, &mut effects);
                }
                (LiveSkipped(epoch, offset, skipped), None) => {
                    let p = publication(epoch, *offset);
                    if let Some(previous) = &last_live {
                        p.follows(previous);
                    }
                    last_live = Some(p.clone());
                    let taken = Arc::new(p.after_skipping(*skipped));
                    deliveries.apply(Input::Live(taken), &mut out, &mut effects);
                }
                (Join(epoch, after), None) => {
                    let event = Publication::presence_event(
                        backplane::Kind::Join,
                        CHANNEL.into(),
                        (*epoch).into(),
                        *after,
                        b"{\"client\":\"x\",\"user\":null}",
                    );
                    deliveries.apply(Input::Live(Arc::new(event)), &mut out, &mut effects);
                }
                (Unsub, None) => {
                    if let Err(e) = deliveries.unsubscribe(CHANNEL) {
                        lines.push(format!("refused {}", e.code));
                    }
                }
                (At, None) => {
                    let catching_up = deliveries.catching_up();
                    lines.push(match deliveries.position(CHANNEL) {
                        Some((epoch, offset, _)) => {
                            format!("at {epoch}@{offset}, {catching_up} catching up")
                        }
                        None => format!("not subscribed, {catching_up} catching up"),
                    });
                }
                _ => {}
            }
            lines.extend(out.iter().map(describe_output));
            // `joined` follows every `subscribed`: asserted once, in `presence_event_cases`.
            lines.extend(
                effects
                    .iter()
                    .map(describe_effect)
                    .filter(|line| line != "joined" || name.starts_with("presence")),
            );
            assert_eq!(lines, *expected, "case `{name}`, step {i}");
        }
    }

    fn failed() -> Result<HistoryPage, BackplaneError> {
        Err(BackplaneError::Unavailable("down".into()))
    }

    #[test]
    fn presence_event_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "presence: live events go out in place",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5", "joined"]),
                    (Join("e1", 5), &["join after 5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Join("e1", 6), &["join after 6"]),
                    (Join("e0", 9), &["join after 9"]),
                ],
            ),
            (
                "presence: an event ahead of delivery reveals a gap",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5", "joined"]),
                    (Join("e1", 7), &["fetch 5"]),
                    (
                        Page("e1", 7, &[6, 7]),
                        &["history 6", "history 7", "join after 7"],
                    ),
                    (Live("e1", 8), &["live 8"]),
                ],
            ),
            (
                "presence: events held while catching up keep their place",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5", "joined"]),
                    (Live("e1", 8), &["fetch 5"]),
                    (Join("e1", 6), &[]),
                    (Join("e1", 8), &[]),
                    (
                        Page("e1", 8, &[6, 7, 8]),
                        &[
                            "history 6",
                            "join after 6",
                            "history 7",
                            "history 8",
                            "join after 8",
                        ],
                    ),
                ],
            ),
            (
                "presence: events while subscribing follow the subscribed result",
                &[
                    (Sub(None), &[]),
                    (Join("e1", 5), &[]),
                    (
                        First("e1", 5, &[]),
                        &["subscribed e1@5", "join after 5", "joined"],
                    ),
                ],
            ),
            (
                "presence: a resume delivers events after the publications they follow",
                &[
                    (Sub(Some(("e1", 2))), &[]),
                    (Join("e1", 3), &[]),
                    (
                        First("e1", 4, &[3, 4]),
                        &[
                            "subscribed e1@4 recovered",
                            "history 3",
                            "join after 3",
                            "history 4",
                            "resumed",
                            "joined",
                        ],
                    ),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    /// Express delivery takes over only plain live subscriptions, and hands back positions the
    /// rule then continues from: no gap read for what it delivered, nothing delivered twice.
    #[test]
    fn lanes_are_plain_live_subscriptions_and_resume_where_express_stopped() {
        let mut deliveries = Deliveries::new(PAGE_SIZE, 4);
        let channel: Arc<str> = CHANNEL.into();
        assert_eq!(deliveries.lanes(), None, "no subscription");
        let gen = deliveries.subscribe(&channel).unwrap();
        assert_eq!(deliveries.lanes(), None, "still subscribing");
        let subscribed = Input::Subscribed {
            gen,
            channel: channel.clone(),
            id: None,
            since: None,
            from_start: false,
            page: page("e1", 5, &[]),
        };
        deliveries.apply(subscribed, &mut Vec::new(), &mut Vec::new());
        let lanes = deliveries.lanes().expect("live and plain");
        assert_eq!(
            lanes,
            vec![Lane {
                channel: channel.clone(),
                epoch: "e1".into(),
                delivered: 5,
                tag: Some(5),
            }]
        );

        // Express delivered 6 and 7.
        let mut moved = lanes;
        moved[0].delivered = 7;
        moved[0].tag = Some(7);
        deliveries.resume_lanes(moved);
        let (mut out, mut effects) = (Vec::new(), Vec::new());
        deliveries.apply(Input::Live(publication("e1", 7)), &mut out, &mut effects);
        assert!(out.is_empty() && effects.is_empty(), "7 went out already");
        deliveries.apply(Input::Live(publication("e1", 8)), &mut out, &mut effects);
        assert!(matches!(&out[..], [Output::Live(p)] if p.offset == 8));
        assert!(effects.is_empty(), "no gap to read");

        // A gap makes the subscription catch up: no lanes until it is live again.
        deliveries.apply(Input::Live(publication("e1", 10)), &mut out, &mut effects);
        assert_eq!(deliveries.catching_up(), 1);
        assert_eq!(deliveries.lanes(), None);

        // A delta subscription stays with the session.
        let mut deltas = Deliveries::new(PAGE_SIZE, 4);
        let options = SubscribeOptions {
            delta: true,
            ..SubscribeOptions::default()
        };
        let gen = deltas.subscribe_with(&channel, options).unwrap();
        let subscribed = Input::Subscribed {
            gen,
            channel,
            id: None,
            since: None,
            from_start: false,
            page: page("e1", 5, &[]),
        };
        deltas.apply(subscribed, &mut Vec::new(), &mut Vec::new());
        assert_eq!(deltas.lanes(), None);
    }

    #[test]
    fn unsubscribe_tells_whether_the_subscription_was_set_up() {
        let mut deliveries = Deliveries::new(PAGE_SIZE, 2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        deliveries.subscribe(&a).unwrap();
        let gen = deliveries.subscribe(&b).unwrap();
        let input = Input::Subscribed {
            gen,
            channel: b.clone(),
            id: None,
            since: None,
            from_start: false,
            page: page("e1", 1, &[]),
        };
        deliveries.apply(input, &mut Vec::new(), &mut Vec::new());
        assert_eq!(deliveries.unsubscribe("a"), Ok(false), "still subscribing");
        assert_eq!(deliveries.unsubscribe("b"), Ok(true));
    }

    #[test]
    fn subscribe_from_now_then_live() {
        run(
            "from now",
            &[
                (Sub(None), &[]),
                (First("e1", 5, &[]), &["subscribed e1@5"]),
                (At, &["at e1@5, 0 catching up"]),
                (Live("e1", 6), &["live 6"]),
                (Live("e1", 7), &["live 7"]),
            ],
        );
    }

    #[test]
    fn conflation_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "conflation: what the queue skipped is reported, not filled",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (LiveSkipped("e1", 9, 2), &["live 9 skipped 2"]),
                    (At, &["at e1@9, 0 catching up"]),
                    (Live("e1", 10), &["live 10"]),
                ],
            ),
            (
                "conflation: missing more than was skipped is a gap, filled from history",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (LiveSkipped("e1", 9, 1), &["fetch 5"]),
                    (
                        Page("e1", 9, &[6, 7, 8]),
                        &["history 6", "history 7", "history 8", "fetch 8"],
                    ),
                    (Page("e1", 9, &[9]), &["history 9"]),
                ],
            ),
            (
                "conflation: a skip only counts what this subscription missed",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (LiveSkipped("e1", 7, 4), &["live 7 skipped 1"]),
                    (LiveSkipped("e1", 7, 4), &[]),
                ],
            ),
            (
                "conflation: a skip breaks the delta chain, which starts again after it",
                &[
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["delta 7"]),
                    (LiveSkipped("e1", 9, 1), &["live 9 skipped 1"]),
                    (Live("e1", 10), &["delta 10"]),
                ],
            ),
            (
                "conflation: while catching up, everything comes from history",
                &[
                    (Sub(None), &[]),
                    (LiveSkipped("e1", 7, 2), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5", "fetch 5"]),
                    (Page("e1", 7, &[6, 7]), &["history 6", "history 7"]),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    #[test]
    fn delta_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "delta: only when asked",
                &[
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["live 7"]),
                ],
            ),
            (
                "delta: against the publication delivered before, once the node saw it",
                &[
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["delta 7"]),
                    (Live("e1", 8), &["delta 8"]),
                ],
            ),
            (
                "delta: never against a publication this subscription did not send",
                &[
                    (Live("e1", 5), &[]),
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["delta 7"]),
                ],
            ),
            (
                "delta: a resume at the top starts in full (the client may not hold that data)",
                &[
                    (Live("e1", 4), &[]),
                    (SubDelta(Some(("e1", 4))), &[]),
                    (
                        First("e1", 4, &[]),
                        &["subscribed e1@4 recovered", "resumed"],
                    ),
                    (Live("e1", 5), &["live 5"]),
                    (Live("e1", 6), &["delta 6"]),
                ],
            ),
            (
                "delta: a gap is filled in full, then deltas go on",
                &[
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["delta 7"]),
                    (Live("e1", 9), &["fetch 7"]),
                    (Page("e1", 9, &[8, 9]), &["history 8", "history 9"]),
                    (Live("e1", 10), &["delta 10"]),
                ],
            ),
            (
                "delta: a resume starts in full",
                &[
                    (SubDelta(Some(("e1", 2))), &[]),
                    (
                        First("e1", 4, &[3, 4]),
                        &[
                            "subscribed e1@4 recovered",
                            "history 3",
                            "history 4",
                            "resumed",
                        ],
                    ),
                    (Live("e1", 5), &["live 5"]),
                    (Live("e1", 6), &["delta 6"]),
                ],
            ),
            (
                "delta: a resume from history is followed by deltas when the node saw the base",
                &[
                    (Live("e1", 4), &[]),
                    (SubDelta(Some(("e1", 2))), &[]),
                    (
                        First("e1", 4, &[3, 4]),
                        &[
                            "subscribed e1@4 recovered",
                            "history 3",
                            "history 4",
                            "resumed",
                        ],
                    ),
                    (Live("e1", 5), &["delta 5"]),
                ],
            ),
            (
                "delta: a new epoch starts in full",
                &[
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 7), &["delta 7"]),
                    (Live("e2", 1), &["fetch 0"]),
                    (
                        Page("e2", 1, &[1]),
                        &["reset e2@0 epoch_changed", "history 1"],
                    ),
                    (Live("e2", 2), &["delta 2"]),
                    (Live("e2", 3), &["delta 3"]),
                ],
            ),
            (
                "delta: a reset past trimmed history starts in full",
                &[
                    (SubDelta(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 9), &["fetch 6"]),
                    (
                        Page("e1", 9, &[9]),
                        &["reset e1@8 history_truncated", "history 9"],
                    ),
                    (Live("e1", 10), &["delta 10"]),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    #[test]
    fn latest_value_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "latest: the newest publication, then live ones",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (
                        First("e1", 5, &[5]),
                        &["subscribed e1@5 latest", "history 5"],
                    ),
                    (At, &["at e1@5, 0 catching up"]),
                    (Live("e1", 5), &[]),
                    (Live("e1", 6), &["live 6"]),
                ],
            ),
            (
                "latest: publications during the reads follow, no gap, no duplicate",
                &[
                    (SubLatest, &[]),
                    (Live("e1", 6), &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (Live("e1", 7), &[]),
                    (
                        First("e1", 7, &[5, 6, 7]),
                        &[
                            "subscribed e1@7 latest",
                            "history 5",
                            "history 6",
                            "history 7",
                        ],
                    ),
                    (Live("e1", 7), &[]),
                    (Live("e1", 8), &["live 8"]),
                ],
            ),
            (
                "latest: live traffic past the page is caught up from history",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (Live("e1", 9), &[]),
                    (
                        First("e1", 9, &[5, 6, 7]),
                        &[
                            "subscribed e1@9 latest",
                            "history 5",
                            "history 6",
                            "history 7",
                            "fetch 7",
                        ],
                    ),
                    (Page("e1", 9, &[8, 9]), &["history 8", "history 9"]),
                    (At, &["at e1@9, 0 catching up"]),
                    (Live("e1", 10), &["live 10"]),
                ],
            ),
            (
                "latest: a channel never published to says so and goes live",
                &[
                    (SubLatest, &[]),
                    (First("", 0, &[]), &["subscribed @0 no latest"]),
                    (Live("e1", 1), &["live 1"]),
                ],
            ),
            (
                "latest: an expired newest publication delivers nothing and says so",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (First("e1", 5, &[]), &["subscribed e1@5 no latest"]),
                    (Live("e1", 6), &["live 6"]),
                ],
            ),
            (
                "latest: trimmed past the newest publication between the reads starts at the top",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (Live("e1", 8), &[]),
                    (First("e1", 8, &[7, 8]), &["subscribed e1@8 no latest"]),
                    (Live("e1", 9), &["live 9"]),
                ],
            ),
            (
                "latest: a channel restarted between the reads starts at its top",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (First("e2", 2, &[]), &["subscribed e2@2 no latest"]),
                    (Live("e2", 3), &["live 3"]),
                ],
            ),
            (
                "latest: an unsubscribe while reading drops the late read",
                &[
                    (SubLatest, &[]),
                    (First("e1", 5, &[]), &["read latest 4"]),
                    (Unsub, &[]),
                    (StaleFirst("e1", 5, &[5]), &[]),
                    (At, &["not subscribed, 0 catching up"]),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    #[test]
    fn resume_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "resume inside history",
                &[
                    (Sub(Some(("e1", 2))), &[]),
                    (
                        First("e1", 4, &[3, 4]),
                        &[
                            "subscribed e1@4 recovered",
                            "history 3",
                            "history 4",
                            "resumed",
                        ],
                    ),
                    (At, &["at e1@4, 0 catching up"]),
                    (Live("e1", 5), &["live 5"]),
                ],
            ),
            (
                "resume at the top",
                &[
                    (Sub(Some(("e1", 4))), &[]),
                    (
                        First("e1", 4, &[]),
                        &["subscribed e1@4 recovered", "resumed"],
                    ),
                    (At, &["at e1@4, 0 catching up"]),
                ],
            ),
            (
                "a compact cursor's position resumes in the channel's epoch, counted later",
                &[
                    (Sub(Some((ANY_EPOCH, 2))), &[]),
                    (
                        First("e1", 4, &[3, 4]),
                        &["subscribed e1@4 recovered", "history 3", "history 4"],
                    ),
                    (At, &["at e1@4, 0 catching up"]),
                ],
            ),
            (
                "a compact cursor's position beyond the top is not recovered",
                &[
                    (Sub(Some((ANY_EPOCH, 9))), &[]),
                    (
                        First("e1", 4, &[]),
                        &["subscribed e1@4 offset_ahead", "not resumed offset_ahead"],
                    ),
                ],
            ),
            (
                "resume over several pages",
                &[
                    (Sub(Some(("e1", 0))), &[]),
                    (
                        First("e1", 7, &[1, 2, 3]),
                        &[
                            "subscribed e1@7 recovered",
                            "history 1",
                            "history 2",
                            "history 3",
                            "resumed",
                            "fetch 3",
                        ],
                    ),
                    (At, &["at e1@3, 1 catching up"]),
                    (
                        Page("e1", 7, &[4, 5, 6]),
                        &["history 4", "history 5", "history 6", "fetch 6"],
                    ),
                    (Page("e1", 7, &[7]), &["history 7"]),
                    (At, &["at e1@7, 0 catching up"]),
                ],
            ),
            (
                "epoch_changed",
                &[
                    (Sub(Some(("e0", 2))), &[]),
                    (First("e1", 5, &[]), &["read from start"]),
                    (
                        FirstFromStart("e1", 5, &[]),
                        &["subscribed e1@5 epoch_changed", "not resumed epoch_changed"],
                    ),
                    (At, &["at e1@5, 0 catching up"]),
                    (Live("e1", 6), &["live 6"]),
                ],
            ),
            (
                "epoch_changed: the new epoch from its start",
                &[
                    (Sub(Some(("e0", 2))), &[]),
                    (First("e1", 5, &[3, 4, 5]), &["read from start"]),
                    (
                        FirstFromStart("e1", 5, &[1, 2, 3]),
                        &[
                            "subscribed e1@5 epoch_changed",
                            "history 1",
                            "history 2",
                            "history 3",
                            "not resumed epoch_changed",
                            "fetch 3",
                        ],
                    ),
                    (Page("e1", 5, &[4, 5]), &["history 4", "history 5"]),
                    (At, &["at e1@5, 0 catching up"]),
                ],
            ),
            (
                "epoch_changed: the new epoch from its first retained publication",
                &[
                    (Sub(Some(("e0", 2))), &[]),
                    (First("e1", 9, &[]), &["read from start"]),
                    (
                        FirstFromStart("e1", 9, &[8, 9]),
                        &[
                            "subscribed e1@9 epoch_changed",
                            "history 8",
                            "history 9",
                            "not resumed epoch_changed",
                        ],
                    ),
                    (At, &["at e1@9, 0 catching up"]),
                ],
            ),
            (
                "offset 0 of another epoch is the start",
                &[
                    (Sub(Some(("e0", 0))), &[]),
                    (
                        First("e1", 2, &[1, 2]),
                        &[
                            "subscribed e1@2 recovered",
                            "history 1",
                            "history 2",
                            "resumed",
                        ],
                    ),
                    (At, &["at e1@2, 0 catching up"]),
                ],
            ),
            (
                "offset 0 of an empty channel",
                &[
                    (Sub(Some(("e0", 0))), &[]),
                    (First("", 0, &[]), &["subscribed @0 recovered", "resumed"]),
                    (Live("e1", 1), &["live 1"]),
                    (At, &["at e1@1, 0 catching up"]),
                ],
            ),
            (
                "offset 0 with the start trimmed",
                &[
                    (Sub(Some(("e0", 0))), &[]),
                    (
                        First("e1", 5, &[4, 5]),
                        &[
                            "subscribed e1@5 history_truncated",
                            "not resumed history_truncated",
                        ],
                    ),
                ],
            ),
            (
                "history_diverged",
                &[
                    (SubTagged("e1", 4, 7), &[]),
                    (
                        FirstTagged("e1", 6, &[5, 6], 8),
                        &[
                            "subscribed e1@6 history_diverged",
                            "not resumed history_diverged",
                        ],
                    ),
                    (At, &["at e1@6, 0 catching up"]),
                    (Live("e1", 7), &["live 7"]),
                ],
            ),
            (
                "a matching tag resumes",
                &[
                    (SubTagged("e1", 4, 7), &[]),
                    (
                        FirstTagged("e1", 6, &[5, 6], 7),
                        &[
                            "subscribed e1@6 recovered",
                            "history 5",
                            "history 6",
                            "resumed",
                        ],
                    ),
                ],
            ),
            (
                "without a tag a rollback cannot be told",
                &[
                    (Sub(Some(("e1", 4))), &[]),
                    (
                        FirstTagged("e1", 6, &[5, 6], 8),
                        &[
                            "subscribed e1@6 recovered",
                            "history 5",
                            "history 6",
                            "resumed",
                        ],
                    ),
                ],
            ),
            (
                "offset_ahead",
                &[
                    (Sub(Some(("e1", 9))), &[]),
                    (
                        First("e1", 5, &[]),
                        &["subscribed e1@5 offset_ahead", "not resumed offset_ahead"],
                    ),
                    (At, &["at e1@5, 0 catching up"]),
                ],
            ),
            (
                "history_truncated",
                &[
                    (Sub(Some(("e1", 2))), &[]),
                    (
                        First("e1", 7, &[6, 7]),
                        &[
                            "subscribed e1@7 history_truncated",
                            "not resumed history_truncated",
                        ],
                    ),
                    (At, &["at e1@7, 0 catching up"]),
                    (Live("e1", 8), &["live 8"]),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    #[test]
    fn live_cases() {
        let cases: Vec<(&str, Vec<ScriptStep>)> = vec![
            (
                "duplicates dropped",
                vec![
                    (Live("e1", 6), &["live 6"]),
                    (Live("e1", 6), &[]),
                    (Live("e1", 4), &[]),
                    (Live("e1", 7), &["live 7"]),
                ],
            ),
            (
                "a live gap is filled from history first",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (At, &["at e1@5, 1 catching up"]),
                    (Live("e1", 9), &[]),
                    (
                        Page("e1", 9, &[6, 7, 8]),
                        &["history 6", "history 7", "history 8", "fetch 8"],
                    ),
                    (Page("e1", 9, &[9]), &["history 9"]),
                    (At, &["at e1@9, 0 catching up"]),
                    (Live("e1", 9), &[]),
                    (Live("e1", 10), &["live 10"]),
                ],
            ),
            (
                "a gap during catch-up is reset",
                vec![
                    (Live("e1", 9), &["fetch 5"]),
                    (
                        Page("e1", 9, &[8, 9]),
                        &["reset e1@7 history_truncated", "history 8", "history 9"],
                    ),
                    (At, &["at e1@9, 0 catching up"]),
                ],
            ),
            (
                "history emptied during catch-up",
                vec![
                    (Live("e1", 9), &["fetch 5"]),
                    (Page("e1", 9, &[]), &["reset e1@9 history_truncated"]),
                    (At, &["at e1@9, 0 catching up"]),
                ],
            ),
            (
                "a failed read is retried",
                vec![
                    (Live("e1", 7), &["fetch 5"]),
                    (PageFails, &["retry 5"]),
                    (At, &["at e1@5, 1 catching up"]),
                    (Page("e1", 7, &[6, 7]), &["history 6", "history 7"]),
                    (At, &["at e1@7, 0 catching up"]),
                ],
            ),
            (
                "epoch_changed on a live subscription: from its start",
                vec![
                    (Live("e2", 3), &["fetch 0"]),
                    (At, &["at e1@5, 1 catching up"]),
                    (Live("e2", 4), &[]),
                    (
                        Page("e2", 4, &[1, 2, 3]),
                        &[
                            "reset e2@0 epoch_changed",
                            "history 1",
                            "history 2",
                            "history 3",
                            "fetch 3",
                        ],
                    ),
                    (Page("e2", 4, &[4]), &["history 4"]),
                    (At, &["at e2@4, 0 catching up"]),
                    (Live("e2", 5), &["live 5"]),
                ],
            ),
            (
                "epoch_changed with the new epoch's start trimmed",
                vec![
                    (Live("e2", 9), &["fetch 0"]),
                    (
                        Page("e2", 9, &[7, 8, 9]),
                        &[
                            "reset e2@6 epoch_changed",
                            "history 7",
                            "history 8",
                            "history 9",
                        ],
                    ),
                    (At, &["at e2@9, 0 catching up"]),
                ],
            ),
            (
                "epoch_changed during catch-up: read the start, then one reset",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (Page("e2", 2, &[]), &["fetch 0"]),
                    (
                        Page("e2", 2, &[1, 2]),
                        &["reset e2@0 epoch_changed", "history 1", "history 2"],
                    ),
                    (At, &["at e2@2, 0 catching up"]),
                    (Live("e2", 3), &["live 3"]),
                ],
            ),
            (
                "a new epoch seen live during catch-up",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (Live("e2", 1), &[]),
                    (Live("e1", 9), &[]),
                    (
                        Page("e1", 8, &[6, 7, 8]),
                        &["history 6", "history 7", "history 8", "fetch 0"],
                    ),
                    (
                        Page("e2", 1, &[1]),
                        &["reset e2@0 epoch_changed", "history 1"],
                    ),
                    (At, &["at e2@1, 0 catching up"]),
                ],
            ),
            (
                "a rolled-back top is read again after the delay",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (Page("e1", 3, &[]), &["retry 5"]),
                    (Page("e1", 5, &[]), &["retry 5"]),
                    (At, &["at e1@5, 1 catching up"]),
                    (
                        Page("e1", 8, &[6, 7, 8]),
                        &["history 6", "history 7", "history 8"],
                    ),
                    (At, &["at e1@8, 0 catching up"]),
                ],
            ),
            (
                "unsubscribe mid-catch-up",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (Unsub, &[]),
                    (At, &["not subscribed, 0 catching up"]),
                    (Page("e1", 8, &[6, 7, 8]), &[]),
                    (Live("e1", 9), &[]),
                    (Unsub, &["refused not_subscribed"]),
                ],
            ),
            (
                "a stale page generation is ignored",
                vec![
                    (Live("e1", 8), &["fetch 5"]),
                    (Unsub, &[]),
                    (Sub(None), &[]),
                    (StalePage("e1", 8, &[6, 7, 8]), &[]),
                    (First("e1", 8, &[]), &["subscribed e1@8"]),
                    (StalePage("e1", 9, &[6, 7, 8]), &[]),
                    (At, &["at e1@8, 0 catching up"]),
                ],
            ),
        ];
        for (name, steps) in cases {
            // Every case starts from a live subscription delivered up to e1@5.
            let mut script: Vec<ScriptStep> = vec![
                (Sub(None), &[]),
                (First("e1", 5, &[]), &["subscribed e1@5"]),
            ];
            script.extend(steps);
            run(name, &script);
        }
    }

    #[test]
    fn setup_cases() {
        let cases: &[(&str, &[ScriptStep])] = &[
            (
                "live publications racing the first read",
                &[
                    (Sub(None), &[]),
                    (Live("e1", 6), &[]),
                    (Live("e1", 7), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5", "fetch 5"]),
                    (At, &["at e1@5, 1 catching up"]),
                    (Live("e1", 8), &[]),
                    (
                        Page("e1", 7, &[6, 7]),
                        &["history 6", "history 7", "fetch 7"],
                    ),
                    (Page("e1", 8, &[8]), &["history 8"]),
                    (Live("e1", 8), &[]),
                    (Live("e1", 9), &["live 9"]),
                ],
            ),
            (
                "live publications racing a resume",
                &[
                    (Sub(Some(("e1", 3))), &[]),
                    (Live("e1", 6), &[]),
                    (
                        First("e1", 5, &[4, 5]),
                        &[
                            "subscribed e1@5 recovered",
                            "history 4",
                            "history 5",
                            "resumed",
                            "fetch 5",
                        ],
                    ),
                    (Page("e1", 6, &[6]), &["history 6"]),
                    (At, &["at e1@6, 0 catching up"]),
                ],
            ),
            (
                "an empty channel's first epoch is adopted silently",
                &[
                    (Sub(None), &[]),
                    (First("", 0, &[]), &["subscribed @0"]),
                    (Live("e1", 1), &["live 1"]),
                    (Live("e1", 2), &["live 2"]),
                    (At, &["at e1@2, 0 catching up"]),
                ],
            ),
            (
                "an empty channel's first epoch found by a gap fill",
                &[
                    (Sub(None), &[]),
                    (First("", 0, &[]), &["subscribed @0"]),
                    (Live("e1", 3), &["fetch 0"]),
                    (
                        Page("e1", 3, &[1, 2, 3]),
                        &["history 1", "history 2", "history 3"],
                    ),
                    (At, &["at e1@3, 0 catching up"]),
                ],
            ),
            (
                "a publication racing an empty channel's first read",
                &[
                    (Sub(None), &[]),
                    (Live("e1", 1), &[]),
                    (First("", 0, &[]), &["subscribed @0", "fetch 0"]),
                    (Page("e1", 1, &[1]), &["history 1"]),
                    (At, &["at e1@1, 0 catching up"]),
                ],
            ),
            (
                "the first read fails",
                &[
                    (Sub(None), &[]),
                    (FirstFails, &["failed backplane_unavailable", "leave"]),
                    (At, &["not subscribed, 0 catching up"]),
                    (Sub(None), &[]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                ],
            ),
            (
                "a stale first read is ignored",
                &[
                    (Sub(None), &[]),
                    (Unsub, &[]),
                    (Sub(None), &[]),
                    (StaleFirst("e1", 3, &[]), &[]),
                    (At, &["at @0, 0 catching up"]),
                    (First("e1", 5, &[]), &["subscribed e1@5"]),
                ],
            ),
            (
                "refusals",
                &[
                    (Sub(None), &[]),
                    (Sub(None), &["refused already_subscribed"]),
                    (SubTo("d"), &[]),
                    (SubTo("e"), &["refused too_many_subscriptions"]),
                ],
            ),
        ];
        for (name, script) in cases {
            run(name, script);
        }
    }

    /// The start a subscribe output names, which a cursor holds until the channel's first
    /// delivered publication (SSE's `connected` event).
    #[test]
    fn subscribed_names_where_delivery_starts() {
        let subscribe =
            |since: Option<(&str, u64)>, pages: &[(bool, Result<HistoryPage, BackplaneError>)]| {
                let mut deliveries = Deliveries::new(PAGE_SIZE, 2);
                let channel: Arc<str> = CHANNEL.into();
                let gen = deliveries.subscribe(&channel).unwrap();
                let since = since.map(|(epoch, offset)| Position {
                    epoch: epoch.into(),
                    offset,
                    tag: None,
                });
                let mut out = Vec::new();
                for (from_start, page) in pages {
                    let page = match page {
                        Ok(p) => Ok(p.clone()),
                        Err(_) => failed(),
                    };
                    let input = Input::Subscribed {
                        gen,
                        channel: channel.clone(),
                        id: None,
                        since: since.clone(),
                        from_start: *from_start,
                        page,
                    };
                    deliveries.apply(input, &mut out, &mut Vec::new());
                }
                out.iter()
                    .find_map(|o| match o {
                        Output::Subscribed { result, start, .. } => Some((result.offset, start.0)),
                        _ => None,
                    })
                    .expect("subscribed")
            };
        // From now: the top.
        assert_eq!(subscribe(None, &[(false, page("e1", 5, &[]))]), (5, 5));
        // Recovered: the requested position, the page follows.
        assert_eq!(
            subscribe(Some(("e1", 2)), &[(false, page("e1", 5, &[3, 4, 5]))]),
            (5, 2)
        );
        // Not recovered: the top.
        assert_eq!(
            subscribe(Some(("e1", 9)), &[(false, page("e1", 5, &[]))]),
            (5, 5)
        );
        // epoch_changed: the result names the new epoch's top, delivery starts at its start.
        let new_epoch = [
            (false, page("e2", 5, &[])),
            (true, page("e2", 5, &[1, 2, 3])),
        ];
        assert_eq!(subscribe(Some(("e1", 2)), &new_epoch), (5, 0));
        let trimmed = [(false, page("e2", 9, &[])), (true, page("e2", 9, &[8, 9]))];
        assert_eq!(subscribe(Some(("e1", 2)), &trimmed), (9, 7));
    }
}
