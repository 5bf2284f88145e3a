//! Batch publish (`POST /api/publish {"publications": [...]}`) on Redis: one pipeline of the
//! publish script per batch keeps every guarantee of the single publish — offsets gap-free and in
//! list order per channel, idempotency per publication, subscribers on other nodes get each one
//! in order, the script reloaded when Redis lost it (for the single publish too), one `WAIT`
//! for `min_replicas_acked`, and nothing acknowledged while Redis is down.

use crate::support::*;
use serde_json::{json, Value};

async fn batch(node: &impl Endpoint, items: Vec<Value>) -> Vec<Value> {
    let body = json!({ "publications": items });
    let (status, answer) = post_raw(node, "/api/publish", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    answer["results"].as_array().expect("results").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_redis_keep_offsets_idempotency_and_delivery() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let (a, b) = ("rb:a", "rb:b");
    let mut sub = WsClient::connect(&nodes[1]).await;
    sub.subscribe(a).await;
    publish(&nodes[0], a, json!(0)).await;

    let mut items = Vec::new();
    for n in 1..=20 {
        items.push(json!({"channel": a, "data": n}));
        items.push(json!({"channel": b, "data": n, "idempotency_key": format!("b{n}")}));
    }
    let results = batch(&nodes[0], items).await;
    assert_eq!(results.len(), 40);
    for (i, r) in results.iter().enumerate() {
        let n = i as u64 / 2 + 1;
        let (channel, offset) = if i % 2 == 0 { (a, n + 1) } else { (b, n) };
        assert_eq!(r["channel"], channel, "{r}");
        assert_eq!(r["offset"], offset, "{r}");
    }
    // Live delivery on the other node: every publication of `a`, in order.
    for n in 0..=20 {
        let p = sub.push().await;
        assert_eq!(
            (p["offset"].as_u64(), p["data"].clone()),
            (Some(n + 1), json!(n))
        );
    }

    // Idempotency per publication: same data → the first ack, other data → a conflict; the
    // others of the batch are published.
    let again = batch(
        &nodes[1],
        vec![
            json!({"channel": b, "data": 3, "idempotency_key": "b3"}),
            json!({"channel": b, "data": "other", "idempotency_key": "b4"}),
            json!({"channel": b, "data": 21}),
        ],
    )
    .await;
    assert_eq!(again[0], results[5], "the first ack of key b3");
    assert_eq!(
        again[1]["error"]["code"], "idempotency_conflict",
        "{again:?}"
    );
    assert_eq!(again[2]["offset"], 21, "{again:?}");
    let (_, page) = history(&nodes[0], &format!("channel={b}")).await;
    let stored: Vec<Value> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["offset"], p["data"]]))
        .collect();
    let expected: Vec<Value> = (1..=21).map(|n| json!([n, n])).collect();
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_single_publish_reload_the_script_redis_lost() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 1, &PATIENT).await;
    let ch = "rb:flushed";
    publish(&nodes[0], ch, json!(1)).await;
    assert_eq!(redis.cli(&["script", "flush"]).await, "OK");
    let items = (2..=5).map(|n| json!({"channel": ch, "data": n})).collect();
    let results = batch(&nodes[0], items).await;
    let offsets: Vec<Value> = results.iter().map(|r| r["offset"].clone()).collect();
    assert_eq!(
        offsets,
        vec![json!(2), json!(3), json!(4), json!(5)],
        "{results:?}"
    );
    // The single publish reloads it too.
    assert_eq!(redis.cli(&["script", "flush"]).await, "OK");
    assert_eq!(publish(&nodes[0], ch, json!(6)).await["offset"], 6);
    let (_, page) = history(&nodes[0], &format!("channel={ch}")).await;
    assert_eq!(page["top"], 6, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_while_redis_is_down_acknowledges_nothing() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 1, &[]).await;
    publish(&nodes[0], "rb:down", json!(1)).await;
    redis.kill9();
    let items = (0..3)
        .map(|n| json!({"channel": "rb:down", "data": n}))
        .collect();
    for r in batch(&nodes[0], items).await {
        assert_eq!(r["error"]["code"], "backplane_unavailable", "{r}");
        assert!(r.get("offset").is_none(), "{r}");
    }
}

/// `min_replicas_acked = 2`, 2 replicas: one `WAIT` covers the whole batch. With a replica down
/// every publication is stored but refused, saying so; once it is back, the retry with the same
/// keys answers the stored offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_waits_for_the_replicas_it_is_asked_to() {
    let mut set = SentinelSet::start(2, 0).await;
    let mut env: Vec<(&str, &str)> = PATIENT.to_vec();
    env.push(("GATEWAY__REDIS__REPLICA_ACK_TIMEOUT", "300ms"));
    let args = [
        "--redis-url".to_string(),
        set.servers[0].url(),
        "--redis-min-replicas-acked".to_string(),
        "2".to_string(),
    ];
    let node = GatewayProcess::start("node0", &args, &env).await;
    let items = |round: &str| {
        (0..3)
            .map(|n| json!({"channel": "rb:acked", "data": n, "idempotency_key": format!("{round}{n}")}))
            .collect::<Vec<_>>()
    };
    let first = batch(&node, items("a")).await;
    let offsets: Vec<Value> = first.iter().map(|r| r["offset"].clone()).collect();
    assert_eq!(offsets, vec![json!(1), json!(2), json!(3)], "{first:?}");

    let replica = set.servers[2].port;
    set.server(replica).kill9();
    for r in batch(&node, items("b")).await {
        assert_eq!(r["error"]["code"], "backplane_unavailable", "{r}");
        let message = r["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("stored but not replicated"), "{r}");
    }
    set.server(replica).restart().await;
    let retried = poll_until("the retried batch to be acknowledged", WAIT, || async {
        let results = batch(&node, items("b")).await;
        results
            .iter()
            .all(|r| r["offset"].is_u64())
            .then_some(results)
    })
    .await;
    let offsets: Vec<Value> = retried.iter().map(|r| r["offset"].clone()).collect();
    assert_eq!(
        offsets,
        vec![json!(4), json!(5), json!(6)],
        "the retry answers the stored publications: {retried:?}"
    );
}
