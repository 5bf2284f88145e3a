//! The `gateway` binary: with no subcommand it reads the configuration, starts the node and
//! stops it on SIGTERM/SIGINT; `gateway config check|defaults` and `gateway token` help set it up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gateway::config::{Config, LogFormat, Overrides};
use gateway::Gateway;
use tracing_subscriber::EnvFilter;

/// Realtime gateway node: WebSocket and SSE with lossless resume.
///
/// Configuration comes from built-in defaults, then the --config file, then GATEWAY__SECTION__KEY
/// environment variables (e.g. GATEWAY__SERVER__LISTEN=0.0.0.0:8080), then these flags.
#[derive(Parser, Debug)]
#[command(version = gateway::cli::VERSION, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Mint an HS256 connection token with the configured key (auth.jwt_hs256_keys), for
    /// development: `gateway token --sub alice --channels 'chat:*' --ttl 1h`.
    Token {
        /// The user (the token's `sub`).
        #[arg(long)]
        sub: String,
        /// Channels the token allows (its `channels` claim; `*` matches any run), comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Option<Vec<String>>,
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The configuration file with the key (the environment applies too).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Load FILE (and the GATEWAY__* environment) as the node would, and say whether the node
    /// would start with it: exit 0, or 2 with a message naming the key at fault.
    Check {
        /// The TOML file; without it, the defaults and the environment are checked.
        file: Option<PathBuf>,
    },
    /// Print a complete gateway.toml: every key at its default, with what it does.
    Defaults,
}

/// Flags of the node itself (no subcommand).
#[derive(Args, Debug)]
struct NodeArgs {
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
    match cli.command {
        None => run_node(cli.node),
        Some(Command::Config(ConfigCommand::Defaults)) => {
            print!("{}", gateway::cli::defaults_toml());
            ExitCode::SUCCESS
        }
        Some(Command::Config(ConfigCommand::Check { file })) => {
            let label = file
                .as_ref()
                .map_or("the defaults and the environment".into(), |f| {
                    f.display().to_string()
                });
            match Config::load(&Overrides {
                file,
                ..Overrides::default()
            }) {
                Ok(_) => {
                    println!("{label}: ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{label}: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Token {
            sub,
            channels,
            ttl,
            config,
        }) => {
            let minted = Config::load(&Overrides {
                file: config,
                ..Overrides::default()
            })
            .map_err(|e| e.to_string())
            .and_then(|c| gateway::cli::mint(&c.auth, &sub, channels.as_deref(), ttl));
            match minted {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gateway token: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Runs a node until SIGTERM (drain) or SIGINT (stop now).
fn run_node(cli: NodeArgs) -> ExitCode {
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
    let runtime = runtime(config.server.worker_threads).expect("cannot start the Tokio runtime");
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

/// The runtime for `server.worker_threads`: one thread runs everything on the main thread (no
/// task is ever handed to another thread); otherwise a work-stealing pool of that many
/// threads, or one per CPU.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
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
