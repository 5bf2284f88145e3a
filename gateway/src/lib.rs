//! A realtime gateway node: WebSocket, SSE and long-poll clients subscribe to channels whose publications are
//! ordered, kept and fanned out by a [`backplane::Backplane`]; a client that drops resumes from
//! its last position on any node.
//!
//! [`Gateway::start`] binds the listener and serves until [`RunningGateway::shutdown`].

pub mod api;
pub mod assets;
mod batch_writer;
mod body_channel;
pub mod client;
pub mod config;
pub mod cursor;
pub mod demo;
pub mod drain;
mod frame_reader;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod poll;
pub mod protocol;
pub mod queue;
pub mod response;
pub mod server;
pub mod sse;
pub mod ws;
mod ws_message;

pub use config::Config;
pub use server::{Gateway, RunningGateway, StartError};
