//! The holes of issue #13 item 4, each reproduced against a real node over real sockets: `nbf`,
//! token times at the end of time, `refresh` revoking subscriptions, the idle timeout, cursors
//! the server must accept back, per-IP limits behind trusted proxies, a keyless API behind a
//! proxy, and connections that stall before their first request (cleartext and TLS).
//! docs/security.md names the test of every row.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use gateway::config::{Access, Config, NamespaceConfig};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "holes-secret-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `claims` as an HS256 token (raw JSON, so claims may be numbers no Rust integer holds).
fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(KEY.as_bytes()),
    )
    .unwrap()
}

/// HS256 keys with a 30 s leeway; `chat:` needs the token to list the channel.
fn secured(config: &mut Config) {
    config.auth.jwt_hs256_keys = vec![KEY.into()];
    config.auth.jwt_leeway = Duration::from_secs(30);
    config.channels.namespaces.insert(
        "chat".into(),
        NamespaceConfig {
            subscribe: Access::Token,
            publish: Access::None,
            ..NamespaceConfig::default()
        },
    );
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The status and body of a WebSocket handshake carrying `token`; 101 means accepted.
async fn ws_handshake(node: &Node, token: &str) -> Result<WsClient, (u16, Value)> {
    WsClient::connect_with(node.addr, "/ws", &[("authorization", &bearer(token))]).await
}

// --- token times ----------------------------------------------------------------------------

#[tokio::test]
async fn a_token_not_valid_yet_is_refused_outside_the_leeway() {
    let node = Node::with(secured).await;
    let early = hs256(json!({"sub": "ann", "exp": now() + 7200, "nbf": now() + 3600}));
    let (status, body) = ws_handshake(&node, &early).await.err().expect("refused");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_token", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("nbf"),
        "{body}"
    );
    let sse = Sse::open_with(
        &sse_client(),
        &node,
        "channel=a",
        &[("authorization", &bearer(&early))],
    )
    .await;
    assert_eq!(sse.status, 401);
    // The same token as a `connect` command: error, close 4002.
    let mut c = WsClient::connect(&node).await;
    c.err(json!({"op": "connect", "token": early}), "invalid_token")
        .await;
    assert_eq!(c.until_close().await.0, Some(4002));
    // Within the leeway (clock skew) it is accepted.
    let skewed = hs256(json!({"sub": "ann", "exp": now() + 7200, "nbf": now() + 10}));
    let mut ok = ws_handshake(&node, &skewed).await.expect("accepted");
    ok.ping().await;
}

#[tokio::test]
async fn token_times_at_the_end_of_time_never_panic() {
    let node = Node::with(secured).await;
    // `exp` at u64::MAX is a valid (if unwise) token: the connection works; before the fix the
    // expiry timer overflowed and the handshake got no answer.
    let forever = hs256(json!({"sub": "bo", "exp": u64::MAX, "iat": u64::MAX}));
    let mut c = ws_handshake(&node, &forever)
        .await
        .unwrap_or_else(|e| panic!("handshake: {e:?}"));
    c.subscribe("free").await;
    c.ok(json!({"op": "refresh", "token": forever})).await;
    c.ping().await;
    let mut framed = WsClient::connect(&node).await;
    let r = framed.ok(json!({"op": "connect", "token": forever})).await;
    assert_eq!(r["expires_at"], json!(u64::MAX));
    framed.ping().await;
    let mut sse = Sse::open_with(
        &sse_client(),
        &node,
        "channel=free",
        &[("authorization", &bearer(&forever))],
    )
    .await;
    sse.assert_stream();
    sse.connected().await;

    // Times no u64 holds, or that lie beyond any clock: `invalid_token`, never a panic.
    for claims in [
        json!({"sub": "bo", "exp": u64::MAX, "nbf": u64::MAX}),
        json!({"sub": "bo", "exp": 1e30}),
        json!({"sub": "bo", "exp": now() + 60, "nbf": 1e30}),
        json!({"sub": "bo", "exp": now() + 60, "nbf": -1}),
        json!({"sub": "bo", "exp": -1}),
    ] {
        let (status, body) = ws_handshake(&node, &hs256(claims.clone()))
            .await
            .err()
            .unwrap_or_else(|| panic!("{claims} accepted"));
        assert_eq!(status, 401, "{claims}");
        assert!(
            body["error"]["code"] == "invalid_token" || body["error"]["code"] == "token_expired",
            "{claims}: {body}"
        );
    }
    // The node still serves.
    c.publish("free", json!(1)).await;
}

// --- refresh --------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_unsubscribes_what_the_new_token_no_longer_allows() {
    let node = Node::with(secured).await;
    let wide = hs256(json!({"sub": "cy", "exp": now() + 3600, "channels": ["chat:a", "chat:b"]}));
    let narrow = hs256(json!({"sub": "cy", "exp": now() + 3600, "channels": ["chat:a"]}));
    let mut c = ws_handshake(&node, &wide).await.expect("accepted");
    c.subscribe("chat:a").await;
    c.subscribe("chat:b").await;
    c.subscribe("free").await;
    c.ok(json!({"op": "refresh", "token": narrow})).await;
    assert_eq!(
        c.push().await,
        json!({"unsubscribed": {"channel": "chat:b", "reason": "permission_revoked"}})
    );
    // chat:b is no longer delivered; chat:a and the open channel still are.
    publish(&node, "chat:b", json!("secret")).await;
    publish(&node, "chat:a", json!("a")).await;
    publish(&node, "free", json!("f")).await;
    let first = c.push().await;
    assert_eq!(
        (&first["channel"], &first["data"]),
        (&json!("chat:a"), &json!("a"))
    );
    let second = c.push().await;
    assert_eq!(
        (&second["channel"], &second["data"]),
        (&json!("free"), &json!("f"))
    );
    c.err(
        json!({"op": "unsubscribe", "channel": "chat:b"}),
        "not_subscribed",
    )
    .await;
    c.err(json!({"op": "subscribe", "channel": "chat:b"}), "forbidden")
        .await;
    // A refresh that narrows nothing revokes nothing.
    c.ok(json!({"op": "refresh", "token": narrow})).await;
    c.ping().await;
    assert_eq!(c.buffered_pushes(), 0);
}

// --- idle timeout ---------------------------------------------------------------------------

#[tokio::test]
async fn the_idle_timeout_runs_whenever_no_subscription_is_held() {
    // Long enough that each client's first command is answered before the timeout on a busy
    // machine.
    let node = Node::with(|c| c.limits.idle_timeout = Duration::from_secs(3)).await;
    // Subscribed, then unsubscribed: idle again, closed 4009 (before the fix the first
    // subscribe disarmed the timer for good).
    let mut left = WsClient::connect(&node).await;
    left.subscribe("a").await;
    left.ok(json!({"op": "unsubscribe", "channel": "a"})).await;
    // Holding a subscription: kept. `idle` below is opened later and closed first, so by then
    // `holder` has held its subscription for longer than the timeout.
    let mut holder = WsClient::connect(&node).await;
    holder.subscribe("b").await;
    let mut idle = WsClient::connect(&node).await;
    assert_eq!(left.until_close().await.0, Some(4009));
    assert_eq!(idle.until_close().await.0, Some(4009));
    holder.ping().await;
    publish(&node, "b", json!(1)).await;
    assert_eq!(holder.push().await["data"], json!(1));
}

// --- cursors --------------------------------------------------------------------------------

/// `n` distinct channel names of `len` bytes.
fn long_channels(n: usize, len: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{i:03}{}", "c".repeat(len - 3)))
        .collect()
}

fn refs(channels: &[String]) -> Vec<&str> {
    channels.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn a_stream_whose_cursor_could_outgrow_the_limit_is_refused_up_front() {
    let node = Node::with(|c| c.client.max_subscriptions = 256).await;
    let channels = long_channels(256, 200);
    let query = channel_query(&refs(&channels));
    let sse = Sse::open_with(&sse_client(), &node, &query, &[]).await;
    assert_eq!(sse.status, 400);
    let body = sse.body_json().await;
    assert_eq!(body["error"]["code"], "cursor_too_long", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("65536"),
        "{body}"
    );
    let poll = get(&node, &format!("/poll?{query}")).await;
    assert_error(&poll, 400, "cursor_too_long");
}

#[tokio::test]
async fn the_widest_accepted_sse_stream_resumes_from_its_own_cursor() {
    let node = Node::with(|c| {
        c.client.max_subscriptions = 256;
        // Every channel of these requests is fresh: the fresh-channel limits are another
        // test's subject.
        c.limits.fresh_channels_per_request = 0;
        c.limits.fresh_channels_per_second = 0.0;
    })
    .await;
    // Just under the bound: 256 channels of 110 bytes.
    let channels = long_channels(256, 110);
    let names = refs(&channels);
    let mut sse = Sse::open(&node, &names).await;
    sse.connected().await;
    for name in &names {
        publish(&node, name, json!(1)).await;
    }
    let mut last = String::new();
    let mut held = Vec::new();
    for _ in 0..names.len() {
        let (id, p) = sse.publication().await;
        last = id;
        held.push(p);
    }
    // The event id is compact (#14.6); the full form a client builds from the positions it
    // holds names every channel and is the long one: both resume the stream.
    let full = gateway::cursor::encode_tagged(held.iter().map(|p| {
        (
            p["channel"].as_str().unwrap(),
            p["epoch"].as_str().unwrap(),
            p["offset"].as_u64().unwrap(),
            p["tag"].as_str().and_then(backplane::parse_tag),
        )
    }));
    assert!(full.len() > 40_000, "cursor of {} bytes", full.len());
    let mut resumed = Vec::new();
    for cursor in [last, full] {
        let mut sse = Sse::resume(&node, &names, &cursor).await;
        sse.assert_stream();
        sse.connected().await;
        resumed.push(sse);
    }
    publish(&node, names[7], json!("next")).await;
    for mut sse in resumed {
        let (_, p) = sse.publication().await;
        assert_eq!(
            (&p["channel"], &p["data"]),
            (&json!(names[7]), &json!("next"))
        );
    }
}

#[tokio::test]
async fn the_widest_accepted_poll_resumes_from_its_own_cursor() {
    let node = Node::with(|c| {
        c.client.max_subscriptions = 256;
        // Every channel of these requests is fresh: the fresh-channel limits are another
        // test's subject.
        c.limits.fresh_channels_per_request = 0;
        c.limits.fresh_channels_per_second = 0.0;
    })
    .await;
    let channels = long_channels(256, 40);
    let query = channel_query(&refs(&channels));
    let (status, first) = get(&node, &format!("/poll?{query}")).await;
    assert_eq!(status, 200, "{first}");
    for name in &channels {
        publish(&node, name, json!(1)).await;
    }
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let (status, second) = get(&node, &format!("/poll?{query}&cursor={cursor}")).await;
    assert_eq!(status, 200, "{second}");
    let cursor = second["cursor"].as_str().unwrap().to_string();
    let (status, third) = get(&node, &format!("/poll?{query}&cursor={cursor}&timeout=0")).await;
    assert_eq!(
        status,
        200,
        "its own cursor of {} bytes: {third}",
        cursor.len()
    );
}

// --- client IP behind trusted proxies -------------------------------------------------------

async fn get_from(client: &reqwest::Client, node: &Node, forwarded_for: Option<&str>) -> u16 {
    let mut req = client.get(node.url("/healthz"));
    if let Some(xff) = forwarded_for {
        req = req.header("x-forwarded-for", xff);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn per_ip_limits_follow_x_forwarded_for_from_trusted_proxies_only() {
    let limited = |c: &mut Config| {
        c.limits.connection_rate_per_ip = 0.001;
        c.limits.connection_burst_per_ip = 1;
    };
    // The test process is the proxy (127.0.0.1): one kept-alive connection carries every
    // client, and each request counts for the client X-Forwarded-For names.
    let node = Node::with(|c| {
        limited(c);
        c.limits.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let proxy = http();
    assert_eq!(get_from(&proxy, &node, Some("203.0.113.1")).await, 200);
    assert_eq!(get_from(&proxy, &node, Some("203.0.113.1")).await, 429);
    // A client cannot pick another address by writing one left of what the proxy appended.
    assert_eq!(
        get_from(&proxy, &node, Some("198.51.100.9, 203.0.113.1")).await,
        429
    );
    assert_eq!(get_from(&proxy, &node, Some("203.0.113.2")).await, 200);
    assert_eq!(get_from(&proxy, &node, Some("2001:db8:1:1::1")).await, 200);
    // The same IPv6 /64.
    assert_eq!(get_from(&proxy, &node, Some("2001:db8:1:1::2")).await, 429);

    // Not a trusted proxy: the header is ignored, the TCP peer is the client.
    let node = Node::with(limited).await;
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    assert_eq!(get_from(&fresh(), &node, Some("203.0.113.1")).await, 200);
    assert_eq!(get_from(&fresh(), &node, Some("203.0.113.2")).await, 429);
}

#[tokio::test]
async fn trusted_proxies_must_be_addresses_or_cidr_blocks() {
    for bad in ["10.0.0.0/33", "nginx.internal", "fd00::/200"] {
        let mut config = test_config();
        config.limits.trusted_proxies = vec![bad.into()];
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("limits.trusted_proxies") && err.contains(bad),
            "{err}"
        );
    }
    let mut config = test_config();
    config.limits.trusted_proxies = vec!["10.0.0.0/8".into(), "::1".into(), "fd00::/8".into()];
    config.validate().unwrap();
}

// --- a keyless API behind a proxy -----------------------------------------------------------

async fn publish_through(node: &Node, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = http()
        .post(node.url("/api/publish"))
        .body(r#"{"channel":"a","data":1}"#);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    json_response(req.send().await.unwrap()).await
}

#[tokio::test]
async fn a_keyless_api_refuses_requests_that_came_through_a_proxy() {
    // Loopback, no key: allowed for direct local callers only.
    let node = Node::default().await;
    assert_eq!(publish_through(&node, &[]).await.0, 200);
    for header in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let value = if header == "forwarded" {
            "for=203.0.113.1"
        } else {
            "203.0.113.1"
        };
        let got = publish_through(&node, &[(header, value)]).await;
        assert_error(&got, 401, "invalid_api_key");
        let history = get(&node, "/api/history?channel=a").await;
        assert_eq!(history.0, 200);
    }
    let proxied = http()
        .get(node.url("/api/history?channel=a"))
        .header("x-forwarded-for", "203.0.113.1")
        .send()
        .await
        .unwrap();
    assert_error(&json_response(proxied).await, 401, "invalid_api_key");
    // A trusted proxy's requests are proxied even without the header.
    let node = Node::with(|c| c.limits.trusted_proxies = vec!["127.0.0.1".into()]).await;
    assert_error(&publish_through(&node, &[]).await, 401, "invalid_api_key");
    // With keys, the key decides; `auth.api_open` says open on purpose.
    let node = Node::with(|c| c.auth.api_keys = vec!["k".into()]).await;
    let got = publish_through(
        &node,
        &[
            ("x-forwarded-for", "203.0.113.1"),
            ("authorization", "apikey k"),
        ],
    )
    .await;
    assert_eq!(got.0, 200, "{got:?}");
    let node = Node::with(|c| c.auth.api_open = true).await;
    assert_eq!(
        publish_through(&node, &[("x-forwarded-for", "203.0.113.1")])
            .await
            .0,
        200
    );
}

// --- handshake timeout ----------------------------------------------------------------------

/// Sends `bytes` (maybe none) and waits for the server to hang up; returns what it sent.
async fn stalled<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = Vec::new();
    // A reset instead of a clean close is a hang-up too.
    let _ = within("the server to hang up", stream.read_to_end(&mut buf)).await;
    buf
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Short enough to keep the test quick, long enough that a client that does send its request
/// (or completes its TLS handshake, debug build) makes it on a busy 2-core machine.
fn quick_handshake(c: &mut Config) {
    c.limits.handshake_timeout = Duration::from_secs(2);
}

async fn handshake_timeouts(node: &Node) -> f64 {
    metric(
        &metrics(node).await,
        "gateway_limit_rejections_total",
        &[("limit", "handshake_timeout")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn cleartext_connections_that_stall_before_a_request_are_closed() {
    let node = Node::with(quick_handshake).await;
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("half a preface", &PREFACE[..10]),
        (
            "a preface and no request",
            &[PREFACE, SETTINGS].concat()[..],
        ),
    ] {
        let before = handshake_timeouts(&node).await;
        let stream = TcpStream::connect(node.addr).await.unwrap();
        let answer = stalled(stream, bytes).await;
        assert!(
            !String::from_utf8_lossy(&answer).contains("200"),
            "{what}: {answer:?}"
        );
        wait_metric(
            &node,
            "gateway_limit_rejections_total",
            &[("limit", "handshake_timeout")],
            |v| v > before,
        )
        .await;
    }
    // A connection that made its request in time is not cut off afterwards: the stalled
    // connection opened after it is closed first, so the stream outlived a handshake timeout.
    let mut sse = Sse::open(&node, &["a"]).await;
    sse.connected().await;
    stalled(TcpStream::connect(node.addr).await.unwrap(), b"").await;
    publish(&node, "a", json!(1)).await;
    assert_eq!(sse.publication().await.1["data"], json!(1));
}

#[tokio::test]
async fn tls_connections_that_stall_in_the_handshake_or_the_preface_are_closed() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    let node = Node::with(|c| {
        quick_handshake(c);
        c.tls.cert_file = Some(dir.path().join("cert.pem"));
        c.tls.key_file = Some(dir.path().join("key.pem"));
    })
    .await;
    // No ClientHello at all, or half of one.
    for bytes in [&b""[..], &[0x16, 0x03, 0x01, 0x00, 0xff, 0x01][..]] {
        let stream = TcpStream::connect(node.addr).await.unwrap();
        assert!(stalled(stream, bytes).await.is_empty());
    }
    // The TLS handshake done (ALPN h2), then half a preface.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let tls = within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stalled(tls, &PREFACE[..10]).await;
    // Read in process: /metrics is HTTPS here.
    let mut node = node;
    let running = node.take();
    let timeouts = running
        .node()
        .metrics()
        .limit_rejections
        .with_label_values(&["handshake_timeout"]);
    eventually("three handshake timeouts counted", || {
        let n = timeouts.get();
        async move { n >= 3 }
    })
    .await;
    running.shutdown().await;
}
