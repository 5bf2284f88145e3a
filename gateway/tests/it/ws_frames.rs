//! RFC 6455 framing rules Autobahn cannot check (its client always masks): raw frames over TCP
//! against a real gateway process, each breaking one rule. Every one gets the close code the RFC
//! names, and a well-behaved subscriber on the same node keeps getting publications meanwhile.

use crate::support::*;
use flate2::{Compress, Compression, FlushCompress};
use serde_json::json;

const DEFLATE_OFFER: (&str, &str) = ("Sec-WebSocket-Extensions", "permessage-deflate");

/// A raw DEFLATE payload as permessage-deflate sends it (sync flush, tail removed).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() / 10 + 1024);
    let mut input = data;
    loop {
        let before = compress.total_in();
        compress
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .unwrap();
        input = &input[(compress.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}

struct Case {
    name: &'static str,
    /// Negotiate permessage-deflate first.
    deflate: bool,
    bytes: Vec<u8>,
    code: u16,
}

fn cases() -> Vec<Case> {
    let ping = br#"{"id":1,"op":"ping"}"#;
    let case = |name, bytes, code| Case {
        name,
        deflate: false,
        bytes,
        code,
    };
    let with_deflate = |name, bytes, code| Case {
        name,
        deflate: true,
        bytes,
        code,
    };
    let mut cases = vec![
        case(
            "unmasked frame",
            encode_frame_with(true, 0, OP_TEXT, ping, false),
            1002,
        ),
        case(
            "RSV1 without an extension",
            encode_frame(true, 0b100, OP_TEXT, ping),
            1002,
        ),
        case("RSV2", encode_frame(true, 0b010, OP_TEXT, ping), 1002),
        case("RSV3", encode_frame(true, 0b001, OP_TEXT, ping), 1002),
        with_deflate(
            "RSV1 on a control frame with deflate",
            encode_frame(true, 0b100, OP_PING, b"x"),
            1002,
        ),
        with_deflate(
            "RSV1 on a continuation with deflate",
            [
                encode_frame(false, 0b100, OP_TEXT, &deflate(b"{\"id\":")),
                encode_frame(true, 0b100, OP_CONT, b""),
            ]
            .concat(),
            1002,
        ),
        case("reserved opcode 3", encode_frame(true, 0, 0x3, b""), 1002),
        case("reserved opcode 7", encode_frame(true, 0, 0x7, b""), 1002),
        case("reserved opcode 0xB", encode_frame(true, 0, 0xB, b""), 1002),
        case("reserved opcode 0xF", encode_frame(true, 0, 0xF, b""), 1002),
        case(
            "ping longer than 125 bytes",
            encode_frame(true, 0, OP_PING, &[b'p'; 126]),
            1002,
        ),
        case(
            "close longer than 125 bytes",
            encode_frame(true, 0, OP_CLOSE, &close(1000, &[b'r'; 124])),
            1002,
        ),
        case(
            "fragmented ping",
            encode_frame(false, 0, OP_PING, b"frag"),
            1002,
        ),
        case(
            "continuation without a start",
            encode_frame(true, 0, OP_CONT, b"orphan"),
            1002,
        ),
        case(
            "new data frame inside a fragmented message",
            [
                encode_frame(false, 0, OP_TEXT, b"{\"id\":"),
                encode_frame(true, 0, OP_TEXT, ping),
            ]
            .concat(),
            1002,
        ),
        case(
            "close payload of 1 byte",
            encode_frame(true, 0, OP_CLOSE, &[0x03]),
            1002,
        ),
        case(
            "invalid UTF-8 in a close reason",
            encode_frame(true, 0, OP_CLOSE, &close(1000, b"bye \xff")),
            1007,
        ),
        case(
            "invalid UTF-8 in a text message",
            encode_frame(true, 0, OP_TEXT, b"{\"id\":1,\"op\":\"\xc3\x28\"}"),
            1007,
        ),
        case(
            "a frame over websocket.max_message_size",
            // Only the header: the server refuses before reading the payload.
            [&[0x82u8, 0xFF][..], &(1u64 << 32).to_be_bytes(), &[0; 4]].concat(),
            1009,
        ),
        with_deflate(
            "a compressed message inflating past websocket.max_message_size",
            encode_frame(true, 0b100, OP_TEXT, &deflate(&vec![b' '; 4 << 20])),
            1009,
        ),
        with_deflate(
            "compressed data that does not inflate",
            encode_frame(true, 0b100, OP_TEXT, &[0xff; 16]),
            1007,
        ),
    ];
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000] {
        cases.push(Case {
            name: "invalid close code",
            deflate: false,
            bytes: encode_frame(true, 0, OP_CLOSE, &close(code, b"")),
            code: 1002,
        });
    }
    cases
}

#[tokio::test]
async fn each_violation_gets_its_close_code_and_the_node_keeps_serving_others() {
    let node = GatewayProcess::start("ws-frames", &[], &[]).await;
    let channel = "frames";
    let mut watcher = RawWs::connect(node.addr, "/ws").await;
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
    watcher
        .send_frame(true, 0, OP_TEXT, subscribe.as_bytes())
        .await;
    assert_eq!(watcher.read_json().await["id"], 1);

    for (i, case) in cases().into_iter().enumerate() {
        let headers: &[(&str, &str)] = if case.deflate { &[DEFLATE_OFFER] } else { &[] };
        let mut bad = RawWs::connect_with(node.addr, "/ws", headers).await;
        assert_eq!(
            bad.response_header("sec-websocket-extensions").is_some(),
            case.deflate,
            "{}",
            case.name
        );
        // The server may close before the whole write is in.
        let _ = bad.send_raw(&case.bytes).await;
        assert_eq!(
            bad.expect_close().await,
            Some(case.code),
            "{} ({:02x?})",
            case.name,
            &case.bytes[..case.bytes.len().min(16)]
        );

        publish(&node, channel, json!({"after": i})).await;
        let push = watcher.read_json().await;
        assert_eq!(push["data"], json!({"after": i}), "after {}", case.name);
    }
}

#[tokio::test]
async fn valid_close_codes_are_echoed() {
    let node = GatewayProcess::start("ws-close-codes", &[], &[]).await;
    for code in [
        1000u16, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
    ] {
        let mut ws = RawWs::connect(node.addr, "/ws").await;
        ws.send_frame(true, 0, OP_CLOSE, &close(code, "fine €".as_bytes()))
            .await;
        assert_eq!(ws.expect_close().await, Some(code));
    }
    // An empty close is answered with an empty close.
    let mut ws = RawWs::connect(node.addr, "/ws").await;
    ws.send_frame(true, 0, OP_CLOSE, b"").await;
    assert_eq!(ws.expect_close().await, Some(1005));
}

/// Messages `i` of a burst: binary, of varied lengths (every length form, across the reader's
/// and the writer's buffer sizes).
fn burst_message(i: usize) -> Vec<u8> {
    (0..(i * 997) % 3000).map(|b| (b + i) as u8).collect()
}

/// The echo endpoint answers a burst that arrives in one write frame by frame, in order: the
/// echoes are gathered into one write, a Ping among them is answered in its place, and the
/// Close after them comes last.
#[tokio::test]
async fn a_burst_is_echoed_in_order_with_its_ping_and_close() {
    let node = Node::with(|c| c.websocket.echo = true).await;
    let mut ws = RawWs::connect(node.addr, "/ws/echo").await;
    let mut burst = Vec::new();
    for i in 0..40 {
        burst.extend(encode_frame(true, 0, OP_BINARY, &burst_message(i)));
        if i == 20 {
            burst.extend(encode_frame(true, 0, OP_PING, b"mid"));
        }
    }
    burst.extend(encode_frame(false, 0, OP_TEXT, "fragmented ".as_bytes()));
    burst.extend(encode_frame(true, 0, OP_CONT, "€".as_bytes()));
    burst.extend(encode_frame(true, 0, OP_CLOSE, &close(1000, b"done")));
    ws.send_raw(&burst).await.unwrap();

    for i in 0..40 {
        let frame = ws.read_frame().await.expect("an echo");
        assert_eq!((frame.opcode, frame.payload), (OP_BINARY, burst_message(i)));
        if i == 20 {
            let pong = ws.read_frame().await.expect("the pong");
            assert_eq!((pong.opcode, &pong.payload[..]), (OP_PONG, &b"mid"[..]));
        }
    }
    let text = ws.read_frame().await.expect("the text echo");
    assert_eq!(
        (text.opcode, text.fin, &text.payload[..]),
        (OP_TEXT, true, "fragmented €".as_bytes())
    );
    assert_eq!(ws.expect_close().await, Some(1000));
}

/// A peer that writes a burst and then shuts its side down without a Close still gets every
/// echo of that burst.
#[tokio::test]
async fn a_burst_before_the_peer_half_closes_is_echoed_whole() {
    let node = Node::with(|c| c.websocket.echo = true).await;
    let mut ws = RawWs::connect(node.addr, "/ws/echo").await;
    let burst: Vec<u8> = (0..40)
        .flat_map(|i| encode_frame(true, 0, OP_BINARY, &burst_message(i)))
        .collect();
    ws.send_raw(&burst).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut ws.stream)
        .await
        .unwrap();
    for i in 0..40 {
        let frame = ws.read_frame().await.expect("an echo");
        assert_eq!((frame.opcode, frame.payload), (OP_BINARY, burst_message(i)));
    }
    assert!(ws.read_frame().await.is_none(), "then the connection ends");
}
