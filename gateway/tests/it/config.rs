//! The binary's configuration: flags, TOML file and `GATEWAY__SECTION__KEY` environment, and the
//! errors that name the offending key.

use std::io::Write;
use std::net::SocketAddr;

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn help_lists_the_flags() {
    let (status, stdout, stderr) = run_to_exit(&["--help"], &[]).await;
    assert!(status.success(), "--help: {status:?} {stderr}");
    for flag in ["--listen", "--config", "--ws-echo", "--demo-publisher"] {
        assert!(
            stdout.contains(flag),
            "--help does not list {flag}:\n{stdout}"
        );
    }
}

/// Runs the binary with `envs` and asserts it refuses to start, naming `key` on stderr.
async fn rejects_env(envs: &[(&str, &str)], key: &str) {
    let (status, stdout, stderr) = run_to_exit(&["--listen", "127.0.0.1:0"], envs).await;
    assert!(
        !status.success(),
        "{envs:?} should be rejected; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(key),
        "error for {envs:?} should name {key}; stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn invalid_env_values_name_the_key() {
    rejects_env(
        &[("GATEWAY__WEBSOCKET__MAX_MESSAGE_SIZE", "lots")],
        "websocket.max_message_size",
    )
    .await;
    rejects_env(
        &[("GATEWAY__WEBSOCKET__MAX_MESSAGE_SIZE", "10")],
        "websocket.max_message_size",
    )
    .await;
    rejects_env(
        &[("GATEWAY__CLIENT__QUEUE_MAX_BYTES", "-5")],
        "client.queue_max_bytes",
    )
    .await;
    rejects_env(
        &[("GATEWAY__WEBSOCKET__PING_INTERVAL", "0s")],
        "websocket.ping_interval",
    )
    .await;
    rejects_env(&[("GATEWAY__HISTORY__MAX_COUNT", "0")], "history.max_count").await;
    rejects_env(&[("GATEWAY__POLL__MAX_TIMEOUT", "0s")], "poll.max_timeout").await;
    rejects_env(
        &[("GATEWAY__DEMO__PUBLISHER_INTERVAL", "0ms")],
        "demo.publisher_interval",
    )
    .await;
}

fn toml_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f.flush().unwrap();
    f
}

async fn rejects_file(contents: &str, key: &str) {
    let file = toml_file(contents);
    let path = file.path().to_str().unwrap();
    let (status, stdout, stderr) =
        run_to_exit(&["--config", path, "--listen", "127.0.0.1:0"], &[]).await;
    assert!(
        !status.success(),
        "{contents:?} should be rejected; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(key),
        "error for {contents:?} should name {key}; stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn invalid_file_values_name_the_key() {
    rejects_file(
        "[websocket]\nmax_message_size = \"big\"\n",
        "websocket.max_message_size",
    )
    .await;
    rejects_file(
        "[websocket]\nping_interval = \"soon\"\n",
        "websocket.ping_interval",
    )
    .await;
    rejects_file(
        "[sse]\nheartbeat_interval = \"0ms\"\n",
        "sse.heartbeat_interval",
    )
    .await;
    rejects_file(
        "[client]\nhistory_page_size = 0\n",
        "client.history_page_size",
    )
    .await;
    rejects_file("[history]\nmax_page = 0\n", "history.max_page").await;
    rejects_file("[presence]\nttl = \"500ms\"\n", "presence.ttl").await;
    rejects_file(
        "[channels.namespaces.room]\njoin_leave = true\n",
        "join_leave needs presence",
    )
    .await;
}

#[tokio::test]
async fn missing_config_file_is_an_error() {
    let (status, _, stderr) = run_to_exit(
        &[
            "--config",
            "/nonexistent/gateway.toml",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert!(!status.success(), "stderr:\n{stderr}");
    assert!(
        stderr.contains("/nonexistent/gateway.toml"),
        "stderr:\n{stderr}"
    );
}

async fn publish_status(addr: SocketAddr, data_len: usize) -> u16 {
    let body = json!({"channel": "cfg", "data": "d".repeat(data_len)}).to_string();
    let resp = within(
        "publish",
        http()
            .post(format!("http://{addr}/api/publish"))
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
    .await
    .unwrap();
    resp.status().as_u16()
}

#[tokio::test]
async fn file_values_take_effect() {
    let file = toml_file(
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[websocket]\nmax_message_size = 300\n\n[sse]\nretry = \"250ms\"\n",
    );
    // --listen overrides the file's address.
    let mut proc = GatewayProcess::spawn(
        &[
            "--config",
            file.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = proc.listening().await;
    assert_ne!(addr.port(), 1);
    assert_eq!(publish_status(addr, 100).await, 200);
    assert_eq!(publish_status(addr, 400).await, 413);

    // Durations are read from strings like "250ms".
    let resp = within(
        "sse",
        sse_client()
            .get(format!("http://{addr}/sse?channel=cfg"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains('\n') {
        use futures_util::StreamExt;
        let chunk = within("sse", body.next()).await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.starts_with("retry: 250\n") || text.starts_with("retry: 250\r"),
        "{text:?}"
    );
}

#[tokio::test]
async fn env_overrides_file_and_flags_override_env() {
    let file = toml_file("[websocket]\nmax_message_size = 5000\n");
    let mut proc = GatewayProcess::spawn(
        &[
            "--config",
            file.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--ws-echo",
        ],
        &[
            ("GATEWAY__WEBSOCKET__MAX_MESSAGE_SIZE", "300"),
            ("GATEWAY__SERVER__LISTEN", "127.0.0.1:1"),
        ],
    );
    let addr = proc.listening().await;
    assert_ne!(addr.port(), 1, "--listen must win over the environment");
    assert_eq!(publish_status(addr, 100).await, 200);
    assert_eq!(
        publish_status(addr, 1000).await,
        413,
        "env must win over the file"
    );

    // --ws-echo serves the echo endpoint.
    let (mut ws, _) = within(
        "echo handshake",
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/echo")),
    )
    .await
    .expect("--ws-echo should enable /ws/echo");
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("hi")).await.unwrap();
    loop {
        match within("echo", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), "hi");
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("echo: {other:?}"),
        }
    }
}

#[tokio::test]
async fn json_logs_still_announce_the_address() {
    let mut proc = GatewayProcess::spawn(&["--listen", "127.0.0.1:0", "--log-json"], &[]);
    let addr = proc.listening().await;
    let line = proc.listening_line().to_string();
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("--log-json line is not JSON ({e}): {line}"));
    assert!(v.is_object());
    let resp = within(
        "healthz",
        http().get(format!("http://{addr}/healthz")).send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}
