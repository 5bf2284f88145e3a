//! Node configuration: built-in defaults < optional TOML file < `GATEWAY__SECTION__KEY`
//! environment < command-line flags. Every value is checked before the node starts, and an error
//! names the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole node configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
    pub sse: SseConfig,
    pub client: ClientConfig,
    pub history: HistoryConfig,
    pub redis: RedisSection,
    pub drain: DrainConfig,
    pub poll: PollConfig,
    pub demo: DemoConfig,
    pub auth: AuthConfig,
    pub channels: ChannelsConfig,
    pub limits: LimitsConfig,
    pub origin: OriginConfig,
    pub tls: TlsConfig,
    pub presence: PresenceConfig,
    pub api: ApiConfig,
}

/// Presence across the cluster (which namespaces have it: `channels.*.presence`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How long the members of a node that died without leaving stay listed at most: the
    /// surviving nodes remove them, and announce their leaves, within it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ttl: Duration::from_secs(30),
        }
    }
}

/// The server API's management of users and channels (`/api/disconnect`, `/api/channels`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// After `POST /api/disconnect`, the user's tokens issued (`iat`) before the disconnect are
    /// refused this long, cluster-wide; make it at least your longest token lifetime.
    #[serde(with = "humantime_serde")]
    pub disconnect_window: Duration,
    /// How often a node reports its channels and their subscriber counts for
    /// `GET /api/channels` (the answering node also reports right before it reads).
    #[serde(with = "humantime_serde")]
    pub channels_report_interval: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            disconnect_window: Duration::from_secs(24 * 3600),
            channels_report_interval: Duration::from_secs(5),
        }
    }
}

/// Who the clients and API callers are: server API keys and connection JWTs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys accepted on `/api/*` as `Authorization: apikey <key>`; empty means no key is checked.
    pub api_keys: Vec<String>,
    /// Serve `/api/*` without a key even when the API listens beyond loopback.
    pub api_open: bool,
    /// Serve `/api/*` (and `/metrics`) only on this separate, internal address.
    pub api_listen: Option<SocketAddr>,
    /// HS256 secrets; the first signs nothing, every one verifies (key rotation).
    pub jwt_hs256_keys: Vec<String>,
    /// PEM files with RS256 (RSA) or ES256 (P-256) public keys.
    pub jwt_public_keys: Vec<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`) with RS256/ES256 public keys, chosen by `kid`.
    pub jwt_jwks_file: Option<PathBuf>,
    /// Required `aud` claim, when set.
    pub jwt_audience: Option<String>,
    /// Required `iss` claim, when set.
    pub jwt_issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
}

/// Who may do what on which channels. A channel belongs to the namespace named by its prefix
/// before the first `:` (`chat:room1` → `chat`); a channel without a configured prefix belongs to
/// the default namespace.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Rules of channels in no configured namespace.
    pub default: NamespaceConfig,
    /// Rules per namespace, by prefix.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

/// Who may subscribe to or publish on a namespace's channels.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Nobody (clients); the server API still may.
    None,
    /// Anyone, with or without a token.
    Anonymous,
    /// Any connection with a valid token.
    Authenticated,
    /// Only connections whose token's `channels` claim lists the channel.
    Token,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Who may subscribe.
    pub subscribe: Access,
    /// Which clients may publish (the server API always may).
    pub publish: Access,
    /// Largest publication `data`, in bytes (client and API publishes).
    pub max_message_size: usize,
    /// Publications kept per channel; unset means `channels.default`'s, else `history.max_count`.
    pub history_max_count: Option<usize>,
    /// Age after which publications leave history; unset as for `history_max_count`.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Option<Duration>,
    /// Whether the channels keep presence: who is subscribed, cluster-wide.
    pub presence: bool,
    /// Whether subscribers get a `join` and a `leave` event as members come and go (needs
    /// `presence`).
    pub join_leave: bool,
    /// Where a subscription that sends no position starts.
    pub subscribe_from: SubscribeFrom,
    /// What happens to a connection whose outbound queue passes its limit.
    pub slow_consumer: SlowConsumer,
}

/// What happens to a slow consumer's publications of a namespace (`channels.*.slow_consumer`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// The connection is closed (4000) and resumes losslessly from its positions.
    #[default]
    Disconnect,
    /// Each channel keeps only its newest waiting publication, which says how many it skipped.
    Conflate,
}

/// Where a subscription without a position starts (`channels.*.subscribe_from`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SubscribeFrom {
    /// After the channel's newest publication: only what is published from now on.
    #[default]
    Now,
    /// With the channel's newest publication (its latest value), then live ones.
    Latest,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            subscribe: Access::Anonymous,
            publish: Access::Anonymous,
            max_message_size: 64 * 1024,
            history_max_count: None,
            history_max_age: None,
            presence: false,
            join_leave: false,
            subscribe_from: SubscribeFrom::Now,
            slow_consumer: SlowConsumer::Disconnect,
        }
    }
}

/// Abuse limits. A zero disables a count or rate limit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most WebSocket and SSE connections on this node.
    pub max_connections: usize,
    /// Most WebSocket and SSE connections of one user (token `sub`) on this node.
    pub max_connections_per_user: usize,
    /// New connections (HTTP, TLS) accepted per second from one IP address.
    pub connection_rate_per_ip: f64,
    /// Burst allowed above `connection_rate_per_ip`.
    pub connection_burst_per_ip: u32,
    /// Commands per second one WebSocket connection may send.
    pub command_rate: f64,
    /// Burst allowed above `command_rate`.
    pub command_burst: u32,
    /// Time allowed for the TLS handshake and for reading a request's headers (slowloris).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A WebSocket connection that has subscribed to nothing for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names the client for the
    /// per-IP limits and the logs.
    pub trusted_proxies: Vec<String>,
    /// Most fresh channels (ones this node holds no subscription for: each costs a new
    /// backplane subscription and history read) one SSE or poll request may name.
    pub fresh_channels_per_request: usize,
    /// Fresh channels subscribed per second from one IP address, over SSE, poll and WebSocket
    /// (the bucket holds a second's worth, at least one request's).
    pub fresh_channels_per_second: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 0,
            max_connections_per_user: 0,
            connection_rate_per_ip: 0.0,
            connection_burst_per_ip: 0,
            command_rate: 0.0,
            command_burst: 0,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            trusted_proxies: Vec::new(),
            fresh_channels_per_request: 128,
            fresh_channels_per_second: 256.0,
        }
    }
}

/// Which web origins may open WebSocket and SSE connections and call the API from a browser.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// Allowed `Origin` values (`https://app.example.com`, `https://*.example.com`); empty
    /// allows every origin. Requests without `Origin` (non-browsers) are always allowed.
    pub allowed: Vec<String>,
}

/// HTTPS with HTTP/2 (ALPN h2, http/1.1) on the main listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key_file`, the listener speaks TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for changes (a change is loaded without a restart).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: Vec::new(),
            api_open: false,
            api_listen: None,
            jwt_hs256_keys: Vec::new(),
            jwt_public_keys: Vec::new(),
            jwt_jwks_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    /// Longest a long-poll request may wait for publications; also its default `timeout`.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
}

/// The demo page and its price feed, for trying the gateway out.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serves the demo page at `/` (the client library at `/client.js` is always served). While
    /// on, an unconfigured `chat` namespace keeps presence and join/leave (the demo's chat shows
    /// who is online).
    pub page: bool,
    /// Publishes made-up stock prices on `prices:<SYMBOL>` channels for the page's tickers.
    pub publisher: bool,
    /// Interval between two rounds of demo prices.
    #[serde(with = "humantime_serde")]
    pub publisher_interval: Duration,
}

/// How a node stopping on SIGTERM lets go of its clients (SIGINT and the in-process `shutdown`
/// close everything at once). Kubernetes deployments set both, e.g. 5s and 20s.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// After SIGTERM, report not ready but keep serving this long, so load balancers stop
    /// routing new clients here before any is closed.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Then close connections in batches spread evenly over this window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Each closed client is told to wait a random delay below this before reconnecting.
    #[serde(with = "humantime_serde")]
    pub reconnect_jitter: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for every endpoint (API, WebSocket, SSE, health, metrics).
    pub listen: SocketAddr,
    /// How long a stopping node waits for its connections to close before it exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Kernel send buffer (SO_SNDBUF) of each accepted connection, in bytes; 0 leaves the
    /// kernel's own, which grows to several MiB. A small one keeps what a slow client has not
    /// read in the node's queue, where conflation can replace it, instead of in the kernel.
    pub send_buffer_bytes: usize,
    /// TCP_NOTSENT_LOWAT of each accepted connection (Linux): the kernel takes more from the node
    /// only while fewer than this many bytes wait unsent; 0 leaves the kernel's default (no
    /// bound). Bounds what a slow client has waiting in the kernel without shrinking the
    /// window a fast one needs, so a conflating channel's backlog stays in the node's queue,
    /// where each channel keeps only its newest publication. Unset: 4096 when a namespace
    /// conflates (see [`Config::send_low_water`]), else the kernel's default.
    pub send_low_water_bytes: Option<u32>,
    /// Threads that run the connections: 0 is one per CPU the process may use (its cgroup's
    /// quota counts); 1 runs the whole node on one thread, which costs the least CPU per
    /// delivery (no connection is handed between threads) when one core is all it gets.
    pub worker_threads: usize,
    /// Whether the fan-out writes its sockets in batches, one io_uring submission per 256
    /// (Linux 5.6+), instead of one `send` each. Where io_uring is refused (a seccomp profile
    /// such as Kubernetes' RuntimeDefault, `kernel.io_uring_disabled`) the node finds out at its
    /// first fan-out, logs it once and sends one by one; false never tries.
    pub batched_sends: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (readable lines) or `json` (one object per line, for log collectors).
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `gateway=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
    /// Whether permessage-deflate (RFC 7692) is negotiated with clients that offer it.
    pub compression: Compression,
    /// Messages shorter than this many bytes are sent uncompressed even when compression was
    /// negotiated: below it the saving is a few bytes and not worth the CPU.
    pub compression_min_size: usize,
}

/// `websocket.compression`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Off,
    /// Answer a client's permessage-deflate offer (the default: a publication is compressed once
    /// for all its subscribers, and an idle connection holds no compression state).
    On,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Interval of `: heartbeat` comments that keep proxies from closing idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Reconnection delay advertised to EventSource in the `retry:` field.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Bytes a connection may have queued for sending before it is cut off as a slow consumer.
    pub queue_max_bytes: usize,
    /// Publications read from history per page while a client catches up.
    pub history_page_size: usize,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Publications kept per channel.
    pub max_count: usize,
    /// Age after which publications leave history.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Largest `limit` accepted by `GET /api/history`.
    pub max_page: usize,
    /// How long a channel's epoch and top offset outlive its last activity.
    #[serde(with = "humantime_serde")]
    pub meta_ttl: Duration,
    /// A publish repeating an `idempotency_key` within this window returns the first result.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
}

/// The Redis backplane; with none of `url`, `cluster_nodes` and `sentinel_nodes` the node runs on
/// the embedded in-memory backplane.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// A single Redis server, e.g. `redis://127.0.0.1:6379`.
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`host:port` or `redis://host:port`).
    pub cluster_nodes: Vec<String>,
    /// Redis Sentinels (`host:port`, or `redis[s]://[user:password@]host:port` for credentials
    /// and TLS, which then apply to the sentinels and to the master alike).
    pub sentinel_nodes: Vec<String>,
    /// The name the sentinels monitor the master under (required with `sentinel_nodes`).
    pub sentinel_master: Option<String>,
    /// A publish answers 200 only once this many replicas acknowledged it (`WAIT`); 0 answers
    /// as soon as the master has it. Not with `cluster_nodes`.
    pub min_replicas_acked: u32,
    /// How long a publish waits for `min_replicas_acked` replicas before answering 503.
    #[serde(with = "humantime_serde")]
    pub replica_ack_timeout: Duration,
    /// Command connections to a single server.
    pub pool_size: usize,
    /// Prefix of every key.
    pub prefix: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A Redis command slower than this fails; a publish then answers 503.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Period of the round trip through pub/sub that proves live delivery works.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long the node stays subscribed after a channel's last local subscriber left.
    #[serde(with = "humantime_serde")]
    pub subscribe_linger: Duration,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            url: None,
            cluster_nodes: Vec::new(),
            sentinel_nodes: Vec::new(),
            sentinel_master: None,
            min_replicas_acked: 0,
            replica_ack_timeout: Duration::from_millis(250),
            pool_size: 8,
            prefix: "gw".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
            health_interval: Duration::from_secs(1),
            subscribe_linger: Duration::from_secs(2),
        }
    }
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            max_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            page: true,
            publisher: false,
            publisher_interval: Duration::from_secs(1),
        }
    }
}

/// `server.send_low_water_bytes` when unset and a namespace conflates: a few quotes' worth, so
/// what a slow client reads is about as fresh as its own receive buffer allows.
pub const AUTO_SEND_LOW_WATER: u32 = 4096;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_timeout: Duration::from_secs(10),
            send_buffer_bytes: 0,
            send_low_water_bytes: None,
            worker_threads: 0,
            batched_sends: true,
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
            compression: Compression::On,
            compression_min_size: 256,
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
            meta_ttl: Duration::from_secs(24 * 3600),
            idempotency_window: Duration::from_secs(300),
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
    pub redis_url: Option<String>,
    pub redis_cluster_nodes: Option<Vec<String>>,
    pub redis_sentinel_nodes: Option<Vec<String>>,
    pub redis_sentinel_master: Option<String>,
    pub redis_min_replicas_acked: Option<u32>,
    pub demo_publisher: bool,
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
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("redis.cluster_nodes")
                .with_list_parse_key("redis.sentinel_nodes")
                .with_list_parse_key("auth.api_keys")
                .with_list_parse_key("auth.jwt_hs256_keys")
                .with_list_parse_key("auth.jwt_public_keys")
                .with_list_parse_key("origin.allowed")
                .with_list_parse_key("limits.trusted_proxies"),
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
        if let Some(url) = &overrides.redis_url {
            builder = builder
                .set_override("redis.url", url.as_str())
                .map_err(err)?;
        }
        if let Some(nodes) = &overrides.redis_cluster_nodes {
            builder = builder
                .set_override("redis.cluster_nodes", nodes.clone())
                .map_err(err)?;
        }
        if let Some(nodes) = &overrides.redis_sentinel_nodes {
            builder = builder
                .set_override("redis.sentinel_nodes", nodes.clone())
                .map_err(err)?;
        }
        if let Some(master) = &overrides.redis_sentinel_master {
            builder = builder
                .set_override("redis.sentinel_master", master.as_str())
                .map_err(err)?;
        }
        if let Some(n) = overrides.redis_min_replicas_acked {
            builder = builder
                .set_override("redis.min_replicas_acked", n)
                .map_err(err)?;
        }
        if overrides.demo_publisher {
            builder = builder.set_override("demo.publisher", true).map_err(err)?;
        }
        if overrides.log_json {
            builder = builder.set_override("log.format", "json").map_err(err)?;
        }
        Config::build(builder)
    }

    /// Parses a TOML document alone (no environment, no overrides) and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let source = config::File::from_str(text, config::FileFormat::Toml);
        Config::build(config::Config::builder().add_source(source))
    }

    /// Reads the layered sources into a `Config` and validates it.
    fn build(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> Result<Config, ConfigError> {
        let err = |e: config::ConfigError| ConfigError(e.to_string());
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
            ("history.meta_ttl", self.history.meta_ttl),
            (
                "history.idempotency_window",
                self.history.idempotency_window,
            ),
            ("redis.connect_timeout", self.redis.connect_timeout),
            ("redis.command_timeout", self.redis.command_timeout),
            ("redis.health_interval", self.redis.health_interval),
            ("poll.max_timeout", self.poll.max_timeout),
            ("demo.publisher_interval", self.demo.publisher_interval),
            (
                "api.channels_report_interval",
                self.api.channels_report_interval,
            ),
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
            ("redis.pool_size", self.redis.pool_size, 1),
        ];
        for (key, value, min) in at_least {
            if value < min {
                return Err(ConfigError(format!(
                    "{key} must be at least {min}, got {value}"
                )));
            }
        }
        if self.drain.delay + self.drain.window >= self.server.shutdown_timeout {
            return Err(ConfigError(format!(
                "server.shutdown_timeout ({:?}) must exceed drain.delay + drain.window ({:?})",
                self.server.shutdown_timeout,
                self.drain.delay + self.drain.window
            )));
        }
        self.validate_redis()?;
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(['{', '}']) {
            return Err(ConfigError(
                "redis.prefix must be non-empty and contain no braces".into(),
            ));
        }
        self.validate_security()
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let targets = [
            ("redis.url", r.url.is_some()),
            ("redis.cluster_nodes", !r.cluster_nodes.is_empty()),
            ("redis.sentinel_nodes", !r.sentinel_nodes.is_empty()),
        ];
        let set: Vec<&str> = targets.iter().filter(|t| t.1).map(|t| t.0).collect();
        if set.len() > 1 {
            return Err(ConfigError(format!(
                "{} are exclusive: set one of redis.url, redis.cluster_nodes, redis.sentinel_nodes",
                set.join(" and ")
            )));
        }
        if let Some(url) = &r.url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError(format!(
                    "redis.url must start with redis:// or rediss://, got {url:?}"
                )));
            }
        }
        if !r.sentinel_nodes.is_empty() {
            match &r.sentinel_master {
                Some(name) if !name.trim().is_empty() => {}
                _ => {
                    return Err(ConfigError(
                        "redis.sentinel_master is required with redis.sentinel_nodes: the name \
                         the sentinels monitor the master under"
                            .into(),
                    ))
                }
            }
            for node in &r.sentinel_nodes {
                if node_url(node).is_none() {
                    return Err(ConfigError(format!(
                        "redis.sentinel_nodes: {node:?} is not host:port or \
                         redis[s]://[user:password@]host:port"
                    )));
                }
            }
            let schemes: std::collections::BTreeSet<bool> = r
                .sentinel_nodes
                .iter()
                .map(|n| n.starts_with("rediss://"))
                .collect();
            if schemes.len() > 1 {
                return Err(ConfigError(
                    "redis.sentinel_nodes: mix of redis:// and rediss:// (TLS applies to all)"
                        .into(),
                ));
            }
        } else if r.sentinel_master.is_some() {
            return Err(ConfigError(
                "redis.sentinel_master is set without redis.sentinel_nodes".into(),
            ));
        }
        if r.min_replicas_acked > 0 {
            if !r.cluster_nodes.is_empty() {
                return Err(ConfigError(
                    "redis.min_replicas_acked is not supported with redis.cluster_nodes (WAIT \
                     would have to run on the shard's connection); use 0"
                        .into(),
                ));
            }
            if r.replica_ack_timeout.is_zero() || r.replica_ack_timeout >= r.command_timeout {
                return Err(ConfigError(format!(
                    "redis.replica_ack_timeout ({:?}) must be greater than zero and below \
                     redis.command_timeout ({:?}): the WAIT answer must arrive in time",
                    r.replica_ack_timeout, r.command_timeout
                )));
            }
        }
        Ok(())
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        if self.auth.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError("auth.api_keys must not hold empty keys".into()));
        }
        if self.auth.jwt_hs256_keys.iter().any(|k| k.len() < 16) {
            return Err(ConfigError(
                "auth.jwt_hs256_keys: every key must be at least 16 bytes".into(),
            ));
        }
        if self.auth.api_listen == Some(self.server.listen) && self.server.listen.port() != 0 {
            return Err(ConfigError(
                "auth.api_listen must differ from server.listen".into(),
            ));
        }
        if self.presence.ttl < Duration::from_secs(1) {
            return Err(ConfigError(
                "presence.ttl must be at least 1s (nodes heartbeat every ttl/6)".into(),
            ));
        }
        for (name, ns) in std::iter::once(("default", &self.channels.default)).chain(
            self.channels
                .namespaces
                .iter()
                .map(|(name, ns)| (name.as_str(), ns)),
        ) {
            if name.is_empty() || name.contains(':') {
                return Err(ConfigError(format!(
                    "channels.namespaces: invalid namespace name {name:?}"
                )));
            }
            if ns.max_message_size < 1 {
                return Err(ConfigError(format!(
                    "channels namespace {name}: max_message_size must be at least 1"
                )));
            }
            if ns.join_leave && !ns.presence {
                return Err(ConfigError(format!(
                    "channels namespace {name}: join_leave needs presence = true"
                )));
            }
            if ns.history_max_count == Some(0) || ns.history_max_age == Some(Duration::ZERO) {
                return Err(ConfigError(format!(
                    "channels namespace {name}: history_max_count and history_max_age must be \
                     greater than zero"
                )));
            }
        }
        let l = &self.limits;
        for (key, rate) in [
            ("limits.connection_rate_per_ip", l.connection_rate_per_ip),
            ("limits.command_rate", l.command_rate),
            (
                "limits.fresh_channels_per_second",
                l.fresh_channels_per_second,
            ),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return Err(ConfigError(format!(
                    "{key} must be a non-negative number, got {rate}"
                )));
            }
        }
        crate::security::client_ip::TrustedProxies::parse(&l.trusted_proxies)
            .map_err(|e| ConfigError(format!("limits.trusted_proxies: {e}")))?;
        if l.handshake_timeout.is_zero() {
            return Err(ConfigError(
                "limits.handshake_timeout must be greater than zero".into(),
            ));
        }
        for pattern in &self.origin.allowed {
            if pattern != "*" && !pattern.contains("://") {
                return Err(ConfigError(format!(
                    "origin.allowed: {pattern:?} is not an origin like https://app.example.com"
                )));
            }
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError(
                    "tls.cert_file and tls.key_file go together: set both or neither".into(),
                ))
            }
            _ => {}
        }
        let api = self.api_addr();
        if !api.ip().is_loopback() && self.auth.api_keys.is_empty() && !self.auth.api_open {
            return Err(ConfigError(format!(
                "the API (/api/*) would listen on {api}, beyond loopback, with no key: set \
                 auth.api_keys (GATEWAY__AUTH__API_KEYS) or declare it open with \
                 auth.api_open = true (GATEWAY__AUTH__API_OPEN=true)"
            )));
        }
        if self.tls.reload_interval.is_zero() {
            return Err(ConfigError(
                "tls.reload_interval must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The address `/api/*` is served on.
    pub fn api_addr(&self) -> SocketAddr {
        self.auth.api_listen.unwrap_or(self.server.listen)
    }

    /// The TCP_NOTSENT_LOWAT for accepted connections, if any: `server.send_low_water_bytes`,
    /// or when unset [`AUTO_SEND_LOW_WATER`] if a namespace conflates — without a bound the
    /// kernel's send buffer (several MiB) would hold a slow client's backlog, aging out of
    /// conflation's reach.
    pub(crate) fn send_low_water(&self) -> Option<u32> {
        match self.server.send_low_water_bytes {
            Some(0) => None,
            Some(bytes) => Some(bytes),
            None => self
                .channels
                .namespaces
                .values()
                .any(|n| n.slow_consumer == SlowConsumer::Conflate)
                .then_some(AUTO_SEND_LOW_WATER),
        }
    }

    /// The longest an SSE stream may take to make room for its next chunk before it is dropped.
    /// The key is `websocket.write_timeout`: one write timeout for every streaming transport.
    pub(crate) fn sse_write_timeout(&self) -> Duration {
        self.websocket.write_timeout
    }

    /// The largest `POST /api/publish` body. The key is `websocket.max_message_size`: a
    /// publication is as large over the API as over WebSocket.
    pub(crate) fn api_max_body(&self) -> usize {
        self.websocket.max_message_size
    }

    pub fn settings(&self) -> backplane::Settings {
        let retention = |ns: &NamespaceConfig, base: backplane::Retention| backplane::Retention {
            max_count: ns.history_max_count.unwrap_or(base.max_count),
            max_age: ns.history_max_age.unwrap_or(base.max_age),
        };
        let global = backplane::Retention {
            max_count: self.history.max_count,
            max_age: self.history.max_age,
        };
        // channels.default refines history.*; a namespace refines channels.default.
        let default = retention(&self.channels.default, global);
        let namespace_retention: Vec<(String, backplane::Retention)> = self
            .channels
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), retention(ns, default)))
            .filter(|(_, r)| *r != default)
            .collect();
        backplane::Settings {
            retention: default,
            namespace_retention: namespace_retention.into(),
            meta_ttl: self.history.meta_ttl,
            idempotency_window: self.history.idempotency_window,
            presence_ttl: self.presence.ttl,
        }
    }

    /// The Redis backplane to use, if one is configured.
    pub fn redis(&self) -> Option<backplane::redis::RedisConfig> {
        let r = &self.redis;
        let target = if let Some(url) = &r.url {
            backplane::redis::Target::Single(url.clone())
        } else if !r.cluster_nodes.is_empty() {
            backplane::redis::Target::Cluster(
                r.cluster_nodes
                    .iter()
                    .map(|n| {
                        if n.contains("://") {
                            n.clone()
                        } else {
                            format!("redis://{n}")
                        }
                    })
                    .collect(),
            )
        } else if !r.sentinel_nodes.is_empty() {
            backplane::redis::Target::Sentinel {
                nodes: r
                    .sentinel_nodes
                    .iter()
                    .filter_map(|n| node_url(n))
                    .collect(),
                master: r.sentinel_master.clone().unwrap_or_default(),
            }
        } else {
            return None;
        };
        Some(backplane::redis::RedisConfig {
            target,
            pool_size: r.pool_size,
            prefix: r.prefix.clone(),
            connect_timeout: r.connect_timeout,
            command_timeout: r.command_timeout,
            health_interval: r.health_interval,
            subscribe_linger: r.subscribe_linger,
            min_replicas_acked: r.min_replicas_acked,
            replica_ack_timeout: r.replica_ack_timeout,
        })
    }
}

/// A node as a URL: `host:port` becomes `redis://host:port`; a URL must be redis:// or rediss://
/// with a host and a port.
fn node_url(node: &str) -> Option<String> {
    let url = if node.contains("://") {
        node.to_string()
    } else {
        format!("redis://{node}")
    };
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let host_port = rest.rsplit('@').next()?.trim_end_matches('/');
    let (host, port) = host_port.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then_some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(toml: &str) -> String {
        Config::from_toml(toml).expect_err(toml).to_string()
    }

    #[test]
    fn sentinel_keys_are_checked_and_named() {
        let e = error_of("[redis]\nsentinel_nodes = [\"a:26379\"]\n");
        assert!(e.contains("redis.sentinel_master is required"), "{e}");
        let e = error_of("[redis]\nsentinel_master = \"m\"\n");
        assert!(e.contains("redis.sentinel_master is set without"), "{e}");
        let e = error_of(
            "[redis]\nurl = \"redis://a:6379\"\nsentinel_nodes = [\"a:26379\"]\nsentinel_master = \"m\"\n",
        );
        assert!(
            e.contains("redis.url and redis.sentinel_nodes are exclusive"),
            "{e}"
        );
        let e = error_of("[redis]\nsentinel_nodes = [\"a\"]\nsentinel_master = \"m\"\n");
        assert!(e.contains("redis.sentinel_nodes: \"a\""), "{e}");
        let e = error_of(
            "[redis]\nsentinel_nodes = [\"redis://a:1\", \"rediss://b:2\"]\nsentinel_master = \"m\"\n",
        );
        assert!(e.contains("redis.sentinel_nodes: mix"), "{e}");

        let config = Config::from_toml(
            "[redis]\nsentinel_nodes = [\"10.0.0.1:26379\", \"redis://:pw@10.0.0.2:26379\"]\n\
             sentinel_master = \"mymaster\"\nmin_replicas_acked = 1\n",
        )
        .unwrap();
        let redis = config.redis().unwrap();
        assert_eq!(
            redis.target,
            backplane::redis::Target::Sentinel {
                nodes: vec![
                    "redis://10.0.0.1:26379".into(),
                    "redis://:pw@10.0.0.2:26379".into()
                ],
                master: "mymaster".into(),
            }
        );
        assert_eq!(redis.min_replicas_acked, 1);
    }

    #[test]
    fn replica_acks_need_a_timeout_below_the_command_timeout_and_no_cluster() {
        let e = error_of("[redis]\ncluster_nodes = [\"a:7000\"]\nmin_replicas_acked = 1\n");
        assert!(
            e.contains("redis.min_replicas_acked is not supported"),
            "{e}"
        );
        let e = error_of(
            "[redis]\nurl = \"redis://a:6379\"\nmin_replicas_acked = 1\nreplica_ack_timeout = \"1s\"\n",
        );
        assert!(e.contains("redis.replica_ack_timeout"), "{e}");
        Config::from_toml("[redis]\nurl = \"redis://a:6379\"\nmin_replicas_acked = 2\n").unwrap();
    }

    #[test]
    fn websocket_compression_keys() {
        let config = Config::default();
        assert_eq!(config.websocket.compression, Compression::On);
        assert_eq!(config.websocket.compression_min_size, 256);
        let config =
            Config::from_toml("[websocket]\ncompression = \"off\"\ncompression_min_size = 0\n")
                .unwrap();
        assert_eq!(config.websocket.compression, Compression::Off);
        assert_eq!(config.websocket.compression_min_size, 0);
        let e = error_of("[websocket]\ncompression = \"gzip\"\n");
        assert!(e.contains("compression"), "{e}");
    }

    #[test]
    fn batched_sends_is_on_unless_turned_off() {
        assert!(Config::default().server.batched_sends);
        let config = Config::from_toml("[server]\nbatched_sends = false\n").unwrap();
        assert!(!config.server.batched_sends);
        let e = error_of("[server]\nbatched_sends = \"maybe\"\n");
        assert!(e.contains("batched_sends"), "{e}");
    }
}
