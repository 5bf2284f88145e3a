//! The exactly-once rule, the same as the JavaScript client's: each channel's position (epoch,
//! offset and tag of the last publication handed on), duplicates dropped by offset within an
//! epoch, and what a subscribe result or a reset does to the position.

use std::collections::HashMap;

use serde::Deserialize;

use crate::types::{Position, Publication, Reset};

/// The result of a `subscribe` command.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct SubscribeResult {
    pub channel: String,
    pub epoch: String,
    /// The channel's newest offset when the subscription started.
    pub offset: u64,
    #[serde(default)]
    pub tag: Option<String>,
    pub recovered: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Every channel's position.
#[derive(Debug, Clone, Default)]
pub(crate) struct Positions {
    map: HashMap<String, Position>,
}

impl Positions {
    pub fn from_map(map: HashMap<String, Position>) -> Positions {
        Positions { map }
    }

    pub fn get(&self, channel: &str) -> Option<&Position> {
        self.map.get(channel)
    }

    pub fn set(&mut self, channel: &str, position: Position) {
        self.map.insert(channel.to_string(), position);
    }

    pub fn remove(&mut self, channel: &str) {
        self.map.remove(channel);
    }

    /// Whether `publication` is new: true (and the position advances to it) unless it is at or
    /// before the position of the same epoch, i.e. a duplicate.
    pub fn accept(&mut self, publication: &Publication) -> bool {
        if let Some(p) = self.map.get(&publication.channel) {
            if p.epoch == publication.epoch && publication.offset <= p.offset {
                return false;
            }
        }
        self.set(&publication.channel, Position::of(publication));
        true
    }

    /// Applies a subscribe result for a subscription that asked for `since`. Recovered: the
    /// position stands, the missed publications follow. Not recovered: delivery starts after
    /// `result.offset` — simply the start of a fresh subscription, or, when a position was asked
    /// for, a gap, returned as the reset to surface. After `epoch_changed` the server delivers
    /// the new epoch from its start, so the position is its offset 0 (no tag).
    pub fn subscribed(
        &mut self,
        result: &SubscribeResult,
        since: Option<&Position>,
    ) -> Option<Reset> {
        if result.recovered {
            return None;
        }
        let from_start = since.is_some() && result.reason.as_deref() == Some("epoch_changed");
        let offset = if from_start { 0 } else { result.offset };
        let tag = if from_start { None } else { result.tag.clone() };
        self.set(
            &result.channel,
            Position {
                epoch: result.epoch.clone(),
                offset,
                tag,
            },
        );
        match (&result.reason, since) {
            (Some(reason), Some(_)) => Some(Reset {
                channel: result.channel.clone(),
                reason: reason.clone(),
                epoch: result.epoch.clone(),
                offset,
            }),
            _ => None,
        }
    }

    /// A live stream could not be continued: publications after `reset.offset` of
    /// `reset.epoch` follow.
    pub fn reset(&mut self, reset: &Reset) {
        self.set(
            &reset.channel,
            Position {
                epoch: reset.epoch.clone(),
                offset: reset.offset,
                tag: None,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn publication(epoch: &str, offset: u64) -> Publication {
        Publication {
            channel: "c".into(),
            offset,
            epoch: epoch.into(),
            tag: Some(format!("{offset:08x}")),
            data: json!(offset),
        }
    }

    fn result(epoch: &str, offset: u64, recovered: bool, reason: Option<&str>) -> SubscribeResult {
        SubscribeResult {
            channel: "c".into(),
            epoch: epoch.into(),
            offset,
            tag: Some("0000abcd".into()),
            recovered,
            reason: reason.map(String::from),
        }
    }

    #[test]
    fn duplicates_within_an_epoch_are_dropped_and_the_position_advances() {
        let mut p = Positions::default();
        assert!(p.accept(&publication("e1", 1)));
        assert!(p.accept(&publication("e1", 2)));
        assert!(!p.accept(&publication("e1", 2)), "same offset again");
        assert!(!p.accept(&publication("e1", 1)), "an older offset");
        assert!(p.accept(&publication("e1", 3)));
        let pos = p.get("c").unwrap();
        assert_eq!((pos.epoch.as_str(), pos.offset), ("e1", 3));
        assert_eq!(pos.tag.as_deref(), Some("00000003"));
    }

    #[test]
    fn a_new_epoch_is_not_a_duplicate_even_at_lower_offsets() {
        let mut p = Positions::default();
        assert!(p.accept(&publication("e1", 7)));
        assert!(p.accept(&publication("e2", 1)));
        assert_eq!(p.get("c").unwrap().epoch, "e2");
        assert!(!p.accept(&publication("e2", 1)));
    }

    #[test]
    fn a_fresh_subscription_starts_after_the_current_offset_without_a_reset() {
        let mut p = Positions::default();
        assert_eq!(p.subscribed(&result("e1", 5, false, None), None), None);
        let pos = p.get("c").unwrap().clone();
        assert_eq!((pos.epoch.as_str(), pos.offset), ("e1", 5));
        assert_eq!(pos.tag.as_deref(), Some("0000abcd"));
        assert!(!p.accept(&publication("e1", 5)));
        assert!(p.accept(&publication("e1", 6)));
    }

    #[test]
    fn a_recovered_resume_keeps_the_position_so_replayed_publications_are_new() {
        let since = Position {
            epoch: "e1".into(),
            offset: 3,
            tag: Some("00000003".into()),
        };
        let mut p = Positions::from_map([("c".to_string(), since.clone())].into());
        assert_eq!(
            p.subscribed(&result("e1", 9, true, None), Some(&since)),
            None
        );
        assert_eq!(p.get("c"), Some(&since));
        assert!(!p.accept(&publication("e1", 3)));
        assert!(p.accept(&publication("e1", 4)));
    }

    #[test]
    fn an_unrecovered_resume_is_a_reset_and_continues_live() {
        let since = Position {
            epoch: "e1".into(),
            offset: 3,
            tag: None,
        };
        let mut p = Positions::from_map([("c".to_string(), since.clone())].into());
        let reset = p
            .subscribed(
                &result("e1", 40, false, Some("history_truncated")),
                Some(&since),
            )
            .expect("a reset");
        assert_eq!(
            reset,
            Reset {
                channel: "c".into(),
                reason: "history_truncated".into(),
                epoch: "e1".into(),
                offset: 40
            }
        );
        assert!(!p.accept(&publication("e1", 40)));
        assert!(p.accept(&publication("e1", 41)));
    }

    #[test]
    fn epoch_changed_restarts_at_offset_zero_of_the_new_epoch() {
        let since = Position {
            epoch: "old".into(),
            offset: 30,
            tag: Some("00000030".into()),
        };
        let mut p = Positions::from_map([("c".to_string(), since.clone())].into());
        let reset = p
            .subscribed(
                &result("new", 4, false, Some("epoch_changed")),
                Some(&since),
            )
            .expect("a reset");
        assert_eq!((reset.epoch.as_str(), reset.offset), ("new", 0));
        assert_eq!(
            p.get("c"),
            Some(&Position {
                epoch: "new".into(),
                offset: 0,
                tag: None
            })
        );
        for offset in 1..=4 {
            assert!(p.accept(&publication("new", offset)));
        }
    }

    #[test]
    fn a_live_reset_moves_the_position() {
        let mut p = Positions::default();
        assert!(p.accept(&publication("e1", 8)));
        p.reset(&Reset {
            channel: "c".into(),
            reason: "epoch_changed".into(),
            epoch: "e2".into(),
            offset: 0,
        });
        assert!(p.accept(&publication("e2", 1)));
        assert!(!p.accept(&publication("e2", 1)));
    }
}
