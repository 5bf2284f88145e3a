//! #12.1, the resume half: a Redis rollback that no node saw (nobody was subscribed while Redis
//! lost acknowledged writes and reused their offsets under the same epoch) is still detected by a
//! client that resumes with the tag of its position. Real processes: `redis-server` with RDB
//! snapshots only, killed with `kill -9` and restarted from the snapshot, and a gateway node.

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A position from a publish answer: epoch, offset, tag.
fn position_of(ack: &Value) -> (String, u64, String) {
    (
        ack["epoch"].as_str().expect("ack epoch").to_string(),
        ack["offset"].as_u64().expect("ack offset"),
        ack["tag"].as_str().expect("ack tag").to_string(),
    )
}

/// Publish 10, `SAVE`, publish 5 (offsets 11..15), `kill -9`, restart from the snapshot (top 10,
/// same epoch), publish 7 with no node subscribed (offsets 11..17 again). A WebSocket resume and
/// an SSE `Last-Event-ID` resume from the lost 15th position are told `history_diverged`; a
/// resume from offset 8, before the rollback point, recovers exactly 9..17.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_nobody_saw_is_caught_by_the_tag_of_a_resume() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 1, &PATIENT).await;
    let addr = nodes[0].addr;
    let channel = "rollback:resume";
    let mut acks = Vec::new();
    for i in 1..=10 {
        acks.push(publish_until_acked(addr, channel, &json!({"i": i})).await.0);
    }
    assert_eq!(redis.cli(&["save"]).await, "OK");
    for i in 11..=15 {
        acks.push(publish_until_acked(addr, channel, &json!({"i": i})).await.0);
    }
    let lost = position_of(&acks[14]);
    let before_rollback = position_of(&acks[7]);
    assert_eq!((lost.1, before_rollback.1), (15, 8));
    assert_eq!(lost.2.len(), 8, "a tag is 8 hex digits: {}", acks[14]);

    redis.kill9();
    redis.restart().await;
    let mut after = Vec::new();
    for i in 16..=22 {
        after.push(publish_until_acked(addr, channel, &json!({"i": i})).await.0);
    }
    let offsets: Vec<u64> = after.iter().filter_map(|a| a["offset"].as_u64()).collect();
    assert_eq!(
        offsets,
        (11..=17).collect::<Vec<_>>(),
        "Redis rolled back to 10 and reused the offsets: {after:?}"
    );
    assert_eq!(after[4]["epoch"], lost.0.as_str(), "under the same epoch");

    // WebSocket: the lost position is not recovered.
    let ws = Sub::connect("ws", addr).await;
    let reply = ws
        .request(json!({"op": "subscribe", "channel": channel,
            "since": {"epoch": lost.0, "offset": lost.1, "tag": lost.2}}))
        .await;
    let result = &reply["result"];
    assert_eq!(result["recovered"], false, "{reply}");
    assert_eq!(result["reason"], "history_diverged", "{reply}");
    assert_eq!(result["offset"], 17, "{reply}");
    assert_eq!(result["tag"], after[6]["tag"], "the top's tag: {reply}");

    // SSE: the same position as a Last-Event-ID cursor gives a reset with the reason.
    let cursor =
        gateway::cursor::encode_tagged([(channel, lost.0.as_str(), lost.1, gateway_tag(&lost.2))]);
    let response = http()
        .get(format!("http://{addr}/sse?channel={channel}"))
        .header("last-event-id", cursor)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let reset = within("the SSE reset", async {
        loop {
            // Only whole events: the last piece may still be arriving.
            let whole = text.rsplit_once("\n\n").map_or("", |(events, _)| events);
            if let Some(block) = whole
                .split("\n\n")
                .find(|block| block.contains("event: reset"))
            {
                break block.to_string();
            }
            let chunk = body.next().await.expect("SSE stream open").expect("chunk");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    let data: Value = reset
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("reset JSON"))
        .expect("reset data");
    assert_eq!(data["reason"], "history_diverged", "{reset}");
    assert!(!text.contains("\"recovered\":true"), "{text}");

    // A position before the rollback point is still good: exactly 9..17.
    let good = Sub::connect("ws-good", addr).await;
    let reply = good
        .request(json!({"op": "subscribe", "channel": channel,
            "since": {"epoch": before_rollback.0, "offset": 8, "tag": before_rollback.2}}))
        .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    // The subscribe result already names offset 17 (the top): wait for the publications.
    good.wait_for("9..17 to be delivered", WAIT, |log| {
        log.pubs(channel).last().is_some_and(|p| p.offset >= 17)
    })
    .await;
    let got: Vec<(u64, Value)> = good
        .pubs(channel)
        .into_iter()
        .map(|p| (p.offset, p.data))
        .collect();
    let wanted: Vec<(u64, Value)> = (9..=10)
        .map(|i| (i, json!({"i": i})))
        .chain((11..=17).map(|o| (o, json!({"i": o + 5}))))
        .collect();
    assert_eq!(got, wanted);
}

fn gateway_tag(text: &str) -> Option<u32> {
    backplane::parse_tag(text)
}
