//! Server-Sent Events: stream format, cursors and resume, errors, HTTP/2.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn stream_starts_with_retry_and_connected_then_publications() {
    let node = Node::with(|c| c.sse.retry = Duration::from_millis(1500)).await;
    let a = channel("sse-a");
    let b = channel("sse-b");
    let ea = publish(&node, &a, json!("before")).await["epoch"].clone();

    let mut sse = Sse::open(&node, &[&a, &b]).await;
    let connected = sse.connected().await;
    let first_line = sse.lines().iter().find(|l| !l.is_empty()).cloned().unwrap();
    assert_eq!(first_line, "retry: 1500", "first line of the stream");

    let chans = connected_channels(&connected);
    assert_eq!(chans.len(), 2, "{connected:?}");
    assert_eq!(chans[&a]["epoch"], ea);
    assert_eq!(chans[&a]["offset"], 1);
    assert_eq!(chans[&a]["recovered"], false);
    assert_eq!(chans[&b]["offset"], 0);
    assert!(chans[&b]["epoch"].is_string());
    let cursor0 = connected.id.clone().unwrap();
    assert!(!cursor0.is_empty());

    publish(&node, &a, json!({"k": 1})).await;
    let (id1, mut p1) = sse.publication().await;
    // Every publication carries its tag, 8 hex digits (#12.1).
    let tag = p1.as_object_mut().unwrap().remove("tag").expect("a tag");
    assert_eq!(tag.as_str().map(str::len), Some(8), "{tag}");
    assert_eq!(
        p1,
        json!({"channel": a, "offset": 2, "epoch": ea, "data": {"k": 1}})
    );
    publish(&node, &b, json!([true])).await;
    let (id2, p2) = sse.publication().await;
    assert_eq!(p2["channel"], b.as_str());
    assert_eq!(p2["offset"], 1);
    assert_eq!(p2["data"], json!([true]));
    // Each event carries a new cursor.
    assert_ne!(id1, cursor0);
    assert_ne!(id2, id1);
}

#[tokio::test]
async fn last_event_id_header_resumes_exactly_once() {
    let node = Node::default().await;
    let a = channel("ra");
    let b = channel("rb");
    let mut sse = Sse::open(&node, &[&a, &b]).await;
    sse.connected().await;
    for n in 1..=2 {
        publish(&node, &a, json!(format!("a{n}"))).await;
        publish(&node, &b, json!(format!("b{n}"))).await;
    }
    let mut cursor = String::new();
    for _ in 0..4 {
        cursor = sse.publication().await.0;
    }
    drop(sse);

    // Missed while away: a3..a5 and b3..b4.
    for n in 3..=5 {
        publish(&node, &a, json!(format!("a{n}"))).await;
    }
    for n in 3..=4 {
        publish(&node, &b, json!(format!("b{n}"))).await;
    }

    let mut sse = Sse::resume(&node, &[&a, &b], &cursor).await;
    sse.assert_stream();
    let connected = sse.connected().await;
    let chans = connected_channels(&connected);
    assert_eq!(chans[&a]["recovered"], true, "{connected:?}");
    assert_eq!(chans[&b]["recovered"], true, "{connected:?}");
    assert_eq!(chans[&a]["offset"], 5);
    assert_eq!(chans[&b]["offset"], 4);

    let mut next: HashMap<String, u64> = HashMap::from([(a.clone(), 3), (b.clone(), 3)]);
    let mut last_id = String::new();
    for _ in 0..5 {
        let (id, p) = sse.publication().await;
        let ch = p["channel"].as_str().unwrap().to_string();
        let want = next.get_mut(&ch).unwrap();
        assert_eq!(p["offset"], *want, "{p}");
        let prefix = if ch == a { "a" } else { "b" };
        assert_eq!(p["data"], json!(format!("{prefix}{}", *want)));
        *want += 1;
        last_id = id;
    }
    // Then live, and nothing was delivered twice in between.
    publish(&node, &b, json!("b5")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["channel"], b.as_str());
    assert_eq!(p["offset"], 5);

    // The cursor of the last caught-up event resumes after it (nothing missed, nothing repeated).
    let mut again = Sse::resume(&node, &[&a, &b], &last_id).await;
    again.assert_stream();
    again.connected().await;
    let (_, p) = again.publication().await;
    assert_eq!(
        (p["channel"].as_str().unwrap(), &p["offset"]),
        (b.as_str(), &json!(5))
    );
    publish(&node, &a, json!("a6")).await;
    let (_, p) = again.publication().await;
    assert_eq!(
        (p["channel"].as_str().unwrap(), &p["offset"]),
        (a.as_str(), &json!(6))
    );
}

#[tokio::test]
async fn last_event_id_query_param_resumes_from_connected_cursor() {
    let node = Node::default().await;
    let ch = channel("rq");
    publish(&node, &ch, json!(1)).await;
    let mut sse = Sse::open(&node, &[&ch]).await;
    let cursor = sse.connected().await.id.unwrap();
    drop(sse);
    for n in 2..=4 {
        publish(&node, &ch, json!(n)).await;
    }
    let mut sse = Sse::open_query(
        &node,
        &format!("channel={}&last_event_id={}", enc(&ch), enc(&cursor)),
    )
    .await;
    let connected = sse.connected().await;
    assert_eq!(connected_channels(&connected)[&ch]["recovered"], true);
    for n in 2..=4u64 {
        let (_, p) = sse.publication().await;
        assert_eq!(p["offset"], n);
        assert_eq!(p["data"], n);
    }
}

#[tokio::test]
async fn large_gap_resume_is_paged_and_complete() {
    let node = Node::with(|c| {
        c.history.max_count = 10_000;
        c.client.history_page_size = 50;
    })
    .await;
    let ch = channel("sse-gap");
    let mut sse = Sse::open(&node, &[&ch]).await;
    let cursor = sse.connected().await.id.unwrap();
    drop(sse);
    // ~1 KB each: more than the stream's buffers hold, so catch-up stalls while nobody reads.
    let pad = "p".repeat(1000);
    let gap = {
        let pad = pad.clone();
        publish_many(node.addr, &ch, 6000, move |i| json!({"gap": i, "pad": pad})).await
    };
    let mut expected: HashMap<u64, Value> = gap
        .iter()
        .enumerate()
        .map(|(i, off)| (*off, json!({"gap": i, "pad": pad})))
        .collect();
    // Publishing continues from before the resume until the stream is past the gap.
    let live = ContinuousPublisher::start(node.addr, &ch, |i| json!({"live": i})).await;
    let mut sse = Sse::resume(&node, &[&ch], &cursor).await;
    sse.assert_stream();
    let connected = sse.connected().await;
    let state = &connected_channels(&connected)[&ch];
    assert_eq!(state["recovered"], true, "{connected:?}");
    let top = state["offset"].as_u64().unwrap();
    assert!(top > 6000, "{connected:?}");
    // Not reading: the catch-up is stuck while publishing goes on.
    live.published_at_least(live.published() + 100).await;

    let mut got = Vec::new();
    let mut next = 1;
    while next <= top + 150 {
        let (_, p) = sse.publication().await;
        assert_eq!(
            p["offset"], next,
            "SSE catch-up out of order, duplicated or gapped"
        );
        got.push(p);
        next += 1;
    }
    let offsets = live.stop().await;
    for (i, off) in offsets.iter().enumerate() {
        expected.insert(*off, json!({"live": i}));
    }
    let last = *offsets.iter().max().unwrap();
    while next <= last {
        let (_, p) = sse.publication().await;
        assert_eq!(
            p["offset"], next,
            "SSE delivery out of order, duplicated or gapped"
        );
        got.push(p);
        next += 1;
    }
    assert_eq!(expected.len() as u64, last);
    for p in &got {
        assert_eq!(p["data"], expected[&p["offset"].as_u64().unwrap()], "{p}");
    }
}

#[tokio::test]
async fn unrecoverable_resume_sends_reset_then_live() {
    let node = Node::with(|c| c.history.max_count = 5).await;
    let ch = channel("reset");
    let ok = channel("reset-ok");
    publish(&node, &ch, json!(1)).await;
    let mut sse = Sse::open(&node, &[&ch, &ok]).await;
    let results = connected_channels(&sse.connected().await);
    drop(sse);
    // The full form, as a client that holds its positions sends it: each channel is judged on
    // its own (an event id's compact form resets a group together: tests/it/sse_ids.rs).
    let position = |c: &str| {
        let r = &results[c];
        let tag = r["tag"].as_str().and_then(backplane::parse_tag);
        (
            r["epoch"].as_str().unwrap().to_string(),
            r["offset"].as_u64().unwrap(),
            tag,
        )
    };
    let (held_ch, held_ok) = (position(&ch), position(&ok));
    let cursor = gateway::cursor::encode_tagged([
        (ch.as_str(), held_ch.0.as_str(), held_ch.1, held_ch.2),
        (ok.as_str(), held_ok.0.as_str(), held_ok.1, held_ok.2),
    ]);
    publish_many(node.addr, &ch, 20, |i| json!(i + 2)).await; // top 21, history 17..=21
    publish(&node, &ok, json!("kept")).await;

    let mut sse = Sse::resume(&node, &[&ch, &ok], &cursor).await;
    sse.assert_stream();
    let connected = sse.connected().await;
    let chans = connected_channels(&connected);
    assert_eq!(chans[&ch]["recovered"], false, "{connected:?}");
    assert_eq!(chans[&ch]["reason"], "history_truncated", "{connected:?}");
    assert_eq!(chans[&ch]["offset"], 21);
    assert_eq!(chans[&ok]["recovered"], true, "{connected:?}");

    // A reset event for the lost channel; the recoverable one catches up.
    let mut saw_reset = false;
    let mut saw_kept = false;
    while !(saw_reset && saw_kept) {
        let ev = sse.next_event().await;
        match ev.kind() {
            "reset" => {
                assert!(!saw_reset, "two reset events");
                let d = ev.json();
                assert_eq!(d["channel"], ch.as_str(), "{d}");
                assert_eq!(d["reason"], "history_truncated", "{d}");
                assert!(ev.id.is_some(), "reset without id: {ev:?}");
                saw_reset = true;
            }
            "message" => {
                let p = ev.json();
                assert_eq!(p["channel"], ok.as_str(), "lost channel replayed: {p}");
                assert_eq!(p["offset"], 1);
                saw_kept = true;
            }
            other => panic!("unexpected event {other}: {ev:?}"),
        }
    }
    publish(&node, &ch, json!("live")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["channel"], ch.as_str());
    assert_eq!(p["offset"], 22, "after reset delivery starts at live: {p}");
}

#[tokio::test]
async fn invalid_cursor_is_400() {
    let node = Node::default().await;
    for bad in ["not a cursor", "%%%", "e30"] {
        let sse =
            Sse::open_with(&sse_client(), &node, "channel=a", &[("Last-Event-ID", bad)]).await;
        assert_eq!(sse.status, 400, "cursor {bad:?}");
        let body = sse.body_json().await;
        assert_eq!(body["error"]["code"], "invalid_cursor", "{body}");
    }
    let sse = Sse::open_with(
        &sse_client(),
        &node,
        "channel=a&last_event_id=garbage!!",
        &[],
    )
    .await;
    assert_eq!(sse.status, 400);
    assert_eq!(sse.body_json().await["error"]["code"], "invalid_cursor");
}

#[tokio::test]
async fn request_errors() {
    let node = Node::default().await;
    let client = sse_client();

    let sse = Sse::open_with(&client, &node, "", &[]).await;
    assert_eq!(sse.status, 400);
    assert_eq!(sse.body_json().await["error"]["code"], "bad_request");

    let sse = Sse::open_with(&client, &node, "channel=a%20b", &[]).await;
    assert_eq!(sse.status, 400);
    assert_eq!(sse.body_json().await["error"]["code"], "invalid_channel");

    let sse = Sse::open_with(
        &client,
        &node,
        "channel=a",
        &[("Accept", "application/json")],
    )
    .await;
    assert_eq!(sse.status, 406);
    assert_eq!(sse.body_json().await["error"]["code"], "not_acceptable");

    // Wildcards and lists that include event streams are accepted.
    for accept in ["*/*", "text/*", "application/json, text/event-stream;q=0.5"] {
        let mut sse = Sse::open_with(&client, &node, "channel=a", &[("Accept", accept)]).await;
        sse.assert_stream();
        sse.connected().await;
    }
}

#[tokio::test]
async fn works_over_http2_prior_knowledge() {
    let node = Node::default().await;
    let ch = channel("h2");
    let client = sse_client_h2();
    let mut sse = Sse::open_with(&client, &node, &channel_query(&[&ch]), &[]).await;
    assert_eq!(sse.version, reqwest::Version::HTTP_2);
    sse.assert_stream();
    let cursor = sse.connected().await.id.unwrap();
    publish(&node, &ch, json!("h2")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["data"], "h2");

    // Resume over HTTP/2 too, on a second stream of the same connection.
    publish(&node, &ch, json!("h2b")).await;
    let mut resumed = Sse::open_with(
        &client,
        &node,
        &channel_query(&[&ch]),
        &[("Last-Event-ID", &cursor)],
    )
    .await;
    resumed.assert_stream();
    resumed.connected().await;
    let got: Vec<Value> = [resumed.publication().await.1, resumed.publication().await.1]
        .into_iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(got, vec![json!("h2"), json!("h2b")]);
    // The first stream is still live.
    let (_, p) = sse.publication().await;
    assert_eq!(p["data"], "h2b");

    // The JSON API over HTTP/2 as well.
    let resp = within(
        "h2 history",
        client
            .get(node.url(&format!("/api/history?channel={}", enc(&ch))))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let (status, body) = json_response(resp).await;
    assert_eq!(status, 200);
    assert_eq!(body["top"], 2);
}

/// Over HTTP/2 the stream is the body hyper sends, one frame per burst: the start (`retry:`,
/// `connected`) comes as one DATA frame, a publication as one frame holding its whole event; a
/// client that resets its stream frees it (and only it); a drain ends the others with a
/// `retry:` hint and the end of their streams.
#[tokio::test]
async fn http2_streams_send_whole_bursts_free_a_reset_stream_and_drain_with_a_hint() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let mut node = Node::default().await;
    let ch = channel("h2-body");
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let next_frame = async |body: &mut hyper::body::Incoming| -> Option<String> {
        let frame = within("a frame of the stream", body.frame()).await?;
        let data = frame
            .expect("body error")
            .into_data()
            .expect("a DATA frame");
        Some(String::from_utf8(data.to_vec()).unwrap())
    };

    let mut bodies = Vec::new();
    for _ in 0..3 {
        let uri = node.url(&format!("/sse?{}", channel_query(&[&ch])));
        let mut body = open_h2_stream(&mut sender, uri).await;
        let start = next_frame(&mut body).await.expect("the stream's start");
        assert!(start.starts_with("retry: "), "{start:?}");
        assert!(start.contains("\nevent: connected\n"), "{start:?}");
        assert!(start.ends_with("\n\n"), "{start:?}");
        bodies.push(body);
    }

    publish(&node, &ch, json!({"n": 1})).await;
    for body in &mut bodies {
        let event = next_frame(body).await.expect("the publication");
        assert!(event.starts_with("id: "), "{event:?}");
        assert!(
            event.contains("\ndata: {") && event.contains("\"n\":1"),
            "{event:?}"
        );
        assert!(event.ends_with("}\n\n"), "one whole event: {event:?}");
    }

    // Dropping a response's body resets its stream: the gateway frees it, the others live on.
    drop(bodies.pop());
    wait_metric(&node, "gateway_connections", &[("transport", "sse")], |v| {
        v == 2.0
    })
    .await;
    publish(&node, &ch, json!({"n": 2})).await;
    for body in &mut bodies {
        let event = next_frame(body).await.expect("the publication");
        assert!(event.contains("\"n\":2"), "{event:?}");
    }

    let shutdown = tokio::spawn(node.take().shutdown());
    for body in &mut bodies {
        let hint = next_frame(body).await.expect("the drain's hint");
        let millis = hint
            .strip_prefix("retry: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("a retry hint, alone: {hint:?}"));
        millis.parse::<u64>().expect("milliseconds");
        // The end of the stream may come as an empty DATA frame that carries END_STREAM.
        while let Some(rest) = next_frame(body).await {
            assert_eq!(rest, "", "nothing after the hint");
        }
    }
    within("shutdown to finish", shutdown).await.unwrap();
}
