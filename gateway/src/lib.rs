//! A realtime gateway node: WebSocket, SSE and long-poll clients subscribe to channels whose publications are
//! ordered, kept and fanned out by a [`backplane::Backplane`]; a client that drops resumes from
//! its last position on any node.
//!
//! [`Gateway::start`] binds the listener and serves until [`RunningGateway::shutdown`].

mod api;
mod assets;
mod auth;
mod batch_writer;
mod body_channel;
pub mod config;
pub mod cursor;
mod delivery;
mod demo;
mod drain;
mod frame_reader;
#[doc(hidden)]
pub mod fuzzing;
mod hub;
mod limits;
mod listener;
mod metrics;
mod namespace;
mod node;
mod origin;
mod policy;
mod poll;
mod protocol;
mod queue;
mod response;
mod security;
mod server;
mod session;
mod sse;
mod stream_query;
mod tls;
mod ws;
mod ws_message;

pub use config::Config;
pub use metrics::Metrics;
pub use node::{Node, StartError};
pub use server::{Gateway, RunningGateway};
