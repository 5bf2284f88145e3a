//! The pub/sub link of one node: which channels the node listens to at Redis, turned into
//! in-order, gap-free deliveries to the node's sink. This file is the backplane's handle on it;
//! the task is in [`super::link`], a channel's delivery state in [`super::channel_state`], the
//! reads it runs in [`super::link_reads`] and its (un)subscribe commands in
//! [`super::subscription_worker`].
//!
//! - Subscriptions are batched (requests that arrive together become one SUBSCRIBE and one
//!   position read) and linger for `subscribe_linger` after the last local subscriber left,
//!   against churn. A subscribe whose caller went away lingers out the same way, so the link's
//!   Redis subscriptions are always the channels with local subscribers plus lingering ones.
//! - Each channel remembers the last offset delivered. A message that skips offsets makes the
//!   link read the gap from history and deliver it first; an older one is a duplicate and
//!   dropped. A new epoch is delivered from its start; a rollback under the same epoch rotates it.
//! - Pushes reach the task through a bounded queue: when it is full, pushes are dropped and every
//!   channel is re-read from history instead.
//! - Presence events (joins and leaves) ride the channel's pub/sub channel too, each naming the
//!   offset it follows, and are delivered in order with the publications. They are not in
//!   history: whatever drops held messages for a re-read (an overflow, a reconnect) loses the
//!   events among them. At most once, never twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redis::PushInfo;
use tokio::sync::{mpsc, oneshot};

use super::commands::unavailable;
use super::connection::Connection;
use super::link::{Task, Wiring};
use super::subscription_worker;
use super::{RedisConfig, Shared};
use crate::{BackplaneError, Kind};

/// Pushes waiting for the link task; beyond it they are dropped and every channel re-read.
const PUSH_QUEUE: usize = 4096;

pub(crate) type Ack = oneshot::Sender<Result<(), BackplaneError>>;

pub(crate) enum Request {
    Subscribe(Arc<str>, Ack),
    Unsubscribe(Arc<str>),
}

/// The backplane's handle on its link task.
pub(crate) struct Link {
    requests: mpsc::UnboundedSender<Request>,
}

impl Link {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        config: &RedisConfig,
    ) -> Result<Link, BackplaneError> {
        let (push_tx, raw_pushes) = mpsc::unbounded_channel();
        let mut connection = Connection::open(&config.target, config, push_tx).await?;
        let health_channel = shared.keys.health(&shared.node_id);
        connection
            .subscribe(
                std::slice::from_ref(&health_channel),
                config.command_timeout,
            )
            .await?;
        let (pushes, pushes_dropped) = bounded(raw_pushes);
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (changes, change_rx) = mpsc::unbounded_channel();
        let (completion_tx, completions) = mpsc::unbounded_channel();
        tokio::spawn(subscription_worker::run(
            connection,
            shared.clone(),
            config.command_timeout,
            change_rx,
            completion_tx.clone(),
        ));
        let task = Task::new(Wiring {
            shared,
            requests: request_rx,
            pushes,
            pushes_dropped,
            changes,
            completions,
            completion_tx,
            health_channel,
            health_interval: config.health_interval,
            linger: config.subscribe_linger,
        });
        tokio::spawn(task.run());
        Ok(Link { requests })
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let channel: Arc<str> = channel.into();
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Subscribe(channel.clone(), tx))
            .map_err(|_| unavailable("pub/sub link stopped"))?;
        // Dropped before the answer (the caller went away): nobody will know the node is
        // subscribed, so tell the link, which lets the channel linger out.
        let mut abandoned = Abandoned {
            requests: &self.requests,
            channel: Some(channel),
        };
        let result = rx.await.map_err(|_| unavailable("pub/sub link stopped"));
        abandoned.channel = None;
        result?
    }

    pub(crate) fn unsubscribe(&self, channel: &str) {
        let _ = self.requests.send(Request::Unsubscribe(channel.into()));
    }
}

struct Abandoned<'a> {
    requests: &'a mpsc::UnboundedSender<Request>,
    channel: Option<Arc<str>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = self.requests.send(Request::Unsubscribe(channel));
        }
    }
}

/// redis-rs hands pushes to an unbounded sender. This forwarder moves each at once into the
/// link's bounded queue and, when that is full, drops it and raises a flag that makes the link
/// re-read every channel from history (it does nothing else, so its own queue stays empty).
fn bounded(
    mut raw: mpsc::UnboundedReceiver<PushInfo>,
) -> (mpsc::Receiver<PushInfo>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel(PUSH_QUEUE);
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    tokio::spawn(async move {
        while let Some(push) = raw.recv().await {
            match tx.try_send(push) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => flag.store(true, Ordering::Relaxed),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    (rx, dropped)
}

/// A message on a channel's pub/sub channel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    Publication(PublicationMessage<'a>),
    Presence(PresenceMessage<'a>),
}

/// A publication as the publish script sends it through pub/sub.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PublicationMessage<'a> {
    pub(crate) offset: u64,
    pub(crate) epoch: &'a str,
    pub(crate) published_us: u64,
    pub(crate) tag: u32,
    pub(crate) channel: &'a str,
    pub(crate) data: &'a [u8],
}

/// A join or leave as the presence scripts send it through pub/sub.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PresenceMessage<'a> {
    /// [`Kind::Join`] or [`Kind::Leave`].
    pub(crate) kind: Kind,
    /// The channel's top offset when the event happened: the event follows that publication.
    pub(crate) after: u64,
    /// The channel's epoch then, `""` for a channel with no publication.
    pub(crate) epoch: &'a str,
    pub(crate) channel: &'a str,
    /// The member's compact JSON.
    pub(crate) member: &'a [u8],
}

/// Splits a pub/sub message. A presence event starts with its kind, a publication with a digit:
/// - `"J <after> <epoch or -> <channel>\n<member>"` (`L` for a leave);
/// - `"<offset> <epoch> <publish time, us> <tag> <channel>\n<data>"` (the tag is 8 hex digits;
///   the channel is last). Also the untagged form of nodes from before tags,
///   `"<offset> <epoch> <publish time, us> <channel>\n<data>"`, as tag 0, so a rolling deploy
///   does not drop their publications (channel names have no whitespace, so the forms differ in
///   their number of fields).
pub(crate) fn parse_message(payload: &[u8]) -> Option<Message<'_>> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&payload[..newline]).ok()?;
    let body = &payload[newline + 1..];
    let kind = match payload.first()? {
        b'J' => Some(Kind::Join),
        b'L' => Some(Kind::Leave),
        _ => None,
    };
    if let Some(kind) = kind {
        let mut parts = head.splitn(4, ' ');
        let _kind = parts.next()?;
        let after = parts.next()?.parse().ok()?;
        let epoch = match parts.next()? {
            "-" => "",
            epoch => epoch,
        };
        let channel = parts.next()?;
        return Some(Message::Presence(PresenceMessage {
            kind,
            after,
            epoch,
            channel,
            member: body,
        }));
    }
    let tagged = head.split(' ').count() >= 5;
    let mut parts = head.splitn(if tagged { 5 } else { 4 }, ' ');
    let offset = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let published_us = parts.next()?.parse().ok()?;
    let tag = if tagged {
        crate::parse_tag(parts.next()?)?
    } else {
        0
    };
    let channel = parts.next()?;
    Some(Message::Publication(PublicationMessage {
        offset,
        epoch,
        published_us,
        tag,
        channel,
        data: body,
    }))
}

#[cfg(test)]
mod tests {
    use super::{parse_message, Message, PresenceMessage, PublicationMessage};
    use crate::Kind;

    fn publication(payload: &[u8]) -> Option<PublicationMessage<'_>> {
        match parse_message(payload)? {
            Message::Publication(p) => Some(p),
            Message::Presence(_) => None,
        }
    }

    #[test]
    fn parses_the_script_message() {
        let message =
            publication(b"42 e1 1700000000000123 00c0ffee chat:a\n{\"x\":\"a b\\nc\"}").unwrap();
        let expected = PublicationMessage {
            offset: 42,
            epoch: "e1",
            published_us: 1700000000000123,
            tag: 0xc0ffee,
            channel: "chat:a",
            data: b"{\"x\":\"a b\\nc\"}",
        };
        assert_eq!(message, expected);
        assert!(parse_message(b"x e 1 0000000a c\n1").is_none());
        assert!(parse_message(b"1 e 1 0000000a c").is_none());
        assert!(parse_message(b"1 e 1 xyz c\n1").is_none(), "not a tag");
        let untagged = publication(b"7 e2 1700000000000456 chat:b\n[1]").unwrap();
        let expected = PublicationMessage {
            offset: 7,
            epoch: "e2",
            published_us: 1700000000000456,
            tag: 0,
            channel: "chat:b",
            data: b"[1]",
        };
        assert_eq!(untagged, expected, "a node from before tags");
    }

    #[test]
    fn tells_presence_events_from_publications() {
        let join = parse_message(b"J 12 e1 chat:a\n{\"client\":\"c 1\",\"user\":null}").unwrap();
        assert_eq!(
            join,
            Message::Presence(PresenceMessage {
                kind: Kind::Join,
                after: 12,
                epoch: "e1",
                channel: "chat:a",
                member: b"{\"client\":\"c 1\",\"user\":null}",
            })
        );
        let leave = parse_message(b"L 0 - fresh\n{}").unwrap();
        assert_eq!(
            leave,
            Message::Presence(PresenceMessage {
                kind: Kind::Leave,
                after: 0,
                epoch: "",
                channel: "fresh",
                member: b"{}",
            }),
            "a channel never published to has no epoch"
        );
        assert!(parse_message(b"J x e c\n{}").is_none(), "after is a number");
        assert!(
            parse_message(b"J 1 e\n{}").is_none(),
            "the channel is there"
        );
        assert!(
            parse_message(b"L 1 e c").is_none(),
            "the member follows a newline"
        );
        assert!(parse_message(b"X 1 e c\n{}").is_none(), "an unknown kind");
    }
}
