//! WebSocket resume: subscribe with `since` recovers every missed publication exactly once and in
//! order (paged catch-up, live publishing meanwhile), or says why it cannot.

use std::collections::HashMap;

use crate::support::*;
use serde_json::{json, Value};

/// Reads pushes of `channel` until offset `last`, asserting they are exactly `first..=last` in
/// order; returns them.
async fn expect_offsets(ws: &mut WsClient, channel: &str, first: u64, last: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut expect = first;
    while expect <= last {
        let push = ws.push().await;
        assert_eq!(push["channel"], channel, "{push}");
        let got = push["offset"].as_u64().expect("offset");
        assert_eq!(
            got, expect,
            "expected offset {expect} (range {first}..={last}), got {got}"
        );
        out.push(push);
        expect += 1;
    }
    out
}

#[tokio::test]
async fn resume_recovers_missed_publications_exactly_once() {
    let node = Node::default().await;
    let ch = channel("resume");
    let mut ws = WsClient::connect(&node).await;
    let res = ws.subscribe(&ch).await;
    assert_eq!(res["epoch"], "", "no publication, no epoch yet (#12.5)");
    for n in 1..=3 {
        publish(&node, &ch, json!({"n": n})).await;
    }
    // The position's epoch is the publications' own.
    let epoch = expect_offsets(&mut ws, &ch, 1, 3).await[0]["epoch"].clone();
    drop(ws);

    for n in 4..=8 {
        publish(&node, &ch, json!({"n": n})).await;
    }
    let mut ws = WsClient::connect(&node).await;
    let res = ws.subscribe_since(&ch, &epoch, 3).await;
    assert_eq!(res["recovered"], true, "{res}");
    assert!(res.get("reason").is_none_or(Value::is_null), "{res}");
    assert_eq!(res["epoch"], epoch);
    assert_eq!(res["offset"], 8, "offset is the current top: {res}");
    let pushes = expect_offsets(&mut ws, &ch, 4, 8).await;
    for (i, p) in pushes.iter().enumerate() {
        assert_eq!(p["data"], json!({"n": i + 4}));
        assert_eq!(p["epoch"], epoch);
    }
    publish(&node, &ch, json!("live")).await;
    let live = ws.push().await;
    assert_eq!(live["offset"], 9, "{live}");
    assert_eq!(live["data"], "live");

    let text = metrics(&node).await;
    let recovered = metric(
        &text,
        "gateway_resumes_total",
        &[("result", "recovered"), ("reason", "none")],
    );
    assert!(
        recovered.is_some_and(|v| v >= 1.0),
        "gateway_resumes_total{{result=recovered,reason=none}}: {recovered:?}\n{text}"
    );
}

#[tokio::test]
async fn resume_from_zero_and_from_top() {
    let node = Node::default().await;
    let ch = channel("edges");
    let mut epoch = Value::Null;
    for n in 1..=4 {
        epoch = publish(&node, &ch, json!(n)).await["epoch"].clone();
    }
    // since 0: the whole retained history.
    let mut ws = WsClient::connect(&node).await;
    let res = ws.subscribe_since(&ch, &epoch, 0).await;
    assert_eq!(res["recovered"], true, "{res}");
    expect_offsets(&mut ws, &ch, 1, 4).await;

    // since the top: nothing to catch up, then live.
    let mut at_top = WsClient::connect(&node).await;
    let res = at_top.subscribe_since(&ch, &epoch, 4).await;
    assert_eq!(res["recovered"], true, "{res}");
    assert_eq!(res["offset"], 4);
    publish(&node, &ch, json!(5)).await;
    assert_eq!(at_top.push().await["offset"], 5);
    assert_eq!(ws.push().await["offset"], 5);
}

#[tokio::test]
async fn resume_with_other_epoch_is_not_recovered() {
    let node = Node::default().await;
    let ch = channel("epoch");
    for n in 1..=3 {
        publish(&node, &ch, json!(n)).await;
    }
    let mut ws = WsClient::connect(&node).await;
    let res = ws.subscribe_since(&ch, &json!("some-other-epoch"), 1).await;
    assert_eq!(res["recovered"], false, "{res}");
    assert_eq!(res["reason"], "epoch_changed", "{res}");
    assert_eq!(res["offset"], 3, "{res}");
    assert_ne!(res["epoch"], "some-other-epoch");
    // The channel's epoch is delivered from its start (#12.7), then live.
    for offset in 1..=3 {
        let push = ws.push().await;
        assert_eq!(
            push["offset"], offset,
            "epoch delivered from its start: {push}"
        );
    }
    publish(&node, &ch, json!("live")).await;
    let push = ws.push().await;
    assert_eq!(push["offset"], 4, "then live: {push}");

    let text = metrics(&node).await;
    assert!(
        metric(
            &text,
            "gateway_resumes_total",
            &[("result", "not_recovered"), ("reason", "epoch_changed")]
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
}

#[tokio::test]
async fn resume_beyond_retained_history_is_truncated() {
    let node = Node::with(|c| c.history.max_count = 10).await;
    let ch = channel("trunc");
    let offsets = publish_many(node.addr, &ch, 30, |i| json!(i)).await;
    assert_eq!(*offsets.last().unwrap(), 30);
    let epoch = history(&node, &format!("channel={}", enc(&ch))).await.1["epoch"].clone();

    // History holds 21..=30: since 5 needs 6, which is gone.
    let mut lost = WsClient::connect(&node).await;
    let res = lost.subscribe_since(&ch, &epoch, 5).await;
    assert_eq!(res["recovered"], false, "{res}");
    assert_eq!(res["reason"], "history_truncated", "{res}");
    assert_eq!(res["offset"], 30, "{res}");

    // since 20 needs 21, which is still there.
    let mut kept = WsClient::connect(&node).await;
    let res = kept.subscribe_since(&ch, &epoch, 20).await;
    assert_eq!(res["recovered"], true, "{res}");
    expect_offsets(&mut kept, &ch, 21, 30).await;

    publish(&node, &ch, json!("live")).await;
    let push = lost.push().await;
    assert_eq!(
        push["offset"], 31,
        "after history_truncated delivery starts at live: {push}"
    );
    assert_eq!(kept.push().await["offset"], 31);

    let text = metrics(&node).await;
    assert!(
        metric(
            &text,
            "gateway_resumes_total",
            &[("result", "not_recovered"), ("reason", "history_truncated")]
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
}

#[tokio::test]
async fn resume_across_large_gap_while_publishing_continues() {
    let node = Node::with(|c| {
        c.history.max_count = 20_000;
        c.client.history_page_size = 100;
    })
    .await;
    let ch = channel("gap");
    // ~1 KB per publication: the 5000 missed ones are more than socket buffers hold, so the
    // catch-up cannot finish while the client does not read.
    let pad = "g".repeat(1000);

    // A client follows the channel for a while, then drops.
    let mut ws = WsClient::connect(&node).await;
    ws.subscribe(&ch).await;
    let mut expected: HashMap<u64, Value> = HashMap::new();
    let head = publish_many(node.addr, &ch, 10, |i| json!({"phase": "head", "i": i})).await;
    for (i, off) in head.iter().enumerate() {
        expected.insert(*off, json!({"phase": "head", "i": i}));
    }
    // The position's epoch is the publications' own (an empty channel has none, #12.5).
    let epoch = expect_offsets(&mut ws, &ch, 1, 10).await[0]["epoch"].clone();
    drop(ws);

    // 5000 publications while it is away.
    let gap = {
        let pad = pad.clone();
        publish_many(
            node.addr,
            &ch,
            5000,
            move |i| json!({"phase": "gap", "i": i, "pad": pad}),
        )
        .await
    };
    for (i, off) in gap.iter().enumerate() {
        expected.insert(*off, json!({"phase": "gap", "i": i, "pad": pad}));
    }
    assert_eq!(*gap.iter().max().unwrap(), 5010);

    // Another task keeps publishing from before the resume until the client is past the gap.
    let live =
        ContinuousPublisher::start(node.addr, &ch, |i| json!({"phase": "live", "i": i})).await;
    let mut ws = WsClient::over(small_buffer_stream(node.addr).await, node.addr, "/ws").await;
    let res = ws.subscribe_since(&ch, &epoch, 10).await;
    assert_eq!(res["recovered"], true, "{res}");
    assert_eq!(res["epoch"], epoch);
    let top_at_subscribe = res["offset"].as_u64().unwrap();
    assert!(top_at_subscribe > 5010, "{res}");

    // While the client is not reading, its catch-up is stuck; publications go on meanwhile.
    live.published_at_least(live.published() + 100).await;

    // Read through the gap and past the top seen at subscribe, then stop the publisher and read
    // up to its last publication.
    let mut pushes = expect_offsets(&mut ws, &ch, 11, top_at_subscribe + 150).await;
    let live_offsets = live.stop().await;
    let last = *live_offsets.iter().max().unwrap();
    assert!(last >= top_at_subscribe + 150);
    pushes.extend(expect_offsets(&mut ws, &ch, top_at_subscribe + 151, last).await);

    for (i, off) in live_offsets.iter().enumerate() {
        expected.insert(*off, json!({"phase": "live", "i": i}));
    }
    assert_eq!(expected.len() as u64, last, "every offset accounted for");
    for p in &pushes {
        let off = p["offset"].as_u64().unwrap();
        assert_eq!(p["data"], expected[&off], "data of offset {off}");
        assert_eq!(p["epoch"], epoch);
    }

    // Then plain live delivery.
    let tail = publish(&node, &ch, json!("tail")).await;
    assert_eq!(tail["offset"], last + 1);
    let push = ws.push().await;
    assert_eq!(push["offset"], last + 1, "{push}");
    assert_eq!(push["data"], "tail");
}

#[tokio::test]
async fn resume_of_several_channels_on_one_connection() {
    let node = Node::with(|c| c.client.history_page_size = 3).await;
    let a = channel("multi-a");
    let b = channel("multi-b");
    let ea = publish(&node, &a, json!("a1")).await["epoch"].clone();
    let eb = publish(&node, &b, json!("b1")).await["epoch"].clone();
    for n in 2..=10 {
        publish(&node, &a, json!(format!("a{n}"))).await;
        publish(&node, &b, json!(format!("b{n}"))).await;
    }
    let mut ws = WsClient::connect(&node).await;
    assert_eq!(ws.subscribe_since(&a, &ea, 1).await["recovered"], true);
    assert_eq!(ws.subscribe_since(&b, &eb, 4).await["recovered"], true);
    let mut next: HashMap<String, u64> = HashMap::from([(a.clone(), 2), (b.clone(), 5)]);
    for _ in 0..(9 + 6) {
        let p = ws.push().await;
        let c = p["channel"].as_str().unwrap().to_string();
        let want = next.get_mut(&c).expect("push for unknown channel");
        assert_eq!(p["offset"], *want, "{p}");
        let prefix = if c == a { "a" } else { "b" };
        assert_eq!(p["data"], json!(format!("{prefix}{}", *want)));
        *want += 1;
    }
    assert_eq!(next[&a], 11);
    assert_eq!(next[&b], 11);
}
