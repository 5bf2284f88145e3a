//! SSE event ids in their compact form (#14.6): what they cost on a many-channel stream, that
//! they resume exactly, and that a position they cannot vouch for any more is reset — by group —
//! instead of being resumed in another epoch.

use crate::support::*;
use serde_json::{json, Value};

/// A quote of realistic shape, about 100 bytes of JSON.
fn quote(symbol: usize, n: u64) -> Value {
    json!({"s": format!("SYM{symbol:02}"), "bid": 101.25 + n as f64 / 100.0, "ask": 101.27,
           "last": 101.26, "vol": 1_200_300 + n, "t": 1_764_000_000_000u64 + n})
}

/// The `id:` line of an event, as it was on the wire.
fn id_line_bytes(ev: &SseBlock) -> usize {
    "id: \n".len() + ev.id.as_deref().map_or(0, str::len)
}

/// The seed-003 shape: one EventSource over 50 symbols. Every event's id names all 50
/// positions, yet its `id:` line takes under 160 bytes (the full form took 2,539 here, 2,674
/// per event in all); resuming from an id in the middle misses and repeats nothing.
#[tokio::test]
async fn a_fifty_channel_stream_pays_little_for_its_ids_and_resumes_exactly() {
    let node = Node::default().await;
    let prefix = channel("prices");
    let symbols: Vec<String> = (0..50).map(|i| format!("{prefix}:SYM{i:02}")).collect();
    let names: Vec<&str> = symbols.iter().map(String::as_str).collect();
    let mut sse = Sse::open(&node, &names).await;
    sse.connected().await;

    let mut ids = Vec::new();
    let mut longest = 0;
    for n in 0..100u64 {
        let symbol = n as usize % 50;
        publish(&node, &symbols[symbol], quote(symbol, n)).await;
        let ev = sse.next_event().await;
        assert_eq!(ev.kind(), "message", "{ev:?}");
        assert_eq!(ev.json()["data"], quote(symbol, n));
        longest = longest.max(id_line_bytes(&ev));
        ids.push(ev.id.clone().expect("an id"));
    }
    assert!(longest < 160, "an id line of {longest} bytes");
    assert!(ids.iter().all(|id| id.starts_with('~')), "{}", ids[0]);
    drop(sse);

    // Resume from the 60th event: publications 61..100 follow, then live ones, once each.
    let mut resumed = Sse::resume(&node, &names, &ids[59]).await;
    resumed.assert_stream();
    let connected = resumed.connected().await;
    let results = connected_channels(&connected);
    assert!(
        results.values().all(|r| r["recovered"] == true),
        "{connected:?}"
    );
    publish(&node, &symbols[0], quote(0, 100)).await;
    // Each channel catches up on its own: in order within a channel, interleaved across them.
    let mut got = Vec::new();
    let mut last_offset = std::collections::HashMap::new();
    for _ in 60..=100u64 {
        let (_, p) = resumed.publication().await;
        let channel = p["channel"].as_str().unwrap().to_string();
        let offset = p["offset"].as_u64().unwrap();
        let previous = last_offset.insert(channel.clone(), offset);
        assert!(previous.is_none_or(|o| o < offset), "out of order: {p}");
        got.push((channel, p["data"].to_string()));
    }
    let mut expected: Vec<_> = (60..=100u64)
        .map(|n| {
            let symbol = n as usize % 50;
            (symbols[symbol].clone(), quote(symbol, n).to_string())
        })
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

/// A position the cursor cannot vouch for is reset with its whole group of four, and the other
/// groups resume exactly: here the first channel's history was truncated while away, so it and
/// its three group-mates are reset (`history_truncated`, then `position_unverified` for the
/// others, each followed by what comes after its position), and the fifth channel, in the next
/// group, is recovered.
#[tokio::test]
async fn a_position_it_cannot_vouch_for_resets_its_group_only() {
    let node = Node::with(|c| c.history.max_count = 5).await;
    let names: Vec<String> = (0..5).map(|i| channel(&format!("group{i}"))).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for name in &names {
        publish(&node, name, json!("before")).await;
    }
    let mut sse = Sse::open(&node, &refs).await;
    let cursor = sse.connected().await.id.unwrap();
    drop(sse);
    publish_many(node.addr, &names[0], 20, |i| json!(i)).await; // top 21, history 17..=21
    publish(&node, &names[1], json!("mate")).await;
    publish(&node, &names[4], json!("kept")).await;

    let mut sse = Sse::resume(&node, &refs, &cursor).await;
    sse.assert_stream();
    let results = connected_channels(&sse.connected().await);
    assert_eq!(results[&names[0]]["reason"], "history_truncated");
    for mate in &names[1..4] {
        assert_eq!(results[mate]["recovered"], false, "{}", results[mate]);
        assert_eq!(results[mate]["reason"], "position_unverified");
    }
    assert_eq!(results[&names[4]]["recovered"], true);

    let mut resets = std::collections::HashMap::new();
    let mut kept = Vec::new();
    while resets.len() < 4 || kept.len() < 2 {
        let ev = sse.next_event().await;
        let data = ev.json();
        match ev.kind() {
            "reset" => {
                let channel = data["channel"].as_str().unwrap().to_string();
                assert!(resets.insert(channel, data).is_none(), "two resets");
            }
            "message" => kept.push((
                data["channel"].as_str().unwrap().to_string(),
                data["offset"].as_u64().unwrap(),
            )),
            other => panic!("unexpected {other}: {ev:?}"),
        }
    }
    // Each unverified mate goes on after the position it had: nothing it may lack is skipped.
    assert_eq!(resets[&names[1]]["offset"], 1, "{:?}", resets[&names[1]]);
    assert_eq!(resets[&names[2]]["offset"], 1);
    kept.sort();
    let mut expected = vec![(names[1].clone(), 2), (names[4].clone(), 2)];
    expected.sort();
    assert_eq!(kept, expected);
}

/// An id resumes only the stream it came from: other channels, or the same in another order,
/// are a 400 `invalid_cursor` (EventSource then stops, rather than resuming the wrong thing).
#[tokio::test]
async fn an_id_resumes_only_its_own_channel_list() {
    let node = Node::default().await;
    let (a, b) = (channel("own-a"), channel("own-b"));
    let mut sse = Sse::open(&node, &[&a, &b]).await;
    let cursor = sse.connected().await.id.unwrap();
    drop(sse);
    for channels in [vec![b.as_str(), a.as_str()], vec![a.as_str()]] {
        let sse = Sse::resume(&node, &channels, &cursor).await;
        assert_eq!(sse.status, 400, "{channels:?}");
        let body = sse.body_json().await;
        assert_eq!(body["error"]["code"], "invalid_cursor", "{body}");
    }
    // A poll over the same channels takes it, as it takes any cursor.
    let url = node.url(&format!(
        "/poll?{}&cursor={cursor}&timeout=0",
        channel_query(&[&a, &b])
    ));
    let answer = http().get(url).send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

/// The store lost everything while the client was away (Redis `FLUSHALL`) and the channel was
/// published to again, past the client's offset, under a new epoch. The compact id carries no
/// epoch, so the node first finds the offset in the new epoch — and the check catches it: the
/// channel is reset (`position_unverified`), never resumed as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_behind_the_same_offset_is_caught() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 1, &[]).await;
    let ch = channel("flushed");
    for n in 1..=3 {
        publish(&nodes[0], &ch, json!(n)).await;
    }
    let mut sse = Sse::open(&nodes[0], &[&ch]).await;
    let connected = sse.connected().await;
    let old_epoch = connected_channels(&connected)[&ch]["epoch"].clone();
    let cursor = connected.id.unwrap();
    drop(sse);

    redis.cli(&["FLUSHALL"]).await;
    for n in 1..=5 {
        publish(&nodes[0], &ch, json!(format!("new {n}"))).await;
    }
    let mut sse = Sse::resume(&nodes[0], &[&ch], &cursor).await;
    sse.assert_stream();
    let result = connected_channels(&sse.connected().await)[&ch].clone();
    assert_ne!(result["epoch"], old_epoch, "{result}");
    assert_eq!(result["recovered"], false, "{result}");
    assert_eq!(result["reason"], "position_unverified", "{result}");
    let reset = sse.next_event().await;
    assert_eq!(reset.kind(), "reset", "{reset:?}");
    assert_eq!(reset.json()["reason"], "position_unverified");
}
