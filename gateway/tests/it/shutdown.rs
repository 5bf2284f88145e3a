//! Graceful shutdown, in-process and of the binary on SIGTERM/SIGINT: readiness drops, WebSockets
//! close with 1001, SSE streams end, new connections are refused and the process exits 0.

use std::net::SocketAddr;

use crate::support::*;
use serde_json::json;
use tokio::net::TcpStream;

/// After shutdown has begun, /readyz must not say ready: 503 not_ready, or no answer at all
/// because the listener is already closed.
async fn assert_not_ready(addr: SocketAddr) {
    let resp = http().get(format!("http://{addr}/readyz")).send().await;
    if let Ok(resp) = resp {
        let got = json_response(resp).await;
        assert_error(&got, 503, "not_ready");
    }
}

async fn assert_refused(addr: SocketAddr) {
    let conn = within("connect after shutdown", TcpStream::connect(addr)).await;
    assert!(
        conn.is_err(),
        "new connections must be refused after shutdown"
    );
}

/// Reads an SSE stream until it ends; panics (via timeout) if it never does.
async fn assert_sse_ends(sse: &mut Sse) {
    while let Some(block) = sse.next_block().await {
        if block.is_event() {
            assert_ne!(block.kind(), "message", "unexpected publication: {block:?}");
        }
    }
}

#[tokio::test]
async fn in_process_shutdown_is_graceful() {
    let mut node = Node::default().await;
    let ch = channel("bye");
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe(&ch).await;
    let mut sse = Sse::open(&node, &[&ch]).await;
    sse.connected().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    assert_eq!(get_text(&node, "/readyz").await.0, 200);

    let running = node.take();
    let shutdown = tokio::spawn(running.shutdown());

    let (code, _) = ws.until_close().await;
    assert_eq!(code, Some(1001), "WebSocket close code on shutdown");
    assert_eq!(raw.expect_close().await, Some(1001));
    assert_not_ready(node.addr).await;
    assert_sse_ends(&mut sse).await;
    within("shutdown to finish", shutdown).await.unwrap();
    assert_refused(node.addr).await;
}

#[tokio::test]
async fn in_process_shutdown_with_idle_node() {
    let node = Node::default().await;
    let addr = node.addr;
    publish(&node, "x", json!(1)).await;
    node.shutdown().await;
    assert_refused(addr).await;
}

/// Spawns the binary on an ephemeral port with fast shutdown, connects a WebSocket and an SSE
/// client, sends `signal` and checks the graceful sequence and exit status 0. With
/// `drain_delay`, the node must report not ready while it still serves during that delay.
async fn binary_exits_cleanly_on(signal: &str, drain_delay: Option<&str>) {
    let mut envs = vec![
        ("GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "5s"),
        ("GATEWAY__DRAIN__WINDOW", "0s"),
    ];
    envs.push(("GATEWAY__DRAIN__DELAY", drain_delay.unwrap_or("0s")));
    let mut proc = GatewayProcess::spawn(&["--listen", "127.0.0.1:0"], &envs);
    let addr = proc.listening().await;
    let node_url = |p: &str| format!("http://{addr}{p}");
    let resp = within("readyz", http().get(node_url("/readyz")).send())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let (mut ws, _) = within(
        "ws connect",
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .unwrap();
    let sse_resp = within("sse", sse_client().get(node_url("/sse?channel=sig")).send())
        .await
        .unwrap();
    assert_eq!(sse_resp.status().as_u16(), 200);
    let mut sse_body = sse_resp.bytes_stream();
    // Wait for the connected event so the stream is established.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("connected") {
        use futures_util::StreamExt;
        let chunk = within("sse preamble", sse_body.next())
            .await
            .expect("stream")
            .unwrap();
        seen.extend_from_slice(&chunk);
    }

    proc.signal(signal).await;

    if drain_delay.is_some() {
        // Still serving, but no longer ready.
        within("readyz to turn 503", async {
            loop {
                let resp = http()
                    .get(node_url("/readyz"))
                    .send()
                    .await
                    .expect("the node must keep serving during the drain delay");
                if resp.status().as_u16() == 200 {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
                assert_error(&json_response(resp).await, 503, "not_ready");
                return;
            }
        })
        .await;
    }

    assert_eq!(
        close_code(&mut ws).await,
        Some(1001),
        "close code on SIG{signal}"
    );
    within("SSE stream to end", async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = sse_body.next().await {}
    })
    .await;
    let status = proc.wait().await;
    assert!(
        status.success(),
        "gateway should exit 0 on SIG{signal}, got {status:?}; output:\n{}",
        proc.logs().join("\n")
    );
    assert_refused(addr).await;
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match within("close frame", ws.next()).await {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

#[tokio::test]
async fn binary_sigterm() {
    binary_exits_cleanly_on("TERM", Some("1s")).await;
}

#[tokio::test]
async fn binary_sigint() {
    binary_exits_cleanly_on("INT", None).await;
}

#[tokio::test]
async fn binary_exits_within_shutdown_timeout_despite_unresponsive_client() {
    let mut proc = GatewayProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &[
            ("GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "500ms"),
            ("GATEWAY__DRAIN__DELAY", "0s"),
            ("GATEWAY__DRAIN__WINDOW", "0s"),
        ],
    );
    let addr = proc.listening().await;
    // A client that completed the handshake and then neither reads nor answers the close.
    let _raw = RawWs::connect(addr, "/ws").await;
    // And a stalled HTTP request that never finishes its body.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        stalled
            .write_all(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"chan",
            )
            .await
            .unwrap();
    }
    proc.signal("TERM").await;
    let status = proc.wait().await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        proc.logs().join("\n")
    );
}

#[tokio::test]
async fn sigterm_right_after_listening_is_graceful() {
    // The `listening on` line announces a node that can be stopped: a SIGTERM sent the moment it
    // appears must still be a graceful stop with exit status 0, not death by signal.
    let mut proc = GatewayProcess::spawn(&["--listen", "127.0.0.1:0"], &[]);
    proc.listening().await;
    proc.signal("TERM").await;
    let status = proc.wait().await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        proc.logs().join("\n")
    );
}

/// `server.worker_threads = 1` runs the whole node on one thread (a current-thread runtime):
/// it delivers over WebSocket and SSE and drains on SIGTERM as the default runtime does.
#[tokio::test]
async fn the_binary_on_one_thread_delivers_and_drains() {
    let mut proc = GatewayProcess::start(
        "one-thread",
        &[],
        &[
            ("GATEWAY__SERVER__WORKER_THREADS", "1"),
            ("GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "5s"),
            ("GATEWAY__DRAIN__WINDOW", "0s"),
        ],
    )
    .await;
    let ch = channel("one-thread");
    let mut ws = WsClient::connect(&proc).await;
    ws.subscribe(&ch).await;
    let mut sse = Sse::open(&proc, &[&ch]).await;
    sse.connected().await;
    for n in 0..3 {
        let (status, ack) = publish_http(&proc, &ch, &json!({ "n": n })).await;
        assert_eq!(status, 200, "{ack}");
    }
    for n in 0..3 {
        assert_eq!(ws.push().await["data"], json!({ "n": n }));
        assert_eq!(sse.publication().await.1["data"], json!({ "n": n }));
    }

    proc.signal("TERM").await;
    let (code, _) = ws.until_close().await;
    assert_eq!(code, Some(1001), "WebSocket close code on SIGTERM");
    assert_sse_ends(&mut sse).await;
    let status = proc.wait().await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        proc.logs().join("\n")
    );
}
