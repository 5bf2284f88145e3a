//! The `gateway` binary: reads configuration, starts the node and stops it on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Config, LogFormat, Overrides};
use gateway::Gateway;
use tracing_subscriber::EnvFilter;

/// Realtime gateway node: WebSocket and SSE with lossless resume.
///
/// Configuration comes from built-in defaults, then the --config file, then GATEWAY__SECTION__KEY
/// environment variables (e.g. GATEWAY__SERVER__LISTEN=0.0.0.0:8080), then these flags.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on for every endpoint [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve the WebSocket echo endpoint /ws/echo (conformance testing).
    #[arg(long)]
    ws_echo: bool,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    /// Use a single Redis server as the backplane, e.g. redis://127.0.0.1:6379.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Use a Redis Cluster as the backplane, given seed nodes.
    #[arg(long, value_name = "HOST:PORT,HOST:PORT,...", value_delimiter = ',')]
    redis_cluster_nodes: Option<Vec<String>>,
    /// Use the Redis master that these Sentinels monitor as the backplane.
    #[arg(long, value_name = "HOST:PORT,HOST:PORT,...", value_delimiter = ',')]
    redis_sentinel_nodes: Option<Vec<String>>,
    /// The master's name at the Sentinels (redis.sentinel_master).
    #[arg(long, value_name = "NAME")]
    redis_sentinel_master: Option<String>,
    /// Answer a publish 200 only once this many replicas acknowledged it (redis.min_replicas_acked).
    #[arg(long, value_name = "N")]
    redis_min_replicas_acked: Option<u32>,
    /// Publish made-up stock prices for the demo page's tickers (demo.publisher).
    #[arg(long)]
    demo_publisher: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        file: cli.config,
        listen: cli.listen,
        ws_echo: cli.ws_echo,
        log_json: cli.log_json,
        redis_url: cli.redis_url,
        redis_cluster_nodes: cli.redis_cluster_nodes,
        redis_sentinel_nodes: cli.redis_sentinel_nodes,
        redis_sentinel_master: cli.redis_sentinel_master,
        redis_min_replicas_acked: cli.redis_min_replicas_acked,
        demo_publisher: cli.demo_publisher,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the Tokio runtime");
    runtime.block_on(async {
        // Installed before the node announces itself, so a SIGTERM right after start is graceful.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
        let running = match Gateway::start(config).await {
            Ok(running) => running,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received: draining");
                running.drain().await;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received: stopping now");
                running.shutdown().await;
            }
        }
        ExitCode::SUCCESS
    })
}

fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
