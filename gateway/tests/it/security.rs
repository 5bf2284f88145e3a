//! Authentication, channel permissions, Origin and CORS, API keys and the abuse limits, each
//! against a real node over real sockets. docs/security.md lists every bad input tried here and
//! the answer it gets.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use gateway::config::{Access, Config, NamespaceConfig};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY_OLD: &str = "old-secret-0123456789";
const KEY_NEW: &str = "new-secret-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(key: &str, claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

/// A valid token for `sub` listing `channels`, an hour long.
fn token(sub: &str, channels: &[&str]) -> String {
    hs256(
        KEY_NEW,
        json!({"sub": sub, "exp": now() + 3600, "channels": channels}),
    )
}

fn ns(subscribe: Access, publish: Access, max: usize) -> NamespaceConfig {
    NamespaceConfig {
        subscribe,
        publish,
        max_message_size: max,
        ..NamespaceConfig::default()
    }
}

/// Keys for HS256 (two: rotation), `chat:` for token-listed channels with no client publishing,
/// `members:` for any authenticated connection, the default namespace open.
fn secured(config: &mut Config) {
    config.auth.jwt_hs256_keys = vec![KEY_OLD.into(), KEY_NEW.into()];
    config.auth.jwt_leeway = Duration::ZERO;
    let mut namespaces = BTreeMap::new();
    namespaces.insert("chat".into(), ns(Access::Token, Access::None, 64));
    namespaces.insert(
        "members".into(),
        ns(Access::Authenticated, Access::Authenticated, 64),
    );
    config.channels.namespaces = namespaces;
}

async fn ws(node: &Node, headers: &[(&str, &str)]) -> WsClient {
    WsClient::connect_with(node.addr, "/ws", headers)
        .await
        .unwrap_or_else(|(status, body)| panic!("handshake refused: {status} {body}"))
}

async fn ws_refused(node: &Node, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    match WsClient::connect_with(node.addr, path, headers).await {
        Ok(_) => panic!("handshake to {path} with {headers:?} should be refused"),
        Err(refused) => refused,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn sub_err(ws: &mut WsClient, channel: &str, code: &str) {
    ws.err(json!({"op": "subscribe", "channel": channel}), code)
        .await;
}

// --- tokens on WebSocket -----------------------------------------------------------------------

#[tokio::test]
async fn bearer_token_opens_the_channels_it_lists_and_no_others() {
    let node = Node::with(secured).await;
    let t = token("alice", &["chat:a*"]);
    let mut c = ws(&node, &[("authorization", &bearer(&t))]).await;
    c.subscribe("chat:abc").await;
    c.subscribe("members:x").await;
    c.subscribe("free").await;
    sub_err(&mut c, "chat:b", "forbidden").await;
    // The namespace lets no client publish, whoever it is.
    c.err(
        json!({"op": "publish", "channel": "chat:abc", "data": 1}),
        "forbidden",
    )
    .await;
    c.publish("members:x", json!("hi")).await;

    // Anonymous: only the open namespace.
    let mut anon = WsClient::connect(&node).await;
    sub_err(&mut anon, "chat:abc", "unauthorized").await;
    sub_err(&mut anon, "members:x", "unauthorized").await;
    anon.err(
        json!({"op": "publish", "channel": "members:x", "data": 1}),
        "unauthorized",
    )
    .await;
    anon.subscribe("free").await;
    anon.publish("free", json!(1)).await;
    let m = metrics(&node).await;
    assert!(
        metric(
            &m,
            "gateway_auth_failures_total",
            &[("reason", "forbidden")]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        metric(
            &m,
            "gateway_auth_failures_total",
            &[("reason", "unauthorized")]
        )
        .unwrap()
            >= 3.0
    );
}

#[tokio::test]
async fn namespace_message_size_applies_to_client_and_api_publishes() {
    let node = Node::with(secured).await;
    let mut c = ws(&node, &[("authorization", &bearer(&token("u", &[])))]).await;
    let big = "x".repeat(80);
    c.err(
        json!({"op": "publish", "channel": "members:x", "data": big}),
        "message_too_large",
    )
    .await;
    c.publish("members:x", json!("small")).await;
    let got = post_raw(
        &node,
        "/api/publish",
        json!({"channel": "members:x", "data": big}).to_string(),
    )
    .await;
    assert_error(&got, 413, "message_too_large");
}

#[tokio::test]
async fn token_in_query_and_rotated_keys_are_accepted() {
    let node = Node::with(secured).await;
    let old = hs256(
        KEY_OLD,
        json!({"sub": "bob", "exp": now() + 60, "channels": ["chat:*"]}),
    );
    let mut c = WsClient::connect_path(&node, &format!("/ws?token={old}")).await;
    c.subscribe("chat:room").await;
}

#[tokio::test]
async fn bad_tokens_at_the_handshake_get_401() {
    let node = Node::with(secured).await;
    let forged = hs256(
        "not-a-configured-key-000",
        json!({"sub": "eve", "exp": now() + 60}),
    );
    let expired = hs256(KEY_NEW, json!({"sub": "eve", "exp": now() - 100}));
    let no_sub = hs256(KEY_NEW, json!({"exp": now() + 60}));
    let alg_none = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(format!(r#"{{"sub":"eve","exp":{}}}"#, now() + 60))
        )
    };
    for (t, code) in [
        (forged.as_str(), "invalid_token"),
        (expired.as_str(), "token_expired"),
        (no_sub.as_str(), "invalid_token"),
        (alg_none.as_str(), "invalid_token"),
        ("garbage", "invalid_token"),
    ] {
        let (status, body) = ws_refused(&node, "/ws", &[("authorization", &bearer(t))]).await;
        assert_eq!(status, 401, "{t}: {body}");
        if !body.is_null() {
            assert_eq!(body["error"]["code"], code, "{t}: {body}");
        }
        let sse = Sse::open_with(
            &sse_client(),
            &node,
            &format!("channel=free&token={t}"),
            &[],
        )
        .await;
        assert_eq!(sse.status, 401, "{t}");
        assert_eq!(sse.body_json().await["error"]["code"], code, "{t}");
    }
    wait_metric(
        &node,
        "gateway_auth_failures_total",
        &[("reason", "expired")],
        |v| v >= 2.0,
    )
    .await;
}

#[tokio::test]
async fn wrong_audience_or_issuer_is_refused() {
    let node = Node::with(|c| {
        secured(c);
        c.auth.jwt_audience = Some("gateway".into());
        c.auth.jwt_issuer = Some("https://issuer.example".into());
    })
    .await;
    let claims = |aud: &str, iss: &str| {
        hs256(
            KEY_NEW,
            json!({"sub": "u", "exp": now() + 60, "aud": aud, "iss": iss}),
        )
    };
    let good = claims("gateway", "https://issuer.example");
    ws(&node, &[("authorization", &bearer(&good))]).await;
    for bad in [
        claims("other", "https://issuer.example"),
        claims("gateway", "https://evil.example"),
        token("u", &[]),
    ] {
        let mut c = WsClient::connect(&node).await;
        c.send_json(&json!({"id": 1, "op": "connect", "token": bad}))
            .await;
        let (code, seen) = c.until_close().await;
        assert_eq!(code, Some(4002), "{seen:?}");
        assert_eq!(seen[0]["error"]["code"], "invalid_token", "{seen:?}");
    }
}

#[tokio::test]
async fn connect_frame_authenticates_once_and_first() {
    let node = Node::with(secured).await;
    let mut c = WsClient::connect(&node).await;
    let r = c
        .ok(json!({"op": "connect", "token": token("carol", &["chat:c"])}))
        .await;
    assert_eq!(r["user"], "carol");
    assert!(r["expires_at"].as_u64().unwrap() > now());
    c.subscribe("chat:c").await;
    c.err(
        json!({"op": "connect", "token": token("carol", &[])}),
        "already_connected",
    )
    .await;

    let mut late = WsClient::connect(&node).await;
    late.ping().await;
    late.err(
        json!({"op": "connect", "token": token("carol", &[])}),
        "bad_request",
    )
    .await;
    late.err(json!({"op": "connect"}), "bad_request").await;
    late.err(
        json!({"op": "refresh", "token": token("carol", &[])}),
        "bad_request",
    )
    .await;

    let mut expired = WsClient::connect(&node).await;
    let t = hs256(KEY_NEW, json!({"sub": "c", "exp": now() - 100}));
    expired
        .send_json(&json!({"id": 1, "op": "connect", "token": t}))
        .await;
    let (code, seen) = expired.until_close().await;
    assert_eq!(code, Some(4003));
    assert_eq!(seen[0]["error"]["code"], "token_expired");
}

#[tokio::test]
async fn connect_without_keys_is_refused() {
    let node = Node::default().await;
    let mut c = WsClient::connect(&node).await;
    c.send_json(&json!({"id": 1, "op": "connect", "token": "x.y.z"}))
        .await;
    let (code, seen) = c.until_close().await;
    assert_eq!(code, Some(4002));
    assert_eq!(seen[0]["error"]["code"], "auth_not_configured");
}

#[tokio::test]
async fn an_expiring_token_closes_the_connection_with_4003() {
    let node = Node::with(secured).await;
    // Whole seconds: `+ 1` could leave milliseconds, less than the subscribe takes on a busy
    // machine.
    let short = hs256(KEY_NEW, json!({"sub": "dave", "exp": now() + 2}));
    let mut c = ws(&node, &[("authorization", &bearer(&short))]).await;
    c.subscribe("free").await;
    let (code, _) = c.until_close().await;
    assert_eq!(code, Some(4003));
}

#[tokio::test]
async fn refresh_keeps_the_connection_past_the_first_expiry() {
    let node = Node::with(secured).await;
    // Whole seconds: `now() + 1` could leave a few milliseconds, less than the four round
    // trips before the refresh take on a busy machine (CI saw the 4003 first).
    let exp = now() + 4;
    let short = hs256(KEY_NEW, json!({"sub": "erin", "exp": exp}));
    let mut c = WsClient::connect(&node).await;
    c.ok(json!({"op": "connect", "token": short})).await;
    c.subscribe("free").await;
    // Another user's token cannot take the connection over.
    c.err(
        json!({"op": "refresh", "token": token("mallory", &[])}),
        "forbidden",
    )
    .await;
    let r = c
        .ok(json!({"op": "refresh", "token": token("erin", &[])}))
        .await;
    assert_eq!(r["user"], "erin");
    // Let the first token's expiry pass: the connection must still answer.
    let past = UNIX_EPOCH + Duration::from_secs(exp + 1);
    if let Ok(wait) = past.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    c.ping().await;
    c.publish("free", json!(1)).await;
}

#[tokio::test]
async fn es256_keys_from_pem_and_jwks_files() {
    let dir = tempfile::tempdir().unwrap();
    let pem_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let jwks_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem_path = dir.path().join("es256.pem");
    std::fs::write(&pem_path, pem_key.public_key_pem()).unwrap();
    let raw = jwks_key.public_key_raw();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65]),
    }]});
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let node = Node::with(|c| {
        secured(c);
        c.auth.jwt_public_keys = vec![pem_path.clone()];
        c.auth.jwt_jwks_file = Some(jwks_path.clone());
    })
    .await;
    let sign = |key: &rcgen::KeyPair, kid: Option<&str>| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        let claims = json!({"sub": "eve", "exp": now() + 60, "channels": ["chat:*"]});
        encode(
            &header,
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    for t in [sign(&pem_key, None), sign(&jwks_key, Some("k1"))] {
        let mut c = ws(&node, &[("authorization", &bearer(&t))]).await;
        c.subscribe("chat:x").await;
    }
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (status, _) = ws_refused(
        &node,
        "/ws",
        &[("authorization", &bearer(&sign(&stranger, Some("k1"))))],
    )
    .await;
    assert_eq!(status, 401);
}

// --- SSE ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sse_checks_the_token_against_every_channel() {
    let node = Node::with(secured).await;
    let t = token("frank", &["chat:f"]);
    let mut ok = Sse::open_query(&node, &format!("channel=chat:f&channel=free&token={t}")).await;
    assert_eq!(ok.next_event().await.kind(), "connected");
    let outside = Sse::open_with(
        &sse_client(),
        &node,
        &format!("channel=chat:f&channel=chat:g&token={t}"),
        &[],
    )
    .await;
    assert_eq!(outside.status, 403);
    assert_eq!(outside.body_json().await["error"]["code"], "forbidden");
    let anon = Sse::open_with(&sse_client(), &node, "channel=members:x", &[]).await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.body_json().await["error"]["code"], "unauthorized");
    let header = Sse::open_with(
        &sse_client(),
        &node,
        "channel=members:x",
        &[("authorization", &bearer(&t))],
    )
    .await;
    header.assert_stream();
}

#[tokio::test]
async fn sse_stream_ends_when_its_token_expires() {
    let node = Node::with(secured).await;
    // Whole seconds: `+ 1` could leave milliseconds, less than opening the stream takes.
    let short = hs256(KEY_NEW, json!({"sub": "gina", "exp": now() + 2}));
    let mut sse = Sse::open_query(&node, &format!("channel=members:g&token={short}")).await;
    assert_eq!(sse.next_event().await.kind(), "connected");
    while sse.next_block().await.is_some() {}
}

// --- Origin and CORS ---------------------------------------------------------------------------

fn origins(config: &mut Config) {
    config.origin.allowed = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
}

#[tokio::test]
async fn foreign_origins_are_refused_on_websocket_sse_and_api() {
    let node = Node::with(origins).await;
    let evil = [("origin", "https://evil.example.net")];
    let (status, _) = ws_refused(&node, "/ws", &evil).await;
    assert_eq!(status, 403);
    let sse = Sse::open_with(&sse_client(), &node, "channel=a", &evil).await;
    assert_eq!(sse.status, 403);
    assert_eq!(sse.body_json().await["error"]["code"], "origin_not_allowed");
    let resp = http()
        .post(node.url("/api/publish"))
        .header("origin", "https://evil.example.net")
        .body(r#"{"channel":"a","data":1}"#)
        .send()
        .await
        .unwrap();
    assert_error(&json_response(resp).await, 403, "origin_not_allowed");
    wait_metric(
        &node,
        "gateway_auth_failures_total",
        &[("reason", "origin")],
        |v| v >= 2.0,
    )
    .await;

    // Allowed origins and non-browser clients (no Origin) get in.
    ws(&node, &[("origin", "https://app.example.com")]).await;
    ws(&node, &[("origin", "https://a.example.org")]).await;
    WsClient::connect(&node).await;
}

#[tokio::test]
async fn cors_headers_and_preflight_for_sse_and_api() {
    let node = Node::with(origins).await;
    let origin = "https://app.example.com";
    let sse = Sse::open_with(&sse_client(), &node, "channel=a", &[("origin", origin)]).await;
    sse.assert_stream();
    assert_eq!(sse.headers["access-control-allow-origin"], origin);
    let preflight = http()
        .request(reqwest::Method::OPTIONS, node.url("/api/publish"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], origin);
    let allow = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allow.contains("authorization"), "{allow}");
    let resp = http()
        .get(node.url("/api/history?channel=a"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    let refused = http()
        .request(reqwest::Method::OPTIONS, node.url("/sse"))
        .header("origin", "https://evil.example.net")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
}

// --- API keys ----------------------------------------------------------------------------------

async fn publish_with(addr: std::net::SocketAddr, auth: Option<&str>) -> (u16, Value) {
    let mut req = http()
        .post(format!("http://{addr}/api/publish"))
        .body(r#"{"channel":"a","data":1}"#);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    json_response(req.send().await.unwrap()).await
}

#[tokio::test]
async fn api_keys_guard_the_api() {
    let node = Node::with(|c| c.auth.api_keys = vec!["k-one".into(), "k-two".into()]).await;
    assert_error(&publish_with(node.addr, None).await, 401, "invalid_api_key");
    assert_error(
        &publish_with(node.addr, Some("apikey wrong")).await,
        401,
        "invalid_api_key",
    );
    assert_error(
        &publish_with(node.addr, Some("Bearer k-two")).await,
        401,
        "invalid_api_key",
    );
    assert_eq!(publish_with(node.addr, Some("apikey k-two")).await.0, 200);
    assert_eq!(publish_with(node.addr, Some("ApiKey k-one")).await.0, 200);
    // Client endpoints do not need the key.
    WsClient::connect(&node).await.ping().await;
    wait_metric(
        &node,
        "gateway_auth_failures_total",
        &[("reason", "api_key")],
        |v| v >= 3.0,
    )
    .await;
}

#[tokio::test]
async fn separate_api_listener_serves_the_api_and_metrics_only() {
    let mut config = test_config();
    config.auth.api_listen = Some("127.0.0.1:0".parse().unwrap());
    let running = gateway::Gateway::start(config).await.unwrap();
    let main = running.local_addr();
    let api = running.api_addr();
    assert_ne!(main, api);
    assert_eq!(publish_with(main, None).await.0, 404);
    assert_eq!(publish_with(api, None).await.0, 200);
    let get = |addr: std::net::SocketAddr, path: &str| {
        let url = format!("http://{addr}{path}");
        async move { http().get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(main, "/metrics").await, 404);
    assert_eq!(get(api, "/metrics").await, 200);
    assert_eq!(get(api, "/healthz").await, 200);
    assert_eq!(get(api, "/sse?channel=a").await, 404);
    assert_eq!(get(main, "/healthz").await, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn beyond_loopback_the_api_needs_a_key_or_an_explicit_open() {
    let (status, _, stderr) = run_to_exit(&["--listen", "0.0.0.0:0"], &[]).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("auth.api_keys"), "{stderr}");
    assert!(stderr.contains("auth.api_open"), "{stderr}");
    // Validation alone (no socket is opened beyond loopback here).
    let toml = |extra: &str| format!("[server]\nlisten = \"0.0.0.0:8080\"\n{extra}");
    assert!(Config::from_toml(&toml("")).is_err());
    assert!(Config::from_toml(&toml("[auth]\napi_open = true\n")).is_ok());
    assert!(Config::from_toml(&toml("[auth]\napi_keys = [\"k\"]\n")).is_ok());
    // An internal API listener on loopback makes the public one fine without a key.
    assert!(Config::from_toml(&toml("[auth]\napi_listen = \"127.0.0.1:9090\"\n")).is_ok());
}

// --- limits ------------------------------------------------------------------------------------

#[tokio::test]
async fn max_connections_answers_429_with_retry_after() {
    let node = Node::with(|c| c.limits.max_connections = 1).await;
    let first = WsClient::connect(&node).await;
    let (status, _) = ws_refused(&node, "/ws", &[]).await;
    assert_eq!(status, 429);
    let resp = sse_client()
        .get(node.url("/sse?channel=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "max_connections")],
        |v| v >= 2.0,
    )
    .await;
    drop(first);
    // The slot comes back once the first connection is gone.
    let addr = node.addr;
    eventually("slot freed", || async move {
        WsClient::connect_with(addr, "/ws", &[]).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn max_connections_per_user_counts_tokens_on_every_transport() {
    let node = Node::with(|c| {
        secured(c);
        c.limits.max_connections_per_user = 1;
    })
    .await;
    let t = token("henry", &[]);
    let _first = ws(&node, &[("authorization", &bearer(&t))]).await;
    let (status, _) = ws_refused(&node, "/ws", &[("authorization", &bearer(&t))]).await;
    assert_eq!(status, 429);
    let sse = Sse::open_with(&sse_client(), &node, &format!("channel=a&token={t}"), &[]).await;
    assert_eq!(sse.status, 429);
    assert_eq!(
        sse.body_json().await["error"]["code"],
        "too_many_user_connections"
    );
    let mut late = WsClient::connect(&node).await;
    late.send_json(&json!({"id": 1, "op": "connect", "token": t}))
        .await;
    let (code, seen) = late.until_close().await;
    assert_eq!(code, Some(4029));
    assert_eq!(seen[0]["error"]["code"], "too_many_user_connections");
    // Another user is not affected.
    ws(&node, &[("authorization", &bearer(&token("ivy", &[])))]).await;
}

#[tokio::test]
async fn per_ip_connection_rate_answers_429() {
    let node = Node::with(|c| {
        c.limits.connection_rate_per_ip = 0.01;
        c.limits.connection_burst_per_ip = 2;
    })
    .await;
    for _ in 0..2 {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        assert_eq!(
            client
                .get(node.url("/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let resp = client.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let (_, body) = json_response(resp).await;
    assert_eq!(body["error"]["code"], "connection_rate_limited");
    // /metrics is rate limited too: read the counter in process.
    let mut node = node;
    let running = node.take();
    let rejected = running
        .node()
        .metrics()
        .limit_rejections
        .with_label_values(&["connection_rate_per_ip"])
        .get();
    assert!(rejected >= 1, "{rejected}");
    running.shutdown().await;
}

#[tokio::test]
async fn command_flood_is_refused_then_closed_with_4008() {
    let node = Node::with(|c| {
        c.limits.command_rate = 0.01;
        c.limits.command_burst = 3;
    })
    .await;
    let mut c = WsClient::connect(&node).await;
    for _ in 0..3 {
        c.ping().await;
    }
    for _ in 0..3 {
        let e = c.err(json!({"op": "ping"}), "rate_limited").await;
        assert!(e["message"].as_str().unwrap().contains("retry in"), "{e}");
    }
    c.send_json(&json!({"id": 99, "op": "ping"})).await;
    let (code, seen) = c.until_close().await;
    assert_eq!(code, Some(4008));
    assert_eq!(seen[0]["error"]["code"], "rate_limited");
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "command_rate")],
        |v| v >= 4.0,
    )
    .await;
}

#[tokio::test]
async fn malformed_commands_count_against_the_rate_too() {
    let node = Node::with(|c| {
        c.limits.command_rate = 0.01;
        c.limits.command_burst = 1;
    })
    .await;
    let mut c = WsClient::connect(&node).await;
    c.send_text("{nope").await;
    assert_eq!(c.recv().await["error"]["code"], "malformed_json");
    c.send_text("{nope").await;
    assert_eq!(c.recv().await["error"]["code"], "rate_limited");
    c.send_text("{nope").await;
    let (code, _) = c.until_close().await;
    assert_eq!(code, Some(4008));
}

#[tokio::test]
async fn connections_that_never_subscribe_are_closed_4009() {
    // Long enough that the ping below is answered before the timeout on a busy machine.
    let node = Node::with(|c| c.limits.idle_timeout = Duration::from_secs(2)).await;
    let mut idle = WsClient::connect(&node).await;
    idle.ping().await;
    let (code, _) = idle.until_close().await;
    assert_eq!(code, Some(4009));
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "idle_timeout")],
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test]
async fn max_subscriptions_is_counted() {
    let node = Node::with(|c| c.client.max_subscriptions = 1).await;
    let mut c = WsClient::connect(&node).await;
    c.subscribe("a").await;
    sub_err(&mut c, "b", "too_many_subscriptions").await;
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "max_subscriptions")],
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let node = Node::with(|c| c.limits.handshake_timeout = Duration::from_millis(300)).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The rest of the headers never come: the server must hang up (with or without a 408).
    let mut buf = Vec::new();
    let read = within("server to close", stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok() || !buf.is_empty());
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    wait_metric(
        &node,
        "gateway_limit_rejections_total",
        &[("limit", "handshake_timeout")],
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test]
async fn huge_frame_header_closes_1009_at_once() {
    let node = Node::default().await;
    let mut raw = RawWs::connect(node.addr, "/ws").await;
    // FIN + text, masked, 64-bit length 2^62, mask key; no payload follows.
    let mut header = vec![0x81, 0xFF];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&header).await.unwrap();
    assert_eq!(raw.expect_close().await, Some(1009));
}

#[tokio::test]
async fn security_settings_come_from_the_environment_too() {
    let mut proc = GatewayProcess::spawn(
        &["--listen", "127.0.0.1:0"],
        &[
            ("GATEWAY__AUTH__API_KEYS", "key-a,key-b"),
            (
                "GATEWAY__AUTH__JWT_HS256_KEYS",
                &format!("{KEY_OLD},{KEY_NEW}"),
            ),
            ("GATEWAY__CHANNELS__NAMESPACES__CHAT__SUBSCRIBE", "token"),
            ("GATEWAY__ORIGIN__ALLOWED", "https://app.example.com"),
        ],
    );
    let addr = proc.listening().await;
    assert_eq!(publish_with(addr, Some("apikey key-b")).await.0, 200);
    assert_eq!(publish_with(addr, None).await.0, 401);
    let mut anon = WsClient::connect_addr(addr, "/ws").await;
    sub_err(&mut anon, "chat:x", "unauthorized").await;
    let t = hs256(
        KEY_OLD,
        json!({"sub": "env", "exp": now() + 60, "channels": ["chat:x"]}),
    );
    let mut user = WsClient::connect_addr(addr, &format!("/ws?token={t}")).await;
    user.subscribe("chat:x").await;
    let (status, _) =
        match WsClient::connect_with(addr, "/ws", &[("origin", "https://evil.example")]).await {
            Ok(_) => panic!("foreign origin let in"),
            Err(refused) => refused,
        };
    assert_eq!(status, 403);
}

#[tokio::test]
async fn long_poll_checks_origin_token_and_channels_like_sse() {
    let node = Node::with(|c| {
        secured(c);
        origins(c);
    })
    .await;
    let poll = |query: String, origin: Option<&'static str>| {
        let mut req = http().get(node.url(&format!("/poll?{query}&timeout=0")));
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        async move { json_response(req.send().await.unwrap()).await }
    };
    let t = token("pat", &["chat:p"]);
    assert_eq!(poll(format!("channel=chat:p&token={t}"), None).await.0, 200);
    assert_error(
        &poll("channel=chat:p".into(), None).await,
        401,
        "unauthorized",
    );
    assert_error(
        &poll(format!("channel=chat:q&token={t}"), None).await,
        403,
        "forbidden",
    );
    assert_error(
        &poll("channel=chat:p&token=forged".into(), None).await,
        401,
        "invalid_token",
    );
    assert_error(
        &poll(
            format!("channel=chat:p&token={t}"),
            Some("https://evil.example.net"),
        )
        .await,
        403,
        "origin_not_allowed",
    );
    let resp = http()
        .get(node.url("/poll?channel=free&timeout=0"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test]
async fn rs256_keys_from_a_pem_file() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("rsa.pem");
    let public = dir.path().join("rsa.pub.pem");
    // The ring-based rcgen cannot make RSA keys; the openssl command line can.
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ],
        vec!["pkey", "-pubout", "-in"],
    ] {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(&args);
        if args[0] == "genpkey" {
            cmd.arg(&private);
        } else {
            cmd.arg(&private).arg("-out").arg(&public);
        }
        let status = cmd.status().expect("openssl (installed by .ci/run)");
        assert!(status.success(), "openssl {args:?}");
    }
    let node = Node::with(|c| {
        secured(c);
        c.auth.jwt_public_keys = vec![public.clone()];
    })
    .await;
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let claims = json!({"sub": "rita", "exp": now() + 60, "channels": ["chat:r"]});
    let t = encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    let mut c = ws(&node, &[("authorization", &bearer(&t))]).await;
    c.subscribe("chat:r").await;
    // The same claims signed with HS256 using the public key as the secret (algorithm
    // confusion) are refused.
    let pem = std::fs::read(&public).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&pem),
    )
    .unwrap();
    let (status, _) = ws_refused(&node, "/ws", &[("authorization", &bearer(&confused))]).await;
    assert_eq!(status, 401);
}
