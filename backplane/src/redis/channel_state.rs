//! One channel's delivery state on the pub/sub link, as a state machine without I/O: what was
//! delivered last, the live messages held while a history read of the channel is in flight, and
//! which read to run next. The link task runs the reads off its loop and feeds the results back,
//! so a channel's deliveries stay in offset order while other channels keep flowing.
//!
//! - Live messages go through `held` in arrival order; one that skips offsets makes the channel
//!   read history after the last delivered offset first. `held` is bounded: when it overflows it
//!   is dropped and the channel re-reads history instead (nothing is lost: it is all in history).
//! - Presence events (joins and leaves, not in history) go through `held` too, in arrival order.
//!   Each names the offset it follows: it is delivered once that offset was delivered (at once if
//!   it already was), so it keeps its place among the publications. Dropping `held` for a re-read
//!   loses the events in it (at most once: history cannot give them back, nor duplicate them).
//! - A new epoch (first sight, Redis lost the channel, or a rotation) is delivered from its start
//!   (offset 1 or the first retained), never from the first live message.
//! - Rollback: when a read shows the top below the delivered offset, or the entry at the
//!   delivered offset has another publish time or tag than the one delivered (Redis lost acknowledged
//!   writes and reused the offsets under the same epoch), the channel's epoch is rotated with a
//!   compare-and-set script and the new epoch is delivered from its start.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::Publication;

/// Live messages held per channel while a read is in flight; beyond it the channel re-reads.
const HELD_MAX: usize = 1024;
/// Publications per history read.
pub(crate) const PAGE: usize = 1000;
/// Epochs of the channel the link has left, whose late messages are ignored.
const RETIRED_MAX: usize = 4;

/// The last publication delivered to the sink (offset 0: none yet in `epoch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// `None` until the link knows the channel's epoch (a channel never published to has none).
    pub(crate) epoch: Option<Arc<str>>,
    pub(crate) offset: u64,
    /// Publish time (ms) and tag of the publication at `offset`, 0 if unknown: they tell
    /// whether the entry at that offset is still the same publication after Redis came back.
    pub(crate) published_ms: u64,
    pub(crate) tag: u32,
}

impl Delivered {
    /// Whether a history entry with this publish time and tag at the delivered offset is another
    /// publication than the one delivered (0: unknown, e.g. an entry from before tags).
    pub(crate) fn differs(&self, published_ms: u64, tag: u32) -> bool {
        let known = |a: u64, b: u64| a != 0 && b != 0;
        (known(self.published_ms, published_ms) && self.published_ms != published_ms)
            || (known(self.tag.into(), tag.into()) && self.tag != tag)
    }
}

/// A history entry as the link reads it: the publication and its publish time (ms).
pub(crate) type Entry = (Arc<Publication>, u64);

/// A page of history read by the link.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) epoch: Arc<str>,
    pub(crate) top: u64,
    pub(crate) entries: Vec<Entry>,
}

/// A read the link must run for the channel (at most one in flight per channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Work {
    /// Read history after `since`.
    Read { since: u64 },
    /// Rotate the channel's epoch if it is still `seen.epoch` and the loss still shows.
    Rotate { seen: Delivered },
}

/// How a held live message relates to what was delivered.
enum Fit {
    Stale,
    Next,
    Gap,
    /// A presence event whose place was reached: delivered without moving the position.
    Event,
}

pub(crate) struct ChannelState {
    pub(crate) name: Arc<str>,
    pub(crate) pubsub_name: String,
    /// Distinguishes this subscription from an earlier one of the same channel, so results of
    /// reads started for the earlier one are ignored.
    pub(crate) incarnation: u64,
    /// Subscribe callers waiting for the subscription and its position read.
    pub(crate) waiters: Vec<super::pubsub::Ack>,
    /// Set while no local subscriber wants the channel; unsubscribed at Redis when it passes.
    pub(crate) linger_until: Option<Instant>,
    /// Since a disconnect (or a subscription Redis dropped) until Redis confirms the
    /// subscription again; the confirmation makes the channel re-read history.
    pub(crate) awaiting_confirmation: bool,
    delivered: Delivered,
    retired: VecDeque<Arc<str>>,
    in_flight: bool,
    held: VecDeque<Arc<Publication>>,
    /// Live messages were dropped from `held`: read history again before going on.
    held_overflowed: bool,
    /// A re-read was asked while a read was in flight.
    resync_wanted: bool,
    /// The last read failed: retried on the link's next health tick.
    retry: bool,
    /// A rotation was tried since the last read that showed no loss.
    rotation_tried: bool,
}

impl ChannelState {
    /// A channel being subscribed: its position read is in flight.
    pub(crate) fn subscribing(name: Arc<str>, pubsub_name: String, incarnation: u64) -> Self {
        ChannelState {
            name,
            pubsub_name,
            incarnation,
            waiters: Vec::new(),
            linger_until: None,
            awaiting_confirmation: false,
            delivered: Delivered {
                epoch: None,
                offset: 0,
                published_ms: 0,
                tag: 0,
            },
            retired: VecDeque::new(),
            in_flight: true,
            held: VecDeque::new(),
            held_overflowed: false,
            resync_wanted: false,
            retry: false,
            rotation_tried: false,
        }
    }

    pub(crate) fn is_subscribing(&self) -> bool {
        !self.waiters.is_empty()
    }

    pub(crate) fn delivered(&self) -> &Delivered {
        &self.delivered
    }

    /// The position read after SUBSCRIBE came back: every later publication arrives live.
    pub(crate) fn on_position(
        &mut self,
        position: Delivered,
        out: &mut Vec<Arc<Publication>>,
    ) -> Option<Work> {
        self.in_flight = false;
        self.delivered = position;
        self.after_read(out, true)
    }

    /// A live message from pub/sub.
    pub(crate) fn on_live(
        &mut self,
        publication: Arc<Publication>,
        out: &mut Vec<Arc<Publication>>,
    ) -> Option<Work> {
        if self.held.len() >= HELD_MAX {
            self.held.clear();
            self.held_overflowed = true;
        }
        self.held.push_back(publication);
        if self.in_flight {
            return None;
        }
        if self.awaiting_confirmation || self.held_overflowed {
            // A message proves the subscription is live again; what came before is in history.
            self.awaiting_confirmation = false;
            self.held_overflowed = false;
            return Some(self.start_read());
        }
        self.drain_held(out, true)
    }

    /// Redis confirmed the subscription (again).
    pub(crate) fn on_confirmed(&mut self) -> Option<Work> {
        if !std::mem::take(&mut self.awaiting_confirmation) {
            return None;
        }
        self.resync()
    }

    /// Reads whatever history holds after the delivered offset (and checks for a rollback).
    pub(crate) fn resync(&mut self) -> Option<Work> {
        if self.in_flight {
            self.resync_wanted = true;
            return None;
        }
        Some(self.start_read())
    }

    /// Retries a read that failed, if one did.
    pub(crate) fn retry_failed(&mut self) -> Option<Work> {
        if !std::mem::take(&mut self.retry) {
            return None;
        }
        self.resync()
    }

    /// A history read started by [`Work::Read`] finished.
    pub(crate) fn on_page(
        &mut self,
        since: u64,
        result: Result<Page, ()>,
        out: &mut Vec<Arc<Publication>>,
    ) -> Option<Work> {
        self.in_flight = false;
        let Ok(page) = result else {
            return self.after_failure(out);
        };
        if self.delivered.epoch.as_deref() != Some(&*page.epoch) {
            // First sight of the epoch, or a new one: deliver it from its start.
            self.switch_epoch(page.epoch.clone());
            if since != 0 {
                return Some(self.start_read());
            }
        } else if self.delivered.offset > 0 {
            let at_delivered = page
                .entries
                .iter()
                .find(|(p, _)| p.offset == self.delivered.offset);
            let lost = page.top < self.delivered.offset
                || at_delivered.is_some_and(|(p, ms)| self.delivered.differs(*ms, p.tag));
            if lost {
                if !self.rotation_tried {
                    self.rotation_tried = true;
                    self.in_flight = true;
                    return Some(Work::Rotate {
                        seen: self.delivered.clone(),
                    });
                }
                // The script saw no loss where this read did: adopt what Redis has now rather
                // than loop. Sessions compare positions with history themselves.
                tracing::error!(channel = %self.name, top = page.top, delivered = self.delivered.offset,
                    "history went back but the epoch rotation did not take; continuing from the top");
                self.delivered.offset = self.delivered.offset.min(page.top);
                self.delivered.published_ms = 0;
                self.delivered.tag = 0;
            }
            self.rotation_tried = false;
        }
        let before = self.delivered.offset;
        let full = page.entries.len() >= PAGE;
        for (publication, published_ms) in page.entries {
            if publication.offset > self.delivered.offset {
                self.delivered.offset = publication.offset;
                self.delivered.published_ms = published_ms;
                self.delivered.tag = publication.tag;
                out.push(publication);
            }
        }
        if full {
            return Some(self.start_read());
        }
        self.after_read(out, self.delivered.offset > before)
    }

    /// A rotation started by [`Work::Rotate`] finished; `Ok` holds the channel's epoch now
    /// (`None`: it has none, its meta is gone).
    pub(crate) fn on_rotated(
        &mut self,
        result: Result<Option<Arc<str>>, ()>,
        out: &mut Vec<Arc<Publication>>,
    ) -> Option<Work> {
        self.in_flight = false;
        let Ok(epoch) = result else {
            return self.after_failure(out);
        };
        if let Some(epoch) = epoch.filter(|e| self.delivered.epoch.as_ref() != Some(e)) {
            self.switch_epoch(epoch);
        }
        Some(self.start_read())
    }

    fn after_read(&mut self, out: &mut Vec<Arc<Publication>>, progressed: bool) -> Option<Work> {
        if std::mem::take(&mut self.held_overflowed) || std::mem::take(&mut self.resync_wanted) {
            return Some(self.start_read());
        }
        self.drain_held(out, progressed)
    }

    /// A read failed (Redis unreachable): go on with live messages, accepting their gaps (each
    /// session notices a gap and reads history itself), and retry the read on the next tick.
    fn after_failure(&mut self, out: &mut Vec<Arc<Publication>>) -> Option<Work> {
        self.retry = true;
        self.held_overflowed = false;
        self.resync_wanted = false;
        self.drain_held(out, false)
    }

    /// Delivers held messages in order until one needs a history read first. After a read that
    /// made no progress, a gap is accepted instead of read again (history does not have it).
    fn drain_held(&mut self, out: &mut Vec<Arc<Publication>>, progressed: bool) -> Option<Work> {
        while let Some(publication) = self.held.pop_front() {
            match self.fit(&publication) {
                Fit::Stale => {}
                Fit::Event => out.push(publication),
                Fit::Next => self.deliver_live(publication, out),
                Fit::Gap if !progressed && !self.retry => {
                    tracing::warn!(channel = %self.name, offset = publication.offset,
                        delivered = self.delivered.offset, "gap not in history; delivering on");
                    self.deliver_live(publication, out);
                }
                Fit::Gap if self.retry => self.deliver_live(publication, out),
                Fit::Gap => {
                    self.held.push_front(publication);
                    return Some(self.start_read());
                }
            }
        }
        None
    }

    fn fit(&mut self, publication: &Publication) -> Fit {
        if self.retired.iter().any(|e| *e == publication.epoch) {
            return Fit::Stale;
        }
        if !publication.is_publication() && publication.epoch.is_empty() {
            // The channel had no publication when the event happened: nothing comes before it.
            return Fit::Event;
        }
        if self.delivered.epoch.as_deref() != Some(&*publication.epoch) {
            self.switch_epoch(publication.epoch.clone());
        }
        if !publication.is_publication() {
            return if publication.offset <= self.delivered.offset {
                Fit::Event
            } else {
                Fit::Gap
            };
        }
        if publication.offset <= self.delivered.offset {
            Fit::Stale
        } else if publication.offset == self.delivered.offset + 1 {
            Fit::Next
        } else {
            Fit::Gap
        }
    }

    fn deliver_live(&mut self, publication: Arc<Publication>, out: &mut Vec<Arc<Publication>>) {
        if !publication.is_publication() {
            // An event whose place history could not fill: it moves no position.
            out.push(publication);
            return;
        }
        self.delivered.offset = publication.offset;
        self.delivered.published_ms = publication.published_us / 1000;
        self.delivered.tag = publication.tag;
        out.push(publication);
    }

    /// Leaves the current epoch for `epoch`, delivered from its start.
    fn switch_epoch(&mut self, epoch: Arc<str>) {
        if let Some(old) = self.delivered.epoch.take() {
            if self.retired.len() >= RETIRED_MAX {
                self.retired.pop_front();
            }
            self.retired.push_back(old);
        }
        self.retired.retain(|e| *e != epoch);
        self.delivered = Delivered {
            epoch: Some(epoch),
            offset: 0,
            published_ms: 0,
            tag: 0,
        };
        self.rotation_tried = false;
    }

    /// Starts a read after the delivered offset; when the delivered publication's publish time
    /// or tag is known, the page starts at it, to check it is still the same publication.
    fn start_read(&mut self) -> Work {
        self.in_flight = true;
        let since = if self.delivered.published_ms > 0 || self.delivered.tag != 0 {
            self.delivered.offset.saturating_sub(1)
        } else {
            self.delivered.offset
        };
        Work::Read { since }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(epoch: &str, offset: u64) -> Arc<Publication> {
        Arc::new(
            Publication::new("c".into(), offset, epoch.into(), 0, b"1")
                .published_at(1_000_000 * offset),
        )
    }

    fn entry(epoch: &str, offset: u64, ms: u64) -> Entry {
        (
            Arc::new(Publication::new("c".into(), offset, epoch.into(), 0, b"1")),
            ms,
        )
    }

    fn page(epoch: &str, top: u64, entries: Vec<Entry>) -> Result<Page, ()> {
        Ok(Page {
            epoch: epoch.into(),
            top,
            entries,
        })
    }

    fn at(epoch: &str, offset: u64) -> Delivered {
        Delivered {
            epoch: Some(epoch.into()),
            offset,
            published_ms: 0,
            tag: 0,
        }
    }

    fn offsets(out: &[Arc<Publication>]) -> Vec<(String, u64)> {
        out.iter()
            .map(|p| (p.epoch.to_string(), p.offset))
            .collect()
    }

    fn subscribed_at(delivered: Delivered) -> ChannelState {
        let mut s = ChannelState::subscribing("c".into(), "p".into(), 1);
        assert_eq!(s.on_position(delivered, &mut Vec::new()), None);
        s
    }

    #[test]
    fn holds_live_messages_during_the_position_read_and_drops_those_it_covers() {
        let mut s = ChannelState::subscribing("c".into(), "p".into(), 1);
        let mut out = Vec::new();
        for o in 3..=5 {
            assert_eq!(s.on_live(live("e", o), &mut out), None);
        }
        assert!(
            out.is_empty(),
            "nothing delivered before the position is known"
        );
        assert_eq!(s.on_position(at("e", 4), &mut out), None);
        assert_eq!(offsets(&out), [("e".into(), 5)]);
    }

    #[test]
    fn a_gap_is_read_from_history_and_later_messages_wait_in_order() {
        let mut s = subscribed_at(at("e", 2));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(live("e", 5), &mut out),
            Some(Work::Read { since: 2 })
        );
        assert_eq!(
            s.on_live(live("e", 6), &mut out),
            None,
            "one read at a time"
        );
        assert!(out.is_empty());
        let entries = (3..=5).map(|o| entry("e", o, o * 1000)).collect();
        assert_eq!(s.on_page(2, page("e", 5, entries), &mut out), None);
        assert_eq!(
            offsets(&out).iter().map(|(_, o)| *o).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
    }

    #[test]
    fn a_new_epoch_is_delivered_from_its_start() {
        let mut s = subscribed_at(at("e1", 7));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(live("e2", 3), &mut out),
            Some(Work::Read { since: 0 })
        );
        let entries = (1..=3).map(|o| entry("e2", o, o)).collect();
        assert_eq!(s.on_page(0, page("e2", 3, entries), &mut out), None);
        assert_eq!(
            offsets(&out),
            [("e2".into(), 1), ("e2".into(), 2), ("e2".into(), 3)]
        );
        assert_eq!(s.on_live(live("e1", 8), &mut out), None);
        assert_eq!(out.len(), 3, "a late message of the old epoch is ignored");
    }

    #[test]
    fn a_resync_that_finds_a_new_epoch_reads_it_from_the_start() {
        let mut s = subscribed_at(at("e1", 7));
        let mut out = Vec::new();
        assert_eq!(s.resync(), Some(Work::Read { since: 7 }));
        assert_eq!(
            s.on_page(7, page("e2", 2, vec![]), &mut out),
            Some(Work::Read { since: 0 })
        );
        let entries = (1..=2).map(|o| entry("e2", o, o)).collect();
        assert_eq!(s.on_page(0, page("e2", 2, entries), &mut out), None);
        assert_eq!(offsets(&out), [("e2".into(), 1), ("e2".into(), 2)]);
    }

    #[test]
    fn a_top_below_the_delivered_offset_rotates_the_epoch_then_delivers_it_from_the_start() {
        let mut s = subscribed_at(at("e", 10));
        let mut out = Vec::new();
        for o in 11..=15 {
            s.on_live(live("e", o), &mut out);
        }
        assert_eq!(out.len(), 5);
        s.awaiting_confirmation = true;
        // Redis came back from a snapshot at 10; a message reusing offset 11 arrives first.
        assert_eq!(
            s.on_live(live("e", 11), &mut out),
            Some(Work::Read { since: 14 })
        );
        let seen = s.delivered().clone();
        assert_eq!(
            s.on_page(14, page("e", 11, vec![]), &mut out),
            Some(Work::Rotate { seen })
        );
        assert_eq!(
            s.on_rotated(Ok(Some("e2".into())), &mut out),
            Some(Work::Read { since: 0 })
        );
        let entries = (1..=11).map(|o| entry("e2", o, o)).collect();
        assert_eq!(s.on_page(0, page("e2", 11, entries), &mut out), None);
        assert_eq!(out.len(), 5 + 11);
        assert_eq!(offsets(&out[5..])[0], ("e2".into(), 1));
        assert_eq!(s.on_live(live("e", 12), &mut out), None);
        assert_eq!(out.len(), 16, "the rotated-away epoch is ignored");
    }

    #[test]
    fn a_reused_offset_above_the_old_top_is_caught_by_its_publish_time() {
        let mut s = subscribed_at(at("e", 10));
        let mut out = Vec::new();
        for o in 11..=15 {
            s.on_live(live("e", o), &mut out);
        }
        // Published again after the rollback: top 17 > 15, but offset 15 is another publication.
        assert_eq!(s.resync(), Some(Work::Read { since: 14 }));
        let entries = (15..=17).map(|o| entry("e", o, 99_999 + o)).collect();
        assert!(matches!(
            s.on_page(14, page("e", 17, entries), &mut out),
            Some(Work::Rotate { .. })
        ));
        assert_eq!(out.len(), 5, "nothing of the reused offsets delivered");
    }

    #[test]
    fn a_reused_offset_is_caught_by_its_tag_too() {
        let mut s = subscribed_at(at("e", 10));
        let mut out = Vec::new();
        let tagged =
            |o: u64, tag: u32| Arc::new(Publication::new("c".into(), o, "e".into(), tag, b"1"));
        s.on_live(tagged(11, 7), &mut out);
        assert_eq!(s.resync(), Some(Work::Read { since: 10 }));
        let entries = vec![(tagged(11, 8), 0), (tagged(12, 9), 0)];
        assert!(matches!(
            s.on_page(10, page("e", 12, entries), &mut out),
            Some(Work::Rotate { .. })
        ));
        let unknown = Delivered {
            tag: 0,
            ..s.delivered().clone()
        };
        assert!(!unknown.differs(5, 8), "nothing known, nothing differs");
    }

    #[test]
    fn an_unchanged_history_passes_the_check() {
        let mut s = subscribed_at(at("e", 10));
        let mut out = Vec::new();
        s.on_live(live("e", 11), &mut out);
        assert_eq!(s.resync(), Some(Work::Read { since: 10 }));
        let entries = vec![entry("e", 11, 11_000), entry("e", 12, 12_000)];
        assert_eq!(s.on_page(10, page("e", 12, entries), &mut out), None);
        assert_eq!(out.iter().map(|p| p.offset).collect::<Vec<_>>(), [11, 12]);
    }

    #[test]
    fn held_messages_are_bounded_and_an_overflow_reads_history_instead() {
        let mut s = subscribed_at(at("e", 0));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(live("e", 2), &mut out),
            Some(Work::Read { since: 0 })
        );
        for o in 3..(3 + HELD_MAX as u64 + 10) {
            assert_eq!(s.on_live(live("e", o), &mut out), None);
        }
        assert!(s.held.len() <= HELD_MAX);
        let entries = (1..=2).map(|o| entry("e", o, o * 1000)).collect();
        assert_eq!(
            s.on_page(0, page("e", 2, entries), &mut out),
            Some(Work::Read { since: 1 }),
            "after an overflow the channel reads history again"
        );
    }

    #[test]
    fn a_failed_read_goes_on_with_live_messages_and_retries_on_the_tick() {
        let mut s = subscribed_at(at("e", 1));
        let mut out = Vec::new();
        assert!(s.on_live(live("e", 4), &mut out).is_some());
        assert_eq!(s.on_page(1, Err(()), &mut out), None);
        assert_eq!(offsets(&out), [("e".into(), 4)]);
        assert_eq!(s.retry_failed(), Some(Work::Read { since: 3 }));
        assert_eq!(s.retry_failed(), None);
    }

    #[test]
    fn a_confirmation_after_a_disconnect_resyncs_once() {
        let mut s = subscribed_at(at("e", 1));
        assert_eq!(s.on_confirmed(), None, "no disconnect: nothing to do");
        s.awaiting_confirmation = true;
        assert_eq!(s.on_confirmed(), Some(Work::Read { since: 1 }));
        assert_eq!(s.on_confirmed(), None);
    }

    fn event(kind: crate::Kind, epoch: &str, after: u64) -> Arc<Publication> {
        Arc::new(Publication::presence_event(
            kind,
            "c".into(),
            epoch.into(),
            after,
            b"{}",
        ))
    }

    /// What was delivered: `P<offset>` for a publication, `J<after>`/`L<after>` for an event.
    fn script(out: &[Arc<Publication>]) -> Vec<String> {
        out.iter()
            .map(|p| match p.kind {
                crate::Kind::Publication => format!("P{}", p.offset),
                crate::Kind::Join => format!("J{}", p.offset),
                crate::Kind::Leave => format!("L{}", p.offset),
            })
            .collect()
    }

    #[test]
    fn an_event_whose_place_was_delivered_goes_out_at_once_and_moves_nothing() {
        use crate::Kind::{Join, Leave};
        let mut s = subscribed_at(at("e", 2));
        let mut out = Vec::new();
        assert_eq!(s.on_live(event(Join, "e", 2), &mut out), None);
        assert_eq!(s.on_live(event(Leave, "e", 1), &mut out), None);
        assert_eq!(s.delivered(), &at("e", 2), "events move no position");
        assert_eq!(s.on_live(live("e", 3), &mut out), None);
        assert_eq!(script(&out), ["J2", "L1", "P3"]);
    }

    #[test]
    fn an_event_waits_in_order_behind_a_gap() {
        use crate::Kind::{Join, Leave};
        let mut s = subscribed_at(at("e", 2));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(live("e", 5), &mut out),
            Some(Work::Read { since: 2 })
        );
        assert_eq!(s.on_live(event(Join, "e", 5), &mut out), None);
        assert_eq!(s.on_live(live("e", 6), &mut out), None);
        assert_eq!(s.on_live(event(Leave, "e", 6), &mut out), None);
        assert!(out.is_empty(), "held while the gap is read");
        let entries = (3..=5).map(|o| entry("e", o, o * 1000)).collect();
        assert_eq!(s.on_page(2, page("e", 5, entries), &mut out), None);
        assert_eq!(script(&out), ["P3", "P4", "P5", "J5", "P6", "L6"]);
    }

    #[test]
    fn an_event_ahead_of_the_delivered_offset_reads_the_publications_before_it() {
        use crate::Kind::Join;
        let mut s = subscribed_at(at("e", 2));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(event(Join, "e", 4), &mut out),
            Some(Work::Read { since: 2 })
        );
        let entries = (3..=4).map(|o| entry("e", o, o * 1000)).collect();
        assert_eq!(s.on_page(2, page("e", 4, entries), &mut out), None);
        assert_eq!(script(&out), ["P3", "P4", "J4"]);
    }

    #[test]
    fn events_held_while_subscribing_follow_the_position() {
        use crate::Kind::{Join, Leave};
        let mut s = ChannelState::subscribing("c".into(), "p".into(), 1);
        let mut out = Vec::new();
        assert_eq!(s.on_live(event(Join, "e", 3), &mut out), None);
        assert_eq!(s.on_live(live("e", 4), &mut out), None);
        assert_eq!(s.on_live(event(Leave, "e", 4), &mut out), None);
        assert!(out.is_empty());
        assert_eq!(s.on_position(at("e", 3), &mut out), None);
        assert_eq!(script(&out), ["J3", "P4", "L4"]);
    }

    #[test]
    fn an_event_of_a_channel_without_publications_goes_out_at_once() {
        use crate::Kind::Join;
        let mut s = ChannelState::subscribing("c".into(), "p".into(), 1);
        let mut out = Vec::new();
        let none = Delivered {
            epoch: None,
            offset: 0,
            published_ms: 0,
            tag: 0,
        };
        assert_eq!(s.on_position(none.clone(), &mut out), None);
        assert_eq!(s.on_live(event(Join, "", 0), &mut out), None);
        assert_eq!(script(&out), ["J0"]);
        assert_eq!(s.delivered(), &none, "no epoch is made up");
    }

    #[test]
    fn an_event_of_a_new_epoch_is_delivered_after_that_epoch_from_its_start() {
        use crate::Kind::Join;
        let mut s = subscribed_at(at("e1", 7));
        let mut out = Vec::new();
        assert_eq!(
            s.on_live(event(Join, "e2", 2), &mut out),
            Some(Work::Read { since: 0 })
        );
        let entries = (1..=2).map(|o| entry("e2", o, o)).collect();
        assert_eq!(s.on_page(0, page("e2", 2, entries), &mut out), None);
        assert_eq!(script(&out), ["P1", "P2", "J2"]);
        assert_eq!(offsets(&out)[2].0, "e2");
    }

    #[test]
    fn events_among_dropped_held_messages_are_lost_not_repeated() {
        use crate::Kind::Join;
        let mut s = subscribed_at(at("e", 0));
        let mut out = Vec::new();
        assert!(s.on_live(live("e", 2), &mut out).is_some());
        assert_eq!(s.on_live(event(Join, "e", 2), &mut out), None);
        for o in 3..(3 + HELD_MAX as u64) {
            s.on_live(live("e", o), &mut out);
        }
        let top = 2 + HELD_MAX as u64;
        // History serves the reads (the overflow makes one more) until the channel is live.
        let mut since = 0;
        for _ in 0..10 {
            let entries = (since + 1..=top).map(|o| entry("e", o, o)).collect();
            match s.on_page(since, page("e", top, entries), &mut out) {
                Some(Work::Read { since: next }) => since = next,
                None => break,
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
        let delivered = script(&out);
        assert_eq!(
            delivered.len() as u64,
            top,
            "every publication, from history"
        );
        assert!(
            !delivered.contains(&"J2".to_string()),
            "the held join is gone"
        );
    }
}
