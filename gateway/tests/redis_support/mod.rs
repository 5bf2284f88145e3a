//! Harness for the Redis backplane integration tests: real `redis-server` processes (standalone
//! or a 3-master Redis Cluster) on free loopback ports, `gateway` processes talking to them,
//! WebSocket subscribers that record everything they receive, publishers that record every ack,
//! and the checks that compare the two. Every spawned process is killed when its handle is
//! dropped, also when a test panics (the gateway's log tail is printed then).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "../shared/mod.rs"]
mod shared;
// Not every test crate uses every helper.
#[allow(unused_imports)]
pub use shared::{enc, listening_addr, metric};

/// Upper bound for one awaited event or condition: only there to fail instead of hanging.
pub const WAIT: Duration = Duration::from_secs(30);

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within_for<F: std::future::Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    within_for(what, WAIT, fut).await
}

/// Polls `cond` (external state that offers no event: a port, an HTTP endpoint, a counter in
/// another process) until it returns `Some`, with a short pause between attempts.
pub async fn poll_until<T, F, Fut>(what: &str, limit: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within_for(what, limit, async {
        loop {
            if let Some(v) = cond().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

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

/// Makes a spawned server die with the test process even if the test process is killed before
/// its destructors run (the signal fires when the spawning thread ends: servers are spawned from
/// the test's runtime threads, which live as long as the test).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).expect("pid fits pid_t")
}

/// Sends `sig` to one child process this harness spawned (never to a group or by name).
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid_of(child), sig) };
    assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal(child, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Runs `redis-cli -p port args...`, returning its stdout (trimmed) or the spawn error.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
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

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

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
}

impl RedisServer {
    pub async fn start(opts: RedisOpts) -> RedisServer {
        Self::start_with(opts, Vec::new()).await
    }

    /// A server with extra `redis-server` arguments (they win over the harness's).
    pub async fn start_with(opts: RedisOpts, extra: Vec<String>) -> RedisServer {
        let port = free_port(opts.cluster);
        let dir = tempfile::tempdir().expect("tempdir for redis");
        let mut server = RedisServer {
            port,
            opts,
            dir,
            child: None,
            extra,
        };
        server.spawn();
        server.wait_ready().await;
        server
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

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
    }

    /// Waits until the server answers PING with PONG (not LOADING, not refused).
    pub async fn wait_ready(&self) {
        let port = self.port;
        poll_until(
            &format!("redis on port {port} to answer PING"),
            WAIT,
            || async move { (redis_cli(port, &["ping"]).await == "PONG").then_some(()) },
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
        self.spawn();
        self.wait_ready().await;
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).await
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

// ---------------------------------------------------------------------------------------------
// Redis Sentinel: a master, its replicas and the sentinels that monitor them
// ---------------------------------------------------------------------------------------------

/// The name the test sentinels monitor the master under.
pub const SENTINEL_MASTER: &str = "gwmaster";

/// One `redis-sentinel` process on a free loopback port with its own (rewritable) config file.
pub struct SentinelProcess {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SentinelProcess {
    /// Monitors `master_port` as [`SENTINEL_MASTER`] with quorum `quorum`; a master that does not
    /// answer for `down_after` is failed over (retried after `failover_timeout`). With
    /// `password`, the sentinel requires it and uses it towards the servers.
    pub async fn start(
        master_port: u16,
        quorum: usize,
        down_after: Duration,
        failover_timeout: Duration,
        password: Option<&str>,
    ) -> SentinelProcess {
        let port = free_port(false);
        let dir = tempfile::tempdir().expect("tempdir for redis-sentinel");
        let d = dir.path().display();
        let auth = password.map_or(String::new(), |pw| {
            format!("requirepass {pw}\nsentinel auth-pass {SENTINEL_MASTER} {pw}\n")
        });
        let conf = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {d}\n\
             logfile {d}/sentinel.log\n\
             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} {}\n\
             sentinel failover-timeout {SENTINEL_MASTER} {}\n\
             sentinel parallel-syncs {SENTINEL_MASTER} 2\n",
            down_after.as_millis(),
            failover_timeout.as_millis(),
        ) + &auth;
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, conf).expect("write sentinel.conf");
        let mut cmd = Command::new("redis-sentinel");
        cmd.arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("spawn redis-sentinel (apt-get install redis-sentinel)");
        let sentinel = SentinelProcess {
            port,
            dir,
            child: Some(child),
        };
        poll_until(
            &format!("redis-sentinel on port {port} to answer PING"),
            WAIT,
            || async move { (redis_cli(port, &["ping"]).await == "PONG").then_some(()) },
        )
        .await;
        sentinel
    }

    /// `SENTINEL get-master-addr-by-name`: the port of the master this sentinel names now.
    pub async fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
        )
        .await;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// A field of `SENTINEL master` (e.g. `num-slaves`, `num-other-sentinels`).
    pub async fn master_field(&self, field: &str) -> Option<String> {
        let out = redis_cli(self.port, &["sentinel", "master", SENTINEL_MASTER]).await;
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .find(|pair| pair[0].trim() == field)
            .and_then(|pair| pair.get(1))
            .map(|v| v.trim().to_string())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- sentinel :{} log tail ----\n{}",
                self.port,
                self.log_tail(30)
            );
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// A master with `replicas` replicas and `sentinels` sentinels (quorum: a majority), every
/// sentinel aware of every replica and of the other sentinels before `start` returns.
pub struct SentinelSet {
    /// `servers[0]` is the first master; after a failover ask [`SentinelSet::master_port`].
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<SentinelProcess>,
    password: Option<String>,
}

impl SentinelSet {
    pub async fn start(replicas: usize, sentinels: usize) -> SentinelSet {
        Self::start_with(replicas, sentinels, None).await
    }

    /// With `password`, every server and sentinel requires it (`requirepass`, `masterauth`,
    /// `sentinel auth-pass`). The harness's `redis-cli` calls need `REDISCLI_AUTH` set to it.
    pub async fn start_with(
        replicas: usize,
        sentinels: usize,
        password: Option<&str>,
    ) -> SentinelSet {
        let auth: Vec<String> = password.map_or(Vec::new(), |pw| {
            vec![
                "--requirepass".into(),
                pw.into(),
                "--masterauth".into(),
                pw.into(),
            ]
        });
        let master = RedisServer::start_with(RedisOpts::default(), auth.clone()).await;
        let mut servers = vec![master];
        for _ in 0..replicas {
            let mut args = auth.clone();
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                servers[0].port.to_string(),
            ]);
            let replica = RedisServer::start_with(RedisOpts::default(), args).await;
            servers.push(replica);
        }
        let master_port = servers[0].port;
        for replica in &servers[1..] {
            poll_until(
                &format!("replica :{} in sync", replica.port),
                WAIT,
                || async move {
                    let info = replica.cli(&["info", "replication"]).await;
                    info.contains("master_link_status:up").then_some(())
                },
            )
            .await;
        }
        let mut set = SentinelSet {
            servers,
            sentinels: Vec::new(),
            password: password.map(str::to_string),
        };
        for _ in 0..sentinels {
            set.sentinels.push(
                SentinelProcess::start(
                    master_port,
                    sentinels / 2 + 1,
                    Duration::from_millis(1000),
                    Duration::from_millis(5000),
                    password,
                )
                .await,
            );
        }
        for sentinel in &set.sentinels {
            let (want_replicas, want_others) = (replicas.to_string(), (sentinels - 1).to_string());
            poll_until(
                &format!("sentinel :{} to see the whole set", sentinel.port),
                WAIT,
                || {
                    let (want_replicas, want_others) = (want_replicas.clone(), want_others.clone());
                    async move {
                        let replicas = sentinel.master_field("num-slaves").await?;
                        let others = sentinel.master_field("num-other-sentinels").await?;
                        (replicas == want_replicas && others == want_others).then_some(())
                    }
                },
            )
            .await;
        }
        set
    }

    /// Flags for a gateway on these sentinels.
    pub fn backend(&self) -> Backend {
        Backend {
            args: vec![
                "--redis-sentinel-nodes".into(),
                self.nodes_arg(),
                "--redis-sentinel-master".into(),
                SENTINEL_MASTER.into(),
            ],
        }
    }

    /// `host:port,host:port,…` of the sentinels (`redis://:password@host:port,…` with a password).
    pub fn nodes_arg(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| match &self.password {
                Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", s.port),
                None => format!("127.0.0.1:{}", s.port),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master the first answering sentinel names.
    pub async fn master_port(&self) -> Option<u16> {
        for sentinel in &self.sentinels {
            if let Some(port) = sentinel.master_port().await {
                return Some(port);
            }
        }
        None
    }

    pub fn server(&mut self, port: u16) -> &mut RedisServer {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a server of this set")
    }

    /// Waits until every sentinel names a master other than `old_port` that says it is master.
    pub async fn wait_failover(&self, old_port: u16) -> u16 {
        let sentinels = &self.sentinels;
        poll_until(
            &format!("a failover away from :{old_port}"),
            Duration::from_secs(60),
            || async move {
                let mut named = None;
                for sentinel in sentinels {
                    let port = sentinel.master_port().await?;
                    if port == old_port || named.is_some_and(|p| p != port) {
                        return None;
                    }
                    named = Some(port);
                }
                let port = named?;
                redis_cli(port, &["role"])
                    .await
                    .starts_with("master")
                    .then_some(port)
            },
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// gateway
// ---------------------------------------------------------------------------------------------

/// A spawned `gateway` binary; its stdout and stderr are collected line by line.
pub struct GatewayProcess {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `gateway --listen 127.0.0.1:0 <args>` with `env` added, waits for its
    /// `listening on` line and for `/readyz` to answer 200.
    pub async fn start(name: &str, args: &[String], env: &[(&str, &str)]) -> GatewayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn gateway binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut process = GatewayProcess {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Some(child),
            logs,
        };
        let addr = within(&format!("{name}: `listening on` line"), async {
            loop {
                match rx.recv().await {
                    Some(line) => {
                        if let Some(addr) = listening_addr(&line) {
                            return addr;
                        }
                    }
                    None => panic!(
                        "{name} exited before listening:\n{}",
                        process.logs().join("\n")
                    ),
                }
            }
        })
        .await;
        process.addr = addr;
        process.wait_ready().await;
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway not running").id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("gateway not running");
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
    }

    pub fn sigterm(&self) {
        signal(
            self.child.as_ref().expect("gateway not running"),
            libc::SIGTERM,
        );
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        let addr = self.addr;
        poll_until(
            &format!("{}: /readyz 200", self.name),
            WAIT,
            || async move { (readyz(addr).await.0 == 200).then_some(()) },
        )
        .await
    }

    /// Resident set size from /proc/<pid>/status, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes_of(self.pid()).expect("VmRSS of a running gateway")
    }
}

/// VmRSS of a process from /proc/<pid>/status, in bytes (None once it is gone).
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            eprintln!(
                "---- gateway {} ({}) log tail ----\n{}",
                self.name,
                self.addr,
                logs[logs.len().saturating_sub(40)..].join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// Starts `n` gateway nodes named `node0`, `node1`... on `backend`.
pub async fn start_nodes(backend: &Backend, n: usize, env: &[(&str, &str)]) -> Vec<GatewayProcess> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(GatewayProcess::start(&format!("node{i}"), &backend.args, env).await);
    }
    nodes
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

pub fn http() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("reqwest client")
        })
        .clone()
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("response body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `POST /api/publish`; status and body (a transport error panics).
pub async fn publish_http(addr: SocketAddr, channel: &str, data: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("http://{addr}/api/publish"))
        .header("content-type", "application/json")
        .body(json!({"channel": channel, "data": data}).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /api/publish to {addr}: {e}"));
    json_of(resp).await
}

pub async fn readyz(addr: SocketAddr) -> (u16, Value) {
    match http().get(format!("http://{addr}/readyz")).send().await {
        Ok(resp) => json_of(resp).await,
        Err(e) => (0, json!({"transport_error": e.to_string()})),
    }
}

/// The whole history of `channel` through `GET /api/history`, paged.
pub async fn full_history(addr: SocketAddr, channel: &str) -> (String, u64, Vec<Pub>) {
    let mut since = 0;
    let mut out = Vec::new();
    loop {
        let resp = http()
            .get(format!(
                "http://{addr}/api/history?channel={}&since={since}&limit=1000",
                enc(channel)
            ))
            .send()
            .await
            .expect("GET /api/history");
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 200, "history of {channel}: {body}");
        let epoch = body["epoch"].as_str().expect("history epoch").to_string();
        let top = body["top"].as_u64().expect("history top");
        let page = body["publications"].as_array().expect("publications");
        for p in page {
            out.push(Pub::from_json(p).expect("publication in history"));
        }
        match out.last() {
            Some(last) if !page.is_empty() && last.offset < top => since = last.offset,
            _ => return (epoch, top, out),
        }
    }
}

pub async fn metrics_text(addr: SocketAddr) -> String {
    let resp = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200, "/metrics status");
    resp.text().await.expect("/metrics body")
}

pub async fn metric_of(addr: SocketAddr, name: &str) -> f64 {
    let text = metrics_text(addr).await;
    metric(&text, name, &[]).unwrap_or_else(|| panic!("metric {name} missing from /metrics"))
}

// ---------------------------------------------------------------------------------------------
// Publications, acks and the check
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Pub {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
}

impl Pub {
    fn from_json(v: &Value) -> Option<Pub> {
        Some(Pub {
            epoch: v["epoch"].as_str()?.to_string(),
            offset: v["offset"].as_u64()?,
            data: v.get("data")?.clone(),
        })
    }
}

/// What one subscription of a recording client received, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The subscribe reply's result.
    Subscribed(Value),
    Pub(Pub),
    Reset {
        epoch: String,
        offset: u64,
        reason: String,
    },
}

/// Every acknowledged publication: channel → epoch → offset → data.
#[derive(Clone, Default)]
pub struct Acks(Arc<Mutex<HashMap<String, EpochAcks>>>);

/// One channel's acks: epoch → offset → data.
pub type EpochAcks = BTreeMap<String, BTreeMap<u64, Value>>;

impl Acks {
    /// Records an ack; two acks for one (channel, epoch, offset) are a server bug.
    pub fn record(&self, channel: &str, ack: &Value, data: &Value) {
        let epoch = ack["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("ack without epoch: {ack}"));
        let offset = ack["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("ack without offset: {ack}"));
        assert_eq!(ack["channel"], channel, "ack for another channel: {ack}");
        let mut all = self.0.lock().unwrap();
        let prev = all
            .entry(channel.to_string())
            .or_default()
            .entry(epoch.to_string())
            .or_default()
            .insert(offset, data.clone());
        assert!(
            prev.is_none(),
            "offset {offset} of {channel} (epoch {epoch}) acknowledged twice: {prev:?} and {data}"
        );
    }

    /// The channel's acks, for the only epoch it has (panics if there are several).
    pub fn single(&self, channel: &str) -> (String, BTreeMap<u64, Value>) {
        let all = self.0.lock().unwrap();
        let epochs = all
            .get(channel)
            .unwrap_or_else(|| panic!("no acks for {channel}"));
        assert_eq!(
            epochs.len(),
            1,
            "{channel} acknowledged under several epochs: {:?}",
            epochs.keys().collect::<Vec<_>>()
        );
        let (e, m) = epochs.iter().next().unwrap();
        (e.clone(), m.clone())
    }

    pub fn epochs(&self, channel: &str) -> EpochAcks {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .flat_map(|e| e.values())
            .map(BTreeMap::len)
            .sum()
    }

    pub fn count_of(&self, channel: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .map(|e| e.values().map(BTreeMap::len).sum())
            .unwrap_or(0)
    }

    /// Highest acked offset of the channel in `epoch`.
    pub fn top(&self, channel: &str, epoch: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .and_then(|e| e.get(epoch))
            .and_then(|m| m.keys().next_back().copied())
            .unwrap_or(0)
    }
}

/// Asserts the acks of a channel are gap-free from 1: every publish was acknowledged, so every
/// offset the backplane assigned must have an ack.
#[track_caller]
pub fn assert_contiguous(channel: &str, acks: &BTreeMap<u64, Value>) {
    let n = acks.len() as u64;
    let first = acks.keys().next().copied().unwrap_or(1);
    let last = acks.keys().next_back().copied().unwrap_or(0);
    assert!(
        first == 1 && last == n,
        "{channel}: acked offsets are not 1..={n} without gaps (first {first}, last {last}, count {n})"
    );
}

/// Asserts `got` is exactly `expected` (offset → data) restricted to offsets > `after`, in order,
/// once each, all in `epoch`.
#[track_caller]
pub fn assert_exact(
    what: &str,
    got: &[Pub],
    epoch: &str,
    expected: &BTreeMap<u64, Value>,
    after: u64,
) {
    let want: Vec<(u64, &Value)> = expected.range(after + 1..).map(|(o, d)| (*o, d)).collect();
    for (i, p) in got.iter().enumerate() {
        assert_eq!(
            p.epoch, epoch,
            "{what}: publication #{i} (offset {}) in epoch {}, expected {epoch}",
            p.offset, p.epoch
        );
    }
    let mut seen = HashSet::new();
    let dups: Vec<u64> = got
        .iter()
        .filter(|p| !seen.insert(p.offset))
        .map(|p| p.offset)
        .take(10)
        .collect();
    assert!(dups.is_empty(), "{what}: duplicates received: {dups:?}");
    let got_set: HashSet<u64> = got.iter().map(|p| p.offset).collect();
    let missing: Vec<u64> = want
        .iter()
        .map(|(o, _)| *o)
        .filter(|o| !got_set.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged publications never arrived (after offset {after}), first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let want_set: HashSet<u64> = want.iter().map(|(o, _)| *o).collect();
    let extra: Vec<u64> = got
        .iter()
        .map(|p| p.offset)
        .filter(|o| !want_set.contains(o))
        .take(10)
        .collect();
    assert!(
        extra.is_empty(),
        "{what}: received offsets that were not acknowledged after {after}: {extra:?}"
    );
    for (i, (p, (o, d))) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(
            p.offset, *o,
            "{what}: out of order at #{i}: got offset {}, expected {o}",
            p.offset
        );
        assert_eq!(
            &p.data, *d,
            "{what}: data of offset {o} differs from what was acknowledged"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Recording WebSocket client
// ---------------------------------------------------------------------------------------------

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Default)]
pub struct SubLog {
    pub channels: HashMap<String, Vec<Item>>,
    /// Set when the connection ended: the close code or the error.
    pub ended: Option<String>,
    /// Messages that are neither replies, publications nor resets.
    pub unexpected: Vec<Value>,
}

impl SubLog {
    pub fn pubs(&self, channel: &str) -> Vec<Pub> {
        self.channels
            .get(channel)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| match i {
                        Item::Pub(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn pub_count(&self, channel: &str) -> usize {
        self.channels
            .get(channel)
            .map(|items| items.iter().filter(|i| matches!(i, Item::Pub(_))).count())
            .unwrap_or(0)
    }

    /// The position to resume from: the last publication, reset or subscribe result.
    pub fn position(&self, channel: &str) -> Option<(String, u64)> {
        self.channels
            .get(channel)?
            .iter()
            .rev()
            .find_map(|i| match i {
                Item::Pub(p) => Some((p.epoch.clone(), p.offset)),
                Item::Reset { epoch, offset, .. } => Some((epoch.clone(), *offset)),
                Item::Subscribed(r) => {
                    Some((r["epoch"].as_str()?.to_string(), r["offset"].as_u64()?))
                }
            })
    }

    pub fn last_offset(&self, channel: &str) -> u64 {
        self.position(channel).map(|p| p.1).unwrap_or(0)
    }
}

/// A WebSocket client whose reader task records every push per channel; requests are matched
/// to replies by id.
pub struct Sub {
    pub name: String,
    pub addr: SocketAddr,
    log: Arc<Mutex<SubLog>>,
    changed: watch::Receiver<u64>,
    sink: Arc<tokio::sync::Mutex<SplitSink<WsStream, Message>>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Sub {
    pub async fn connect(name: &str, addr: SocketAddr) -> Sub {
        let (ws, resp) = within(
            &format!("{name}: websocket handshake with {addr}"),
            tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), None, true),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: websocket handshake with {addr}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let (sink, stream) = ws.split();
        let log = Arc::new(Mutex::new(SubLog::default()));
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let (tx, changed) = watch::channel(0u64);
        let reader = tokio::spawn(read_loop(stream, log.clone(), pending.clone(), tx));
        Sub {
            name: name.to_string(),
            addr,
            log,
            changed,
            sink: Arc::new(tokio::sync::Mutex::new(sink)),
            pending,
            next_id: AtomicU64::new(1),
            reader,
        }
    }

    /// Sends `op` with a fresh id and returns the whole reply.
    pub async fn request(&self, mut op: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        op["id"] = json!(id);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if let Some(ended) = self.ended() {
            panic!(
                "{}: cannot send {op}: connection ended ({ended})",
                self.name
            );
        }
        within(&format!("{}: send", self.name), async {
            self.sink
                .lock()
                .await
                .send(Message::text(op.to_string()))
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("{}: send {op}: {e}", self.name));
        within(&format!("{}: reply to {op}", self.name), rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: connection ended before the reply to {op}: {:?}",
                    self.name,
                    self.log.lock().unwrap().ended
                )
            })
    }

    /// Subscribes (from `since` if given), asserting success; returns the result.
    pub async fn subscribe(&self, channel: &str, since: Option<&(String, u64)>) -> Value {
        let mut op = json!({"op": "subscribe", "channel": channel});
        if let Some((epoch, offset)) = since {
            op["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let reply = self.request(op.clone()).await;
        let result = reply.get("result").cloned().unwrap_or_else(|| {
            panic!("{}: {op} failed: {reply}", self.name);
        });
        assert_eq!(result["channel"], channel, "{}: {reply}", self.name);
        result
    }

    /// `publish` over this connection; the whole reply.
    pub async fn publish(&self, channel: &str, data: &Value) -> Value {
        self.request(json!({"op": "publish", "channel": channel, "data": data}))
            .await
    }

    pub async fn ping(&self) {
        let reply = self.request(json!({"op": "ping"})).await;
        assert!(
            reply.get("result").is_some(),
            "{}: ping: {reply}",
            self.name
        );
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, SubLog> {
        self.log.lock().unwrap()
    }

    pub fn pubs(&self, channel: &str) -> Vec<Pub> {
        self.log().pubs(channel)
    }

    pub fn items(&self, channel: &str) -> Vec<Item> {
        self.log()
            .channels
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    pub fn ended(&self) -> Option<String> {
        self.log().ended.clone()
    }

    /// Waits (bounded by `limit`) until `pred` holds for the log; awaits the reader's change
    /// notifications, no polling.
    pub async fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&SubLog) -> bool) {
        let mut changed = self.changed.clone();
        let res = tokio::time::timeout(limit, async {
            loop {
                changed.borrow_and_update();
                if pred(&self.log()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    // The reader ended; the log cannot change any more.
                    if pred(&self.log()) {
                        return;
                    }
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if res.is_err() {
            let log = self.log();
            let summary: Vec<String> = log
                .channels
                .keys()
                .map(|c| {
                    format!(
                        "{c}: {} pubs, position {:?}",
                        log.pub_count(c),
                        log.position(c)
                    )
                })
                .collect();
            panic!(
                "{}: timed out after {limit:?} waiting for {what}; ended: {:?}; {summary:?}; unexpected: {:?}",
                self.name, log.ended, log.unexpected
            );
        }
    }

    /// Waits until the channel's last received offset reaches `offset`.
    pub async fn wait_offset(&self, channel: &str, offset: u64) {
        self.wait_for(
            &format!("{channel} to reach offset {offset}"),
            WAIT,
            |log| log.last_offset(channel) >= offset,
        )
        .await
    }

    /// Waits until the connection ends (close frame or EOF).
    pub async fn wait_ended(&self) -> String {
        self.wait_for("the connection to end", WAIT, |log| log.ended.is_some())
            .await;
        self.ended().unwrap()
    }

    /// Closes the connection politely and stops the reader.
    pub async fn close(self) {
        let _ = within("close", async { self.sink.lock().await.close().await }).await;
        self.reader.abort();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut stream: SplitStream<WsStream>,
    log: Arc<Mutex<SubLog>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    changed: watch::Sender<u64>,
) {
    let mut n = 0u64;
    loop {
        let msg = stream.next().await;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                log.lock().unwrap().ended = Some(format!(
                    "close {:?}",
                    frame.map(|f| (u16::from(f.code), f.reason.to_string()))
                ));
                break;
            }
            Some(Ok(Message::Binary(_))) => {
                log.lock().unwrap().unexpected.push(json!("binary message"));
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                log.lock().unwrap().ended = Some(format!("error: {e}"));
                break;
            }
            None => {
                log.lock().unwrap().ended = Some("eof".into());
                break;
            }
        };
        let v: Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(_) => {
                log.lock().unwrap().unexpected.push(json!(text.as_str()));
                continue;
            }
        };
        {
            let mut log = log.lock().unwrap();
            if let Some(id) = v.get("id").and_then(Value::as_u64) {
                if let Some(result) = v.get("result") {
                    if result.get("recovered").is_some() {
                        if let Some(ch) = result["channel"].as_str() {
                            log.channels
                                .entry(ch.to_string())
                                .or_default()
                                .push(Item::Subscribed(result.clone()));
                        }
                    }
                }
                drop(log);
                if let Some(tx) = pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(v);
                }
            } else if let Some(reset) = v.get("reset") {
                let ch = reset["channel"].as_str().unwrap_or("").to_string();
                log.channels.entry(ch).or_default().push(Item::Reset {
                    epoch: reset["epoch"].as_str().unwrap_or("").to_string(),
                    offset: reset["offset"].as_u64().unwrap_or(0),
                    reason: reset["reason"].as_str().unwrap_or("").to_string(),
                });
            } else if let (Some(ch), Some(p)) = (v["channel"].as_str(), Pub::from_json(&v)) {
                log.channels
                    .entry(ch.to_string())
                    .or_default()
                    .push(Item::Pub(p));
            } else {
                log.unexpected.push(v);
            }
        }
        n += 1;
        changed.send_replace(n);
    }
    // Fail every waiting request.
    pending.lock().unwrap().clear();
    changed.send_replace(n + 1);
}

// ---------------------------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /api/publish` from `concurrency` concurrent workers.
    Http,
    /// `publish` ops over one WebSocket, `concurrency` in flight at a time.
    Ws,
}

/// Publishes round-robin over `channels` until stopped or `limit` publications, asserting every
/// publish succeeds and recording every ack. Publication `i` carries `{"tag": tag, "i": i}`.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    progress: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publisher {
    pub async fn start(
        addr: SocketAddr,
        via: Via,
        channels: &[String],
        tag: &str,
        acks: &Acks,
        limit: u64,
        concurrency: usize,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (progress_tx, progress) = watch::channel(0u64);
        let progress_tx = Arc::new(progress_tx);
        let channels: Arc<Vec<String>> = Arc::new(channels.to_vec());
        let mut tasks = Vec::new();
        let workers = if via == Via::Http { concurrency } else { 1 };
        for _ in 0..workers {
            let (stop, next, done, progress_tx, channels, acks) = (
                stop.clone(),
                next.clone(),
                done.clone(),
                progress_tx.clone(),
                channels.clone(),
                acks.clone(),
            );
            let tag = tag.to_string();
            let ws = match via {
                Via::Ws => Some(Sub::connect(&format!("publisher {tag}"), addr).await),
                Via::Http => None,
            };
            tasks.push(tokio::spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = if ws.is_some() { concurrency as u64 } else { 1 };
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= limit {
                        break;
                    }
                    let last = (first + batch).min(limit);
                    let items: Vec<(String, Value)> = (first..last)
                        .map(|i| {
                            let ch = channels[i as usize % channels.len()].clone();
                            (ch, json!({"tag": tag, "i": i}))
                        })
                        .collect();
                    match &ws {
                        None => {
                            for (ch, data) in &items {
                                let (status, body) = publish_http(addr, ch, data).await;
                                assert_eq!(status, 200, "publisher {tag}: publish {data}: {body}");
                                acks.record(ch, &body, data);
                            }
                        }
                        Some(sub) => {
                            let replies = futures_util::future::join_all(
                                items.iter().map(|(ch, data)| sub.publish(ch, data)),
                            )
                            .await;
                            for ((ch, data), reply) in items.iter().zip(replies) {
                                let ack = reply.get("result").unwrap_or_else(|| {
                                    panic!("publisher {tag}: publish {data}: {reply}")
                                });
                                acks.record(ch, ack, data);
                            }
                        }
                    }
                    let n =
                        done.fetch_add(items.len() as u64, Ordering::Relaxed) + items.len() as u64;
                    progress_tx.send_replace(n);
                }
            }));
        }
        Publisher {
            stop,
            done,
            progress,
            tasks,
        }
    }

    pub fn published(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` publications were acknowledged.
    pub async fn wait_published(&self, n: u64) {
        let mut progress = self.progress.clone();
        within(&format!("{n} publications acknowledged"), async {
            loop {
                if *progress.borrow_and_update() >= n {
                    return;
                }
                if progress.changed().await.is_err() {
                    panic!("publisher ended before {n} publications");
                }
            }
        })
        .await
    }

    /// Waits until the limit is reached (every worker finished); panics if one failed.
    pub async fn finish(self) -> u64 {
        for t in self.tasks {
            within_for("publisher to finish", Duration::from_secs(90), t)
                .await
                .expect("publisher failed");
        }
        self.done.load(Ordering::Relaxed)
    }

    /// Stops after the publishes in flight and returns how many were acknowledged.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }
}

/// Publishes `count` publications `{"tag": tag, "i": i}` to `channel` over one WebSocket with up
/// to `window` requests in flight (writes and reads run concurrently), asserting every ack and
/// recording it. Lighter on the test process than [`Publisher`], for large volumes.
pub async fn bulk_publish(
    addr: SocketAddr,
    channel: &str,
    tag: &str,
    count: u64,
    window: usize,
    acks: &Acks,
) {
    let (ws, _) = within(
        "bulk publisher handshake",
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), None, true),
    )
    .await
    .expect("bulk publisher handshake");
    let (mut sink, mut stream) = ws.split();
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let writer = {
        let permits = permits.clone();
        let channel = channel.to_string();
        let tag = tag.to_string();
        tokio::spawn(async move {
            for i in 0..count {
                permits.acquire().await.expect("semaphore").forget();
                let frame = json!({"id": i, "op": "publish", "channel": channel,
                                   "data": {"tag": tag, "i": i}});
                sink.send(Message::text(frame.to_string()))
                    .await
                    .expect("bulk publisher send");
            }
            sink
        })
    };
    let mut got = 0;
    while got < count {
        let msg = within("bulk publish ack", stream.next()).await;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            other => panic!("bulk publisher {tag}: connection ended: {other:?}"),
        };
        let reply: Value = serde_json::from_str(text.as_str()).expect("JSON reply");
        let i = reply["id"].as_u64().expect("reply id");
        let ack = reply
            .get("result")
            .unwrap_or_else(|| panic!("bulk publisher {tag}: publish #{i}: {reply}"));
        acks.record(channel, ack, &json!({"tag": tag, "i": i}));
        got += 1;
        permits.add_permits(1);
    }
    let mut sink = within("bulk writer", writer)
        .await
        .expect("bulk writer failed");
    let _ = sink.close().await;
}

// ---------------------------------------------------------------------------------------------
// Scenarios shared by the standalone and the cluster tests
// ---------------------------------------------------------------------------------------------

/// Three nodes; on every node one subscriber to every channel and one to a third of them;
/// every node publishes through HTTP and WebSocket. Every subscriber must receive every
/// publication of its channels, in order, exactly once.
pub async fn scenario_fanout(backend: &Backend, channels: &[String], per_publisher: u64) {
    let nodes = start_nodes(backend, 3, &PATIENT).await;
    let mut subs: Vec<(Sub, Vec<String>)> = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let all = Sub::connect(&format!("all@node{n}"), node.addr).await;
        let part = Sub::connect(&format!("part@node{n}"), node.addr).await;
        let mine: Vec<String> = channels
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == n)
            .map(|(_, c)| c.clone())
            .collect();
        for c in channels {
            let r = all.subscribe(c, None).await;
            assert_eq!(r["offset"], 0, "fresh channel {c}: {r}");
        }
        for c in &mine {
            part.subscribe(c, None).await;
        }
        subs.push((all, channels.to_vec()));
        subs.push((part, mine));
    }

    let acks = Acks::default();
    let mut publishers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for via in [Via::Http, Via::Ws] {
            let tag = format!("node{n}-{via:?}");
            publishers.push(
                Publisher::start(node.addr, via, channels, &tag, &acks, per_publisher, 4).await,
            );
        }
    }
    let mut total = 0;
    for p in publishers {
        total += p.finish().await;
    }
    assert_eq!(total, per_publisher * 6);

    for c in channels {
        let (_, a) = acks.single(c);
        assert_contiguous(c, &a);
    }
    for (sub, chans) in &subs {
        for c in chans {
            let (_, a) = acks.single(c);
            sub.wait_offset(c, *a.keys().next_back().unwrap()).await;
        }
        // A round trip flushes anything (e.g. a duplicate) already queued behind the last one.
        sub.ping().await;
        assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
        assert!(
            sub.log().unexpected.is_empty(),
            "{:?}",
            sub.log().unexpected
        );
        for c in chans {
            let (epoch, a) = acks.single(c);
            let items = sub.items(c);
            assert!(
                !items.iter().any(|i| matches!(i, Item::Reset { .. })),
                "{}: unexpected reset on {c}: {items:?}",
                sub.name
            );
            assert_exact(&format!("{} on {c}", sub.name), &sub.pubs(c), &epoch, &a, 0);
        }
    }
}

/// Three nodes A, B, C; clients on A, a publisher on B. A is killed with SIGKILL mid-stream;
/// its clients reconnect to B or C with their last positions and must end up with every acked
/// publication after their start, in order, exactly once.
pub async fn scenario_kill9(backend: &Backend, channels: &[String]) {
    let mut nodes = start_nodes(backend, 3, &PATIENT).await;
    let clients_n = 4;
    let mut clients: Vec<(Sub, Vec<String>)> = Vec::new();
    for k in 0..clients_n {
        let mine: Vec<String> = channels
            .iter()
            .enumerate()
            .filter(|(i, _)| i % clients_n == k || *i == 0)
            .map(|(_, c)| c.clone())
            .collect();
        let sub = Sub::connect(&format!("client{k}@A"), nodes[0].addr).await;
        for c in &mine {
            sub.subscribe(c, None).await;
        }
        clients.push((sub, mine));
    }
    let start: Vec<HashMap<String, (String, u64)>> = clients
        .iter()
        .map(|(s, chans)| {
            chans
                .iter()
                .map(|c| (c.clone(), s.log().position(c).unwrap()))
                .collect()
        })
        .collect();

    let acks = Acks::default();
    let publisher =
        Publisher::start(nodes[1].addr, Via::Ws, channels, "B", &acks, 200_000, 8).await;

    // Mid-stream: every client has received something on every channel.
    for (sub, chans) in &clients {
        for c in chans {
            sub.wait_for(&format!("progress on {c}"), WAIT, |log| {
                log.pub_count(c) >= 10
            })
            .await;
        }
    }
    nodes[0].kill9();

    let mut resumed: Vec<Sub> = Vec::new();
    for (k, (old, chans)) in clients.iter().enumerate() {
        old.wait_ended().await;
        let target = &nodes[1 + k % 2];
        let sub = Sub::connect(&format!("client{k}@{}", target.name), target.addr).await;
        for c in chans {
            let pos = old.log().position(c).unwrap();
            let r = sub.subscribe(c, Some(&pos)).await;
            assert_eq!(
                r["recovered"], true,
                "{}: resume of {c} from {pos:?} not recovered: {r}",
                sub.name
            );
            assert_eq!(r["epoch"], pos.0.as_str(), "{}: {r}", sub.name);
        }
        resumed.push(sub);
    }
    // Live traffic after the resume, then a bounded end.
    for (sub, (_, chans)) in resumed.iter().zip(&clients) {
        for c in chans {
            sub.wait_for(&format!("live publications on {c}"), WAIT, |log| {
                log.pub_count(c) >= 20
            })
            .await;
        }
    }
    publisher.stop().await;

    for c in channels {
        let (_, a) = acks.single(c);
        assert_contiguous(c, &a);
    }
    for (k, (sub, (old, chans))) in resumed.iter().zip(&clients).enumerate() {
        for c in chans {
            let (_, a) = acks.single(c);
            sub.wait_offset(c, *a.keys().next_back().unwrap()).await;
        }
        sub.ping().await;
        assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
        for c in chans {
            let (epoch, a) = acks.single(c);
            let (start_epoch, start_offset) = &start[k][c];
            assert_eq!(start_epoch, &epoch);
            let mut all = old.pubs(c);
            all.extend(sub.pubs(c));
            assert_exact(
                &format!("client{k} on {c} (A then {})", sub.name),
                &all,
                &epoch,
                &a,
                *start_offset,
            );
        }
    }
}

/// Wall-clock helper for diagnostics only (never asserted on).
pub fn elapsed(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Fault helpers: a client that leaves mid-subscribe, Redis Cluster slot migration, publish
// retries
// ---------------------------------------------------------------------------------------------

/// Opens a WebSocket to `addr`, then sends a `subscribe` of `channel` and a Close frame in one
/// TCP write and drops the socket without waiting for anything: the server sees the subscribe
/// and the end of the connection at once (a page reload does this).
pub async fn subscribe_and_close_in_one_write(addr: SocketAddr, channel: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to the gateway");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("upgrade");
    // Read the 101 response headers (the server sends nothing else before our frames).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("101 response", tcp.read(&mut byte))
            .await
            .expect("read 101");
        assert!(n == 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    let mut bytes = ws_client_frame(0x1, subscribe.as_bytes());
    bytes.extend(ws_client_frame(0x8, &1000u16.to_be_bytes()));
    tcp.write_all(&bytes).await.expect("subscribe and close");
}

/// A masked (client) WebSocket frame with FIN set.
fn ws_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend((n as u16).to_be_bytes());
        }
    }
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Publishes over HTTP until one attempt is answered 200 (bounded by [`WAIT`]); returns the ack
/// and every earlier attempt's answer (a refused publish was not stored, but one that timed out
/// may have been).
pub async fn publish_until_acked(addr: SocketAddr, channel: &str, data: &Value) -> (Value, usize) {
    let mut failures = 0;
    within(&format!("publish of {data} to be acknowledged"), async {
        loop {
            let (status, body) = publish_http(addr, channel, data).await;
            if status == 200 {
                return (body, failures);
            }
            failures += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Moving one hash slot of a [`RedisCluster`] from its owner to another master, step by step as
/// `redis-cli --cluster reshard` does, so a test can act between the steps.
pub struct SlotMove<'a> {
    cluster: &'a RedisCluster,
    pub slot: u16,
    pub from: usize,
    pub to: usize,
}

impl RedisCluster {
    /// The node id of each node, in `nodes` order.
    pub async fn node_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for node in &self.nodes {
            ids.push(node.cli(&["cluster", "myid"]).await);
        }
        ids
    }

    pub async fn slot_of(&self, key: &str) -> u16 {
        let slot = self.nodes[0].cli(&["cluster", "keyslot", key]).await;
        slot.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {slot}"))
    }

    /// Index of the node that owns `slot` (as node 0 sees the slot map).
    pub async fn owner_of(&self, slot: u16) -> usize {
        let ids = self.node_ids().await;
        let nodes = self.nodes[0].cli(&["cluster", "nodes"]).await;
        // `<id> <addr> <flags> <master> <ping> <pong> <epoch> <link> <slot or range>...`
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let owns = fields.iter().skip(8).any(|range| {
                let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                    (Some(Ok(a)), None) => a == slot,
                    _ => false,
                }
            });
            if owns {
                if let Some(n) = ids
                    .iter()
                    .position(|id| Some(&id.as_str()) == fields.first())
                {
                    return n;
                }
            }
        }
        panic!("no owner of slot {slot} in {nodes}");
    }

    /// Starts moving `slot` to node `to`: IMPORTING on the target, MIGRATING on the source.
    pub async fn begin_slot_move(&self, slot: u16, to: usize) -> SlotMove<'_> {
        let from = self.owner_of(slot).await;
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let ids = self.node_ids().await;
        let s = slot.to_string();
        let r = self.nodes[to]
            .cli(&["cluster", "setslot", &s, "importing", &ids[from]])
            .await;
        assert_eq!(r, "OK", "SETSLOT IMPORTING: {r}");
        let r = self.nodes[from]
            .cli(&["cluster", "setslot", &s, "migrating", &ids[to]])
            .await;
        assert_eq!(r, "OK", "SETSLOT MIGRATING: {r}");
        SlotMove {
            cluster: self,
            slot,
            from,
            to,
        }
    }
}

impl SlotMove<'_> {
    /// MIGRATEs every key of the slot to the target.
    pub async fn move_keys(&self) {
        let (from, to) = (&self.cluster.nodes[self.from], &self.cluster.nodes[self.to]);
        let s = self.slot.to_string();
        loop {
            let keys = from.cli(&["cluster", "getkeysinslot", &s, "1000"]).await;
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                return;
            }
            let port = to.port.to_string();
            let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
            args.extend(keys);
            let r = from.cli(&args).await;
            assert!(r == "OK" || r == "NOKEY", "MIGRATE: {r}");
        }
    }

    /// Assigns the slot to the target on every master (target and source first).
    pub async fn finish(self) {
        let ids = self.cluster.node_ids().await;
        let s = self.slot.to_string();
        let mut order = vec![self.to, self.from];
        order.extend((0..self.cluster.nodes.len()).filter(|n| *n != self.to && *n != self.from));
        for n in order {
            let r = self.cluster.nodes[n]
                .cli(&["cluster", "setslot", &s, "node", &ids[self.to]])
                .await;
            assert_eq!(r, "OK", "SETSLOT NODE on node {n}: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault checks: publishing through a fault with retries, and "delivered or reset"
// ---------------------------------------------------------------------------------------------

/// One acknowledged publication, in the order the publisher got the answers.
#[derive(Debug, Clone)]
pub struct Acked {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
}

/// One publisher per channel, each publishing `{"tag": channel, "i": i}` one at a time over
/// HTTP, rotating over `nodes`, and retrying a refused publish (any non-200, or a transport
/// error) with the same `idempotency_key` until it is acknowledged.
pub struct RetryingPublishers {
    stop: Arc<AtomicBool>,
    /// Per channel, every ack in order.
    pub acked: Arc<Mutex<HashMap<String, Vec<Acked>>>>,
    /// Refused attempts (retried).
    pub refused: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RetryingPublishers {
    pub fn start(nodes: &[SocketAddr], channels: &[String]) -> RetryingPublishers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<HashMap<String, Vec<Acked>>>> = Arc::default();
        let refused = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for channel in channels {
            let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
            let (nodes, channel) = (nodes.to_vec(), channel.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("reqwest client");
                let mut attempt = 0usize;
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let data = json!({"tag": channel, "i": i});
                    let body = json!({"channel": channel, "data": data,
                                      "idempotency_key": format!("{channel}-{i}")});
                    loop {
                        let addr = nodes[attempt % nodes.len()];
                        attempt += 1;
                        let answer = client
                            .post(format!("http://{addr}/api/publish"))
                            .header("content-type", "application/json")
                            .body(body.to_string())
                            .send()
                            .await;
                        if let Ok(resp) = answer {
                            let (status, ack) = json_of(resp).await;
                            if status == 200 {
                                acked
                                    .lock()
                                    .unwrap()
                                    .entry(channel.clone())
                                    .or_default()
                                    .push(Acked {
                                        epoch: ack["epoch"].as_str().unwrap_or("").to_string(),
                                        offset: ack["offset"].as_u64().unwrap_or(0),
                                        data: data.clone(),
                                    });
                                break;
                            }
                        }
                        refused.fetch_add(1, Ordering::Relaxed);
                        // A retry pause, not a wait for an event: the publisher must keep trying.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        RetryingPublishers {
            stop,
            acked,
            refused,
            tasks,
        }
    }

    pub fn count_of(&self, channel: &str) -> usize {
        self.acked.lock().unwrap().get(channel).map_or(0, Vec::len)
    }

    pub fn acked_of(&self, channel: &str) -> Vec<Acked> {
        self.acked
            .lock()
            .unwrap()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every channel has at least `n` acks.
    pub async fn wait_acked(&self, channels: &[String], n: usize, limit: Duration) {
        poll_until(&format!("{n} acks on every channel"), limit, || async {
            channels.iter().all(|c| self.count_of(c) >= n).then_some(())
        })
        .await
    }

    /// Stops after the publishes in flight (each finishes its retries).
    pub async fn stop(self) -> HashMap<String, Vec<Acked>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within_for("retrying publisher to stop", Duration::from_secs(90), t)
                .await
                .expect("publisher task");
        }
        Arc::try_unwrap(self.acked)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

/// What a subscriber's log says about a channel's acknowledged publications.
#[derive(Debug, Default)]
pub struct DeliveryCheck {
    /// Acked publications neither delivered nor preceded by a reset: the one rule is broken.
    pub silently_lost: Vec<String>,
    /// Acked publications not delivered, but after an explicit reset.
    pub covered_by_reset: usize,
    /// A position delivered twice, or with other data than was acknowledged for it.
    pub corrupt: Vec<String>,
    pub resets: usize,
}

/// Checks `items` (one subscription's log) against `acked`: every acknowledged publication after
/// `after` (epoch, offset) must be delivered with its data, or the subscriber must have received
/// a reset after the last publication it got before that one.
pub fn check_delivery(items: &[Item], acked: &[Acked], after: &(String, u64)) -> DeliveryCheck {
    let mut check = DeliveryCheck::default();
    // (epoch, offset) -> (index in the log, data)
    let mut delivered: HashMap<(String, u64), (usize, Value)> = HashMap::new();
    let mut reset_at = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Pub(p) => {
                let key = (p.epoch.clone(), p.offset);
                if delivered.insert(key, (i, p.data.clone())).is_some() {
                    check
                        .corrupt
                        .push(format!("{}/{} delivered twice", p.epoch, p.offset));
                }
            }
            Item::Reset { .. } => reset_at.push(i),
            Item::Subscribed(_) => {}
        }
    }
    check.resets = reset_at.len();
    for a in acked {
        if a.epoch == after.0 && a.offset <= after.1 {
            continue;
        }
        match delivered.get(&(a.epoch.clone(), a.offset)) {
            Some((_, data)) if *data == a.data => {}
            Some((_, data)) => check.corrupt.push(format!(
                "{}/{}: acked {} but delivered {}",
                a.epoch, a.offset, a.data, data
            )),
            None => {
                // The log index of the last publication of the same epoch before this one.
                let before = delivered
                    .iter()
                    .filter(|((e, o), _)| *e == a.epoch && *o < a.offset)
                    .map(|(_, (i, _))| *i)
                    .max();
                if reset_at.iter().any(|&r| before.is_none_or(|b| r > b)) {
                    check.covered_by_reset += 1;
                } else {
                    check
                        .silently_lost
                        .push(format!("{}/{} {}", a.epoch, a.offset, a.data));
                }
            }
        }
    }
    check
}
