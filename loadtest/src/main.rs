//! `loadtest`: load, latency and loss scenarios against the gateway.
//!
//! Every scenario is bounded in clients, messages and time, and stops by itself. With `--spawn`
//! the tool starts its own gateway on a free loopback port and kills it at the end.

mod connections;
mod echo;
mod fanout;
mod gateway;
// The peers' driver pieces, until the scenarios use them.
#[allow(dead_code)]
mod peers;
#[allow(dead_code)]
mod socketio;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Start the gateway binary on a free loopback port for this run (ignores --url).
    #[arg(long, global = true)]
    spawn: bool,
    /// Gateway binary for --spawn [default: target/release/gateway, else target/debug/gateway].
    #[arg(long, global = true, value_name = "PATH")]
    gateway_bin: Option<PathBuf>,
    /// Also write the result object as JSON to this file.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// WebSocket subscribers over K channels, an HTTP publisher at R/s; latency and loss.
    Fanout {
        /// Gateway origin (the WebSocket endpoint is URL/ws, publishing URL/api/publish).
        #[arg(long, default_value = "ws://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        channels: usize,
        /// Publications per second, over all channels.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Padding bytes added to each publication's data.
        #[arg(long, default_value_t = 0)]
        payload: usize,
        /// Seconds to wait after the last publication for in-flight deliveries.
        #[arg(long, default_value_t = 5.0)]
        drain: f64,
    },
    /// Clients send messages to the echo endpoint and check every echo.
    Echo {
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws/echo")]
        url: String,
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Messages per client.
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages a client may have in flight (1 = strictly sequential).
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Send text frames instead of binary.
        #[arg(long)]
        text: bool,
    },
    /// Opens N idle connections and reports the gateway's resident memory per connection.
    Connections {
        /// Gateway origin.
        #[arg(long, default_value = "ws://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, value_enum, default_value = "ws")]
        transport: connections::Transport,
        /// Gateway process id for VmRSS (the spawned gateway's by default with --spawn).
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to hold the connections open before measuring.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
        /// Connections opened concurrently.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 24.0 * 3600.0))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let spawned = if cli.spawn {
        let bin = match gateway::find_binary(cli.gateway_bin.as_deref()) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("loadtest: {e}");
                return ExitCode::from(2);
            }
        };
        let echo = matches!(cli.command, Command::Echo { .. });
        match gateway::spawn(&bin, echo).await {
            Ok(s) => {
                eprintln!(
                    "loadtest: spawned {} on port {} (pid {})",
                    bin.display(),
                    s.port,
                    s.pid()
                );
                Some(s)
            }
            Err(e) => {
                eprintln!("loadtest: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let origin_of = |url: &str| match &spawned {
        Some(s) => s.base_ws(),
        None => gateway::origin(url),
    };
    let (title, (result, ok)) = match cli.command {
        Command::Fanout {
            url,
            clients,
            channels,
            rate,
            duration,
            payload,
            drain,
        } => {
            let ws_origin = origin_of(&url);
            let p = fanout::Params {
                http_origin: gateway::http_origin(&ws_origin),
                ws_origin,
                clients,
                channels,
                rate,
                duration: secs(duration),
                payload,
                drain: secs(drain),
            };
            ("fanout", fanout::run(p).await)
        }
        Command::Echo {
            url,
            clients,
            messages,
            size,
            window,
            text,
        } => {
            let url = match &spawned {
                Some(s) => format!("{}/ws/echo", s.base_ws()),
                None => url,
            };
            let p = echo::Params {
                url,
                clients,
                messages,
                size,
                window,
                text,
            };
            ("echo", echo::run(p).await)
        }
        Command::Connections {
            url,
            count,
            transport,
            pid,
            hold,
            concurrency,
        } => {
            let ws_origin = origin_of(&url);
            let p = connections::Params {
                http_origin: gateway::http_origin(&ws_origin),
                ws_origin,
                count,
                transport,
                pid: pid.or(spawned.as_ref().map(|s| s.pid())),
                hold: secs(hold),
                concurrency,
            };
            ("connections", connections::run(p).await)
        }
    };
    drop(spawned);
    stats::print_table(title, &result);
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&result).expect("serializable");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("loadtest: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadtest: {title} FAILED");
        ExitCode::FAILURE
    }
}
