//! The binary's subcommands as a newcomer runs them: `config check` (exit code and the key at
//! fault), `config defaults` (a file the node starts with), `token` (a token a node configured
//! with the same key accepts, limited to its channels), `--version`.

use std::io::Write;

use crate::support::*;
use serde_json::json;

const KEY: &str = "0123456789abcdef-cli-test-key";

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[tokio::test]
async fn config_check_says_ok_or_names_the_key() {
    let good = file("[history]\nmax_count = 50\n");
    let path = good.path().to_str().unwrap();
    let (status, stdout, stderr) = run_to_exit(&["config", "check", path], &[]).await;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");

    for (text, key) in [
        ("[server]\nlistne = 1\n", "listne"),
        (
            "[websocket]\nmax_message_size = 10\n",
            "websocket.max_message_size",
        ),
        ("[history]\nmax_age = \"soon\"\n", "history.max_age"),
    ] {
        let bad = file(text);
        let path = bad.path().to_str().unwrap();
        let (status, _, stderr) = run_to_exit(&["config", "check", path], &[]).await;
        assert_eq!(status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(key),
            "{text}: the message should name {key}: {stderr}"
        );
    }
    // The environment is part of what the node would load.
    let (status, _, stderr) = run_to_exit(
        &["config", "check", path],
        &[("GATEWAY__CLIENT__MAX_SUBSCRIPTIONS", "0")],
    )
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("client.max_subscriptions"), "{stderr}");
    let (status, _, stderr) = run_to_exit(&["config", "check", "/nonexistent.toml"], &[]).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[tokio::test]
async fn config_defaults_prints_a_file_the_node_starts_with() {
    let (status, stdout, stderr) = run_to_exit(&["config", "defaults"], &[]).await;
    assert!(status.success(), "{stderr}");
    for section in [
        "[server]",
        "[websocket]",
        "[redis]",
        "[limits]",
        "[channels.default]",
    ] {
        assert!(stdout.contains(section), "no {section} in\n{stdout}");
    }
    let defaults = file(&stdout);
    let path = defaults.path().to_str().unwrap().to_string();
    let (status, _, stderr) = run_to_exit(&["config", "check", &path], &[]).await;
    assert!(
        status.success(),
        "the printed defaults do not check: {stderr}"
    );
    // A node runs on it (the listen address from the flag, the rest from the file).
    let node = GatewayProcess::start("defaults", &["--config".into(), path], &[]).await;
    let ack = publish(&node, "cli-defaults", json!("on the printed defaults")).await;
    assert_eq!(ack["offset"], 1);
}

#[tokio::test]
async fn a_minted_token_opens_exactly_its_channels() {
    let config = file(&format!(
        "[auth]\njwt_hs256_keys = [\"{KEY}\"]\n[channels.default]\nsubscribe = \"token\"\n"
    ));
    let path = config.path().to_str().unwrap().to_string();
    let (status, token, stderr) = run_to_exit(
        &[
            "token",
            "--sub",
            "alice",
            "--channels",
            "chat:*",
            "--ttl",
            "10m",
            "--config",
            &path,
        ],
        &[],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let token = token.trim().to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");

    let node = GatewayProcess::start("token", &["--config".into(), path.clone()], &[]).await;
    let mut ws = WsClient::connect_path(&node, &format!("/ws?token={token}")).await;
    let allowed = ws
        .request(json!({"op": "subscribe", "channel": "chat:room1"}))
        .await;
    assert!(
        allowed.get("result").is_some(),
        "chat:room1 refused: {allowed}"
    );
    let refused = ws
        .request(json!({"op": "subscribe", "channel": "news"}))
        .await;
    assert!(refused.get("error").is_some(), "news allowed: {refused}");

    // Without a configured key the command refuses, naming the key to set.
    let (status, _, stderr) = run_to_exit(&["token", "--sub", "alice"], &[]).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("auth.jwt_hs256_keys"), "{stderr}");
}

#[tokio::test]
async fn version_names_the_commit() {
    let (status, stdout, _) = run_to_exit(&["--version"], &[]).await;
    assert!(status.success());
    assert!(
        stdout.starts_with(&format!("gateway {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}
