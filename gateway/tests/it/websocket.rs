//! WebSocket protocol: commands, replies, pushes, errors and close codes.

use crate::support::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::Message;

#[tokio::test]
async fn subscribe_publish_and_receive_push() {
    let node = Node::default().await;
    let ch = channel("ws");
    let mut sub = WsClient::connect(&node).await;
    let mut publisher = WsClient::connect(&node).await;

    let res = sub.subscribe(&ch).await;
    assert_eq!(res["channel"], ch.as_str(), "{res}");
    assert_eq!(res["offset"], 0, "{res}");
    assert_eq!(res["recovered"], false, "{res}");
    assert!(res.get("reason").is_none_or(Value::is_null), "{res}");
    assert!(res["epoch"].is_string(), "{res}");

    let ack = publisher.publish(&ch, json!({"hello": "world"})).await;
    assert_eq!(ack["channel"], ch.as_str(), "{ack}");
    assert_eq!(ack["offset"], 1, "{ack}");
    // A channel with no publication has no epoch; its first publication makes it (#12.5).
    assert_eq!(res["epoch"], "", "{res}");
    assert_eq!(ack["tag"].as_str().map(str::len), Some(8), "{ack}");

    let push = sub.push().await;
    assert_eq!(
        push,
        json!({"channel": ch, "offset": 1, "epoch": ack["epoch"], "tag": ack["tag"], "data": {"hello": "world"}})
    );

    // HTTP publications reach WebSocket subscribers too.
    publish(&node, &ch, json!([1, 2])).await;
    let push = sub.push().await;
    assert_eq!(push["offset"], 2);
    assert_eq!(push["data"], json!([1, 2]));

    // The publisher is not subscribed, so it gets only its reply.
    let ack = publisher.publish(&ch, json!(3)).await;
    assert_eq!(ack["offset"], 3);
    publisher.ping().await;
    assert_eq!(publisher.buffered_pushes(), 0);
    assert_eq!(sub.push().await["offset"], 3);
}

#[tokio::test]
async fn subscribe_reports_current_top_and_delivers_only_later_publications() {
    let node = Node::default().await;
    let ch = channel("top");
    for n in 0..4 {
        publish(&node, &ch, json!(n)).await;
    }
    let mut ws = WsClient::connect(&node).await;
    let res = ws.subscribe(&ch).await;
    assert_eq!(res["offset"], 4, "{res}");
    assert_eq!(res["recovered"], false, "{res}");
    publish(&node, &ch, json!("live")).await;
    let push = ws.push().await;
    assert_eq!(
        push["offset"], 5,
        "history must not be replayed without since: {push}"
    );
    assert_eq!(push["data"], "live");
}

#[tokio::test]
async fn subscribe_reply_precedes_pushes_and_live_delivery_is_gap_free() {
    let node = Node::default().await;
    let ch = channel("race");
    publish(&node, &ch, json!("first")).await;
    let total = 2000;
    let publisher = {
        let ch = ch.clone();
        let addr = node.addr;
        tokio::spawn(async move { publish_many(addr, &ch, total, |i| json!(i)).await })
    };
    // Subscribe while publications are flowing.
    let mut ws = WsClient::connect(&node).await;
    ws.send_json(&json!({"id": 7, "op": "subscribe", "channel": ch}))
        .await;
    let first = ws.recv().await;
    assert_eq!(
        first["id"], 7,
        "the subscribe reply must come before any push: {first}"
    );
    let top = first["result"]["offset"].as_u64().expect("offset");
    let last = *publisher.await.unwrap().last().unwrap();
    assert_eq!(last, total as u64 + 1);
    let mut expect = top + 1;
    while expect <= last {
        let push = ws.push().await;
        assert_eq!(push["channel"], ch.as_str());
        assert_eq!(
            push["offset"], expect,
            "live delivery out of order or gapped"
        );
        expect += 1;
    }
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let node = Node::default().await;
    let a = channel("unsub-a");
    let b = channel("unsub-b");
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe(&a).await;
    ws.subscribe(&b).await;
    publish(&node, &a, json!(1)).await;
    assert_eq!(ws.push().await["channel"], a.as_str());

    let r = ws.ok(json!({"op": "unsubscribe", "channel": a})).await;
    assert_eq!(r, json!({}));
    publish(&node, &a, json!(2)).await;
    publish(&node, &b, json!(3)).await;
    let push = ws.push().await;
    assert_eq!(
        push["channel"],
        b.as_str(),
        "push after unsubscribe: {push}"
    );
    assert_eq!(push["data"], 3);

    // Subscribing again works and starts from the current top.
    let res = ws.subscribe(&a).await;
    assert_eq!(res["offset"], 2, "{res}");
}

#[tokio::test]
async fn ping_replies_with_empty_result() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    ws.send_json(&json!({"id": 4, "op": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"id": 4, "result": {}}));
    ws.send_json(&json!({"id": 5, "op": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"id": 5, "result": {}}));
}

#[tokio::test]
async fn malformed_json_gets_error_without_id_and_connection_stays() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    for bad in ["{not json", "", "[1,", "\"unterminated"] {
        ws.send_text(bad).await;
        let reply = ws.recv().await;
        assert_eq!(reply["error"]["code"], "malformed_json", "{bad:?}: {reply}");
        assert!(reply.get("id").is_none_or(Value::is_null), "{reply}");
        assert!(reply["error"]["message"].is_string(), "{reply}");
    }
    ws.ping().await;
}

#[tokio::test]
async fn unknown_op_and_bad_requests() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    let e = ws.err(json!({"op": "frobnicate"}), "unknown_op").await;
    assert!(e["message"].is_string());
    ws.err(json!({"op": "subscribe"}), "bad_request").await;
    ws.err(json!({"op": "unsubscribe"}), "bad_request").await;
    ws.err(json!({"op": "publish", "data": 1}), "bad_request")
        .await;
    ws.err(json!({"op": "publish", "channel": "a"}), "bad_request")
        .await;
    ws.err(json!({"op": "subscribe", "channel": 12}), "bad_request")
        .await;
    ws.err(
        json!({"op": "subscribe", "channel": "a", "since": {"epoch": "e"}}),
        "bad_request",
    )
    .await;
    ws.err(
        json!({"op": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": "x"}}),
        "bad_request",
    )
    .await;
    ws.ping().await;
    // None of the failed subscribes took effect.
    publish(&node, "a", json!(1)).await;
    ws.subscribe("a").await;
}

#[tokio::test]
async fn invalid_channels_are_rejected() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    let long = "c".repeat(256);
    for name in ["", "has space", "tab\t", "ctl\u{1}", &long] {
        ws.err(
            json!({"op": "subscribe", "channel": name}),
            "invalid_channel",
        )
        .await;
        ws.err(
            json!({"op": "publish", "channel": name, "data": 1}),
            "invalid_channel",
        )
        .await;
    }
    let ok = ws.subscribe(&"c".repeat(255)).await;
    assert_eq!(ok["offset"], 0);
    ws.ping().await;
}

#[tokio::test]
async fn subscription_state_errors() {
    let node = Node::with(|c| c.client.max_subscriptions = 2).await;
    let mut ws = WsClient::connect(&node).await;
    let (a, b, c) = (channel("s"), channel("s"), channel("s"));
    ws.err(json!({"op": "unsubscribe", "channel": a}), "not_subscribed")
        .await;
    ws.subscribe(&a).await;
    ws.err(
        json!({"op": "subscribe", "channel": a}),
        "already_subscribed",
    )
    .await;
    ws.subscribe(&b).await;
    ws.err(
        json!({"op": "subscribe", "channel": c}),
        "too_many_subscriptions",
    )
    .await;
    // Leaving one makes room again.
    ws.ok(json!({"op": "unsubscribe", "channel": a})).await;
    ws.subscribe(&c).await;
    ws.err(json!({"op": "unsubscribe", "channel": a}), "not_subscribed")
        .await;
    ws.ping().await;
    // The limit is per connection.
    let mut other = WsClient::connect(&node).await;
    other.subscribe(&a).await;
    other.subscribe(&b).await;
}

#[tokio::test]
async fn message_of_exactly_max_size_is_accepted() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let ch = channel("exact");
    let mut ws = WsClient::connect(&node).await;
    let text = padded_publish(&ch, 1000);
    assert_eq!(text.len(), 1000);
    ws.send_text(text).await;
    let reply = ws.recv().await;
    assert_eq!(reply["result"]["offset"], 1, "{reply}");
}

/// A publish command of exactly `len` bytes.
fn padded_publish(channel: &str, len: usize) -> String {
    let base = json!({"id": 1, "op": "publish", "channel": channel, "data": ""}).to_string();
    let pad = len - base.len();
    json!({"id": 1, "op": "publish", "channel": channel, "data": "p".repeat(pad)}).to_string()
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let mut ws = WsClient::connect(&node).await;
    ws.send_text(padded_publish("big", 1001)).await;
    let (code, seen) = ws.until_close().await;
    assert_eq!(code, Some(1009), "messages before close: {seen:?}");
    // Nothing was published.
    let (_, body) = history(&node, "channel=big").await;
    assert_eq!(body["top"], 0, "{body}");
}

#[tokio::test]
async fn oversized_fragmented_message_closes_1009() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    let text = padded_publish("frag", 2000);
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(100).collect();
    let n = chunks.len();
    let mut frames = Vec::new();
    for (i, c) in chunks.into_iter().enumerate() {
        let opcode = if i == 0 { OP_TEXT } else { OP_CONT };
        frames.extend(encode_frame(i == n - 1, 0, opcode, c));
    }
    // The server may close before reading everything; a failed write is fine.
    let _ = raw.send_raw(&frames).await;
    assert_eq!(raw.expect_close().await, Some(1009));
    let (_, body) = history(&node, "channel=frag").await;
    assert_eq!(body["top"], 0, "{body}");
}

#[tokio::test]
async fn fragmented_message_within_limit_is_reassembled() {
    let node = Node::default().await;
    let ch = channel("frag-ok");
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    let text =
        json!({"id": 9, "op": "publish", "channel": ch, "data": "x".repeat(300)}).to_string();
    let parts: Vec<&[u8]> = text.as_bytes().chunks(120).collect();
    assert_eq!(parts.len(), 3);
    raw.send_frame(false, 0, OP_TEXT, parts[0]).await;
    // A control frame may be interleaved between fragments.
    raw.send_frame(true, 0, OP_PING, b"mid").await;
    raw.send_frame(false, 0, OP_CONT, parts[1]).await;
    raw.send_frame(true, 0, OP_CONT, parts[2]).await;
    let mut saw_pong = false;
    let reply = loop {
        let frame = raw.read_frame().await.expect("connection ended");
        match frame.opcode {
            OP_PONG => {
                assert_eq!(frame.payload, b"mid");
                saw_pong = true;
            }
            OP_PING => {}
            OP_TEXT => break serde_json::from_slice::<Value>(&frame.payload).unwrap(),
            _ => panic!("unexpected frame {frame:?}"),
        }
    };
    assert!(
        saw_pong,
        "ping between fragments must be answered with a pong"
    );
    assert_eq!(reply["id"], 9, "{reply}");
    assert_eq!(reply["result"]["offset"], 1, "{reply}");
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let node = Node::default().await;
    let mut ws = WsClient::connect(&node).await;
    within("send", ws.ws.send(Message::binary(vec![1u8, 2, 3])))
        .await
        .unwrap();
    let (code, _) = ws.until_close().await;
    assert_eq!(code, Some(1003));
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    raw.send_frame(true, 0, OP_TEXT, b"{\"op\":\"ping\",\"x\":\"\xff\xfe\"}")
        .await;
    assert_eq!(raw.expect_close().await, Some(1007));
}

#[tokio::test]
async fn invalid_utf8_across_fragments_closes_1007() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    // "é" is C3 A9; split it and corrupt the continuation byte.
    raw.send_frame(false, 0, OP_TEXT, b"{\"op\":\"ping\",\"x\":\"\xc3")
        .await;
    raw.send_frame(true, 0, OP_CONT, b"\x28\"}").await;
    assert_eq!(raw.expect_close().await, Some(1007));
}

#[tokio::test]
async fn reserved_bits_close_1002() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    raw.send_frame(true, 0b100, OP_TEXT, br#"{"id":1,"op":"ping"}"#)
        .await;
    assert_eq!(raw.expect_close().await, Some(1002));
}

#[tokio::test]
async fn fragmented_control_frame_closes_1002() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    raw.send_frame(false, 0, OP_PING, b"frag").await;
    assert_eq!(raw.expect_close().await, Some(1002));
}

#[tokio::test]
async fn continuation_without_start_closes_1002() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    raw.send_frame(true, 0, OP_CONT, b"orphan").await;
    assert_eq!(raw.expect_close().await, Some(1002));
}

#[tokio::test]
async fn client_close_is_echoed() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    raw.send_frame(true, 0, OP_TEXT, br#"{"id":1,"op":"ping"}"#)
        .await;
    assert_eq!(raw.read_json().await, json!({"id": 1, "result": {}}));
    raw.send_frame(true, 0, OP_CLOSE, &1000u16.to_be_bytes())
        .await;
    assert_eq!(raw.expect_close().await, Some(1000));
    // Then the server ends the TCP connection.
    assert!(raw.read_frame().await.is_none());
}

#[tokio::test]
async fn echo_endpoint_echoes_text_and_binary() {
    let node = Node::with(|c| c.websocket.echo = true).await;
    let mut ws = WsClient::connect_path(&node, "/ws/echo").await;
    within("send", ws.ws.send(Message::text("not even json")))
        .await
        .unwrap();
    within(
        "send",
        ws.ws.send(Message::binary(vec![0u8, 159, 146, 150])),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        use futures_util::StreamExt;
        match within("echo", ws.ws.next()).await {
            Some(Ok(Message::Text(t))) => got.push(Message::Text(t)),
            Some(Ok(Message::Binary(b))) => got.push(Message::Binary(b)),
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
            other => panic!("echo connection: {other:?}"),
        }
    }
    assert_eq!(got[0], Message::text("not even json"));
    assert_eq!(got[1], Message::binary(vec![0u8, 159, 146, 150]));
    // The main endpoint still works alongside.
    let mut main = WsClient::connect(&node).await;
    main.ping().await;
}

#[tokio::test]
async fn echo_endpoint_enforces_the_size_limit() {
    use futures_util::StreamExt;
    let node = Node::with(|c| {
        c.websocket.echo = true;
        c.websocket.max_message_size = 1000;
    })
    .await;
    let mut ws = WsClient::connect_path(&node, "/ws/echo").await;
    let fits = "a".repeat(1000);
    within("send", ws.ws.send(Message::text(fits.clone())))
        .await
        .unwrap();
    match within("echo", ws.ws.next()).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), fits),
        other => panic!("expected the 1000-byte message echoed, got {other:?}"),
    }
    within("send", ws.ws.send(Message::text("b".repeat(1001))))
        .await
        .unwrap();
    let code = loop {
        match within("close", ws.ws.next()).await {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected close 1009, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1009));
}

/// Live publications to an idle subscriber are written by the fan-out itself (express
/// delivery). A subscriber whose task keeps taking its socket back for commands in between —
/// subscribes, pings, unsubscribes, a publication of its own — and one that only listens both get
/// every publication once, in order. The same with the fan-out's sockets written one by one
/// (`server.batched_sends = false`) instead of in io_uring batches.
#[tokio::test]
async fn express_delivery_keeps_each_stream_exact_while_commands_interleave() {
    express_keeps_each_stream_exact(Node::default().await).await;
    let one_by_one = Node::with(|c| c.server.batched_sends = false).await;
    express_keeps_each_stream_exact(one_by_one).await;
}

async fn express_keeps_each_stream_exact(node: Node) {
    const N: u64 = 400;
    let ch = channel("express");
    let mut quiet = WsClient::connect(&node).await;
    let mut busy = WsClient::connect(&node).await;
    quiet.subscribe(&ch).await;
    busy.subscribe(&ch).await;
    let before = metric_of(&node, "gateway_express_handovers_total").await;

    let publisher = {
        let (addr, ch) = (node.addr(), ch.clone());
        tokio::spawn(async move {
            for i in 1..=N {
                publish(&addr, &ch, json!(i)).await;
            }
        })
    };
    for round in 0..20 {
        let other = format!("{ch}-other-{round}");
        busy.subscribe(&other).await;
        busy.ping().await;
        busy.publish(&other, json!(round)).await;
        busy.ok(json!({"op": "unsubscribe", "channel": other}))
            .await;
    }
    publisher.await.unwrap();

    for (name, client) in [("quiet", &mut quiet), ("busy", &mut busy)] {
        let mut offsets = Vec::new();
        while offsets.len() < N as usize {
            let push = client.push().await;
            if push["channel"] == ch.as_str() {
                offsets.push(push["offset"].as_u64().unwrap());
                assert_eq!(push["data"], json!(offsets.len()), "{name}: {push}");
            }
        }
        let expected: Vec<u64> = (1..=N).collect();
        assert_eq!(
            offsets, expected,
            "{name}: every publication once, in order"
        );
    }
    // The quiet one's last delivery at the latest left its queue empty: its socket was handed
    // over (right after that write, which the client may read first).
    wait_metric(&node, "gateway_express_handovers_total", &[], |v| {
        v > before
    })
    .await;
}
