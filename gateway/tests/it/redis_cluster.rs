//! The fan-out and node-crash scenarios again on a 3-master Redis Cluster, with channels spread
//! over every shard.

use crate::support::*;

/// Twelve channels; the test checks afterwards that every master holds keys of some of them.
fn channels(prefix: &str) -> Vec<String> {
    (0..12).map(|i| format!("{prefix}:{i}")).collect()
}

/// Every master must hold data: the channels really spread over the three shards.
async fn assert_every_shard_used(cluster: &RedisCluster) {
    for node in &cluster.nodes {
        let size = node.cli(&["dbsize"]).await;
        let keys: u64 = size.parse().unwrap_or(0);
        assert!(
            keys > 0,
            "master :{} holds no key (dbsize {size:?}): channels did not spread over all shards",
            node.port
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_three_masters_every_subscriber_gets_everything() {
    let cluster = RedisCluster::start(3).await;
    scenario_fanout(&cluster.backend(), &channels("cfan"), 60).await;
    assert_every_shard_used(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_three_masters_kill9_node_clients_resume_on_others() {
    let cluster = RedisCluster::start(3).await;
    scenario_kill9(&cluster.backend(), &channels("ck9")).await;
    assert_every_shard_used(&cluster).await;
}
