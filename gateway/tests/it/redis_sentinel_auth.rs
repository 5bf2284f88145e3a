//! Redis Sentinel with a password everywhere (servers, replicas, sentinels): the password given in
//! the sentinel node URLs (`redis://:password@host:port`) reaches the sentinels and the master, so
//! a node publishes and delivers, and follows a failover. The harness's own `redis-cli` calls get
//! the password per process, so this shares the binary with tests without one.

use crate::support::*;
use serde_json::json;

const PASSWORD: &str = "s3cret-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_with_a_password_publishes_and_follows_a_failover() {
    let mut set = SentinelSet::start_with(1, 3, Some(PASSWORD)).await;
    assert!(
        set.nodes_arg().contains(PASSWORD),
        "the nodes carry the password"
    );
    let node = GatewayProcess::start("node0", &set.backend().args, &PATIENT).await;
    node.wait_ready().await;

    let sub = Sub::connect("sub", node.addr).await;
    sub.subscribe("auth", None).await;
    let (status, body) = publish_http(node.addr, "auth", &json!({"n": 1})).await;
    assert_eq!(status, 200, "{body}");
    sub.wait_offset("auth", 1).await;

    let old = set.master_port().await.expect("a master");
    set.server(old).kill9();
    set.wait_failover(old).await;
    let (status, body) = poll_until("a publish on the new master", WAIT, || async {
        let (status, body) = publish_http(node.addr, "auth", &json!({"n": 2})).await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    let offset = body["offset"].as_u64().unwrap();
    assert_eq!(offset, 2, "the replica had offset 1: {body}");
    sub.wait_offset("auth", offset).await;
    let pubs = sub.pubs("auth");
    assert_eq!(pubs.len(), 2, "{pubs:?}");
    assert_eq!(pubs[1].data, json!({"n": 2}));
}
