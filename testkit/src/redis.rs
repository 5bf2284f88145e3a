//! redis-server processes on free loopback ports: one server (optionally with an AOF), or a
//! Redis Cluster of masters; kill -9 and restart on the same port and directory for fault
//! tests; `redis-cli`; and the gateway flags that point at them ([`Backend`]).
//!
//! Redis is the one place a port is chosen before the process starts: a killed server must come
//! back on the same port, and `redis-server --port 0` would not listen at all. The ports come
//! from below the kernel's ephemeral range, so no outgoing connection can take one meanwhile.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::process::{die_with_parent, kill_and_reap, signal};
use crate::wait::{poll_until, within, within_for, WAIT};

/// A loopback port nobody listens on, below the kernel's ephemeral range (32768+) so that no
/// outgoing connection can take it while a killed server is down. With `bus`, port + 10000 (the
/// Redis Cluster bus) is free too.
pub fn free_port(bus: bool) -> u16 {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (lo, hi) = if bus { (10000, 22000) } else { (22000, 32000) };
    let mut taken = TAKEN.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port: u16 = rand::random_range(lo..hi);
        if taken.contains(&port) || (bus && taken.contains(&(port + 10000))) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        if bus && TcpListener::bind(("127.0.0.1", port + 10000)).is_err() {
            continue;
        }
        taken.insert(port);
        if bus {
            taken.insert(port + 10000);
        }
        return port;
    }
    panic!("no free port found");
}

/// Runs `redis-cli -p port args...`, returning its stdout (trimmed) or the spawn error.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_auth(port, None, args).await
}

/// [`redis_cli`] with a password, given to this `redis-cli` process only (`REDISCLI_AUTH`), so
/// that tests with and without passwords can share one test binary.
pub async fn redis_cli_auth(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("redis-cli");
    if let Some(password) = password {
        cmd.env("REDISCLI_AUTH", password);
    }
    let out = cmd
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within("redis-cli", out).await.expect("run redis-cli");
    let mut s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        s.push_str(&format!(" [stderr: {}]", err.trim()));
    }
    s
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RedisOpts {
    /// `--appendonly yes --appendfsync always` instead of no persistence at all.
    pub aof: bool,
    /// `--cluster-enabled yes` (a node for [`RedisCluster`]).
    pub cluster: bool,
}

/// One `redis-server` process on a free loopback port with its own temporary directory.
pub struct RedisServer {
    pub port: u16,
    pub opts: RedisOpts,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Arguments after the harness's own (e.g. `--replicaof`).
    extra: Vec<String>,
    /// The `--requirepass` among `extra`, for this harness's own `redis-cli` calls.
    password: Option<String>,
}

impl RedisServer {
    pub async fn start(opts: RedisOpts) -> RedisServer {
        Self::try_start(opts)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server with extra `redis-server` arguments (they win over the harness's).
    pub async fn start_with(opts: RedisOpts, extra: Vec<String>) -> RedisServer {
        Self::try_start_with(opts, extra)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RedisServer::start`], reporting a missing `redis-server` instead of panicking (for
    /// `loadtest`, which starts Redis at run time).
    pub async fn try_start(opts: RedisOpts) -> Result<RedisServer, String> {
        Self::try_start_with(opts, Vec::new()).await
    }

    async fn try_start_with(opts: RedisOpts, extra: Vec<String>) -> Result<RedisServer, String> {
        let port = free_port(opts.cluster);
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir for redis: {e}"))?;
        let password = extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .cloned();
        let mut server = RedisServer {
            port,
            opts,
            dir,
            child: None,
            extra,
            password,
        };
        server.spawn()?;
        server.wait_ready().await;
        Ok(server)
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--protected-mode".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            dir.clone(),
            "--logfile".into(),
            format!("{dir}/redis.log"),
            "--save".into(),
            "".into(),
        ];
        if self.opts.aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        if self.opts.cluster {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("{dir}/nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                ]
                .map(String::from),
            );
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            format!("cannot start redis-server (apt-get install redis-server): {e}")
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server answers PING with PONG (not LOADING, not refused).
    pub async fn wait_ready(&self) {
        let port = self.port;
        poll_until(
            &format!("redis on port {port} to answer PING"),
            WAIT,
            || async move { (self.cli(&["ping"]).await == "PONG").then_some(()) },
        )
        .await
    }

    /// `kill -9`, then reaps the process: nothing is flushed, the port is closed.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("redis is not running");
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
    }

    /// Starts again on the same port with the same directory (and so the same AOF, if any).
    pub async fn restart(&mut self) {
        self.spawn().unwrap_or_else(|e| panic!("{e}"));
        self.wait_ready().await;
    }

    /// The process id (0 once killed), e.g. to read its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli_auth(self.port, self.password.as_deref(), args).await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis :{} log tail ----\n{}",
                self.port,
                self.log_tail(20)
            );
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// A Redis Cluster of masters without replicas, every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..masters {
            nodes.push(
                RedisServer::start(RedisOpts {
                    aof: false,
                    cluster: true,
                })
                .await,
            );
        }
        RedisCluster::create(nodes).await
    }

    /// Makes a cluster of masters out of started `cluster: true` servers.
    pub async fn create(nodes: Vec<RedisServer>) -> RedisCluster {
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = tokio::process::Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = within_for("redis-cli --cluster create", Duration::from_secs(60), out)
            .await
            .expect("run redis-cli --cluster create");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && stdout.contains("All 16384 slots covered"),
            "cluster create failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`, knows every node and the full slot map
    /// (after a start or a restart).
    pub async fn wait_ok(&self) {
        let masters = self.nodes.len();
        for node in &self.nodes {
            let port = node.port;
            poll_until(
                &format!("cluster_state:ok on :{port}"),
                WAIT,
                || async move {
                    let info = redis_cli(port, &["cluster", "info"]).await;
                    let known = format!("cluster_known_nodes:{masters}");
                    (info.contains("cluster_state:ok") && info.contains(&known)).then_some(())
                },
            )
            .await;
        }
        // Every node must agree on the slot map before clients look at it.
        for node in &self.nodes {
            let port = node.port;
            poll_until(&format!("full slot map on :{port}"), WAIT, || async move {
                let slots = redis_cli(port, &["cluster", "shards"]).await;
                (slots.matches("master").count() >= masters).then_some(())
            })
            .await;
        }
    }

    /// The value of `--redis-cluster-nodes`.
    pub fn nodes_arg(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn backend(&self) -> Backend {
        Backend {
            args: vec!["--redis-cluster-nodes".into(), self.nodes_arg()],
        }
    }
}

/// Generous Redis timeouts for tests that are not about timeouts, so that a loaded 2-core machine
/// does not turn slow answers into refused publishes.
pub const PATIENT: [(&str, &str); 2] = [
    ("GATEWAY__REDIS__COMMAND_TIMEOUT", "5s"),
    ("GATEWAY__REDIS__CONNECT_TIMEOUT", "5s"),
];

/// How a gateway reaches Redis: the command-line flags.
#[derive(Debug, Clone)]
pub struct Backend {
    pub args: Vec<String>,
}

impl Backend {
    pub fn standalone(redis: &RedisServer) -> Backend {
        Backend {
            args: vec!["--redis-url".into(), redis.url()],
        }
    }
}
