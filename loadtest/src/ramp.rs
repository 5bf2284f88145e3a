//! `ramp`: the capacity figure. Fixed subscribers (default 1,000 WebSocket clients on 1 channel)
//! and a publish rate raised step by step (× `--factor` from `--start-rate`, each step a
//! `pubsub::run` of `--step` seconds) until a step's p99 publish→deliver latency passes
//! `--p99-limit-ms`, subscribers lose (or get duplicated) messages, or the publisher cannot
//! reach the asked rate. The capacity is the deliveries/s of the last step that stayed within
//! all three. This module owns the stepping and the stop rule; the run itself is pubsub's.

use std::time::Duration;

use serde_json::{json, Value};

use crate::pubsub::{self, Params};
use crate::subscriber::Transport;
use crate::system::System;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publications per second of the first step.
    #[arg(long, default_value_t = 50.0)]
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Seconds of publishing per step.
    #[arg(long, default_value_t = 5.0)]
    pub step: f64,
    /// A step whose p99 publish→deliver latency passes this ends the ramp.
    #[arg(long, default_value_t = 50.0)]
    pub p99_limit_ms: f64,
    /// A step whose achieved publish rate is below this share of the asked one ends the ramp.
    #[arg(long, default_value_t = 0.95)]
    pub min_rate_share: f64,
    #[arg(long, default_value_t = 20)]
    pub max_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
}

/// Why a step ends the ramp, if it does.
fn verdict(step: &Value, a: &Args) -> Option<String> {
    let p99 = step["latency"]["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
    let (lost, dup) = (step["lost"].as_u64(), step["duplicated"].as_u64());
    let asked = step["rate_target"].as_f64().unwrap_or(0.0);
    let achieved = step["publish_rate"].as_f64().unwrap_or(0.0);
    if lost != Some(0) || dup != Some(0) || step["out_of_order"].as_u64() != Some(0) {
        Some(format!(
            "loss: {} lost, {} duplicated",
            step["lost"], step["duplicated"]
        ))
    } else if step["client_errors"].as_u64() != Some(0)
        || step["publish_errors"].as_u64() != Some(0)
    {
        Some(format!("errors: {}", step["first_errors"]))
    } else if p99 > a.p99_limit_ms {
        Some(format!("p99 {p99} ms > {} ms", a.p99_limit_ms))
    } else if achieved < asked * a.min_rate_share {
        Some(format!("publisher reached {achieved}/s of {asked}/s"))
    } else {
        None
    }
}

pub async fn run(system: &mut System, a: &Args) -> Value {
    let mut steps = Vec::new();
    let mut capacity: Option<Value> = None;
    let mut stopped_by = format!("{} steps", a.max_steps);
    let mut rate = a.start_rate;
    for i in 0..a.max_steps {
        let p = Params {
            clients: a.clients,
            channels: a.channels,
            rate,
            duration: crate::secs(a.step),
            payload: a.payload,
            transport: a.transport,
            drain: crate::secs(5.0),
            subscribe_nodes: (0..system.nodes.len()).collect(),
            publish_node: 0,
            storm: None,
            bucket: Duration::from_millis(500),
        };
        let out = pubsub::run(system, &p).await;
        let full = out.to_json(&p);
        let cpu_cores = out.server_cpu_s / out.elapsed_s.max(1e-9);
        let step = json!({
            "step": i + 1,
            "rate_target": full["rate_target"],
            "publish_rate": full["publish_rate"],
            "deliveries_per_s": full["deliveries_per_s"],
            "latency": full["latency"],
            "server_cpu_s": full["server_cpu_s"],
            "server_cpu_cores": pubsub::round2(cpu_cores),
            "lost": full["lost"],
            "duplicated": full["duplicated"],
            "out_of_order": full["out_of_order"],
            "client_errors": full["client_errors"],
            "publish_errors": full["publish_errors"],
            "first_errors": full["first_errors"],
        });
        eprintln!(
            "ramp step {}: {}/s asked, {}/s published, {} deliveries/s, p99 {} ms, cpu {} cores",
            i + 1,
            step["rate_target"],
            step["publish_rate"],
            step["deliveries_per_s"],
            step["latency"]["p99_ms"],
            step["server_cpu_cores"]
        );
        let end = verdict(&step, a);
        if end.is_none() {
            capacity = Some(step.clone());
        }
        steps.push(step);
        if let Some(why) = end {
            stopped_by = why;
            break;
        }
        rate = (rate * a.factor).round();
    }
    json!({
        "scenario": "ramp",
        "ok": capacity.is_some(),
        "transport": a.transport,
        "clients": a.clients,
        "channels": a.channels,
        "p99_limit_ms": a.p99_limit_ms,
        "step_s": a.step,
        "capacity_deliveries_per_s": capacity.as_ref().map(|c| c["deliveries_per_s"].clone()),
        "capacity_publish_rate": capacity.as_ref().map(|c| c["publish_rate"].clone()),
        "capacity_p99_ms": capacity.as_ref().map(|c| c["latency"]["p99_ms"].clone()),
        "stopped_by": stopped_by,
        "steps": steps,
    })
}

/// The steps of a ramp result as a markdown table.
pub fn steps_markdown(v: &Value) -> String {
    let mut out = format!(
        "\n**ramp steps ({})**\n\n| step | asked pub/s | achieved pub/s | deliveries/s | p50 ms | p99 ms | server CPU cores | lost | dup |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        crate::report::label(v)
    );
    for s in v["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let cells = [
            &s["step"],
            &s["rate_target"],
            &s["publish_rate"],
            &s["deliveries_per_s"],
            &s["latency"]["p50_ms"],
            &s["latency"]["p99_ms"],
            &s["server_cpu_cores"],
            &s["lost"],
            &s["duplicated"],
        ];
        out.push('|');
        for c in cells {
            out.push_str(&format!(" {} |", crate::report::num(c)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn step(p99: f64, asked: f64, achieved: f64, lost: u64) -> Value {
        json!({"latency": {"p99_ms": p99}, "rate_target": asked, "publish_rate": achieved,
               "lost": lost, "duplicated": 0, "out_of_order": 0, "client_errors": 0,
               "publish_errors": 0})
    }

    #[test]
    fn a_step_ends_the_ramp_on_latency_loss_or_a_short_rate() {
        let a = Cli::parse_from(["ramp"]).args;
        assert_eq!(verdict(&step(10.0, 100.0, 99.0, 0), &a), None);
        assert!(verdict(&step(51.0, 100.0, 100.0, 0), &a)
            .unwrap()
            .starts_with("p99"));
        assert!(verdict(&step(1.0, 100.0, 100.0, 3), &a)
            .unwrap()
            .starts_with("loss"));
        assert!(verdict(&step(1.0, 100.0, 80.0, 0), &a)
            .unwrap()
            .starts_with("publisher"));
        // No latency recorded at all counts as over the limit.
        assert!(verdict(
            &json!({"lost": 0, "duplicated": 0, "out_of_order": 0,
                                "client_errors": 0, "publish_errors": 0}),
            &a
        )
        .is_some());
    }
}
