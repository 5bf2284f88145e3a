//! `limits.fresh_channels_per_request` and `limits.fresh_channels_per_second` (#12.5): channels
//! the node holds no subscription for are charged to the client's IP before any work is done;
//! over a limit, `/poll` and `/sse` answer 429 `too_many_fresh_channels` and a WebSocket
//! subscribe gets that error while the connection stays. Channels the node already holds are
//! free.

use crate::support::*;
use serde_json::{json, Value};

/// 4 fresh channels per request, and a bucket of 4 that refills one token per 100 s: what the
/// test spends is never given back while it runs, whatever the machine's speed.
async fn limited_node() -> Node {
    Node::with(|c| {
        c.limits.fresh_channels_per_request = 4;
        c.limits.fresh_channels_per_second = 0.01;
    })
    .await
}

async fn poll_channels(node: &Node, channels: &[&str]) -> reqwest::Response {
    let query = channel_query(channels);
    within(
        "poll",
        http()
            .get(node.url(&format!("/poll?{query}&timeout=0")))
            .send(),
    )
    .await
    .expect("poll")
}

async fn assert_too_many_fresh(resp: reqwest::Response, limit: &str) {
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let got = json_response(resp).await;
    assert_error(&got, 429, "too_many_fresh_channels");
    let message = got.1["error"]["message"].as_str().unwrap();
    assert!(message.contains(limit), "{message} names {limit}");
    assert!(retry.is_some(), "429 without Retry-After: {got:?}");
}

#[tokio::test]
async fn fresh_channels_are_limited_per_request_and_per_ip() {
    let node = limited_node().await;
    let fresh = |i: usize| format!("fresh:{i}");

    // 5 fresh channels in one poll: over the per-request limit, and nothing is charged.
    let five: Vec<String> = (0..5).map(fresh).collect();
    let five: Vec<&str> = five.iter().map(String::as_str).collect();
    assert_too_many_fresh(
        poll_channels(&node, &five).await,
        "limits.fresh_channels_per_request",
    )
    .await;

    // A WebSocket subscriber holds `held`: 1 of the 4 tokens.
    let mut holder = WsClient::connect(&node).await;
    holder.subscribe("held").await;

    // `held` plus 3 fresh channels: within both limits (3 tokens, none left).
    let resp = poll_channels(&node, &["held", "fresh:a", "fresh:b", "fresh:c"]).await;
    let (status, body) = json_response(resp).await;
    assert_eq!(status, 200, "{body}");

    // A held channel costs nothing, on another connection too.
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe("held").await;
    // A fresh one is refused with the error reply; the connection stays and works.
    let error = ws
        .err(
            json!({"op": "subscribe", "channel": "fresh:d"}),
            "too_many_fresh_channels",
        )
        .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("limits.fresh_channels_per_second"),
        "{error}"
    );
    ws.ping().await;
    // Refused means not subscribed: unsubscribing it is an error, `held` still delivers.
    ws.err(
        json!({"op": "unsubscribe", "channel": "fresh:d"}),
        "not_subscribed",
    )
    .await;
    publish(&node, "held", json!("x")).await;
    let push: Value = ws.push().await;
    assert_eq!(push["channel"], "held", "{push}");

    // SSE: a fresh channel is refused with 429, a held one streams.
    let sse = Sse::open_with(&sse_client(), &node, "channel=held&channel=fresh:e", &[]).await;
    assert_eq!(sse.status, 429);
    let body = sse.body_json().await;
    assert_eq!(body["error"]["code"], "too_many_fresh_channels", "{body}");
    let mut sse = Sse::open(&node, &["held"]).await;
    sse.connected().await;

    let text = metrics(&node).await;
    for (limit, at_least) in [
        ("fresh_channels_per_request", 1.0),
        ("fresh_channels_per_second", 2.0),
    ] {
        let count =
            metric(&text, "gateway_limit_rejections_total", &[("limit", limit)]).unwrap_or(0.0);
        assert!(count >= at_least, "{limit}: {count}");
    }
}

#[tokio::test]
async fn limits_of_zero_turn_the_fresh_channel_limits_off() {
    let node = Node::with(|c| {
        c.limits.fresh_channels_per_request = 0;
        c.limits.fresh_channels_per_second = 0.0;
    })
    .await;
    let many: Vec<String> = (0..300).map(|i| format!("many:{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    // 256 is client.max_subscriptions: the only limit left.
    let (status, body) = json_response(poll_channels(&node, &many[..256]).await).await;
    assert_eq!(status, 200, "{body}");
    let mut ws = WsClient::connect(&node).await;
    for channel in &many[256..] {
        ws.subscribe(channel).await;
    }
}
