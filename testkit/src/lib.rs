//! The test kit: everything a test (or `loadtest`) needs to drive real gateway and redis-server
//! processes from outside — spawning them ([`gateway_process`], [`redis`], [`sentinel`];
//! [`slot_move`] reshards a cluster; [`tcp_proxy`] freezes or cuts a link), talking to them ([`http`], [`ws`], [`raw_ws`], [`sse`]),
//! publishing ([`publisher`]; through faults, with retries: [`fault_publish`]), recording what
//! subscribers receive and checking it against the acks ([`recording`]), and waiting without
//! sleeping ([`wait`]).
//!
//! Most helpers take an [`Endpoint`]: a `SocketAddr`, a [`GatewayProcess`], or anything else
//! that knows its address (the gateway's in-process test node implements it too).

pub mod fault_publish;
pub mod gateway_process;
pub mod histogram;
pub mod http;
mod process;
pub mod publisher;
pub mod raw_ws;
pub mod recording;
pub mod redis;
pub mod sentinel;
pub mod slot_move;
pub mod sse;
pub mod tcp_proxy;
pub mod text;
pub mod wait;
pub mod ws;

pub use fault_publish::*;
pub use gateway_process::{run_to_exit, start_nodes, GatewayProcess};
pub use histogram::bucket_quantile;
pub use http::*;
pub use process::{die_with_parent, rss_bytes_of, signal_with_parent};
pub use publisher::*;
pub use raw_ws::*;
pub use recording::*;
pub use redis::*;
pub use sentinel::*;
pub use slot_move::*;
pub use sse::*;
pub use tcp_proxy::TcpProxy;
pub use text::*;
pub use wait::*;
pub use ws::*;
