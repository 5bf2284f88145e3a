//! Long-poll (`GET /poll`): first answer, waiting, resume from a cursor exactly once, resets,
//! input errors and draining (on several nodes through Redis: the `redis_poll` module).

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

/// `GET /poll?<query>`: status and JSON body.
async fn poll(node: &Node, query: &str) -> (u16, Value) {
    get(node, &format!("/poll?{query}")).await
}

/// A successful poll's body.
async fn poll_ok(node: &Node, query: &str) -> Value {
    let (status, body) = poll(node, query).await;
    assert_eq!(status, 200, "poll {query}: {body}");
    body
}

fn cursor_of(answer: &Value) -> String {
    answer["cursor"].as_str().expect("cursor").to_string()
}

/// The offsets of an answer's publications of `channel`, in order.
fn offsets(answer: &Value, channel: &str) -> Vec<u64> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["channel"] == channel)
        .map(|e| e["offset"].as_u64().unwrap())
        .collect()
}

fn resets(answer: &Value) -> Vec<Value> {
    answer["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e.get("reset").cloned())
        .collect()
}

fn position(answer: &Value, channel: &str) -> (String, u64) {
    let p = answer["positions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["channel"] == channel)
        .unwrap_or_else(|| panic!("no position of {channel} in {answer}"));
    (
        p["epoch"].as_str().unwrap().to_string(),
        p["offset"].as_u64().unwrap(),
    )
}

/// Starts a poll from `cursor` that waits (up to 30 s) and returns once the node counts it as an
/// open poll, so what happens next happens while it waits. Resolves to the poll's status and body.
async fn waiting_poll(
    node: &Node,
    query: &str,
    cursor: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = node.url(&format!("/poll?{query}&cursor={cursor}&timeout=30"));
    let waiting =
        tokio::spawn(async move { json_response(http().get(url).send().await.unwrap()).await });
    wait_metric(node, "gateway_connections", &[("transport", "poll")], |v| {
        v == 1.0
    })
    .await;
    waiting
}

#[tokio::test]
async fn first_poll_answers_at_once_with_every_channels_position() {
    let node = Node::default().await;
    let a = channel("pa");
    let b = channel("pb");
    let ack = publish(&node, &a, json!(1)).await;
    publish(&node, &a, json!(2)).await;

    // No cursor: no waiting even with the longest timeout, nothing old is replayed.
    let answer = poll_ok(&node, &format!("{}&timeout=30", channel_query(&[&a, &b]))).await;
    assert_eq!(answer["events"], json!([]));
    assert_eq!(
        position(&answer, &a),
        (ack["epoch"].as_str().unwrap().into(), 2)
    );
    assert_eq!(position(&answer, &b).1, 0);
    let cursor = cursor_of(&answer);
    assert!(!cursor.is_empty());

    // The answer is not cacheable.
    let resp = http()
        .get(node.url(&format!("/poll?{}", channel_query(&[&a]))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(resp.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn a_waiting_poll_answers_when_a_publication_arrives() {
    let node = Node::default().await;
    let a = channel("wait");
    let first = poll_ok(&node, &channel_query(&[&a])).await;
    let cursor = cursor_of(&first);

    // Published after the poll began waiting (it is counted as an open poll first).
    let waiting = waiting_poll(&node, &channel_query(&[&a]), &cursor).await;
    publish(&node, &a, json!({"n": 1})).await;
    let (status, answer) = within("the waiting poll", waiting).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(offsets(&answer, &a), vec![1]);
    assert_eq!(answer["events"][0]["data"], json!({"n": 1}));
    assert_eq!(position(&answer, &a).1, 1);
    wait_metric(
        &node,
        "gateway_connections",
        &[("transport", "poll")],
        |v| v == 0.0,
    )
    .await;
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "gateway_deliveries_total", &[("transport", "poll")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "gateway_poll_responses_total",
            &[("outcome", "data")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn resumes_from_the_cursor_exactly_once_across_channels() {
    let node = Node::with(|c| c.client.history_page_size = 4).await;
    let a = channel("ra");
    let b = channel("rb");
    let start = poll_ok(&node, &channel_query(&[&a, &b])).await;
    let mut cursor = cursor_of(&start);
    for n in 1..=10 {
        publish(&node, &a, json!(format!("a{n}"))).await;
        if n <= 3 {
            publish(&node, &b, json!(format!("b{n}"))).await;
        }
    }

    // Page after page until both channels are at their top; each offset exactly once, in order.
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while got_a.len() < 10 || got_b.len() < 3 {
        let answer = poll_ok(
            &node,
            &format!("{}&cursor={cursor}&timeout=5", channel_query(&[&a, &b])),
        )
        .await;
        assert!(resets(&answer).is_empty(), "{answer}");
        got_a.extend(offsets(&answer, &a));
        got_b.extend(offsets(&answer, &b));
        cursor = cursor_of(&answer);
        assert!(
            got_a.len() <= 10 && got_b.len() <= 3,
            "duplicates: {got_a:?} {got_b:?}"
        );
    }
    assert_eq!(got_a, (1..=10).collect::<Vec<_>>());
    assert_eq!(got_b, vec![1, 2, 3]);

    // Nothing new: a short timeout answers with no events and the same positions.
    let answer = poll_ok(
        &node,
        &format!("{}&cursor={cursor}&timeout=0.2", channel_query(&[&a, &b])),
    )
    .await;
    assert_eq!(answer["events"], json!([]));
    assert_eq!(cursor_of(&answer), cursor);
    let text = metrics(&node).await;
    assert!(
        metric(
            &text,
            "gateway_poll_responses_total",
            &[("outcome", "timeout")]
        ) >= Some(1.0)
    );

    // The SSE cursor is the same thing: an SSE stream resumes from a poll's cursor.
    let mut sse = Sse::resume(&node, &[&a, &b], &cursor).await;
    sse.connected().await;
    publish(&node, &a, json!("a11")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["offset"], 11);
}

#[tokio::test]
async fn unrecoverable_positions_come_back_as_resets() {
    let node = Node::with(|c| c.history.max_count = 3).await;
    let a = channel("trunc");
    let e = channel("epoch");
    let first = poll_ok(&node, &channel_query(&[&a, &e])).await;
    // A channel with no publication has no epoch yet (#12.5): its first publish makes it.
    assert_eq!(position(&first, &a).0, "");
    let epoch_a = publish(&node, &a, json!(1)).await["epoch"]
        .as_str()
        .expect("ack epoch")
        .to_string();
    for n in 2..=10 {
        publish(&node, &a, json!(n)).await;
    }
    publish(&node, &e, json!("x")).await;

    // a: history keeps 8..10 only; e: a position from an epoch the channel never had.
    let cursor = gateway::cursor::encode([
        (a.as_str(), epoch_a.as_str(), 1),
        (e.as_str(), "not-an-epoch", 5),
    ]);
    let answer = poll_ok(
        &node,
        &format!("{}&cursor={cursor}&timeout=5", channel_query(&[&a, &e])),
    )
    .await;
    let resets = resets(&answer);
    let reason = |c: &str| {
        resets
            .iter()
            .find(|r| r["channel"] == c)
            .unwrap_or_else(|| panic!("no reset of {c}: {answer}"))["reason"]
            .clone()
    };
    assert_eq!(reason(&a), "history_truncated");
    assert_eq!(reason(&e), "epoch_changed");
    // Not recovered: delivery goes on from the channel's newest offset.
    assert_eq!(position(&answer, &a).1, 10);
    assert_eq!(position(&answer, &e).1, 1);
    assert!(offsets(&answer, &a).is_empty());
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let node = Node::with(|c| {
        c.client.max_subscriptions = 2;
        c.poll.max_timeout = Duration::from_secs(10);
    })
    .await;
    assert_error(&poll(&node, "").await, 400, "bad_request");
    assert_error(&poll(&node, "timeout=1").await, 400, "bad_request");
    for timeout in ["-1", "abc", "10.5", "NaN", "inf", ""] {
        assert_error(
            &poll(&node, &format!("channel=x&timeout={timeout}")).await,
            400,
            "bad_request",
        );
    }
    assert_error(
        &poll(&node, "channel=a&channel=b&channel=c").await,
        400,
        "too_many_subscriptions",
    );
    assert_error(&poll(&node, "channel=a%20b").await, 400, "invalid_channel");
    assert_error(
        &poll(&node, "channel=a&cursor=%25%25").await,
        400,
        "invalid_cursor",
    );
    assert_error(
        &poll(&node, "channel=a&cursor=eyJhIjoxfQ").await,
        400,
        "invalid_cursor",
    );
    // A repeated channel is subscribed once, but every `channel` parameter counts against the
    // limit (the work a request may cause is bounded before de-duplication).
    let answer = poll_ok(&node, "channel=a&channel=a").await;
    assert_eq!(answer["positions"].as_array().unwrap().len(), 1);
    assert_error(
        &poll(&node, "channel=a&channel=a&channel=b").await,
        400,
        "too_many_subscriptions",
    );

    let resp = http()
        .post(node.url("/poll?channel=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "GET");
    assert_error(&json_response(resp).await, 405, "method_not_allowed");
    let text = metrics(&node).await;
    assert!(
        metric(
            &text,
            "gateway_poll_responses_total",
            &[("outcome", "rejected")]
        ) >= Some(12.0)
    );
}

#[tokio::test]
async fn draining_answers_waiting_polls_and_refuses_new_ones() {
    // The delay must outlast the steps below (a readyz poll, then one refused poll) however
    // slow the machine is: once it passes, connections close and the refusal is never seen.
    let mut node = Node::with(|c| {
        c.drain.delay = Duration::from_secs(3);
        c.drain.reconnect_jitter = Duration::from_millis(200);
    })
    .await;
    let a = channel("drain");
    let cursor = cursor_of(&poll_ok(&node, &channel_query(&[&a])).await);
    let waiting = waiting_poll(&node, &channel_query(&[&a]), &cursor).await;

    let running = node.take();
    let drain = tokio::spawn(running.drain());
    // During drain.delay the node still serves, but sends new pollers elsewhere.
    let addr = node.addr;
    eventually("readyz 503", || async move {
        http()
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 503
    })
    .await;
    let refused = poll(&node, &format!("{}&cursor={cursor}", channel_query(&[&a]))).await;
    assert_error(&refused, 503, "shutting_down");

    // The waiting poll is answered when the drain closes connections: its cursor and a hint.
    let (status, answer) = within("the waiting poll at drain", waiting).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["events"], json!([]));
    assert_eq!(cursor_of(&answer), cursor);
    let hint = answer["reconnect_ms"].as_u64().expect("reconnect_ms");
    assert!(hint < 200, "{answer}");
    within("drain", drain).await.unwrap();
}
