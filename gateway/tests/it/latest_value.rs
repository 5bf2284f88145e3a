//! Latest value on subscribe: `"since": "latest"` (WebSocket), `latest=true` (SSE, long-poll) and
//! a namespace's `subscribe_from = "latest"` deliver the channel's newest publication first, then
//! live ones with no gap and no duplicate; an empty or expired history delivers nothing and the
//! subscribe result says `"latest": false`. On one memory node and on two nodes sharing Redis.

use std::net::SocketAddr;

use crate::support::*;
use gateway::config::{NamespaceConfig, SubscribeFrom};
use serde_json::{json, Value};

/// Namespace whose channels start from their latest value without asking.
const QUOTES: &str = "quotes";
/// Namespace whose history lives one second, for the expired case.
const BRIEF: &str = "brief";

fn env() -> Vec<(&'static str, &'static str)> {
    let mut env = PATIENT.to_vec();
    env.push((
        "GATEWAY__CHANNELS__NAMESPACES__QUOTES__SUBSCRIBE_FROM",
        "latest",
    ));
    env.push((
        "GATEWAY__CHANNELS__NAMESPACES__BRIEF__HISTORY_MAX_AGE",
        "1s",
    ));
    env
}

async fn memory_node() -> Node {
    Node::with(|c| {
        let quotes = NamespaceConfig {
            subscribe_from: SubscribeFrom::Latest,
            ..NamespaceConfig::default()
        };
        let brief = NamespaceConfig {
            history_max_age: Some(std::time::Duration::from_secs(1)),
            ..NamespaceConfig::default()
        };
        c.channels.namespaces.insert(QUOTES.into(), quotes);
        c.channels.namespaces.insert(BRIEF.into(), brief);
    })
    .await
}

async fn publish_n(publisher: SocketAddr, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        publish(&publisher, channel, json!({"price": n})).await;
    }
}

/// `(offset, data)` of a publication.
fn at(p: &Value) -> (u64, Value) {
    (p["offset"].as_u64().expect("offset"), p["data"].clone())
}

fn quote(n: u64) -> (u64, Value) {
    (n, json!({"price": n}))
}

async fn over_websocket(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:ws";
    publish_n(publisher, ch, 1..=3).await;
    let mut ws = WsClient::connect(&subscriber).await;
    let result = ws
        .ok(json!({"op": "subscribe", "channel": ch, "since": "latest"}))
        .await;
    assert_eq!(
        (result["latest"].clone(), result["offset"].clone()),
        (json!(true), json!(3)),
        "{result}"
    );
    assert_eq!(at(&ws.push().await), quote(3), "the latest value first");
    publish_n(publisher, ch, 4..=5).await;
    assert_eq!(
        at(&ws.push().await),
        quote(4),
        "then live, no gap, no duplicate"
    );
    assert_eq!(at(&ws.push().await), quote(5));

    // A namespace that starts from the latest value when no position is sent.
    let quotes = "quotes:ws";
    publish_n(publisher, quotes, 1..=2).await;
    let result = ws.subscribe(quotes).await;
    assert_eq!(result["latest"], true, "{result}");
    assert_eq!(at(&ws.push().await), quote(2));
    // A position still wins over the namespace's default.
    let mut again = WsClient::connect(&subscriber).await;
    let result = again.subscribe_since(quotes, &result["epoch"], 0).await;
    assert_eq!(
        (result["recovered"].clone(), result.get("latest")),
        (json!(true), None)
    );
    assert_eq!(at(&again.push().await), quote(1));
    assert_eq!(at(&again.push().await), quote(2));

    // A channel never published to: nothing, said so; then live from its first publication.
    let empty = "ticker:ws-empty";
    let result = ws
        .ok(json!({"op": "subscribe", "channel": empty, "since": "latest"}))
        .await;
    assert_eq!(result["latest"], false, "{result}");
    publish_n(publisher, empty, 1..=1).await;
    assert_eq!(at(&ws.push().await), quote(1));
    ws.err(
        json!({"op": "subscribe", "channel": "ticker:bad", "since": "newest"}),
        "bad_request",
    )
    .await;
}

async fn over_sse(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:sse";
    publish_n(publisher, ch, 1..=3).await;
    let mut sse = Sse::open_query(&subscriber, &format!("channel={}&latest=true", enc(ch))).await;
    let connected = sse.connected().await;
    assert_eq!(
        connected_channels(&connected)[ch]["latest"],
        true,
        "{connected:?}"
    );
    assert_eq!(at(&sse.publication().await.1), quote(3));
    publish_n(publisher, ch, 4..=4).await;
    assert_eq!(at(&sse.publication().await.1), quote(4));

    // A plain EventSource on a `subscribe_from = "latest"` namespace gets the price first.
    let quotes = "quotes:sse";
    publish_n(publisher, quotes, 1..=2).await;
    let mut plain = Sse::open(&subscriber, &[quotes]).await;
    plain.connected().await;
    assert_eq!(at(&plain.publication().await.1), quote(2));
    // Resuming from its event id (a position) delivers what followed, not the latest again.
    let (id, _) = {
        publish_n(publisher, quotes, 3..=3).await;
        plain.publication().await
    };
    publish_n(publisher, quotes, 4..=4).await;
    let mut resumed = Sse::resume(&subscriber, &[quotes], &id).await;
    resumed.connected().await;
    assert_eq!(at(&resumed.publication().await.1), quote(4));
}

async fn over_poll(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:poll";
    publish_n(publisher, ch, 1..=3).await;
    let (status, first) = get(
        &subscriber,
        &format!("/poll?channel={}&latest=true&timeout=5", enc(ch)),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let events = first["events"].as_array().expect("events");
    assert_eq!(
        events.iter().map(at).collect::<Vec<_>>(),
        vec![quote(3)],
        "{first}"
    );
    publish_n(publisher, ch, 4..=4).await;
    let cursor = first["cursor"].as_str().expect("cursor");
    let (status, next) = get(
        &subscriber,
        &format!(
            "/poll?channel={}&latest=true&cursor={cursor}&timeout=5",
            enc(ch)
        ),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    let events = next["events"].as_array().expect("events");
    assert_eq!(
        events.iter().map(at).collect::<Vec<_>>(),
        vec![quote(4)],
        "a channel with a position resumes from it: {next}"
    );
    let (status, bad) = get(
        &subscriber,
        &format!("/poll?channel={}&latest=yes", enc(ch)),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
}

/// History that expired: the subscribe says `latest: false` and delivery starts live.
async fn expired(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "brief:expired";
    publish_n(publisher, ch, 1..=2).await;
    eventually("history of brief:expired to expire", || async {
        let (_, page) = history(&subscriber, &format!("channel={}", enc(ch))).await;
        page["publications"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let mut ws = WsClient::connect(&subscriber).await;
    let result = ws
        .ok(json!({"op": "subscribe", "channel": ch, "since": "latest"}))
        .await;
    assert_eq!(
        (result["latest"].clone(), result["offset"].clone()),
        (json!(false), json!(2)),
        "{result}"
    );
    publish_n(publisher, ch, 3..=3).await;
    assert_eq!(at(&ws.push().await), quote(3));
}

async fn every_transport(publisher: SocketAddr, subscriber: SocketAddr) {
    over_websocket(publisher, subscriber).await;
    over_sse(publisher, subscriber).await;
    over_poll(publisher, subscriber).await;
    expired(publisher, subscriber).await;
}

#[tokio::test]
async fn latest_value_on_memory() {
    let node = memory_node().await;
    every_transport(node.addr(), node.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_value_across_nodes_on_redis() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &env()).await;
    every_transport(nodes[0].addr(), nodes[1].addr()).await;
}
