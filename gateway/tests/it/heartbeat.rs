//! Server pings: idle clients are pinged every `websocket.ping_interval`; a client that stays
//! silent for `pong_timeout` after a ping is closed, one that answers stays connected.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

fn fast_pings(c: &mut gateway::Config) {
    c.websocket.ping_interval = Duration::from_millis(100);
    c.websocket.pong_timeout = Duration::from_millis(500);
}

/// Fast pings but a pong timeout no scheduling delay on a busy machine can reach, for the tests
/// of clients that answer: with 500 ms, a test process descheduled that long would be closed
/// although it answers every ping.
fn fast_pings_patient_pongs(c: &mut gateway::Config) {
    fast_pings(c);
    c.websocket.pong_timeout = Duration::from_secs(20);
}

#[tokio::test]
async fn silent_client_is_pinged_then_closed() {
    let node = Node::with(fast_pings).await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    // Read (TCP only, nothing is ever sent back) until the server gives up.
    let mut pings = 0;
    let code = loop {
        match raw.read_frame().await {
            Some(f) if f.opcode == OP_PING => pings += 1,
            Some(f) if f.opcode == OP_CLOSE => break f.close_code(),
            Some(f) => panic!("unexpected frame to an idle client: {f:?}"),
            None => break None,
        }
    };
    assert!(
        pings >= 1,
        "the server closed an idle client without pinging it"
    );
    assert!(
        code.is_none() || code == Some(4001),
        "dead client close code: {code:?}"
    );
    wait_metric(&node, "gateway_connections", &[("transport", "ws")], |v| {
        v == 0.0
    })
    .await;
}

#[tokio::test]
async fn client_that_never_reads_is_closed() {
    let node = Node::with(fast_pings).await;
    let _raw = RawWs::connect(node.addr, "/ws").await;
    // The client neither reads nor writes; the server must still drop it.
    wait_metric(&node, "gateway_connections", &[("transport", "ws")], |v| {
        v == 0.0
    })
    .await;
}

#[tokio::test]
async fn answering_client_stays_connected_across_many_pings() {
    let node = Node::with(fast_pings_patient_pongs).await;
    let mut ws = WsClient::connect(&node).await;
    // tokio-tungstenite answers every ping with a pong while it is being read.
    let mut pings = 0;
    while pings < 4 {
        match ws.event().await {
            WsEvent::Ping => pings += 1,
            other => panic!("connection should stay open, got {other:?}"),
        }
    }
    ws.ping().await;
    assert_eq!(
        metric(
            &metrics(&node).await,
            "gateway_connections",
            &[("transport", "ws")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn raw_client_answering_pongs_stays_connected() {
    let node = Node::with(fast_pings_patient_pongs).await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    let mut pings = 0;
    while pings < 3 {
        let f = raw
            .read_frame()
            .await
            .expect("connection closed while answering pings");
        match f.opcode {
            OP_PING => {
                pings += 1;
                raw.send_frame(true, 0, OP_PONG, &f.payload).await;
            }
            _ => panic!("unexpected frame {f:?}"),
        }
    }
    raw.send_frame(
        true,
        0,
        OP_TEXT,
        json!({"id": 1, "op": "ping"}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(raw.read_json().await, json!({"id": 1, "result": {}}));
}

#[tokio::test]
async fn sse_heartbeat_comments() {
    let node = Node::with(|c| c.sse.heartbeat_interval = Duration::from_millis(100)).await;
    let ch = channel("hb");
    let mut sse = Sse::open(&node, &[&ch]).await;
    sse.connected().await;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let block = sse.next_block().await.expect("SSE stream ended");
        assert!(!block.is_event(), "no events expected: {block:?}");
        heartbeats += block.comments.iter().filter(|c| *c == "heartbeat").count();
    }
    // The stream still delivers after heartbeats.
    publish(&node, &ch, json!("x")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["data"], "x");
}
