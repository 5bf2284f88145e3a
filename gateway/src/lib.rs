//! A realtime gateway node: WebSocket, SSE and long-poll clients subscribe to channels whose publications are
//! ordered, kept and fanned out by a [`backplane::Backplane`]; a client that drops resumes from
//! its last position on any node.
//!
//! [`Gateway::start`] binds the listener and serves until [`RunningGateway::shutdown`].

pub mod cli;
pub mod config;
mod control;
pub mod cursor;
mod demo;
mod drain;
mod express;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod hub;
mod metrics;
mod node;
mod presence;
mod protocol;
mod queue;
mod security;
mod send_batch;
mod session;
mod transport;

pub use config::Config;
pub use http::server::{Gateway, RunningGateway};
pub use metrics::Metrics;
pub use node::{Node, StartError};
