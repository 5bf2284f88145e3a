//! HTTP API: publish, history paging, error shapes, health and metrics.

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn publish_assigns_gap_free_offsets_in_one_epoch() {
    let node = Node::default().await;
    let ch = channel("pub");
    let first = publish(&node, &ch, json!({"n": 1})).await;
    assert_eq!(first["channel"], ch.as_str());
    assert_eq!(first["offset"], 1);
    let epoch = first["epoch"].clone();
    assert!(
        epoch.as_str().is_some_and(|e| !e.is_empty()),
        "epoch: {first}"
    );
    for n in 2..=5u64 {
        let ack = publish(&node, &ch, json!({"n": n})).await;
        assert_eq!(ack["offset"], n, "{ack}");
        assert_eq!(ack["epoch"], epoch, "{ack}");
        assert_eq!(ack["channel"], ch.as_str());
    }
    // Another channel has its own sequence.
    let other = publish(&node, &channel("pub-other"), json!(null)).await;
    assert_eq!(other["offset"], 1);
}

#[tokio::test]
async fn history_returns_publications_in_order_with_data() {
    let node = Node::default().await;
    let ch = channel("hist");
    let payloads = [
        json!({"a": [1, 2, 3]}),
        json!("text"),
        json!(42),
        json!(null),
        json!({"nested": {"k": true}}),
    ];
    let mut epoch = Value::Null;
    for p in &payloads {
        epoch = publish(&node, &ch, p.clone()).await["epoch"].clone();
    }
    let (status, body) = history(&node, &format!("channel={}", enc(&ch))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], ch.as_str());
    assert_eq!(body["epoch"], epoch);
    assert_eq!(body["top"], 5);
    let pubs = body["publications"].as_array().expect("publications");
    assert_eq!(pubs.len(), 5, "{body}");
    for (i, p) in pubs.iter().enumerate() {
        assert_eq!(p["channel"], ch.as_str());
        assert_eq!(p["offset"], i as u64 + 1);
        assert_eq!(p["epoch"], epoch);
        assert_eq!(p["data"], payloads[i]);
    }
}

#[tokio::test]
async fn history_since_and_limit_page_through_everything() {
    let node = Node::default().await;
    let ch = channel("page");
    for n in 1..=7 {
        publish(&node, &ch, json!(n)).await;
    }
    let (status, body) = history(&node, &format!("channel={}&since=2&limit=2", enc(&ch))).await;
    assert_eq!(status, 200, "{body}");
    let offsets: Vec<u64> = body["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4]);
    assert_eq!(body["top"], 7);

    // Page with the last offset until the list is empty.
    let mut since = 0;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (status, body) = history(
            &node,
            &format!("channel={}&since={since}&limit=3", enc(&ch)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let pubs = body["publications"].as_array().unwrap();
        assert!(pubs.len() <= 3, "limit ignored: {body}");
        if pubs.is_empty() {
            break;
        }
        for p in pubs {
            seen.push(p["data"].as_u64().unwrap());
        }
        since = pubs.last().unwrap()["offset"].as_u64().unwrap();
    }
    assert_eq!(seen, (1..=7).collect::<Vec<u64>>());

    // since at the top: nothing left.
    let (_, body) = history(&node, &format!("channel={}&since=7", enc(&ch))).await;
    assert_eq!(body["publications"], json!([]));
}

#[tokio::test]
async fn history_limit_defaults_to_and_is_capped_by_max_page() {
    let node = Node::with(|c| c.history.max_page = 3).await;
    let ch = channel("maxpage");
    for n in 1..=5 {
        publish(&node, &ch, json!(n)).await;
    }
    let (status, body) = history(&node, &format!("channel={}", enc(&ch))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["publications"].as_array().unwrap().len(),
        3,
        "default limit should be history.max_page: {body}"
    );
    let ok = history(&node, &format!("channel={}&limit=3", enc(&ch))).await;
    assert_eq!(ok.0, 200, "{ok:?}");
    let too_big = history(&node, &format!("channel={}&limit=4", enc(&ch))).await;
    assert_error(&too_big, 400, "bad_request");
}

#[tokio::test]
async fn history_of_unknown_channel_is_empty() {
    let node = Node::default().await;
    let ch = channel("never");
    let (status, body) = history(&node, &format!("channel={}", enc(&ch))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], ch.as_str());
    assert_eq!(body["publications"], json!([]));
    assert_eq!(body["top"], 0);
    assert!(body["epoch"].is_string(), "{body}");
}

#[tokio::test]
async fn history_rejects_bad_query_params() {
    let node = Node::default().await;
    assert_error(&history(&node, "").await, 400, "bad_request");
    assert_error(&history(&node, "since=1").await, 400, "bad_request");
    assert_error(
        &history(&node, "channel=a&since=abc").await,
        400,
        "bad_request",
    );
    assert_error(
        &history(&node, "channel=a&since=-1").await,
        400,
        "bad_request",
    );
    assert_error(
        &history(&node, "channel=a&limit=x").await,
        400,
        "bad_request",
    );
    assert_error(&history(&node, "channel=").await, 400, "invalid_channel");
    assert_error(
        &history(&node, "channel=a%20b").await,
        400,
        "invalid_channel",
    );
}

#[tokio::test]
async fn publish_rejects_malformed_json() {
    let node = Node::default().await;
    for body in ["{not json", "", "{\"channel\": \"a\", \"data\": "] {
        let got = post_raw(&node, "/api/publish", body.to_string()).await;
        assert_error(&got, 400, "malformed_json");
    }
}

#[tokio::test]
async fn publish_rejects_missing_or_invalid_fields() {
    let node = Node::default().await;
    for body in [
        json!({"data": 1}),
        json!({"channel": "a"}),
        json!({"channel": 5, "data": 1}),
        json!({"channel": null, "data": 1}),
        json!([1, 2]),
        json!("just a string"),
    ] {
        let got = post_raw(&node, "/api/publish", body.to_string()).await;
        assert_error(&got, 400, "bad_request");
    }
}

#[tokio::test]
async fn reused_idempotency_key_with_other_data_is_409() {
    let node = Node::default().await;
    let ch = channel("idem");
    let body = |data: Value| json!({"channel": ch, "data": data, "idempotency_key": "order-1"});
    let first = post_raw(&node, "/api/publish", body(json!("a")).to_string()).await;
    assert_eq!(first.0, 200, "{first:?}");
    let retry = post_raw(&node, "/api/publish", body(json!("a")).to_string()).await;
    assert_eq!(retry, first, "same key, same data: the first ack");
    let other = post_raw(&node, "/api/publish", body(json!("b")).to_string()).await;
    assert_error(&other, 409, "idempotency_conflict");

    // A WebSocket client's keys live apart from the server API's: the same key is its own.
    let mut ws = WsClient::connect(&node).await;
    let publish = |data: Value| json!({"op": "publish", "channel": ch, "data": data, "idempotency_key": "order-1"});
    let from_client = ws.ok(publish(json!("c"))).await;
    assert_eq!(from_client["offset"], 2, "{from_client}");
    let error = ws.err(publish(json!("d")), "idempotency_conflict").await;
    assert!(error["message"].is_string(), "{error}");

    let (_, page) = history(&node, &format!("channel={ch}")).await;
    let stored: Vec<Value> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(
        stored,
        vec![json!("a"), json!("c")],
        "conflicts store nothing"
    );
}

#[tokio::test]
async fn publish_rejects_invalid_channel_names() {
    let node = Node::default().await;
    let long = "x".repeat(256);
    for name in [
        "",
        "a b",
        "tab\there",
        "new\nline",
        "nul\u{0}",
        "del\u{7f}",
        &long,
    ] {
        let got = post_raw(
            &node,
            "/api/publish",
            json!({"channel": name, "data": 1}).to_string(),
        )
        .await;
        assert_error(&got, 400, "invalid_channel");
    }
    // 255 bytes (multi-byte characters count as bytes) is the longest valid name.
    let max = "x".repeat(255);
    assert_eq!(publish(&node, &max, json!(1)).await["offset"], 1);
    let multibyte = "é".repeat(128); // 256 bytes
    let got = post_raw(
        &node,
        "/api/publish",
        json!({"channel": multibyte, "data": 1}).to_string(),
    )
    .await;
    assert_error(&got, 400, "invalid_channel");
    // Unicode and punctuation without whitespace are fine.
    assert_eq!(publish(&node, "news:été/1", json!(1)).await["offset"], 1);
}

#[tokio::test]
async fn publish_body_over_max_message_size_is_413() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let ch = channel("big");
    let big = json!({"channel": ch, "data": "y".repeat(2000)}).to_string();
    assert_error(
        &post_raw(&node, "/api/publish", big).await,
        413,
        "payload_too_large",
    );
    // A body that fits is accepted, and the rejected one was not stored.
    let small = json!({"channel": ch, "data": "y".repeat(100)}).to_string();
    let (status, body) = post_raw(&node, "/api/publish", small).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 1);
}

/// A publish body of exactly `len` bytes.
fn body_of_len(channel: &str, len: usize) -> String {
    let base = json!({"channel": channel, "data": ""}).to_string();
    let body = json!({"channel": channel, "data": "z".repeat(len - base.len())}).to_string();
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn publish_body_size_limit_is_inclusive() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let ch = channel("edge");
    let (status, body) = post_raw(&node, "/api/publish", body_of_len(&ch, 1000)).await;
    assert_eq!(
        status, 200,
        "a body of exactly max_message_size must be accepted: {body}"
    );
    assert_error(
        &post_raw(&node, "/api/publish", body_of_len(&ch, 1001)).await,
        413,
        "payload_too_large",
    );
}

#[tokio::test]
async fn chunked_publish_body_over_limit_is_413() {
    let node = Node::with(|c| c.websocket.max_message_size = 1000).await;
    let ch = channel("chunked");
    // No Content-Length: the limit must hold while the body streams in.
    let body = body_of_len(&ch, 3000).into_bytes();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(500).map(|c| Ok(c.to_vec())).collect();
    let stream = futures_util::stream::iter(chunks);
    let got = post_raw(&node, "/api/publish", reqwest::Body::wrap_stream(stream)).await;
    assert_error(&got, 413, "payload_too_large");

    // A small chunked body is fine.
    let small = body_of_len(&ch, 400).into_bytes();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        small.chunks(100).map(|c| Ok(c.to_vec())).collect();
    let (status, ack) = post_raw(
        &node,
        "/api/publish",
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(
        ack["offset"], 1,
        "the oversized body must not have been published"
    );
}

#[tokio::test]
async fn percent_encoded_unicode_channels() {
    let node = Node::default().await;
    let ch = "news/été:1";
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe(ch).await;
    let mut sse = Sse::open(&node, &[ch]).await;
    let connected = sse.connected().await;
    assert!(
        connected_channels(&connected).contains_key(ch),
        "{connected:?}"
    );
    publish(&node, ch, json!("ü")).await;
    assert_eq!(ws.push().await["channel"], ch);
    let (_, p) = sse.publication().await;
    assert_eq!(p["channel"], ch);
    assert_eq!(p["data"], "ü");
    let (status, body) = history(&node, &format!("channel={}", enc(ch))).await;
    assert_eq!(status, 200);
    assert_eq!(body["channel"], ch);
    assert_eq!(body["top"], 1);
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods() {
    let node = Node::default().await;
    assert_error(&get(&node, "/nope").await, 404, "not_found");
    assert_error(&get(&node, "/api/nope").await, 404, "not_found");
    assert_error(&get(&node, "/api/publish").await, 405, "method_not_allowed");
    assert_error(
        &post_raw(&node, "/api/history?channel=a", "{}").await,
        405,
        "method_not_allowed",
    );
    let resp = within(
        "DELETE",
        http()
            .delete(node.url("/api/publish"))
            .body(json!({"channel":"a","data":1}).to_string())
            .send(),
    )
    .await
    .unwrap();
    assert_error(&json_response(resp).await, 405, "method_not_allowed");
}

#[tokio::test]
async fn ws_echo_is_not_served_unless_enabled() {
    let node = Node::default().await;
    let got = get(&node, "/ws/echo").await;
    assert_eq!(got.0, 404, "{got:?}");
    let err = within(
        "handshake",
        tokio_tungstenite::connect_async(node.ws_url("/ws/echo")),
    )
    .await
    .expect_err("/ws/echo must not upgrade when websocket.echo is false");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 404)
        }
        other => panic!("expected HTTP 404, got {other:?}"),
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let node = Node::default().await;
    assert_eq!(get_text(&node, "/healthz").await.0, 200);
    assert_eq!(get_text(&node, "/readyz").await.0, 200);
}

#[tokio::test]
async fn metrics_expose_the_documented_series() {
    let node = Node::default().await;
    let ch = channel("metrics");

    let mut ws = WsClient::connect(&node).await;
    ws.subscribe(&ch).await;
    let mut sse = Sse::open(&node, &[&ch]).await;
    sse.connected().await;

    for n in 0..3 {
        publish(&node, &ch, json!(n)).await;
    }
    for _ in 0..3 {
        ws.push().await;
        sse.publication().await;
    }

    let text = metrics(&node).await;
    for name in [
        "gateway_connections",
        "gateway_subscriptions",
        "gateway_publications_total",
        "gateway_deliveries_total",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("# TYPE ") && l[7..].starts_with(name)),
            "no TYPE line for {name} in:\n{text}"
        );
    }
    let val = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
    };
    assert_eq!(val("gateway_connections", &[("transport", "ws")]), 1.0);
    assert_eq!(val("gateway_connections", &[("transport", "sse")]), 1.0);
    assert!(val("gateway_subscriptions", &[]) >= 1.0, "{text}");
    assert!(val("gateway_publications_total", &[]) >= 3.0, "{text}");
    assert!(val("gateway_deliveries_total", &[("transport", "ws")]) >= 3.0);
    assert!(val("gateway_deliveries_total", &[("transport", "sse")]) >= 3.0);
    assert_eq!(
        metric(&text, "gateway_slow_consumer_disconnects_total", &[]).unwrap_or(0.0),
        0.0
    );

    // The gauges go back down when the clients leave.
    drop(ws);
    drop(sse);
    wait_metric(&node, "gateway_connections", &[("transport", "ws")], |v| {
        v == 0.0
    })
    .await;
    wait_metric(&node, "gateway_connections", &[("transport", "sse")], |v| {
        v == 0.0
    })
    .await;
    wait_metric(&node, "gateway_subscriptions", &[], |v| v == 0.0).await;
}

/// `POST /api/publish {"publications": [...]}`: each publication answered in order, offsets of a
/// channel in list order and continuing the single publishes, history holding each.
#[tokio::test]
async fn batch_publish_answers_each_publication_in_order() {
    let node = Node::default().await;
    let (a, b) = (channel("batch-a"), channel("batch-b"));
    publish(&node, &a, json!("first")).await;
    let mut sub = WsClient::connect(&node).await;
    sub.subscribe(&b).await;
    let body = json!({"publications": [
        {"channel": a, "data": {"n": 1}},
        {"channel": b, "data": null},
        {"channel": a, "data": [2]},
        {"channel": b, "data": "x", "idempotency_key": "k1"},
    ]});
    let (status, answer) = post_raw(&node, "/api/publish", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    let got: Vec<(Value, Value)> = results
        .iter()
        .map(|r| (r["channel"].clone(), r["offset"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!(a), json!(2)),
            (json!(b), json!(1)),
            (json!(a), json!(3)),
            (json!(b), json!(2)),
        ],
        "{answer}"
    );
    assert!(results
        .iter()
        .all(|r| r["epoch"].is_string() && r["tag"].is_string()));
    let (_, page) = history(&node, &format!("channel={a}")).await;
    let data: Vec<Value> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(data, vec![json!("first"), json!({"n": 1}), json!([2])]);
    // Subscribers get the batch's publications live, in order.
    assert_eq!(sub.push().await["data"], Value::Null);
    assert_eq!(sub.push().await["data"], "x");
}

/// A reused key in a batch answers like the single publish: the first ack for the same data, an
/// `idempotency_conflict` error for other data; the rest of the batch is published.
#[tokio::test]
async fn batch_publish_keeps_idempotency_per_item() {
    let node = Node::default().await;
    let ch = channel("batch-idem");
    let first = post_raw(
        &node,
        "/api/publish",
        json!({"channel": ch, "data": "a", "idempotency_key": "k"}).to_string(),
    )
    .await;
    assert_eq!(first.0, 200, "{first:?}");
    let body = json!({"publications": [
        {"channel": ch, "data": "a", "idempotency_key": "k"},
        {"channel": ch, "data": "b", "idempotency_key": "k"},
        {"channel": ch, "data": "c"},
    ]});
    let (status, answer) = post_raw(&node, "/api/publish", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let results = &answer["results"];
    assert_eq!(results[0], first.1, "same key, same data: the first ack");
    assert_eq!(
        results[1]["error"]["code"], "idempotency_conflict",
        "{answer}"
    );
    assert!(results[1]["error"]["message"].is_string());
    assert_eq!(results[2]["offset"], 2, "{answer}");
    let (_, page) = history(&node, &format!("channel={ch}")).await;
    assert_eq!(page["top"], 2, "conflicts store nothing: {page}");
}

/// A bad batch is refused as a whole, naming the bad publication; nothing is published.
#[tokio::test]
async fn batch_publish_rejects_bad_batches_before_publishing() {
    let node = Node::with(|c| c.websocket.max_message_size = 4 * 1024 * 1024).await;
    let ch = channel("batch-bad");
    let ok = json!({"channel": ch, "data": 1});
    let too_many: Vec<Value> = (0..1001).map(|_| ok.clone()).collect();
    for (body, code, names) in [
        (json!({"publications": []}), "bad_request", None),
        (json!({"publications": too_many}), "bad_request", None),
        (
            json!({"publications": {"channel": ch}}),
            "bad_request",
            None,
        ),
        (
            json!({"publications": [ok, {"data": 1}]}),
            "bad_request",
            None,
        ),
        (
            json!({"publications": [ok, {"channel": ch}]}),
            "bad_request",
            None,
        ),
        (
            json!({"publications": [ok], "channel": ch, "data": 1}),
            "bad_request",
            None,
        ),
        (
            json!({"publications": [ok], "idempotency_key": "k"}),
            "bad_request",
            None,
        ),
        (
            json!({"publications": [ok, {"channel": "has space", "data": 1}]}),
            "invalid_channel",
            Some("publications[1]"),
        ),
        (
            json!({"publications": [ok, ok, {"channel": ch, "data": 1, "idempotency_key": ""}]}),
            "bad_request",
            Some("publications[2]"),
        ),
    ] {
        let got = post_raw(&node, "/api/publish", body.to_string()).await;
        assert_error(&got, 400, code);
        if let Some(names) = names {
            let message = got.1["error"]["message"].as_str().unwrap_or("");
            assert!(message.starts_with(names), "{got:?}");
        }
    }
    let (_, page) = history(&node, &format!("channel={ch}")).await;
    assert_eq!(page["top"], 0, "nothing published: {page}");
}

/// A publication over its namespace's `max_message_size` refuses the batch with 413.
#[tokio::test]
async fn batch_publish_item_over_namespace_size_is_413() {
    let node = Node::with(|c| {
        c.channels.namespaces.insert(
            "small".into(),
            gateway::config::NamespaceConfig {
                max_message_size: 8,
                ..Default::default()
            },
        );
    })
    .await;
    let body = json!({"publications": [
        {"channel": "small:a", "data": 1},
        {"channel": "small:a", "data": "far more than eight bytes"},
    ]});
    let got = post_raw(&node, "/api/publish", body.to_string()).await;
    assert_error(&got, 413, "message_too_large");
    let (_, page) = history(&node, "channel=small:a").await;
    assert_eq!(page["top"], 0, "{page}");
}
