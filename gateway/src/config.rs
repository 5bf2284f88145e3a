//! Node configuration: built-in defaults < optional TOML file < `GATEWAY__SECTION__KEY`
//! environment < command-line flags. Every value is checked before the node starts, and an error
//! names the offending key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole node configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
    pub sse: SseConfig,
    pub client: ClientConfig,
    pub history: HistoryConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for every endpoint (API, WebSocket, SSE, health, metrics).
    pub listen: SocketAddr,
    /// How long a stopping node waits for its connections to close before it exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `gateway=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Largest message (after reassembling fragments) a client may send, in bytes.
    pub max_message_size: usize,
    /// A connection silent for this long is pinged.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A pinged connection that sends nothing for this long is closed as dead.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// A write to the socket that takes longer than this drops the connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Serves `GET /ws/echo`, the conformance endpoint, when true.
    pub echo: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Interval of `: heartbeat` comments that keep proxies from closing idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Reconnection delay advertised to EventSource in the `retry:` field.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Bytes a connection may have queued for sending before it is cut off as a slow consumer.
    pub queue_max_bytes: usize,
    /// Publications read from history per page while a client catches up.
    pub history_page_size: usize,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Publications kept per channel.
    pub max_count: usize,
    /// Age after which publications leave history.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Largest `limit` accepted by `GET /api/history`.
    pub max_page: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_size: 64 * 1024,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            echo: false,
        }
    }
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            heartbeat_interval: Duration::from_secs(15),
            retry: Duration::from_secs(3),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            queue_max_bytes: 1024 * 1024,
            history_page_size: 500,
            max_subscriptions: 256,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_count: 1000,
            max_age: Duration::from_secs(600),
            max_page: 1000,
        }
    }
}

/// Values given on the command line; they override every other source.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub ws_echo: bool,
    pub log_json: bool,
}

/// A configuration that cannot be used, with the key at fault where one is known.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Layers defaults, the file, the environment (`GATEWAY__SECTION__KEY`) and the overrides.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = &overrides.file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("GATEWAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let err = |e: config::ConfigError| ConfigError(e.to_string());
        if let Some(listen) = overrides.listen {
            builder = builder
                .set_override("server.listen", listen.to_string())
                .map_err(err)?;
        }
        if overrides.ws_echo {
            builder = builder.set_override("websocket.echo", true).map_err(err)?;
        }
        if overrides.log_json {
            builder = builder.set_override("log.format", "json").map_err(err)?;
        }
        let config: Config = builder
            .build()
            .map_err(err)?
            .try_deserialize()
            .map_err(err)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("server.shutdown_timeout", self.server.shutdown_timeout),
            ("websocket.ping_interval", self.websocket.ping_interval),
            ("websocket.pong_timeout", self.websocket.pong_timeout),
            ("websocket.write_timeout", self.websocket.write_timeout),
            ("sse.heartbeat_interval", self.sse.heartbeat_interval),
            ("history.max_age", self.history.max_age),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(ConfigError(format!("{key} must be greater than zero")));
            }
        }
        let at_least = [
            (
                "websocket.max_message_size",
                self.websocket.max_message_size,
                126,
            ),
            ("client.queue_max_bytes", self.client.queue_max_bytes, 1024),
            ("client.history_page_size", self.client.history_page_size, 1),
            ("client.max_subscriptions", self.client.max_subscriptions, 1),
            ("history.max_count", self.history.max_count, 1),
            ("history.max_page", self.history.max_page, 1),
        ];
        for (key, value, min) in at_least {
            if value < min {
                return Err(ConfigError(format!(
                    "{key} must be at least {min}, got {value}"
                )));
            }
        }
        Ok(())
    }

    pub fn retention(&self) -> backplane::Retention {
        backplane::Retention {
            max_count: self.history.max_count,
            max_age: self.history.max_age,
        }
    }
}
