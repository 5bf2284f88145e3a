//! A client that stops reading is cut off once its outbound queue passes
//! `client.queue_max_bytes`, while other subscribers of the same channel receive everything.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Message;

const PAYLOAD: usize = 16 * 1024;
const WINDOW: usize = 8;
const MAX_WINDOWS: usize = 320; // 40 MB at most, far beyond what socket buffers absorb

fn config(c: &mut gateway::Config) {
    c.client.queue_max_bytes = 256 * 1024;
    c.websocket.max_message_size = 1024 * 1024;
}

/// A subscriber that reads every push and reports the offsets it saw, asserting order.
fn spawn_fast_reader(mut ws: WsClient, channel: String) -> mpsc::UnboundedReceiver<u64> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut expect = 1;
        loop {
            let push = ws.push().await;
            assert_eq!(push["channel"], channel.as_str());
            assert_eq!(
                push["offset"], expect,
                "fast subscriber lost or reordered a push"
            );
            if tx.send(expect).is_err() {
                return;
            }
            expect += 1;
        }
    });
    rx
}

/// Publishes in small windows, each only after the fast subscriber received the previous one (so
/// it never has more than `WINDOW` publications pending, far below the queue limit), until the
/// slow-consumer counter moves. Returns the last offset published.
async fn publish_until_slow_consumer_cut(
    node: &Node,
    channel: &str,
    fast: &mut mpsc::UnboundedReceiver<u64>,
) -> u64 {
    let pad = "s".repeat(PAYLOAD);
    let mut publisher = WsClient::connect(node).await;
    let mut last = 0;
    for window in 0..MAX_WINDOWS {
        for i in 0..WINDOW {
            publisher
                .send_json(&json!({"id": i, "op": "publish", "channel": channel,
                                   "data": {"w": window, "i": i, "pad": pad}}))
                .await;
        }
        for _ in 0..WINDOW {
            let reply = publisher.recv().await;
            last = last.max(
                reply["result"]["offset"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("publish failed: {reply}")),
            );
        }
        await_fast_reader(fast, last).await;
        let text = metrics(node).await;
        if metric(&text, "gateway_slow_consumer_disconnects_total", &[]).unwrap_or(0.0) >= 1.0 {
            return last;
        }
    }
    panic!("no slow consumer disconnect after {last} publications of {PAYLOAD} bytes");
}

async fn await_fast_reader(rx: &mut mpsc::UnboundedReceiver<u64>, last: u64) {
    within("fast subscriber to receive everything", async {
        while let Some(off) = rx.recv().await {
            if off >= last {
                return;
            }
        }
        panic!("fast subscriber stopped before offset {last}");
    })
    .await;
}

#[tokio::test]
async fn stalled_websocket_client_is_cut_off_and_others_get_everything() {
    let node = Node::with(config).await;
    let ch = channel("slow");

    let mut fast = WsClient::connect(&node).await;
    fast.subscribe(&ch).await;
    let mut fast_rx = spawn_fast_reader(fast, ch.clone());

    let stream = small_buffer_stream(node.addr).await;
    let (mut slow, _) = within(
        "slow handshake",
        tokio_tungstenite::client_async(node.ws_url("/ws"), stream),
    )
    .await
    .expect("slow handshake");
    slow.send(Message::text(
        json!({"id": 1, "op": "subscribe", "channel": ch}).to_string(),
    ))
    .await
    .unwrap();
    let reply = within("subscribe reply", slow.next())
        .await
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    assert_eq!(reply["id"], 1, "{reply}");
    // From here on `slow` is not read until the server has given up on it.

    let last = publish_until_slow_consumer_cut(&node, &ch, &mut fast_rx).await;

    // The stalled client now drains what reached it: a gap-free prefix, then close 4000.
    let mut expect = 1;
    let code = within("slow client close", async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert_eq!(v["offset"], expect, "slow consumer got a gapped prefix");
                    expect += 1;
                }
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("slow client connection ended without close frame: {e}"),
                None => return None,
            }
        }
    })
    .await;
    assert_eq!(code, Some(4000), "slow consumer close code");
    assert!(
        expect - 1 < last,
        "the slow client received everything ({last}), it was not slow"
    );

    // Only the fast subscriber is left connected; publishing is unaffected.
    wait_metric(&node, "gateway_connections", &[("transport", "ws")], |v| {
        v == 1.0
    })
    .await;
    let ack = publish(&node, &ch, json!("after")).await;
    assert_eq!(ack["offset"], last + 1);
    await_fast_reader(&mut fast_rx, last + 1).await;
}

#[tokio::test]
async fn stalled_sse_client_is_cut_off_and_others_get_everything() {
    let node = Node::with(config).await;
    let ch = channel("slow-sse");

    let mut fast = WsClient::connect(&node).await;
    fast.subscribe(&ch).await;
    let mut fast_rx = spawn_fast_reader(fast, ch.clone());

    // A raw HTTP/1.1 SSE request that stops reading after the `connected` event.
    let mut slow = small_buffer_stream(node.addr).await;
    let req = format!(
        "GET /sse?channel={} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        enc(&ch),
        node.addr
    );
    slow.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    within("connected event", async {
        while !String::from_utf8_lossy(&seen).contains("event: connected") {
            let mut buf = [0u8; 1024];
            let n = slow.read(&mut buf).await.unwrap();
            assert!(n > 0, "SSE connection closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;

    let last = publish_until_slow_consumer_cut(&node, &ch, &mut fast_rx).await;

    // Draining the stalled stream ends (the server ended the response) before every publication.
    let mut rest = Vec::new();
    within("slow SSE stream to end", async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    rest.extend_from_slice(&buf[..n]);
                    // The response may end with the last chunk on a kept-alive connection.
                    if rest.ends_with(b"\r\n0\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&rest);
    let delivered = text.matches("\"offset\":").count() as u64;
    assert!(
        delivered < last,
        "the stalled SSE client received all {last} publications"
    );
    wait_metric(&node, "gateway_connections", &[("transport", "sse")], |v| {
        v == 0.0
    })
    .await;
}
