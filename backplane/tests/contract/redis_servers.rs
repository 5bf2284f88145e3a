//! Real Redis for the contract suite: one `redis-server`, or a Redis Cluster of masters, on free
//! loopback ports with their own temporary directories. Every process is killed when its handle
//! is dropped (also when a test panics) and dies with the test process if that is killed first.
//! Self-contained on purpose, until a shared test kit absorbs it.

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::{poll_until, WAIT};

/// A loopback port nobody listens on, below the kernel's ephemeral range so that no outgoing
/// connection takes it. With `bus`, port + 10000 (the Redis Cluster bus) is free too.
fn free_port(bus: bool) -> u16 {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (lo, hi) = if bus { (10000, 22000) } else { (22000, 32000) };
    let mut taken = TAKEN.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port: u16 = rand::random_range(lo..hi);
        let pair_taken = bus && taken.contains(&(port + 10000));
        if taken.contains(&port) || pair_taken {
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

/// Runs `redis-cli -p port args...` and returns its trimmed stdout.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("redis-cli answered in time")
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub async fn start() -> RedisServer {
        Self::spawn(false).await
    }

    async fn spawn(cluster: bool) -> RedisServer {
        let port = free_port(cluster);
        let dir = tempfile::tempdir().expect("tempdir for redis");
        let path = dir.path().display().to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .args(["--dir", &path, "--logfile", &format!("{path}/redis.log")])
            .args(["--save", "", "--appendonly", "no"]);
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-config-file", &format!("{path}/nodes.conf")]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn redis-server");
        let server = RedisServer { port, dir, child };
        poll_until(&format!("redis on :{port} to answer PING"), || async move {
            (redis_cli(port, &["ping"]).await == "PONG").then_some(())
        })
        .await;
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis :{} log tail ----\n{}",
                self.port,
                self.log_tail()
            );
        }
        // Only this child, by its pid; it is reaped right after.
        let _ = self.child.kill();
        let _ = self.child.wait();
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
            nodes.push(RedisServer::spawn(true).await);
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = tokio::process::Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("redis-cli --cluster create answered in time")
            .expect("run redis-cli --cluster create");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("All 16384 slots covered"),
            "cluster create failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node must agree on the slot map before a client reads it.
        for node in &nodes {
            let port = node.port;
            poll_until(&format!("cluster state ok on :{port}"), || async move {
                let info = redis_cli(port, &["cluster", "info"]).await;
                let known = format!("cluster_known_nodes:{masters}");
                let shards = redis_cli(port, &["cluster", "shards"]).await;
                let all_masters = shards.matches("master").count() >= masters;
                (info.contains("cluster_state:ok") && info.contains(&known) && all_masters)
                    .then_some(())
            })
            .await;
        }
        RedisCluster { nodes }
    }

    /// Seed node URLs for the cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Makes a spawned server die with the test process even if its destructors never run.
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
