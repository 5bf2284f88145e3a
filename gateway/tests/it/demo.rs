//! The files a node serves (`/client.js`, the demo page at `/`) and the demo price publisher.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn serves_the_client_and_the_demo_page_with_validators() {
    let node = Node::default().await;
    for (path, content_type, marker) in [
        (
            "/client.js",
            "text/javascript; charset=utf-8",
            "export function connect",
        ),
        (
            "/",
            "text/html; charset=utf-8",
            "import { connect, TRANSPORTS } from '/client.js'",
        ),
    ] {
        let resp = http().get(node.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let headers = resp.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let etag = headers["etag"].to_str().unwrap().to_string();
        assert!(resp.text().await.unwrap().contains(marker), "{path}");

        // A cached copy is revalidated, not downloaded again.
        let again = http()
            .get(node.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert!(again.bytes().await.unwrap().is_empty());
    }
    let resp = http().post(node.url("/client.js")).send().await.unwrap();
    assert_error(&json_response(resp).await, 405, "method_not_allowed");
}

#[tokio::test]
async fn the_demo_page_can_be_turned_off_but_not_the_client() {
    let node = Node::with(|c| c.demo.page = false).await;
    assert_error(&get(&node, "/").await, 404, "not_found");
    assert_eq!(get_text(&node, "/client.js").await.0, 200);
}

#[tokio::test]
async fn the_demo_publisher_feeds_price_channels_only_when_asked() {
    let node = Node::with(|c| {
        c.demo.publisher = true;
        c.demo.publisher_interval = Duration::from_millis(50);
    })
    .await;
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe("prices:ACME").await;
    for _ in 0..2 {
        let p = ws.push().await;
        assert_eq!(p["channel"], "prices:ACME");
        assert_eq!(p["data"]["symbol"], "ACME");
        assert!(p["data"]["price"].as_f64().unwrap() > 0.0, "{p}");
    }
    // As the page subscribes: the current quote at once, then deltas of what changed.
    let mut page = WsClient::connect(&node).await;
    let result = page
        .ok(
            serde_json::json!({"op": "subscribe", "channel": "prices:GLOBEX",
                               "since": "latest", "delta": true}),
        )
        .await;
    let first = page.push().await;
    if result["latest"] == true {
        assert!(
            first.get("data").is_some(),
            "the latest value in full: {first}"
        );
    }
    let mut saw_delta = false;
    while !saw_delta {
        let p = page.push().await;
        if let Some(delta) = p.get("delta") {
            assert!(delta.get("symbol").is_none(), "only what changed: {p}");
            saw_delta = true;
        }
    }

    // Off by default: nothing is ever published on the price channels.
    let quiet = Node::default().await;
    let (status, body) = history(&quiet, "channel=prices:ACME").await;
    assert_eq!(status, 200);
    assert_eq!(body["top"], 0, "{body}");
}
