//! The server API's management of users and channels (#15.5), on gateway processes: one node on
//! the embedded backplane and three on Redis. `POST /api/disconnect` closes every connection of
//! the user on every node (WebSocket 4010 with `reconnect:false`, SSE a `disconnect` event and
//! the end) and refuses the same token afterwards, and no one else's; `POST /api/unsubscribe`
//! makes the user's connections on every node leave a channel, told why, while others keep it;
//! `POST /api/broadcast` answers per channel and reaches each channel's subscribers;
//! `GET /api/channels` lists the channels with subscribers across the nodes; bad input is 400 and
//! a missing API key 401, like `/api/publish`; nobody may use the `$gateway:` channels.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::Message;

const JWT_KEY: &str = "manage-secret-0123456789";
const API_KEY: &str = "manage-api-key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An hour-long token of `sub` issued at `iat`.
fn token_issued(sub: &str, iat: u64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "iat": iat, "exp": now() + 3600}),
        &EncodingKey::from_secret(JWT_KEY.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str) -> String {
    token_issued(sub, now())
}

/// Tokens, an API key, and a short channel report period (the channel list test waits for it).
const ENV: [(&str, &str); 5] = [
    ("GATEWAY__AUTH__JWT_HS256_KEYS", JWT_KEY),
    ("GATEWAY__AUTH__API_KEYS", API_KEY),
    ("GATEWAY__API__CHANNELS_REPORT_INTERVAL", "200ms"),
    PATIENT[0],
    PATIENT[1],
];

async fn one_memory_node() -> Vec<GatewayProcess> {
    vec![GatewayProcess::start("node0", &[], &ENV).await]
}

async fn redis_nodes(redis: &RedisServer) -> Vec<GatewayProcess> {
    start_nodes(&Backend::standalone(redis), 3, &ENV).await
}

/// `POST path` with `body`, with the API key when `key`; status and JSON body.
async fn api_post(node: &impl Endpoint, path: &str, body: &str, key: bool) -> (u16, Value) {
    let mut request = http()
        .post(node.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if key {
        request = request.header("authorization", format!("apikey {API_KEY}"));
    }
    let response = within("POST", request.send()).await.expect("POST");
    json_response(response).await
}

async fn api_get(node: &impl Endpoint, path: &str, key: bool) -> (u16, Value) {
    let mut request = http().get(node.url(path));
    if key {
        request = request.header("authorization", format!("apikey {API_KEY}"));
    }
    let response = within("GET", request.send()).await.expect("GET");
    json_response(response).await
}

async fn ok_post(node: &impl Endpoint, path: &str, body: Value) -> Value {
    let (status, answer) = api_post(node, path, &body.to_string(), true).await;
    assert_eq!(status, 200, "{path} {body}: {answer}");
    answer
}

/// A WebSocket of `sub` with its token in the handshake.
async fn ws_of(node: &impl Endpoint, bearer: &str) -> WsClient {
    WsClient::connect_with(
        node.addr(),
        "/ws",
        &[("authorization", &format!("Bearer {bearer}"))],
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("handshake refused: {status} {body}"))
}

/// A WebSocket that names its user with a `connect` command.
async fn ws_connected(node: &impl Endpoint, bearer: &str) -> WsClient {
    let mut ws = WsClient::connect(node).await;
    ws.ok(json!({"op": "connect", "token": bearer})).await;
    ws
}

/// An SSE stream of the token's user, read up to its `connected` event.
async fn sse_of(node: &impl Endpoint, bearer: &str, channels: &[&str]) -> Sse {
    let query = format!("{}&token={bearer}", channel_query(channels));
    let mut sse = Sse::open_query(node, &query).await;
    sse.connected().await;
    sse
}

/// Reads until the server's Close; its code and its reason as JSON.
async fn close_of(ws: &mut WsClient) -> (u16, Value) {
    loop {
        match within("the server's close", ws.ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                let reason = serde_json::from_str(frame.reason.as_str())
                    .unwrap_or_else(|e| panic!("close reason {:?} not JSON: {e}", frame.reason));
                return (u16::from(frame.code), reason);
            }
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection ended without a close: {e}"),
            None => panic!("connection ended without a close"),
        }
    }
}

// --- disconnect ---------------------------------------------------------------------------------

/// Alice has WebSockets (token in the handshake, and by `connect`) and SSE streams (HTTP/1.1 and
/// HTTP/2) on every node; Bob one of each on the first. A disconnect of Alice through the last node closes all of
/// hers and none of Bob's, and her token no longer opens anything anywhere.
async fn disconnect_reaches_every_node(nodes: &[GatewayProcess]) {
    let (alice, bob) = (token("alice"), token("bob"));
    let room = "room:disconnect";
    let mut alice_ws = Vec::new();
    let mut alice_sse = Vec::new();
    for node in nodes {
        let mut by_header = ws_of(node, &alice).await;
        by_header.subscribe(room).await;
        alice_ws.push(by_header);
        let mut by_connect = ws_connected(node, &alice).await;
        by_connect.subscribe(room).await;
        alice_ws.push(by_connect);
        alice_sse.push(sse_of(node, &alice, &[room]).await);
        // And one over HTTP/2, where the stream is the response's body.
        let query = format!("{}&token={alice}", channel_query(&[room]));
        let mut over_h2 = Sse::open_with(&sse_client_h2(), node, &query, &[]).await;
        assert_eq!(over_h2.version, reqwest::Version::HTTP_2);
        over_h2.connected().await;
        alice_sse.push(over_h2);
    }
    let mut bob_ws = ws_of(&nodes[0], &bob).await;
    bob_ws.subscribe(room).await;
    let mut bob_sse = sse_of(&nodes[0], &bob, &[room]).await;

    let last = nodes.last().unwrap();
    let answer = ok_post(last, "/api/disconnect", json!({"user": "alice"})).await;
    assert_eq!(answer["user"], "alice", "{answer}");
    let at = answer["disconnected_at"].as_u64().expect("disconnected_at");

    for ws in &mut alice_ws {
        let (code, reason) = close_of(ws).await;
        assert_eq!(code, 4010);
        assert_eq!(
            reason,
            json!({"reason": "disconnected", "reconnect": false})
        );
    }
    for sse in &mut alice_sse {
        let event = sse.next_event().await;
        assert_eq!(event.kind(), "disconnect", "{event:?}");
        assert_eq!(event.json()["reconnect"], false, "{event:?}");
        assert!(sse.next_block().await.is_none(), "the stream ends");
    }

    // Bob is untouched: his connections still deliver.
    publish_key(&nodes[0], room, json!("after")).await;
    assert_eq!(bob_ws.push().await["data"], "after");
    assert_eq!(bob_sse.publication().await.1["data"], "after");

    // Alice's token is refused everywhere: handshake, SSE, poll, and `connect`.
    for node in nodes {
        let refused = WsClient::connect_with(
            node.addr(),
            "/ws",
            &[("authorization", &format!("Bearer {alice}"))],
        )
        .await;
        let Err((status, body)) = refused else {
            panic!("a disconnected token opened a WebSocket")
        };
        assert_error(&(status, body), 403, "user_disconnected");
        let query = format!("channel={room}&token={alice}");
        let sse = Sse::open_with(&sse_client(), node, &query, &[]).await;
        assert_eq!(sse.status, 403);
        assert_eq!(sse.body_json().await["error"]["code"], "user_disconnected");
        let poll = get(node, &format!("/poll?{query}&timeout=0")).await;
        assert_error(&poll, 403, "user_disconnected");
        let mut ws = WsClient::connect(node).await;
        ws.err(
            json!({"op": "connect", "token": alice}),
            "user_disconnected",
        )
        .await;
        let (code, reason) = close_of(&mut ws).await;
        assert_eq!((code, &reason["reconnect"]), (4010, &json!(false)));
    }
    // A token issued after the disconnect works; Bob's never stopped.
    let mut fresh = ws_of(&nodes[0], &token_issued("alice", at + 1)).await;
    fresh.subscribe(room).await;
    ws_of(last, &bob).await.subscribe(room).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_and_refuses_its_token_on_one_node() {
    disconnect_reaches_every_node(&one_memory_node().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_and_refuses_its_token_on_three_redis_nodes() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    disconnect_reaches_every_node(&redis_nodes(&redis).await).await;
}

/// A node started after a disconnect refuses the user's older tokens too: it reads the
/// disconnects back from the control channel's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_after_a_disconnect_refuses_the_old_token() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let first = start_nodes(&Backend::standalone(&redis), 1, &ENV).await;
    let alice = token("alice");
    ok_post(&first[0], "/api/disconnect", json!({"user": "alice"})).await;
    let later = GatewayProcess::start("later", &Backend::standalone(&redis).args, &ENV).await;
    let refused = WsClient::connect_with(
        later.addr(),
        "/ws",
        &[("authorization", &format!("Bearer {alice}"))],
    )
    .await;
    let Err(refused) = refused else {
        panic!("the later node let the disconnected token in")
    };
    assert_error(&refused, 403, "user_disconnected");
}

// --- unsubscribe --------------------------------------------------------------------------------

/// Alice holds two channels on a WebSocket and an SSE stream on every node, Bob one on the first.
/// Unsubscribing Alice from one channel through the last node tells each of her connections,
/// which then get only the other channel; Bob keeps receiving it.
async fn unsubscribe_reaches_every_node(nodes: &[GatewayProcess]) {
    let (alice, bob) = (token("alice"), token("bob"));
    let (left, kept) = ("room:left", "room:kept");
    let mut alice_ws = Vec::new();
    let mut alice_sse = Vec::new();
    for node in nodes {
        let mut ws = ws_connected(node, &alice).await;
        ws.subscribe(left).await;
        ws.subscribe(kept).await;
        alice_ws.push(ws);
        alice_sse.push(sse_of(node, &alice, &[left, kept]).await);
    }
    let mut bob_ws = ws_of(&nodes[0], &bob).await;
    bob_ws.subscribe(left).await;

    let last = nodes.last().unwrap();
    let answer = ok_post(
        last,
        "/api/unsubscribe",
        json!({"user": "alice", "channel": left}),
    )
    .await;
    assert_eq!(answer, json!({"user": "alice", "channel": left}));

    let told = json!({"unsubscribed": {"channel": left, "reason": "server"}});
    for ws in &mut alice_ws {
        assert_eq!(ws.push().await, told);
    }
    for sse in &mut alice_sse {
        let event = sse.next_event().await;
        assert_eq!(event.kind(), "unsubscribed", "{event:?}");
        assert_eq!(event.json(), told["unsubscribed"]);
    }

    // `left` first, then `kept`: a connection that still had `left` would get it first.
    publish_key(last, left, json!("left")).await;
    publish_key(last, kept, json!("kept")).await;
    for ws in &mut alice_ws {
        let push = ws.push().await;
        assert_eq!(
            (&push["channel"], &push["data"]),
            (&json!(kept), &json!("kept"))
        );
        ws.ping().await;
    }
    for sse in &mut alice_sse {
        let (_, publication) = sse.publication().await;
        assert_eq!(publication["channel"], kept, "{publication}");
    }
    assert_eq!(bob_ws.push().await["data"], "left");
    // The connection itself is fine: it may subscribe again.
    alice_ws[0].subscribe(left).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_makes_the_user_leave_the_channel_on_one_node() {
    unsubscribe_reaches_every_node(&one_memory_node().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_makes_the_user_leave_the_channel_on_three_redis_nodes() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    unsubscribe_reaches_every_node(&redis_nodes(&redis).await).await;
}

/// A waiting long-poll of the user is answered at once with the `unsubscribed` event, and its
/// cursor no longer names the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_answers_a_waiting_long_poll() {
    let nodes = one_memory_node().await;
    let node = &nodes[0];
    let alice = token("alice");
    let (left, kept) = ("poll:left", "poll:kept");
    let query = format!("channel={left}&channel={kept}&token={alice}");
    let (status, first) = get(node, &format!("/poll?{query}")).await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let before = metric_of(node, "gateway_subscriptions").await;
    let waiting = {
        let url = format!("/poll?{query}&cursor={cursor}&timeout=25");
        let addr = node.addr();
        tokio::spawn(async move { get(&addr, &url).await })
    };
    // The poll has subscribed (so it is registered under its user) once the count rose by two.
    eventually("the poll subscribed", || async {
        metric_of(node, "gateway_subscriptions").await >= before + 2.0
    })
    .await;
    ok_post(
        node,
        "/api/unsubscribe",
        json!({"user": "alice", "channel": left}),
    )
    .await;
    let (status, answer) = within("the poll's answer", waiting).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["events"],
        json!([{"unsubscribed": {"channel": left, "reason": "server"}}])
    );
    let named: Vec<&Value> = answer["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["channel"])
        .collect();
    assert_eq!(named, vec![&json!(kept)]);
}

// --- broadcast ----------------------------------------------------------------------------------

async fn publish_key(node: &impl Endpoint, channel: &str, data: Value) -> Value {
    ok_post(
        node,
        "/api/publish",
        json!({"channel": channel, "data": data}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_answers_per_channel_and_reaches_every_channels_subscribers() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = redis_nodes(&redis).await;
    let channels = ["bc:a", "bc:b", "bc:c"];
    publish_key(&nodes[0], "bc:b", json!("earlier")).await;
    let mut subscribers = Vec::new();
    for (node, channel) in nodes.iter().zip(channels) {
        let mut ws = WsClient::connect(node).await;
        ws.subscribe(channel).await;
        subscribers.push(ws);
    }
    let answer = ok_post(
        &nodes[0],
        "/api/broadcast",
        json!({"channels": channels, "data": {"n": 1}}),
    )
    .await;
    let results = answer["results"].as_array().expect("results");
    let got: Vec<(Value, Value)> = results
        .iter()
        .map(|r| (r["channel"].clone(), r["offset"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("bc:a"), json!(1)),
            (json!("bc:b"), json!(2)),
            (json!("bc:c"), json!(1))
        ]
    );
    for (ws, channel) in subscribers.iter_mut().zip(channels) {
        let push = ws.push().await;
        assert_eq!(
            (&push["channel"], &push["data"]),
            (&json!(channel), &json!({"n": 1}))
        );
    }

    // An idempotency key answers each channel's first result again.
    let keyed = json!({"channels": ["bc:a", "bc:b"], "data": 2, "idempotency_key": "k1"});
    let first = ok_post(&nodes[1], "/api/broadcast", keyed.clone()).await;
    let again = ok_post(&nodes[2], "/api/broadcast", keyed).await;
    assert_eq!(first, again);
}

// --- bad input, API key, reserved channels -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_and_no_api_key_is_401() {
    let nodes = one_memory_node().await;
    let node = &nodes[0];
    let cases: [(&str, &str, &str); 14] = [
        ("/api/disconnect", "{}", "bad_request"),
        ("/api/disconnect", r#"{"user": null}"#, "bad_request"),
        ("/api/disconnect", r#"{"user": ""}"#, "bad_request"),
        ("/api/disconnect", "{nope", "malformed_json"),
        ("/api/unsubscribe", r#"{"channel": "c"}"#, "bad_request"),
        ("/api/unsubscribe", r#"{"user": "u"}"#, "bad_request"),
        (
            "/api/unsubscribe",
            r#"{"user": "u", "channel": "a b"}"#,
            "invalid_channel",
        ),
        (
            "/api/unsubscribe",
            r#"{"user": "u", "channel": "$gateway:x"}"#,
            "invalid_channel",
        ),
        (
            "/api/broadcast",
            r#"{"channels": [], "data": 1}"#,
            "bad_request",
        ),
        ("/api/broadcast", r#"{"channels": ["a"]}"#, "bad_request"),
        ("/api/broadcast", r#"{"data": 1}"#, "bad_request"),
        (
            "/api/broadcast",
            r#"{"channels": ["a", "$gateway:control"], "data": 1}"#,
            "invalid_channel",
        ),
        (
            "/api/publish",
            r#"{"channel": "$gateway:control", "data": 1}"#,
            "invalid_channel",
        ),
        ("/api/disconnect", r#"{"user": 7}"#, "bad_request"),
    ];
    for (path, body, code) in cases {
        let answer = api_post(node, path, body, true).await;
        assert_error(&answer, 400, code);
        let without_key = api_post(node, path, body, false).await;
        assert_error(&without_key, 401, "invalid_api_key");
    }
    let (_, bad_place) = api_post(
        node,
        "/api/broadcast",
        r#"{"channels": ["a", "$gateway:control"], "data": 1}"#,
        true,
    )
    .await;
    let message = bad_place["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("channels[1]:"), "{message}");
    assert_error(
        &api_get(node, "/api/channels", false).await,
        401,
        "invalid_api_key",
    );

    // Nobody subscribes to the control channel either.
    let mut ws = WsClient::connect(node).await;
    ws.err(
        json!({"op": "subscribe", "channel": "$gateway:control"}),
        "invalid_channel",
    )
    .await;
    let sse = Sse::open_with(&sse_client(), node, "channel=$gateway:control", &[]).await;
    assert_eq!(sse.status, 400);
    let poll = get(node, "/poll?channel=$gateway:control&timeout=0").await;
    assert_error(&poll, 400, "invalid_channel");
}

// --- channel list ---------------------------------------------------------------------------------

/// Polls `GET /api/channels?prefix=list:` on `node` until it lists `expected` (the other nodes
/// report every 200 ms: no event to await).
async fn wait_listed(node: &GatewayProcess, expected: Value) {
    poll_until("the channel list", WAIT, || {
        let expected = expected.clone();
        async move {
            let (status, answer) = api_get(node, "/api/channels?prefix=list:", true).await;
            (status == 200 && answer["channels"] == expected).then_some(())
        }
    })
    .await
}

/// Subscribers on three nodes: the list under a prefix counts each channel's subscribers across
/// the nodes, leaves out other prefixes, and follows a subscriber leaving. Needs the backplane's
/// channel reports (`Backplane::report_channels`/`channels`, memory and Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_lists_the_clusters_channels_with_subscriber_counts() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = redis_nodes(&redis).await;
    let mut clients = Vec::new();
    for (node, channel) in [
        (0, "list:a"),
        (1, "list:a"),
        (2, "list:a"),
        (1, "list:b"),
        (2, "other:c"),
    ] {
        let mut ws = WsClient::connect(&nodes[node]).await;
        ws.subscribe(channel).await;
        clients.push(ws);
    }
    wait_listed(
        &nodes[0],
        json!([{"channel": "list:a", "subscribers": 3}, {"channel": "list:b", "subscribers": 1}]),
    )
    .await;
    clients.remove(3); // list:b's only subscriber leaves
    wait_listed(&nodes[2], json!([{"channel": "list:a", "subscribers": 3}])).await;
    let (status, all) = api_get(&nodes[1], "/api/channels", true).await;
    assert_eq!(status, 200, "{all}");
    let names: Vec<&Value> = all["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["channel"])
        .collect();
    assert!(names.contains(&&json!("other:c")), "{all}");
    assert!(
        !names
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("$gateway:")),
        "{all}"
    );
}

/// The same on the embedded backplane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_lists_the_channels_of_a_single_node() {
    let nodes = one_memory_node().await;
    let mut a = WsClient::connect(&nodes[0]).await;
    a.subscribe("solo:a").await;
    let mut b = WsClient::connect(&nodes[0]).await;
    b.subscribe("solo:a").await;
    let (status, answer) = api_get(&nodes[0], "/api/channels?prefix=solo:", true).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["channels"],
        json!([{"channel": "solo:a", "subscribers": 2}])
    );
}
