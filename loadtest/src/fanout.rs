//! `fanout`: C subscribers over K channels, spread over the system's nodes, and one publisher at
//! R/s (or as fast as accepted); deliveries per second (and per server CPU second), latency, loss.

use serde_json::Value;

use crate::pubsub::{self, Params};
use crate::subscriber::Transport;
use crate::system::System;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publications per second over all channels (0 = as fast as the server accepts them).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Padding bytes added to each publication's data.
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
    /// Seconds subscribers wait for in-flight deliveries after the last publication.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
}

pub async fn run(system: &mut System, a: &Args) -> Value {
    let p = Params {
        clients: a.clients,
        channels: a.channels,
        rate: a.rate,
        duration: crate::secs(a.duration),
        payload: a.payload,
        transport: a.transport,
        drain: crate::secs(a.drain),
        subscribe_nodes: (0..system.nodes.len()).collect(),
        publish_node: 0,
        storm: None,
        bucket: std::time::Duration::from_millis(500),
    };
    let out = pubsub::run(system, &p).await;
    let mut v = out.to_json(&p);
    v["scenario"] = "fanout".into();
    v
}
