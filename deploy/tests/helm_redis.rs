//! The Helm chart's Redis start-up scripts (`helm/files/redis/*.sh`, run by `redis.mode=sentinel`
//! and `standalone` pods) against real `redis-server` and `redis-sentinel` processes: three
//! "pods" on 127.0.0.1 (a Redis and a Sentinel each, on their own ports and data directory, as a
//! pod has its own host name and volume), started in StatefulSet order. The set bootstraps with
//! pod 0 as master; a gateway node on its sentinels acknowledges publications with
//! `min_replicas_acked = 1`; after `kill -9` of the master the sentinels promote a replica, every
//! acknowledged publication is still in history, the old master's pod restarts as a replica of
//! the new master, and a Sentinel restarted with its state — or with an empty volume — names the
//! new master too.
//!
//! Needs `redis-server`, `redis-sentinel` and `redis-cli` on PATH (Debian: redis-server,
//! redis-sentinel, redis-tools); without them the test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::*;

const PASSWORD: &str = "chart-test-password";
const MASTER_NAME: &str = "gateway";
/// Generous: a failover is Sentinel's down-after (1 s here), agreement and promotion.
const FAILOVER: Duration = Duration::from_secs(60);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../helm/files/redis")
        .join(name)
}

/// One pod of the set: its ports, its volume, and its two processes.
struct Pod {
    redis_port: u16,
    sentinel_port: u16,
    volume: tempfile::TempDir,
    run: tempfile::TempDir,
    redis: Option<Child>,
    sentinel: Option<Child>,
}

impl Pod {
    /// The file a process of the pod logs to (appended to across restarts), printed if the test
    /// fails.
    fn log(&self, process: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run.path().join(format!("{process}.log")))
            .expect("log file")
    }
}

struct Set {
    pods: Vec<Pod>,
}

impl Set {
    fn new(n: usize) -> Set {
        let pods = (0..n)
            .map(|_| Pod {
                redis_port: free_port(false),
                sentinel_port: free_port(false),
                volume: tempfile::tempdir().expect("volume"),
                run: tempfile::tempdir().expect("run dir"),
                redis: None,
                sentinel: None,
            })
            .collect();
        Set { pods }
    }

    fn sentinels(&self) -> String {
        let all: Vec<String> = self
            .pods
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.sentinel_port))
            .collect();
        all.join(" ")
    }

    fn first_master(&self) -> String {
        format!("127.0.0.1:{}", self.pods[0].redis_port)
    }

    /// Runs the chart's script for pod `i`'s Redis with the environment the StatefulSet gives it
    /// (the password as a mounted file).
    fn start_redis(&mut self, i: usize) {
        let password_file = self.pods[i].run.path().join("redis-password");
        std::fs::write(&password_file, PASSWORD).expect("password file");
        let mut cmd = Command::new("sh");
        cmd.arg(script("redis-start.sh"))
            .env("REDIS_PASSWORD_FILE", &password_file)
            .env("SELF_HOST", "127.0.0.1")
            .env("SELF_PORT", self.pods[i].redis_port.to_string())
            .env("FIRST_MASTER", self.first_master())
            .env("SENTINELS", self.sentinels())
            .env("MASTER_NAME", MASTER_NAME)
            .env("DATA_DIR", self.pods[i].volume.path())
            .env("CONF", self.pods[i].run.path().join("redis.conf"))
            .stdout(self.pods[i].log("redis"))
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        self.pods[i].redis = Some(cmd.spawn().expect("run redis-start.sh"));
    }

    fn start_sentinel(&mut self, i: usize) {
        let mut cmd = Command::new("sh");
        cmd.arg(script("sentinel-start.sh"))
            .env("REDIS_PASSWORD", PASSWORD)
            .env("SENTINEL_HOST", "127.0.0.1")
            .env("SENTINEL_PORT", self.pods[i].sentinel_port.to_string())
            .env("FIRST_MASTER", self.first_master())
            .env("SENTINELS", self.sentinels())
            .env("MASTER_NAME", MASTER_NAME)
            .env("QUORUM", "2")
            // The chart's default. At 1 s a busy machine made Sentinel fail over twice: a master
            // it has just switched to is down if no PING is answered within down-after of the
            // switch, and the others' votes that the old master was down, kept across the
            // switch (Redis 7.0), made it objectively down at once.
            .env("DOWN_AFTER_MS", "5000")
            .env("FAILOVER_TIMEOUT_MS", "10000")
            .env(
                "SENTINEL_CONF",
                self.pods[i].volume.path().join("sentinel.conf"),
            )
            .stdout(self.pods[i].log("sentinel"))
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        self.pods[i].sentinel = Some(cmd.spawn().expect("run sentinel-start.sh"));
    }

    /// Starts pod `i` and waits until both its containers would be ready (they answer PONG),
    /// as OrderedReady does before the next pod.
    async fn start_pod(&mut self, i: usize) {
        self.start_redis(i);
        self.start_sentinel(i);
        let (r, s) = (self.pods[i].redis_port, self.pods[i].sentinel_port);
        eventually(&format!("pod {i} ready"), || async move {
            cli(r, &["ping"]).await == "PONG" && cli(s, &["ping"]).await == "PONG"
        })
        .await;
    }

    fn kill9(child: &mut Option<Child>) {
        let mut c = child.take().expect("running");
        // The scripts `exec` the server: the child is redis-server / redis-sentinel itself.
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The master's port every running sentinel names, once they all agree on one that is not
    /// `not`.
    async fn agreed_master(&self, limit: Duration, not: Option<u16>) -> u16 {
        poll_until("the sentinels to agree on a master", limit, || async move {
            self.agreement().await.filter(|&port| Some(port) != not)
        })
        .await
    }

    /// The master's port if every running sentinel names the same one now.
    async fn agreement(&self) -> Option<u16> {
        let mut named = Vec::new();
        for pod in self.pods.iter().filter(|p| p.sentinel.is_some()) {
            named.push(named_master(pod.sentinel_port).await?);
        }
        named.windows(2).all(|w| w[0] == w[1]).then(|| named[0])
    }
}

impl Drop for Set {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, pod) in self.pods.iter().enumerate() {
                for process in ["redis", "sentinel"] {
                    let log =
                        std::fs::read_to_string(pod.run.path().join(format!("{process}.log")))
                            .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    eprintln!("---- pod {i} {process} log tail ----\n{}", tail.join("\n"));
                }
            }
        }
        for pod in &mut self.pods {
            for child in [&mut pod.redis, &mut pod.sentinel] {
                if child.is_some() {
                    Set::kill9(child);
                }
            }
        }
    }
}

async fn cli(port: u16, args: &[&str]) -> String {
    redis_cli_auth(port, Some(PASSWORD), args).await
}

async fn named_master(sentinel_port: u16) -> Option<u16> {
    let answer = cli(
        sentinel_port,
        &["--raw", "sentinel", "get-master-addr-by-name", MASTER_NAME],
    )
    .await;
    answer.lines().nth(1)?.trim().parse().ok()
}

/// `role:slave` with the link up to the Redis on `master_port`.
async fn replicates(port: u16, master_port: u16) -> bool {
    let info = cli(port, &["info", "replication"]).await;
    info.contains("role:slave")
        && info.contains(&format!("master_port:{master_port}"))
        && info.contains("master_link_status:up")
}

/// Publishes `data` until the node acknowledges it (a 503 during the failover is "outcome
/// unknown": the retry carries the same idempotency key, so it is stored once).
async fn publish_acked(node: &GatewayProcess, channel: &str, n: u64) -> Value {
    let body =
        json!({"channel": channel, "data": n, "idempotency_key": format!("k{n}")}).to_string();
    poll_until(&format!("publication {n} acknowledged"), FAILOVER, || {
        let body = body.clone();
        async move {
            let (status, ack) = post_raw(node, "/api/publish", body).await;
            (status == 200).then_some(ack)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_sentinel_set_bootstraps_fails_over_and_rejoins_without_losing_acks() {
    let mut set = Set::new(3);
    for i in 0..3 {
        set.start_pod(i).await;
    }
    let first = set.pods[0].redis_port;
    // Bootstrap: pod 0 is the master, the others replicate it, every sentinel names it and
    // has found the two others.
    assert_eq!(set.agreed_master(WAIT, None).await, first);
    for i in 1..3 {
        let port = set.pods[i].redis_port;
        eventually(&format!("redis {i} replicating pod 0"), || {
            replicates(port, first)
        })
        .await;
    }
    // Sentinel learns replicas from the master's INFO (every 10 s): a failover before that
    // finds no replica to promote. (In Kubernetes the set has long been up by then.)
    for pod in &set.pods {
        let port = pod.sentinel_port;
        eventually(
            "each sentinel knows the two others and both replicas",
            || async move {
                let master = cli(port, &["sentinel", "master", MASTER_NAME]).await;
                let fields: Vec<&str> = master.lines().map(str::trim).collect();
                let field = |name: &str| {
                    fields
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| fields.get(i + 1).copied())
                };
                field("num-other-sentinels") == Some("2") && field("num-slaves") == Some("2")
            },
        )
        .await;
    }
    let info = cli(first, &["config", "get", "appendfsync"]).await;
    assert!(
        info.contains("always"),
        "the chart's Redis persists every write: {info}"
    );

    // A gateway node on the sentinels, as the chart configures it.
    let nodes: Vec<String> = set
        .pods
        .iter()
        .map(|p| format!("redis://:{PASSWORD}@127.0.0.1:{}", p.sentinel_port))
        .collect();
    let args = vec![
        "--redis-sentinel-nodes".to_string(),
        nodes.join(","),
        "--redis-sentinel-master".to_string(),
        MASTER_NAME.to_string(),
    ];
    let node = GatewayProcess::start(
        "gateway",
        &args,
        &[("GATEWAY__REDIS__MIN_REPLICAS_ACKED", "1")],
    )
    .await;
    let channel = channel("helm-sentinel");
    let mut acked = Vec::new();
    for n in 1..=20 {
        acked.push(publish_acked(&node, &channel, n).await);
    }

    // kill -9 the master: a replica is promoted, publishing resumes on it.
    Set::kill9(&mut set.pods[0].redis);
    let promoted = set.agreed_master(FAILOVER, Some(first)).await;
    for n in 21..=40 {
        acked.push(publish_acked(&node, &channel, n).await);
    }

    // Every acknowledged publication is in the history the promoted master serves, once each.
    let (epoch, _top, history) = full_history(&node, &channel).await;
    let data: Vec<u64> = history.iter().filter_map(|p| p.data.as_u64()).collect();
    assert_eq!(
        data,
        (1..=40).collect::<Vec<_>>(),
        "history after the failover (epoch {epoch})"
    );
    for ack in &acked {
        let offset = ack["offset"].as_u64().expect("ack offset");
        assert!(
            history
                .iter()
                .any(|p| p.offset == offset && ack["epoch"] == json!(p.epoch)),
            "acknowledged {ack} is not in history: rolled back without a new epoch"
        );
    }

    // The old master's pod restarts (same volume): a replica of the master the sentinels name —
    // the promoted one, or a later one should Sentinel fail over again meanwhile (it may: the
    // promise above holds across any number of failovers).
    set.start_redis(0);
    let shared = &set;
    let master = poll_until(
        "the old master rejoins as a replica of the new one",
        WAIT,
        || async move {
            let master = shared.agreement().await.filter(|&m| m != first)?;
            replicates(first, master).await.then_some(master)
        },
    )
    .await;
    if master != promoted {
        eprintln!("sentinel failed over again: {promoted} → {master}");
    }

    // A Sentinel restarted with its state, and one whose volume was lost, name the new master.
    Set::kill9(&mut set.pods[1].sentinel);
    set.start_sentinel(1);
    Set::kill9(&mut set.pods[2].sentinel);
    std::fs::remove_file(set.pods[2].volume.path().join("sentinel.conf")).expect("wipe state");
    set.start_sentinel(2);
    for i in [1, 2] {
        let port = set.pods[i].sentinel_port;
        let named = poll_until("a restarted sentinel names a master", WAIT, || async move {
            named_master(port).await
        })
        .await;
        assert_eq!(named, master, "sentinel {i} after its restart");
    }

    // And the set still acknowledges with a replica: the old master has it too.
    let ack = publish_acked(&node, &channel, 41).await;
    let offset = ack["offset"].as_u64().expect("offset");
    assert_eq!(
        offset,
        acked.last().unwrap()["offset"].as_u64().unwrap() + 1
    );
    let (_, top, _) = full_history(&node, &channel).await;
    assert_eq!(top, offset);
}
