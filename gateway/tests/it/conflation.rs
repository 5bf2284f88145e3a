//! Conflation for slow consumers (`slow_consumer = "conflate"`): a client that stops reading on
//! a conflating namespace is not cut off; when its queue passes its limit each channel keeps
//! only its newest waiting publication, which reports how many it skipped. Once the client
//! reads again it gets, per channel, offsets that only increase, each exactly `skipped + 1`
//! after the previous one, ending at the newest — while a fast subscriber got everything.

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
    let mut fast = WsClient::connect(&node).await;
    for ch in SYMBOLS {
        fast.subscribe(ch).await;
    }

    let mut slow = slow_subscriber(&node, &SYMBOLS).await;
    // From here on `slow` is not read until its queue conflated.

    let pad = "q".repeat(PAYLOAD);
    let mut publisher = WsClient::connect(&node).await;
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
        let text = metrics(&node).await;
        let conflated = metric(&text, "gateway_conflated_publications_total", &[]);
        if conflated.unwrap_or(0.0) >= 3.0 {
            break;
        }
        assert!(round < 2_000, "the slow client's queue never conflated");
    }
    assert_eq!(
        metric(
            &metrics(&node).await,
            "gateway_slow_consumer_disconnects_total",
            &[]
        ),
        Some(0.0),
        "conflating channels do not cut the client off"
    );

    // The stalled client reads again: per channel, increasing offsets whose skips account for
    // every publication in between, ending with the newest.
    let skipped_total = read_to_newest(&mut slow, &newest).await;
    assert!(skipped_total > 0, "the slow client was not slow");

    // And it is live again: the next tick arrives in full, right after the newest.
    publisher
        .ok(json!({"op": "publish", "channel": SYMBOLS[0], "data": "next"}))
        .await;
    let next = loop {
        match within("next tick", slow.next()).await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("the slow client's connection ended: {other:?}"),
        }
    };
    assert_eq!(next["offset"], newest[SYMBOLS[0]] + 1, "{next}");
    assert_eq!(next["data"], "next");
}

/// A client on `channels` whose socket has a small receive buffer, subscribed, and from then on
/// not read until the test says.
async fn slow_subscriber(node: &Node, channels: &[&str]) -> WebSocketStream<TcpStream> {
    let stream = small_buffer_stream(node.addr).await;
    let (mut slow, _) = within(
        "slow handshake",
        tokio_tungstenite::client_async(node.ws_url("/ws"), stream),
    )
    .await
    .expect("slow handshake");
    for (id, ch) in channels.iter().enumerate() {
        slow.send(Message::text(
            json!({"id": id, "op": "subscribe", "channel": ch}).to_string(),
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

/// Reads `slow` until every channel of `newest` reached its newest offset, asserting that each
/// channel's offsets only increase and that each skip accounts exactly for what was not
/// delivered. Returns the publications skipped.
async fn read_to_newest(slow: &mut WebSocketStream<TcpStream>, newest: &HashMap<&str, u64>) -> u64 {
    let mut last: HashMap<String, u64> = HashMap::new();
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
                        let before = last.insert(ch, offset).unwrap_or(0);
                        assert_eq!(
                            offset,
                            before + 1 + skipped,
                            "never reordered, every skip reported: {}",
                            &t.as_str()[..120.min(t.len())]
                        );
                        skipped_total += skipped;
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

/// With `server.send_low_water_bytes` the node sees its socket stop taking data long before the
/// client's queue reaches its limit: the backlog conflates from then on, so a slow reader is not
/// served publications that aged in a queue it can never fill.
#[tokio::test]
async fn a_stalled_socket_conflates_long_before_the_queue_is_full() {
    const PUBLICATIONS: u64 = 100;
    let node = Node::with(|c| {
        config(c);
        // 100 publications of 8 KiB fit five times over: the limit is never the reason.
        c.client.queue_max_bytes = 4 * 1024 * 1024;
        c.server.send_low_water_bytes = Some(1024);
    })
    .await;
    let channel = SYMBOLS[0];
    let mut fast = WsClient::connect(&node).await;
    fast.subscribe(channel).await;
    let mut slow = slow_subscriber(&node, &[channel]).await;

    let pad = "q".repeat(PAYLOAD);
    let mut publisher = WsClient::connect(&node).await;
    let mut newest = HashMap::new();
    for n in 1..=PUBLICATIONS {
        let ack = publisher
            .ok(json!({"op": "publish", "channel": channel, "data": {"n": n, "pad": pad}}))
            .await;
        newest.insert(channel, ack["offset"].as_u64().unwrap());
        // The hub queues a publication for every subscriber of the node at once: once the fast
        // one (which keeps up, so it skips nothing) has it, so has the slow one's queue.
        let p = fast.push().await;
        assert_eq!((&p["offset"], p.get("skipped")), (&json!(n), None));
    }

    let skipped = read_to_newest(&mut slow, &newest).await;
    assert!(
        skipped > 0,
        "800 KB cannot all have fitted in the socket: the backlog conflated"
    );
    let text = metrics(&node).await;
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
