//! Conflation for slow consumers (`slow_consumer = "conflate"`): a client that stops reading on
//! a conflating namespace is not cut off; when its queue passes its limit each channel keeps
//! only its newest waiting publication, which reports how many it skipped. Once the client
//! reads again it gets, per channel, offsets that only increase, each exactly `skipped + 1`
//! after the previous one, ending at the newest — while a fast subscriber got everything. On
//! one node, and across two nodes sharing Redis (publisher on one, subscribers on the other),
//! also for a stalled client that asked for deltas: the publication that reports a skip is
//! full, and every patch applies to the publication received right before it. And before the
//! limit: a socket that stops taking data conflates the backlog waiting behind it.

use std::collections::HashMap;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use gateway::config::{NamespaceConfig, SlowConsumer};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::WebSocketStream;

const PAYLOAD: usize = 8 * 1024;
const SYMBOLS: [&str; 3] = ["ticks:A", "ticks:B", "ticks:C"];

fn config(c: &mut gateway::Config) {
    c.client.queue_max_bytes = 128 * 1024;
    c.websocket.max_message_size = 1024 * 1024;
    let ticks = NamespaceConfig {
        slow_consumer: SlowConsumer::Conflate,
        ..NamespaceConfig::default()
    };
    c.channels.namespaces.insert("ticks".into(), ticks);
}

#[tokio::test]
async fn a_stalled_client_on_a_conflating_namespace_gets_the_newest_with_honest_skips() {
    let node = Node::with(config).await;
    stalled_client_gets_the_newest_with_honest_skips(&node, &node, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_nodes_on_redis_a_stalled_client_gets_the_newest_with_honest_skips() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let on_redis = |c: &mut gateway::Config| {
        config(c);
        c.redis.url = Some(redis.url());
    };
    let publishing = Node::with(on_redis).await;
    let subscribing = Node::with(on_redis).await;
    stalled_client_gets_the_newest_with_honest_skips(&publishing, &subscribing, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_nodes_on_redis_a_stalled_delta_client_gets_full_skips_and_exact_patches() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let on_redis = |c: &mut gateway::Config| {
        config(c);
        // Deltas are small: with the kernel's own send buffer the client would stall only
        // after many megabytes; a small one stalls it while publications still wait in the
        // node's queue, where conflation acts.
        c.server.send_buffer_bytes = 4096;
        c.redis.url = Some(redis.url());
    };
    let publishing = Node::with(on_redis).await;
    let subscribing = Node::with(on_redis).await;
    stalled_client_gets_the_newest_with_honest_skips(&publishing, &subscribing, true).await;
}

/// Publishes through `publishing` while a fast and a stalled client of `subscribing` listen;
/// the stalled one asks for deltas when `delta`.
async fn stalled_client_gets_the_newest_with_honest_skips(
    publishing: &Node,
    subscribing: &Node,
    delta: bool,
) {
    let mut fast = WsClient::connect(subscribing).await;
    for ch in SYMBOLS {
        fast.subscribe(ch).await;
    }

    let mut slow = slow_subscriber(subscribing, &SYMBOLS, delta).await;
    // From here on `slow` is not read until its queue conflated.

    let pad = "q".repeat(PAYLOAD);
    let mut publisher = WsClient::connect(publishing).await;
    let mut newest: HashMap<&str, u64> = HashMap::new();
    let mut fast_seen: HashMap<String, u64> = HashMap::new();
    let mut round = 0u64;
    loop {
        round += 1;
        for ch in SYMBOLS {
            let ack = publisher
                .ok(json!({"op": "publish", "channel": ch, "data": {"round": round, "pad": pad}}))
                .await;
            newest.insert(ch, ack["offset"].as_u64().unwrap());
        }
        // The fast subscriber keeps up: every publication, in order.
        for _ in SYMBOLS {
            let p = fast.push().await;
            let ch = p["channel"].as_str().unwrap().to_string();
            let offset = p["offset"].as_u64().unwrap();
            let before = fast_seen.insert(ch, offset).unwrap_or(0);
            assert_eq!(
                offset,
                before + 1,
                "the fast subscriber misses nothing: {p}"
            );
            assert!(p.get("skipped").is_none(), "{p}");
        }
        let text = metrics(subscribing).await;
        let conflated = metric(&text, "gateway_conflated_publications_total", &[]);
        if conflated.unwrap_or(0.0) >= 3.0 {
            break;
        }
        assert!(round < 2_000, "the slow client's queue never conflated");
    }
    assert_eq!(
        metric(
            &metrics(subscribing).await,
            "gateway_slow_consumer_disconnects_total",
            &[]
        ),
        Some(0.0),
        "conflating channels do not cut the client off"
    );

    // The stalled client reads again: per channel, increasing offsets whose skips account for
    // every publication in between, ending with the newest, each with the data published at its
    // offset (round n published offset n of every channel).
    let skipped_total = read_to_newest(&mut slow, &newest, &pad).await;
    assert!(skipped_total > 0, "the slow client was not slow");

    // And it is live again: the next tick arrives right after the newest, a patch of it for a
    // client that asked for deltas (the chain goes on), else in full.
    let offset = newest[SYMBOLS[0]] + 1;
    publisher
        .ok(json!({"op": "publish", "channel": SYMBOLS[0], "data": {"round": offset, "pad": pad}}))
        .await;
    let next = loop {
        match within("next tick", slow.next()).await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("the slow client's connection ended: {other:?}"),
        }
    };
    assert_eq!(next["offset"], offset, "{next}");
    assert!(next.get("skipped").is_none(), "{next}");
    if delta {
        assert_eq!(next["delta"], json!({"round": offset}), "{next}");
    } else {
        assert_eq!(next["data"], json!({"round": offset, "pad": pad}), "{next}");
    }
}

/// A client of `node` on `channels` (asking for deltas when `delta`) whose socket has a small
/// receive buffer, subscribed, and from then on not read until the test says.
async fn slow_subscriber(
    node: &Node,
    channels: &[&str],
    delta: bool,
) -> WebSocketStream<TcpStream> {
    let stream = small_buffer_stream(node.addr).await;
    let (mut slow, _) = within(
        "slow handshake",
        tokio_tungstenite::client_async(node.ws_url("/ws"), stream),
    )
    .await
    .expect("slow handshake");
    for (id, ch) in channels.iter().enumerate() {
        slow.send(Message::text(
            json!({"id": id, "op": "subscribe", "channel": ch, "delta": delta}).to_string(),
        ))
        .await
        .unwrap();
    }
    for _ in channels {
        let reply = within("subscribe reply", slow.next())
            .await
            .unwrap()
            .unwrap();
        let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert!(reply.get("result").is_some(), "{reply}");
    }
    slow
}

/// Reads `slow` until every channel of `newest` reached its newest offset: per channel,
/// increasing offsets whose skips account for every publication in between, each with the data
/// published at its offset (`{"round": offset, "pad": pad}`), patches applied to the
/// publication received right before. Returns the publications skipped.
async fn read_to_newest(
    slow: &mut WebSocketStream<TcpStream>,
    newest: &HashMap<&str, u64>,
    pad: &str,
) -> u64 {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut values: HashMap<String, Value> = HashMap::new();
    let mut skipped_total = 0;
    within(
        "the slow client to reach the newest of every channel",
        async {
            while newest.iter().any(|(ch, n)| last.get(*ch) != Some(n)) {
                match slow.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let p: Value = serde_json::from_str(t.as_str()).unwrap();
                        let ch = p["channel"].as_str().expect("a publication").to_string();
                        let offset = p["offset"].as_u64().unwrap();
                        let skipped = p.get("skipped").map_or(0, |s| s.as_u64().unwrap());
                        let before = last.insert(ch.clone(), offset).unwrap_or(0);
                        let head = &t.as_str()[..120.min(t.len())];
                        assert_eq!(
                            offset,
                            before + 1 + skipped,
                            "never reordered, every skip reported: {head}"
                        );
                        skipped_total += skipped;
                        let value = match p.get("delta") {
                            Some(patch) => {
                                assert_eq!(skipped, 0, "a skip is reported in full: {head}");
                                let mut value = values
                                    .remove(&ch)
                                    .unwrap_or_else(|| panic!("a delta without a base: {head}"));
                                backplane::merge_patch::apply(&mut value, patch);
                                value
                            }
                            None => p["data"].clone(),
                        };
                        assert_eq!(value, json!({"round": offset, "pad": pad}), "{head}");
                        values.insert(ch, value);
                    }
                    Some(Ok(Message::Close(frame))) => panic!("closed: {frame:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("the slow client's connection failed: {e}"),
                    None => panic!("the slow client's connection ended"),
                }
            }
        },
    )
    .await;
    skipped_total
}

/// A node whose conflating namespace's limit is far above what the stall tests publish (100
/// publications of 8 KiB fit five times over), so only a stalled socket can start conflation.
fn stall_config(c: &mut gateway::Config) {
    config(c);
    c.client.queue_max_bytes = 4 * 1024 * 1024;
    c.server.send_low_water_bytes = Some(1024);
}

const STALL_PUBLICATIONS: u64 = 100;

/// Publishes `STALL_PUBLICATIONS` on `channel`, each read by `fast` before the next: the hub
/// queues a publication for every subscriber of the node at once, so once the fast one (which
/// keeps up and skips nothing) has it, so has every other subscriber's queue.
async fn publish_past_a_stalled_client(
    node: &Node,
    fast: &mut WsClient,
    channel: &'static str,
) -> (HashMap<&'static str, u64>, String) {
    let pad = "q".repeat(PAYLOAD);
    let mut publisher = WsClient::connect(node).await;
    let mut newest = HashMap::new();
    for round in 1..=STALL_PUBLICATIONS {
        let ack = publisher
            .ok(json!({"op": "publish", "channel": channel, "data": {"round": round, "pad": pad}}))
            .await;
        newest.insert(channel, ack["offset"].as_u64().unwrap());
        let p = fast.push().await;
        assert_eq!((&p["offset"], p.get("skipped")), (&json!(round), None));
    }
    (newest, pad)
}

/// What a stall test ends with: the client was told of skips (800 KB cannot all have fitted in
/// its socket: the backlog conflated although the queue never neared its limit), the metric
/// counts exactly those, and nobody was cut off.
async fn assert_conflated_on_stall(node: &Node, skipped: u64) {
    assert!(
        skipped > 0,
        "the backlog behind the stalled socket did not conflate"
    );
    let text = metrics(node).await;
    assert_eq!(
        metric(&text, "gateway_conflated_publications_total", &[]),
        Some(skipped as f64),
        "the metric counts what the client was told it skipped"
    );
    assert_eq!(
        metric(&text, "gateway_slow_consumer_disconnects_total", &[]),
        Some(0.0)
    );
}

/// A WebSocket whose socket stops taking data conflates the backlog long before the client's
/// queue is full (`server.send_low_water_bytes` keeps the backlog out of the kernel): a slow
/// reader is not served publications that aged in a queue it could never fill.
#[tokio::test]
async fn a_stalled_socket_conflates_long_before_the_queue_is_full() {
    let node = Node::with(stall_config).await;
    let channel = SYMBOLS[0];
    let mut fast = WsClient::connect(&node).await;
    fast.subscribe(channel).await;
    let mut slow = slow_subscriber(&node, &[channel], false).await;
    let (newest, pad) = publish_past_a_stalled_client(&node, &mut fast, channel).await;
    let skipped = read_to_newest(&mut slow, &newest, &pad).await;
    assert_conflated_on_stall(&node, skipped).await;
}

/// The same over SSE (HTTP/1.0, so the stream is its bytes as they are): the stream's writes
/// wait for the socket, and the backlog conflates; every event's skips account for the offsets
/// it did not get.
#[tokio::test]
async fn a_stalled_sse_stream_conflates_long_before_the_queue_is_full() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Node::with(stall_config).await;
    let channel = SYMBOLS[0];
    let mut fast = WsClient::connect(&node).await;
    fast.subscribe(channel).await;
    let mut slow = small_buffer_stream(node.addr).await;
    let head = format!("GET /sse?channel={channel} HTTP/1.0\r\n\r\n");
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut parser = SseParser::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut next_block = async |parser: &mut SseParser, slow: &mut TcpStream| loop {
        if let Some(block) = parser.next_block() {
            return block;
        }
        let n = within("more of the stream", slow.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "the stream ended");
        parser.push(&buf[..n]);
    };
    // The response head and `retry:` come as one block; then `connected`, once subscribed.
    while next_block(&mut parser, &mut slow).await.kind() != "connected" {}

    let (newest, pad) = publish_past_a_stalled_client(&node, &mut fast, channel).await;
    let (mut last, mut skipped_total) = (0, 0);
    while last != newest[channel] {
        let block = next_block(&mut parser, &mut slow).await;
        if block.kind() != "message" {
            continue;
        }
        let p = block.json();
        let offset = p["offset"].as_u64().unwrap();
        let skipped = p.get("skipped").map_or(0, |s| s.as_u64().unwrap());
        assert_eq!(
            offset,
            last + 1 + skipped,
            "never reordered, every skip reported"
        );
        assert_eq!(p["data"], json!({"round": offset, "pad": pad}));
        (last, skipped_total) = (offset, skipped_total + skipped);
    }
    assert_conflated_on_stall(&node, skipped_total).await;
}
