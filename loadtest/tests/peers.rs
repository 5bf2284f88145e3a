//! The peer servers against their contract: every subscriber gets every offset once and in order
//! (ws, uWS, and a 3-node Socket.IO cluster across a SIGKILLed node with session recovery), echo
//! round trips, malformed publishes refused. Installs the peers' npm packages when missing.
//! No timing assertions; timeouts only turn a hang into a failure.

#[allow(dead_code)]
#[path = "../src/net.rs"]
mod net;
#[allow(dead_code)]
#[path = "../src/peers.rs"]
mod peers;
#[allow(dead_code)]
#[path = "../src/socketio.rs"]
mod socketio;

use std::process::Command;
use std::sync::Mutex;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use peers::{PeerKind, Peers};

const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
use socketio::{SioClient, SioDelivery};
use testkit::{RedisOpts, RedisServer, WAIT};

/// Runs loadtest/peers/install.sh once per test process when node_modules is missing.
fn ensure_installed() {
    static INSTALL: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Peers::peers_dir();
    if *done || dir.join("node_modules").is_dir() {
        *done = true;
        return;
    }
    let status = Command::new("bash")
        .arg(dir.join("install.sh"))
        .status()
        .expect("run loadtest/peers/install.sh");
    assert!(status.success(), "loadtest/peers/install.sh failed");
    *done = true;
}

async fn publish(port: u16, channel: &str, data: Value) -> u64 {
    let reply: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/publish"))
        .json(&json!({ "channel": channel, "data": data }))
        .send()
        .await
        .expect("publish")
        .error_for_status()
        .expect("publish status")
        .json()
        .await
        .expect("publish reply");
    assert_eq!(reply["channel"], channel);
    reply["offset"]
        .as_u64()
        .expect("offset in the publish reply")
}

async fn publish_malformed(port: u16) -> u16 {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/publish"))
        .body("{\"data\": 1}")
        .send()
        .await
        .expect("publish")
        .status()
        .as_u16()
}

/// ws and uWS: subscribers on one channel, publications on it and on another, echo.
async fn broadcast_and_echo(kind: PeerKind) {
    ensure_installed();
    let peers = Peers::start(kind, 1, None).await.expect("start peer");
    let port = peers.nodes()[0].port;

    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let url = format!("ws://127.0.0.1:{port}/ws?channel=room%201");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("subscribe");
        subscribers.push(ws);
    }
    const COUNT: u64 = 5;
    for i in 1..=COUNT {
        // A publication on another channel must reach no subscriber of "room 1".
        publish(port, "other", json!(i)).await;
        assert_eq!(publish(port, "room 1", json!({ "i": i })).await, i);
    }
    for ws in &mut subscribers {
        for i in 1..=COUNT {
            let frame = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("delivery in time")
                .expect("open")
                .expect("frame");
            let Message::Text(text) = frame else {
                panic!("expected a text frame, got {frame:?}");
            };
            let publication: Value = serde_json::from_str(text.as_str()).expect("json");
            assert_eq!(
                publication,
                json!({ "channel": "room 1", "offset": i, "data": { "i": i } })
            );
        }
    }
    assert_eq!(publish_malformed(port).await, 400);

    let (mut echo, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/echo"))
        .await
        .expect("echo");
    for sent in [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        echo.send(sent.clone()).await.expect("send");
        let back = tokio::time::timeout(WAIT, echo.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("frame");
        assert_eq!(back, sent);
    }
}

#[tokio::test]
async fn ws_peer_broadcasts_and_echoes() {
    broadcast_and_echo(PeerKind::Ws).await;
}

#[tokio::test]
async fn uws_peer_broadcasts_and_echoes() {
    broadcast_and_echo(PeerKind::Uws).await;
}

async fn next_delivery(client: &mut SioClient) -> SioDelivery {
    tokio::time::timeout(WAIT, client.next())
        .await
        .expect("delivery in time")
        .expect("connection open")
        .expect("delivery")
}

/// Three nodes: clients subscribe on node 1, publications go through node 0; node 1 is killed
/// with SIGKILL, more is published, the clients resume on node 2 with their sessions and get
/// what they missed, then the rest.
#[tokio::test]
async fn socketio_cluster_recovers_sessions_after_a_node_is_killed() {
    ensure_installed();
    let redis = RedisServer::start(RedisOpts::default()).await;
    let mut peers = Peers::start(PeerKind::SocketIo, 3, Some(redis.port))
        .await
        .expect("start Socket.IO nodes");
    let port = |i: usize| peers.nodes()[i].port;
    let (publisher, victim, survivor) = (port(0), port(1), port(2));
    const CHANNEL: &str = "storm";

    let mut clients = Vec::new();
    for _ in 0..3 {
        let (client, recovered) = SioClient::connect(victim, LOCALHOST, CHANNEL, None)
            .await
            .expect("connect to node 1");
        assert!(!recovered, "a fresh connection cannot be a recovered one");
        clients.push((client, Vec::<u64>::new()));
    }
    assert_eq!(publish_malformed(publisher).await, 400);

    let mut last = 0;
    for _ in 0..5 {
        last = publish(publisher, CHANNEL, json!({ "n": last + 1 })).await;
    }
    for (client, seen) in &mut clients {
        while seen.last() != Some(&last) {
            let d = next_delivery(client).await;
            assert_eq!(d.channel, CHANNEL);
            assert_eq!(d.data, json!({ "n": d.offset }));
            seen.push(d.offset);
        }
        assert!(client.session().offset.is_some(), "no recovery offset");
    }

    peers.kill(1, libc::SIGKILL);
    // Published while the clients are cut off: recovery must replay these.
    for _ in 0..5 {
        last = publish(publisher, CHANNEL, json!({ "n": last + 1 })).await;
    }

    let mut resumed = Vec::new();
    for (mut client, mut seen) in clients {
        // Whatever still arrives before the connection is seen dead counts too.
        while let Some(Ok(d)) = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("the killed node's connections end")
        {
            seen.push(d.offset);
        }
        let session = client.session();
        let (client, recovered) = SioClient::connect(survivor, LOCALHOST, CHANNEL, Some(&session))
            .await
            .expect("reconnect to node 2");
        assert!(recovered, "node 2 did not recover session {session:?}");
        resumed.push((client, seen));
    }

    for _ in 0..5 {
        last = publish(publisher, CHANNEL, json!({ "n": last + 1 })).await;
    }
    for (mut client, mut seen) in resumed {
        while seen.last() != Some(&last) {
            seen.push(next_delivery(&mut client).await.offset);
        }
        assert_eq!(
            seen,
            (1..=last).collect::<Vec<_>>(),
            "offsets not exactly once in order"
        );
        client.close().await;
    }
    drop(peers);
    drop(redis);
}

/// A node that cannot start says why: its stderr comes back in the error.
#[tokio::test]
async fn a_peer_that_cannot_start_reports_its_stderr() {
    ensure_installed();
    // A port just freed: no redis listens there.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let redis_port = unused.local_addr().expect("addr").port();
    drop(unused);
    let error = match Peers::start(PeerKind::SocketIo, 1, Some(redis_port)).await {
        Ok(_) => panic!("a Socket.IO node started without redis"),
        Err(e) => e,
    };
    assert!(error.contains("redis: "), "no reason in: {error}");
}
