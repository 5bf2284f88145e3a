//! Versioned publishes: a publish whose `version` is not greater than the channel's last one is
//! neither stored nor delivered and is answered `"suppressed": true` with the channel's current
//! top — over WebSocket and the HTTP API (single and batch), on one node and across two nodes
//! sharing Redis, so out-of-order producers cannot move a value back in time.

use crate::support::*;
use serde_json::{json, Value};
use std::net::SocketAddr;

/// `POST /api/publish` with a raw body; the answer's JSON.
async fn api(node: &impl Endpoint, body: Value) -> Value {
    let (status, answer) = post_raw(node, "/api/publish", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Checks a suppressed answer names the channel's top as `top` (an earlier ack) states it.
fn assert_suppressed_at(answer: &Value, top: &Value) {
    assert_eq!(answer["suppressed"], true, "{answer}");
    for field in ["channel", "offset", "epoch", "tag"] {
        assert_eq!(answer[field], top[field], "{field} of {answer} vs {top}");
    }
}

/// Publishes versions 1..=6 of a channel from the WebSocket, the single API and the batch API of
/// `producers` (round robin), each stale version again right after, and checks what `subscriber`
/// receives: only the versions that advanced, in order.
async fn stale_versions_never_arrive(producers: &[SocketAddr], subscriber: SocketAddr) {
    let ch = "ticker:versioned";
    let mut sub = WsClient::connect(&subscriber).await;
    sub.subscribe(ch).await;
    let mut ws = Vec::new();
    for p in producers {
        ws.push(WsClient::connect(p).await);
    }
    for v in 1..=6u64 {
        let k = v as usize % producers.len();
        let quote = json!({"v": v});
        let ack = match v % 3 {
            0 => {
                ws[k]
                    .ok(json!({"op": "publish", "channel": ch, "data": quote, "version": v}))
                    .await
            }
            1 => {
                api(
                    &producers[k],
                    json!({"channel": ch, "data": quote, "version": v}),
                )
                .await
            }
            _ => {
                let answer = api(
                    &producers[k],
                    json!({"publications": [{"channel": ch, "data": quote, "version": v}]}),
                )
                .await;
                answer["results"][0].clone()
            }
        };
        assert_eq!(ack["offset"], v, "{ack}");
        assert!(ack.get("suppressed").is_none(), "only when true: {ack}");
        let top = ack;
        // The same version again, and an older one, from the other producer and transports.
        let other = (k + 1) % producers.len();
        let again = ws[other]
            .ok(json!({"op": "publish", "channel": ch, "data": {"stale": v}, "version": v}))
            .await;
        assert_suppressed_at(&again, &top);
        let older = api(
            &producers[other],
            json!({"channel": ch, "data": {"stale": v}, "version": v - 1}),
        )
        .await;
        assert_suppressed_at(&older, &top);
        let batch = api(
            &producers[other],
            json!({"publications": [
                {"channel": ch, "data": {"stale": v}, "version": v},
                {"channel": "ticker:versioned-other", "data": v, "version": v},
            ]}),
        )
        .await;
        assert_suppressed_at(&batch["results"][0], &top);
        assert!(
            batch["results"][1].get("suppressed").is_none(),
            "one item suppressed does not suppress the others: {batch}"
        );
    }
    let mut received = Vec::new();
    for _ in 1..=6 {
        let p = sub.push().await;
        received.push(json!([p["offset"], p["data"]]));
    }
    let expected: Vec<Value> = (1..=6).map(|v| json!([v, {"v": v}])).collect();
    assert_eq!(received, expected);
    // Nothing after them: an unversioned marker is the very next push.
    let marker = api(&producers[0], json!({"channel": ch, "data": "end"})).await;
    let next = sub.push().await;
    assert_eq!(
        (next["offset"].clone(), next["data"].clone()),
        (marker["offset"].clone(), json!("end"))
    );
    let (_, page) = history(&producers[0], &format!("channel={ch}")).await;
    assert_eq!(page["top"], 7, "nothing suppressed was stored: {page}");
}

#[tokio::test]
async fn stale_versions_are_suppressed_on_memory() {
    let node = Node::default().await;
    stale_versions_never_arrive(&[node.addr()], node.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_versions_are_suppressed_across_nodes_on_redis() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    stale_versions_never_arrive(&[nodes[0].addr(), nodes[1].addr()], nodes[1].addr()).await;
}

#[tokio::test]
async fn a_version_must_be_an_unsigned_integer() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    for bad in [json!(-1), json!("3"), json!(1.5)] {
        ws.err(
            json!({"op": "publish", "channel": "v", "data": 1, "version": bad}),
            "bad_request",
        )
        .await;
        let (status, _) = post_raw(
            &node,
            "/api/publish",
            json!({"channel": "v", "data": 1, "version": bad}).to_string(),
        )
        .await;
        assert_eq!(status, 400, "version {bad}");
    }
    let (status, answer) = post_raw(
        &node,
        "/api/publish",
        json!({"publications": [{"channel": "v", "data": 1}], "version": 1}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "a batch takes versions per item: {answer}");
}
