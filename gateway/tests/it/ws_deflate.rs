//! permessage-deflate (RFC 7692) on a real gateway process: what is negotiated, that
//! publications arrive compressed (RSV1) above `websocket.compression_min_size` and plain below
//! it, as the same bytes for every subscriber, that compressed commands are understood, and that
//! a real compressing client (Node's built-in WebSocket, which offers permessage-deflate)
//! receives publications through `/ws`.

use std::process::Stdio;

use crate::support::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const EXTENSIONS: &str = "Sec-WebSocket-Extensions";

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    compress
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut decompress = Decompress::new(false);
    let input = [payload, &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(1 << 20);
    decompress
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(decompress.total_in() as usize, input.len());
    out
}

/// The next text frame, as sent (control frames skipped).
async fn next_text(ws: &mut RawWs) -> Frame {
    loop {
        let frame = ws.read_frame().await.expect("connection ended");
        match frame.opcode {
            OP_TEXT => return frame,
            OP_PING | OP_PONG => continue,
            other => panic!("unexpected opcode {other}: {frame:?}"),
        }
    }
}

fn json_of(frame: &Frame) -> Value {
    let text = if frame.rsv & 0b100 != 0 {
        inflate(&frame.payload)
    } else {
        frame.payload.clone()
    };
    serde_json::from_slice(&text).expect("JSON")
}

/// Connects offering `offer`, sends a compressed `subscribe` and waits for its reply.
async fn compressed_subscriber(node: &GatewayProcess, offer: &str, channel: &str) -> RawWs {
    let mut ws = RawWs::connect_with(node.addr, "/ws", &[(EXTENSIONS, offer)]).await;
    assert!(
        ws.response_header(EXTENSIONS).is_some(),
        "{}",
        ws.response_head
    );
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    ws.send_frame(true, 0b100, OP_TEXT, &deflate(subscribe.as_bytes()))
        .await;
    let reply = next_text(&mut ws).await;
    assert_eq!(json_of(&reply)["id"], 1, "{reply:?}");
    ws
}

#[tokio::test]
async fn negotiation_answers_the_first_acceptable_offer() {
    let node = GatewayProcess::start("ws-deflate-negotiation", &[], &[]).await;
    let answer = |offer: &'static str| {
        let addr = node.addr;
        async move {
            RawWs::connect_with(addr, "/ws", &[(EXTENSIONS, offer)])
                .await
                .response_header(EXTENSIONS)
        }
    };
    let base = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    assert_eq!(
        answer("permessage-deflate; client_max_window_bits").await,
        Some(base.to_string())
    );
    assert_eq!(
        answer("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10").await,
        Some(format!("{base}; server_max_window_bits=10"))
    );
    assert_eq!(answer("permessage-deflate; bogus").await, None);
    assert_eq!(answer("x-webkit-deflate-frame").await, None);

    let off = GatewayProcess::start(
        "ws-deflate-off",
        &[],
        &[("GATEWAY__WEBSOCKET__COMPRESSION", "off")],
    )
    .await;
    let ws = RawWs::connect_with(off.addr, "/ws", &[(EXTENSIONS, "permessage-deflate")]).await;
    assert_eq!(ws.response_header(EXTENSIONS), None);
}

#[tokio::test]
async fn publications_are_compressed_once_and_identical_for_every_subscriber() {
    let node = GatewayProcess::start("ws-deflate-fanout", &[], &[]).await;
    let channel = "deflate";
    let mut a = compressed_subscriber(&node, "permessage-deflate", channel).await;
    let mut b = compressed_subscriber(
        &node,
        "permessage-deflate; client_max_window_bits; client_no_context_takeover",
        channel,
    )
    .await;
    let mut narrow = compressed_subscriber(
        &node,
        "permessage-deflate; server_max_window_bits=9",
        channel,
    )
    .await;
    let mut plain = RawWs::connect(node.addr, "/ws").await;
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    plain
        .send_frame(true, 0, OP_TEXT, subscribe.as_bytes())
        .await;
    assert_eq!(plain.read_json().await["id"], 1);

    let rows: Vec<Value> = (0..40)
        .map(|i| json!({"symbol": "AAPL", "bid": 189.5 + f64::from(i), "ask": 189.75, "ts": 1_700_000_000 + i}))
        .collect();
    let big = json!({"rows": rows});
    publish(&node, channel, big.clone()).await;
    let small = json!({"symbol": "AAPL", "bid": 1});
    publish(&node, channel, small.clone()).await;

    let uncompressed = next_text(&mut plain).await;
    assert_eq!(uncompressed.rsv, 0);
    let (fa, fb, fn_) = (
        next_text(&mut a).await,
        next_text(&mut b).await,
        next_text(&mut narrow).await,
    );
    for frame in [&fa, &fb, &fn_] {
        assert_eq!(frame.rsv, 0b100, "a large publication is compressed");
        assert_eq!(inflate(&frame.payload), uncompressed.payload);
        assert!(frame.payload.len() < uncompressed.payload.len() / 2);
    }
    assert_eq!(fa.payload, fb.payload, "the same compressed bytes");
    assert_eq!(json_of(&fa)["data"], big);

    // Below compression_min_size (256 by default): sent as it is.
    for ws in [&mut a, &mut b, &mut narrow] {
        let frame = next_text(ws).await;
        assert_eq!(frame.rsv, 0);
        assert_eq!(json_of(&frame)["data"], small);
    }
}

#[tokio::test]
async fn compressed_commands_inflate_and_fragments_reassemble() {
    let node = GatewayProcess::start(
        "ws-deflate-commands",
        &[],
        &[("GATEWAY__WEBSOCKET__COMPRESSION_MIN_SIZE", "0")],
    )
    .await;
    let mut ws = RawWs::connect_with(node.addr, "/ws", &[(EXTENSIONS, "permessage-deflate")]).await;
    // A compressed message in three frames, RSV1 on the first only, then a plain one.
    let ping = deflate(br#"{"id":7,"op":"ping"}"#);
    let (one, rest) = ping.split_at(3);
    let (two, three) = rest.split_at(rest.len() / 2);
    ws.send_raw(
        &[
            encode_frame(false, 0b100, OP_TEXT, one),
            encode_frame(false, 0, OP_CONT, two),
            encode_frame(true, 0, OP_CONT, three),
            encode_frame(true, 0, OP_TEXT, br#"{"id":8,"op":"ping"}"#),
        ]
        .concat(),
    )
    .await
    .unwrap();
    for id in [7, 8] {
        let reply = next_text(&mut ws).await;
        // compression_min_size = 0: even replies go out compressed.
        assert_eq!(reply.rsv, 0b100);
        assert_eq!(json_of(&reply), json!({"id": id, "result": {}}));
    }
}

/// Node 20's built-in WebSocket (undici) offers `permessage-deflate; client_max_window_bits` and
/// inflates what it receives: it subscribes and prints every message it gets as a JSON line.
const NODE_CLIENT: &str = r#"
const ws = new WebSocket(process.argv[1]);
ws.onopen = () => {
  console.log(JSON.stringify({extensions: ws.extensions}));
  ws.send(JSON.stringify({id: 1, op: "subscribe", channel: process.argv[2]}));
};
ws.onmessage = (e) => console.log(e.data);
ws.onerror = (e) => { console.error("error", e.message); process.exit(1); };
ws.onclose = (e) => { console.error("closed", e.code); process.exit(2); };
"#;

#[tokio::test]
async fn a_real_compressing_client_receives_publications() {
    let node = GatewayProcess::start("ws-deflate-node", &[], &[]).await;
    let channel = "deflate-node";
    let mut child = tokio::process::Command::new("node")
        .args([
            "--experimental-websocket",
            "--no-warnings",
            "-e",
            NODE_CLIENT,
        ])
        .arg(format!("ws://{}/ws", node.addr))
        .arg(channel)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let open = next_line(&mut lines).await;
    let extensions = open["extensions"].as_str().unwrap();
    assert!(
        extensions.starts_with("permessage-deflate; server_no_context_takeover"),
        "{open}"
    );
    assert_eq!(next_line(&mut lines).await["id"], 1);
    let big = json!({"text": "tick ".repeat(400), "n": [1, 2, 3]});
    publish(&node, channel, big.clone()).await;
    publish(&node, channel, json!("small")).await;
    assert_eq!(next_line(&mut lines).await["data"], big);
    assert_eq!(next_line(&mut lines).await["data"], "small");
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = within("node client line", lines.next_line())
        .await
        .unwrap()
        .expect("node client output");
    serde_json::from_str(&line).unwrap()
}
