//! Long-poll on several gateway nodes sharing one Redis: a poller follows a channel published on
//! another node, and resumes on a third node after its node was killed with SIGKILL, losing and
//! duplicating nothing.

use std::net::SocketAddr;

use crate::support::*;
use serde_json::{json, Value};

/// `GET /poll` for one channel from `cursor` (empty: first poll); the answer, asserted 200.
async fn poll(addr: SocketAddr, channel: &str, cursor: &str) -> Value {
    let url = format!(
        "http://{addr}/poll?channel={}&cursor={cursor}&timeout=5",
        enc(channel)
    );
    let resp = http().get(url).send().await.expect("GET /poll");
    let status = resp.status().as_u16();
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(status, 200, "poll on {addr}: {body}");
    assert!(
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("reset").is_none()),
        "nothing may be lost: {body}"
    );
    body
}

async fn publish_range(addr: SocketAddr, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        let (status, body) = publish_http(addr, channel, &json!(n)).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_resumes_on_another_node_after_kill9() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let mut nodes = start_nodes(&Backend::standalone(&redis), 3, &[]).await;
    let channel = "poll-redis:0";

    let first = poll(nodes[0].addr, channel, "").await;
    let mut cursor = first["cursor"].as_str().unwrap().to_string();
    // Published through node 1, polled on node 0.
    publish_range(nodes[1].addr, channel, 1..=5).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        let answer = poll(nodes[0].addr, channel, &cursor).await;
        got.extend(poll_offsets(&answer));
        cursor = answer["cursor"].as_str().unwrap().to_string();
    }

    nodes[0].kill9();
    publish_range(nodes[1].addr, channel, 6..=9).await;
    while got.len() < 9 {
        let answer = poll(nodes[2].addr, channel, &cursor).await;
        got.extend(poll_offsets(&answer));
        cursor = answer["cursor"].as_str().unwrap().to_string();
    }
    assert_eq!(
        got,
        (1..=9).collect::<Vec<_>>(),
        "every offset once, in order"
    );
}
