//! Redis Sentinel set-ups for fault tests: `redis-sentinel` processes on free ports, and a master
//! with replicas and the sentinels that monitor it ([`SentinelSet`]), optionally password-protected.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{die_with_parent, kill_and_reap};
use crate::redis::{free_port, redis_cli_auth, Backend, RedisOpts, RedisServer};
use crate::wait::{poll_until, WAIT};

/// The name the test sentinels monitor the master under.
pub const SENTINEL_MASTER: &str = "gwmaster";

/// One `redis-sentinel` process on a free loopback port with its own (rewritable) config file.
pub struct SentinelProcess {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The sentinel's `requirepass`, for this harness's own `redis-cli` calls.
    password: Option<String>,
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
            password: password.map(str::to_string),
        };
        poll_until(
            &format!("redis-sentinel on port {port} to answer PING"),
            WAIT,
            || async { (sentinel.cli(&["ping"]).await == "PONG").then_some(()) },
        )
        .await;
        sentinel
    }

    /// `SENTINEL get-master-addr-by-name`: the port of the master this sentinel names now.
    pub async fn master_port(&self) -> Option<u16> {
        let out = self
            .cli(&["sentinel", "get-master-addr-by-name", SENTINEL_MASTER])
            .await;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// A field of `SENTINEL master` (e.g. `num-slaves`, `num-other-sentinels`).
    pub async fn master_field(&self, field: &str) -> Option<String> {
        let out = self.cli(&["sentinel", "master", SENTINEL_MASTER]).await;
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .find(|pair| pair[0].trim() == field)
            .and_then(|pair| pair.get(1))
            .map(|v| v.trim().to_string())
    }

    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli_auth(self.port, self.password.as_deref(), args).await
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
    /// `sentinel auth-pass`); the harness's own `redis-cli` calls pass it on.
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
        let password = self.password.as_deref();
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
                redis_cli_auth(port, password, &["role"])
                    .await
                    .starts_with("master")
                    .then_some(port)
            },
        )
        .await
    }
}
