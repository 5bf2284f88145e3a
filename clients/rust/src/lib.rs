//! Rust client of the realtime gateway (`docs/protocol.md`).
//!
//! - [`ApiClient`]: the server API — [`ApiClient::publish`] with one idempotency key per
//!   logical publish, retried across nodes until acknowledged, and history
//!   ([`ApiClient::history`], [`ApiClient::history_after`] to page through everything after a
//!   position); one data to many channels ([`ApiClient::broadcast`]); and the management of
//!   users and channels ([`ApiClient::disconnect`], [`ApiClient::unsubscribe`],
//!   [`ApiClient::channels`]).
//! - [`Subscriber`]: a WebSocket subscriber that keeps each channel's position (epoch, offset,
//!   tag), and across reconnects and node changes resumes every channel from it: every
//!   publication exactly once and in order, or an explicit [`Event::Reset`] first — the rule of
//!   the JavaScript client.

#![warn(missing_docs)]

mod api;
mod backoff;
mod error;
mod positions;
mod subscriber;
mod types;

pub use api::{new_idempotency_key, ApiClient};
pub use backoff::Backoff;
pub use error::{Error, Result};
pub use subscriber::{Event, Subscriber, SubscriberBuilder};
pub use types::{
    ChannelCount, HistoryPage, Member, Position, Presence, Publication, PublishAck, Reset,
};
