//! `latency`: a fixed publish rate through node 0, subscribers spread over every node (3 gateway
//! nodes on Redis by default); publish→deliver percentiles from the timestamp in each payload.

use serde_json::Value;

use crate::pubsub::{self, Params};
use crate::subscriber::Transport;
use crate::system::System;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Publications per second over all channels (deliveries/s = rate × clients / channels).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
}

pub async fn run(system: &mut System, a: &Args) -> Value {
    let p = Params {
        clients: a.clients,
        channels: a.channels,
        rate: a.rate,
        duration: crate::secs(a.duration),
        payload: a.payload,
        transport: a.transport,
        drain: crate::secs(10.0),
        subscribe_nodes: (0..system.nodes.len()).collect(),
        publish_node: 0,
        storm: None,
        bucket: std::time::Duration::from_millis(500),
    };
    let out = pubsub::run(system, &p).await;
    let mut v = out.to_json(&p);
    v["scenario"] = "latency".into();
    v["nodes"] = system.nodes.len().into();
    v
}
