//! A realtime gateway node: WebSocket, SSE and long-poll clients subscribe to channels whose publications are
//! ordered, kept and fanned out by a [`backplane::Backplane`]; a client that drops resumes from
//! its last position on any node.
//!
//! [`Gateway::start`] binds the listener and serves until [`RunningGateway::shutdown`].

pub mod api;
pub mod assets;
pub mod auth;
mod batch_writer;
mod body_channel;
pub mod client;
pub mod config;
pub mod cursor;
pub mod demo;
pub mod drain;
mod frame_reader;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod origin;
pub mod poll;
pub mod protocol;
pub mod queue;
pub mod response;
pub mod security;
pub mod server;
pub mod sse;
pub mod tls;
pub mod ws;
mod ws_message;

pub use config::Config;
pub use server::{Gateway, RunningGateway, StartError};
