//! Measurements of presence on Redis at the sizes issue #15 names
//! (`cargo run --release -p backplane --example presence_scale`): a presence read of a channel with 10,000 members held by 3 nodes, the
//! Redis memory those members take, and the cost of 1,000 announced joins made at once (how long
//! until a subscribed node heard them all, and how many script calls they took). Real
//! `redis-server`, three backplanes in this process; results go to stdout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane::redis::{RedisBackplane, RedisConfig, Target};
use backplane::{Backplane, Member, Publication, PublicationSink, Settings};
use serde_json::value::RawValue;
use testkit::{RedisOpts, RedisServer};
use tokio::sync::Notify;

const PREFIX: &str = "scale";

/// Counts what a node's sink got and wakes a waiter.
#[derive(Default)]
struct Counter {
    events: AtomicUsize,
    changed: Notify,
}

impl PublicationSink for Counter {
    fn deliver(&self, publication: Arc<Publication>) {
        if !publication.is_publication() {
            self.events.fetch_add(1, Ordering::Relaxed);
            self.changed.notify_waiters();
        }
    }
}

impl Counter {
    async fn wait_events(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.events.load(Ordering::Relaxed) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("{n} events not heard within 60 s"));
    }
}

async fn node(server: &RedisServer, sink: Arc<Counter>) -> Arc<RedisBackplane> {
    let config = RedisConfig {
        target: Target::Single(server.url()),
        pool_size: 4,
        prefix: PREFIX.into(),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        health_interval: Duration::from_secs(1),
        subscribe_linger: Duration::from_secs(2),
        min_replicas_acked: 0,
        replica_ack_timeout: Duration::from_millis(250),
    };
    RedisBackplane::connect(config, Settings::default(), sink)
        .await
        .expect("connect")
}

fn member(i: usize) -> Member {
    Member {
        client: format!("{i:016x}-{i:08x}"),
        user: Some(format!("user-{}", i / 2)),
        info: Some(RawValue::from_string(format!("{{\"name\":\"User {i}\"}}")).unwrap()),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn used_memory(server: &RedisServer) -> i64 {
    let info = server.cli(&["info", "memory"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

async fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["info", "commandstats"]).await;
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Mean time inside Redis per call of `command` since the last `CONFIG RESETSTAT`.
async fn usec_per_call(server: &RedisServer, command: &str) -> f64 {
    let stats = server.cli(&["info", "commandstats"]).await;
    let prefix = format!("cmdstat_{command}:");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| {
            rest.split(',')
                .find_map(|f| f.strip_prefix("usec_per_call="))?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const MEMBERS: usize = 10_000;
    const READS: usize = 100;
    let server = RedisServer::start(RedisOpts::default()).await;
    let sinks: Vec<Arc<Counter>> = (0..3).map(|_| Arc::new(Counter::default())).collect();
    let mut nodes = Vec::new();
    for sink in &sinks {
        nodes.push(node(&server, sink.clone()).await);
    }

    let before = used_memory(&server).await;
    let started = Instant::now();
    for i in 0..MEMBERS {
        nodes[i % 3].presence_join("big", member(i), false);
    }
    for node in &nodes {
        node.flush_presence().await.unwrap();
    }
    let joined = started.elapsed();
    let after = used_memory(&server).await;
    let mut hashes = 0;
    for node in &nodes {
        let key = format!("{PREFIX}:{{big}}:pn:{}", node.node_id());
        hashes += server
            .cli(&["memory", "usage", &key, "samples", "0"])
            .await
            .parse::<u64>()
            .unwrap();
    }
    println!(
        "{MEMBERS} members over 3 nodes applied in {joined:?}; Redis used_memory +{} bytes \
         ({} per member); the 3 member hashes {hashes} bytes",
        after - before,
        (after - before) / MEMBERS as i64
    );

    for members in [false, true] {
        server.cli(&["config", "resetstat"]).await;
        let mut took = Vec::with_capacity(READS);
        for _ in 0..READS {
            let t = Instant::now();
            let read = nodes[0].presence("big", members).await.unwrap();
            took.push(t.elapsed());
            assert_eq!(
                (read.count, read.users),
                (MEMBERS as u64, MEMBERS as u64 / 2)
            );
        }
        took.sort();
        println!(
            "presence read ({}): p50 {:?}, p99 {:?}, max {:?} over {READS} reads; {} µs per \
             script call inside Redis",
            if members {
                "with the member list"
            } else {
                "count only"
            },
            quantile(&took, 0.5),
            quantile(&took, 0.99),
            took[READS - 1],
            usec_per_call(&server, "evalsha").await
        );
    }

    // 1,000 announced joins at once on node 0; node 1 is subscribed and hears them all.
    nodes[1].subscribe("burst").await.unwrap();
    server.cli(&["config", "resetstat"]).await;
    let started = Instant::now();
    for i in 0..1000 {
        nodes[0].presence_join("burst", member(MEMBERS + i), true);
    }
    sinks[1].wait_events(1000).await;
    let heard = started.elapsed();
    println!(
        "1,000 announced joins at once: heard by a subscribed node after {heard:?}; {} script \
         calls, {} publishes at Redis",
        calls(&server, "evalsha").await,
        calls(&server, "publish").await
    );
}
