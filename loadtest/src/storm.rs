//! `storm`: K subscribers on node 1 while node 0 publishes; node 1 is killed (`kill -9`) or
//! drained (SIGTERM) mid-run and its clients reconnect to the other nodes from their positions.
//! Reports when each was caught up, the reconnect curve, and lost / duplicated / out-of-order
//! counts, which must all be 0.

use std::time::Duration;

use serde_json::Value;

use crate::pubsub::{self, Params, Storm};
use crate::subscriber::Transport;
use crate::system::System;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a drain (clients follow the node's reconnect hint).
    Term,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing in all.
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Seconds of publishing before the kill.
    #[arg(long, default_value_t = 5.0)]
    pub kill_after: f64,
    #[arg(long, value_enum, default_value = "kill")]
    pub signal: Signal,
    /// Each client waits a random share of this many ms before reconnecting (full jitter).
    #[arg(long, default_value_t = 1000)]
    pub jitter_ms: u64,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
}

pub async fn run(system: &mut System, a: &Args) -> Value {
    let victim = if system.nodes.len() > 1 { 1 } else { 0 };
    let p = Params {
        clients: a.clients,
        channels: a.channels,
        rate: a.rate,
        duration: crate::secs(a.duration),
        payload: 0,
        transport: a.transport,
        drain: crate::secs(15.0),
        subscribe_nodes: vec![victim],
        publish_node: 0,
        storm: Some(Storm {
            victim,
            signal: match a.signal {
                Signal::Kill => libc::SIGKILL,
                Signal::Term => libc::SIGTERM,
            },
            after: crate::secs(a.kill_after),
            jitter: Duration::from_millis(a.jitter_ms),
        }),
        bucket: Duration::from_millis(100),
    };
    let out = pubsub::run(system, &p).await;
    let mut v = out.to_json(&p);
    v["scenario"] = "storm".into();
    v["nodes"] = system.nodes.len().into();
    v
}
