//! The SSE path's own HTTP/1.1 (`http/sse_h1.rs`, #14.4), on raw sockets: the response's framing
//! (chunked on HTTP/1.1, to the close on HTTP/1.0), and what it refuses or cuts off — a body on
//! the GET, a head over the size limit, a head that never ends. The streams' behaviour itself
//! (cursors, resume, drain) is every other SSE test's: they all run on this path.

use std::time::Duration;

use crate::support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `head` and reads until the server closes.
async fn exchange(node: &Node, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream.write_all(head).await.unwrap();
    let mut answer = Vec::new();
    within("server to close", stream.read_to_end(&mut answer))
        .await
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads from `stream` until `needle` has arrived; returns everything read.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(needle) {
        let n = within("more of the stream", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// HTTP/1.1: a chunked event stream with `Connection: close`, its events inside chunks; the
/// server ends it at drain with the last chunk and closes.
#[tokio::test]
async fn an_http11_stream_is_chunked_and_ends_with_the_last_chunk() {
    let mut node = Node::default().await;
    let ch = channel("h1");
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let head =
        format!("GET /sse?channel={ch} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let start = read_until(&mut stream, "event: connected").await;
    assert!(start.starts_with("HTTP/1.1 200 OK\r\n"), "{start}");
    for header in [
        "transfer-encoding: chunked",
        "connection: close",
        "content-type: text/event-stream",
        "date: ",
    ] {
        assert!(
            start.to_ascii_lowercase().contains(header),
            "{header}: {start}"
        );
    }
    publish(&node, &ch, json!("hello")).await;
    let mut raw = start;
    raw.push_str(&read_until(&mut stream, "\"hello\"").await);
    node.take().shutdown().await;
    let mut rest = Vec::new();
    within("server to close", stream.read_to_end(&mut rest))
        .await
        .unwrap();
    raw.push_str(&String::from_utf8_lossy(&rest));
    assert!(raw.ends_with("\r\n0\r\n\r\n"), "{raw:?}");

    // The body, unchunked, is the event stream: the publication's event whole, then drain's
    // `retry:`.
    let body = unchunk(&raw[raw.find("\r\n\r\n").unwrap() + 4..]);
    let event = body.find("\ndata: {").expect("the publication's event");
    assert!(body[event..].contains("\"hello\""), "{body}");
    assert!(
        body.trim_end().ends_with(|c: char| c.is_ascii_digit()),
        "{body}"
    );
}

/// Decodes a chunked body (`hex length CRLF bytes CRLF` … `0 CRLF CRLF`), asserting its framing.
fn unchunk(mut chunked: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, rest) = chunked.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            assert_eq!(rest, "\r\n", "nothing after the last chunk");
            return body;
        }
        body.push_str(&rest[..size]);
        assert_eq!(&rest[size..size + 2], "\r\n", "a chunk ends with CRLF");
        chunked = &rest[size + 2..];
    }
}

/// HTTP/1.0 has no chunked encoding: the stream is its bytes as they are, ended by the close.
#[tokio::test]
async fn an_http10_stream_is_plain_until_the_close() {
    let node = Node::default().await;
    let ch = channel("h10");
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let head = format!("GET /sse?channel={ch} HTTP/1.0\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let start = read_until(&mut stream, "event: connected").await;
    assert!(
        !start.to_ascii_lowercase().contains("transfer-encoding"),
        "{start}"
    );
    let body = &start[start.find("\r\n\r\n").unwrap() + 4..];
    assert!(body.starts_with("retry: "), "no chunk framing: {body:?}");
}

/// Refused before any stream: a body on the GET (400), a head over 96 KiB (431); both as the
/// JSON error every route answers with, then the connection is closed.
#[tokio::test]
async fn a_body_or_an_oversized_head_is_refused() {
    let node = Node::default().await;
    let with_body = exchange(
        &node,
        b"GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(with_body.starts_with("HTTP/1.1 400 "), "{with_body}");
    assert!(
        with_body.contains("\"code\":\"bad_request\""),
        "{with_body}"
    );

    let huge = format!(
        "GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {}\r\n\r\n",
        "A".repeat(100 * 1024)
    );
    let answer = exchange(&node, huge.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "{}",
        &answer[..answer.len().min(200)]
    );
}

/// A head that never ends is cut off at `limits.handshake_timeout` and counted, as on every
/// other route.
#[tokio::test]
async fn a_head_that_never_ends_is_cut_off() {
    let node = Node::with(|c| c.limits.handshake_timeout = Duration::from_millis(300)).await;
    let answer = exchange(&node, b"GET /sse?channel=a HTTP/1.1\r\nHost: x\r\n").await;
    assert!(answer.is_empty(), "{answer}");
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "handshake_timeout")],
        |v| v >= 1.0,
    )
    .await;
}
