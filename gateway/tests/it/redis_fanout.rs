//! Several gateway nodes on one standalone Redis: cross-node fan-out, and clients of a node
//! killed with SIGKILL resuming on the others.

use crate::support::*;

fn channels(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}:{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_redis_every_subscriber_gets_everything() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    scenario_fanout(&Backend::standalone(&redis), &channels("fan", 6), 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_node_clients_resume_on_others() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    scenario_kill9(&Backend::standalone(&redis), &channels("k9", 6)).await;
}
