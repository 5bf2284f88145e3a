//! `loadtest`: load, latency, loss and chaos scenarios against the gateway and its peers.
//!
//! Every scenario is bounded in clients, messages and time, and stops by itself. Unless given
//! `--url`, the tool starts the system under test itself (gateway nodes, Redis, peer servers) on
//! free loopback ports and stops it at the end, so one command gives one comparable run.

mod charts;
mod connections;
mod echo;
mod failover;
mod fanout;
mod flood;
mod gateway;
mod latency;
mod net;
mod peers;
mod presence;
mod progress;
mod publish;
mod publisher;
mod pubsub;
mod ramp;
mod report;
mod soak;
mod socketio;
mod stats;
mod storm;
mod subscriber;
mod suite;
mod system;
mod ticker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use system::{Spec, System, SystemKind};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Gateway binary [default: target/release/gateway, else target/debug/gateway].
    #[arg(long, global = true, value_name = "PATH")]
    gateway_bin: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write the result as a markdown table to this file.
    #[arg(long, global = true, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write SVG charts of the result into this directory.
    #[arg(long, global = true, value_name = "DIR")]
    charts: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// What to load.
#[derive(clap::Args, Debug, Clone)]
pub struct SystemArgs {
    #[arg(long, value_enum, default_value = "gateway")]
    pub system: SystemKind,
    /// Servers already running (an origin per node, e.g. http://127.0.0.1:8080); without it the
    /// tool starts the system itself.
    #[arg(long = "url", value_name = "ORIGIN")]
    pub urls: Vec<String>,
    /// Nodes to start [default: 3 for latency and storm, else 1].
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Gateway: use a Redis backplane (started by the tool) even with one node.
    #[arg(long)]
    pub redis: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// C subscribers over K channels, one publisher: deliveries/s, latency and loss.
    Fanout {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: fanout::Args,
    },
    /// Fixed publish rate through node 0, subscribers over all nodes: latency percentiles.
    Latency {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: latency::Args,
    },
    /// Kill (or drain) the node holding K clients mid-run; time to catch up, loss, reconnect curve.
    Storm {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: storm::Args,
    },
    /// WebSocket echo throughput and round trips.
    Echo {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: echo::Args,
    },
    /// N idle connections: the server's memory per connection and idle CPU.
    Connections {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: connections::Args,
    },
    /// Every scenario against the gateway and the peers in one run: JSON, markdown and charts.
    Suite(suite::Args),
    /// Redis Sentinel failover under load (master, replicas, sentinels and nodes started by the
    /// tool; the master is killed): recovery times, lost / duplicated / reset counts.
    Failover(failover::Args),
    /// What redis.min_replicas_acked costs: publish latency with 0, 1, … replica acks.
    PublishLatency(failover::LatencyArgs),
    /// A flood of polls and WebSocket subscribes over fresh channel names (redis-server and one
    /// node started by the tool): a hot channel's latency without and during it, the 429s.
    FreshFlood(flood::Args),
    /// The capacity figure: fixed subscribers, the publish rate raised step by step until p99
    /// passes a limit (or messages are lost, or the rate is not reached); deliveries/s there.
    Ramp {
        #[command(flatten)]
        system: SystemArgs,
        #[command(flatten)]
        args: ramp::Args,
    },
    /// One gateway node under churning subscribers and steady publishes for a long time: RSS,
    /// file descriptors and queued bytes sampled (flat?), zero loss per subscriber.
    Soak(soak::Args),
    /// Acknowledged publishes/s through one Redis over HTTP and WebSocket (and on the embedded
    /// backplane), against the publish script pipelined straight at the same Redis.
    Publish(publish::Args),
    /// Presence at scale on three nodes and one Redis (started by the tool): join/leave fan-out
    /// when many clients subscribe at once, presence reads and Redis memory of a big channel,
    /// and how fast a killed node's members are removed.
    Presence(presence::Args),
    /// Stock tickers (#16): bytes on the wire and CPU per delivery for full JSON, deltas,
    /// permessage-deflate and both; a slow subscriber under conflation.
    Ticker(ticker::Args),
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 24.0 * 3600.0))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any child starts, so gateways and peers inherit it.
    net::raise_nofile(1 << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let outcome = match &cli.command {
        Command::Suite(args) => suite::run(args, cli.gateway_bin.clone()).await,
        Command::Failover(args) => {
            redis_scenario(&cli, |bin| async move { failover::run(&bin, args).await }).await
        }
        Command::PublishLatency(args) => {
            redis_scenario(&cli, |bin| async move {
                failover::run_latency(&bin, args).await
            })
            .await
        }
        Command::FreshFlood(args) => {
            redis_scenario(&cli, |bin| async move { flood::run(&bin, args).await }).await
        }
        Command::Presence(args) => {
            redis_scenario(&cli, |bin| async move { presence::run(&bin, args).await }).await
        }
        Command::Ticker(args) => {
            redis_scenario(&cli, |bin| async move { ticker::run(&bin, args).await }).await
        }
        Command::Publish(args) => {
            let bin = match &args.url {
                Some(_) => None,
                None => Some(gateway::find_binary(cli.gateway_bin.as_deref())),
            };
            match bin.transpose() {
                Ok(bin) => publish::run(bin.as_deref(), args).await.map(|results| {
                    let ok = results.iter().all(|v| v["ok"] == true);
                    (results, ok)
                }),
                Err(e) => Err(e),
            }
        }
        Command::Soak(args) => soak::run(cli.gateway_bin.clone(), args).await.map(|v| {
            let ok = v["ok"] == true;
            (vec![v], ok)
        }),
        command => single(command, cli.gateway_bin.clone()).await,
    };
    let (results, ok) = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    for v in &results {
        stats::print_table(v["scenario"].as_str().unwrap_or("result"), v);
    }
    print!("{}", markdown(&results));
    if let Err(e) = write_outputs(&cli, &results) {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadtest: FAILED (see \"ok\", \"lost\" and \"first_errors\" above)");
        ExitCode::FAILURE
    }
}

/// Runs a scenario that starts its own Redis set-up and gateway nodes.
async fn redis_scenario<F, Fut>(cli: &Cli, scenario: F) -> Result<(Vec<Value>, bool), String>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Value>, String>>,
{
    let bin = gateway::find_binary(cli.gateway_bin.as_deref())?;
    let mut results = scenario(bin).await?;
    for v in &mut results {
        v["system"] = "gateway".into();
    }
    let ok = results.iter().all(|v| v["ok"] == true);
    Ok((results, ok))
}

/// Starts (or attaches to) the system, runs one scenario on it, stops the system.
async fn single(
    command: &Command,
    gateway_bin: Option<PathBuf>,
) -> Result<(Vec<Value>, bool), String> {
    let (sys, default_nodes) = match command {
        Command::Fanout { system, .. }
        | Command::Echo { system, .. }
        | Command::Connections { system, .. }
        | Command::Ramp { system, .. } => (system, 1),
        Command::Latency { system, .. } | Command::Storm { system, .. } => (system, 3),
        Command::Suite(_)
        | Command::Failover(_)
        | Command::PublishLatency(_)
        | Command::FreshFlood(_)
        | Command::Presence(_)
        | Command::Soak(_)
        | Command::Publish(_)
        | Command::Ticker(_) => {
            unreachable!("handled by the caller")
        }
    };
    if matches!(command, Command::Storm { .. }) && sys.nodes.unwrap_or(3) < 2 && sys.urls.len() < 2
    {
        return Err("storm needs at least 2 nodes".into());
    }
    let mut system = if sys.urls.is_empty() {
        System::start(&Spec {
            kind: sys.system,
            nodes: sys.nodes.unwrap_or(default_nodes),
            redis: sys.redis,
            echo: matches!(command, Command::Echo { .. }),
            gateway_bin,
        })
        .await?
    } else {
        System::external(sys.system, &sys.urls)
    };
    let (mut v, ok) = match command {
        Command::Fanout { args, .. } => passed(fanout::run(&mut system, args).await),
        Command::Latency { args, .. } => passed(latency::run(&mut system, args).await),
        Command::Storm { args, .. } => passed(storm::run(&mut system, args).await),
        Command::Echo { args, .. } => {
            let url = system.echo_url(0);
            echo::run(&url, &system.pids(), args).await
        }
        Command::Connections { args, .. } => connections::run(&mut system, args).await,
        Command::Ramp { args, .. } => passed(ramp::run(&mut system, args).await),
        Command::Suite(_)
        | Command::Failover(_)
        | Command::PublishLatency(_)
        | Command::FreshFlood(_)
        | Command::Presence(_)
        | Command::Soak(_)
        | Command::Publish(_)
        | Command::Ticker(_) => {
            unreachable!("handled by the caller")
        }
    };
    v["system"] = sys.system.name().into();
    drop(system);
    Ok((vec![v], ok))
}

/// A result with its verdict.
pub fn passed(v: Value) -> (Value, bool) {
    let ok = v["ok"] == true;
    (v, ok)
}

/// The scenario tables, and a ramp's steps.
fn markdown(results: &[Value]) -> String {
    let mut out = report::markdown(results);
    for v in results.iter().filter(|v| v["scenario"] == "ramp") {
        out.push_str(&ramp::steps_markdown(v));
    }
    out
}

fn write_outputs(cli: &Cli, results: &[Value]) -> Result<(), String> {
    if let Some(path) = &cli.json {
        let v = if results.len() == 1 {
            results[0].clone()
        } else {
            Value::from(results.to_vec())
        };
        let text = serde_json::to_string_pretty(&v).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &cli.markdown {
        std::fs::write(path, markdown(results))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(dir) = &cli.charts {
        charts::write_all(dir, results)?;
    }
    Ok(())
}
