//! Delta updates: a subscriber that asks (`"delta": true`, `delta=true`) gets each live
//! publication as a JSON Merge Patch against the previous one when that is smaller, while others
//! on the same channel get full data; applying the patches gives exactly the published data. A
//! resume starts in full. Over WebSocket, SSE and long-poll, on memory and across two nodes on
//! Redis; over permessage-deflate, where the compressed delta is made once and shared; and on
//! Redis when the chain breaks — a gap the subscriber's node fills from history, a gap past what
//! history keeps, and an epoch change — after which a patch is still only ever applied to the
//! very publication the subscriber received right before it, and what follows a reset is full.

use std::net::SocketAddr;

use crate::support::*;
use backplane::merge_patch;
use serde_json::{json, Value};

/// A quote of realistic shape in which only the price and the time change from tick to tick.
fn quote(n: u64) -> Value {
    json!({
        "symbol": "ACME", "currency": "EUR", "exchange": "XETR",
        "bid": 100 + n, "ask": 101 + n, "last": 100 + n,
        "volume": 250_000, "open": 99.5, "high": 120.25, "low": 98.75,
        "time": 1_700_000_000_000u64 + n,
    })
}

/// Follows a channel's publications as a client would: full ones replace the value, deltas are
/// applied to it, and a reset forgets it. Returns `(offset, was a delta, value)`.
struct Follower {
    /// The epoch, offset and data of the last publication taken (none after a reset).
    value: Option<(Value, u64, Value)>,
}

impl Follower {
    fn new() -> Self {
        Follower { value: None }
    }

    fn take(&mut self, p: &Value) -> (u64, bool, Value) {
        let offset = p["offset"].as_u64().expect("offset");
        let epoch = p["epoch"].clone();
        let delta = p.get("delta").is_some();
        let value = if let Some(patch) = p.get("delta") {
            assert!(p.get("data").is_none(), "a delta has no data: {p}");
            let (base_epoch, before, base) = self
                .value
                .clone()
                .unwrap_or_else(|| panic!("a delta follows a full publication: {p}"));
            assert_eq!(
                (base_epoch, before + 1),
                (epoch.clone(), offset),
                "a delta only follows the publication it patches: {p}"
            );
            let mut value = base;
            merge_patch::apply(&mut value, patch);
            value
        } else {
            p["data"].clone()
        };
        self.value = Some((epoch, offset, value.clone()));
        (offset, delta, value)
    }

    /// A reset: the stream goes on elsewhere, so nothing held may be patched any more.
    fn reset(&mut self) {
        self.value = None;
    }
}

async fn publish_quotes(publisher: SocketAddr, ch: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        publish(&publisher, ch, quote(n)).await;
    }
}

async fn over_websocket(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:delta-ws";
    let mut deltas = WsClient::connect(&subscriber).await;
    deltas
        .ok(json!({"op": "subscribe", "channel": ch, "delta": true}))
        .await;
    let mut full = WsClient::connect(&subscriber).await;
    full.subscribe(ch).await;
    publish_quotes(publisher, ch, 1..=5).await;
    let mut follower = Follower::new();
    for n in 1..=5 {
        let p = deltas.push().await;
        let (offset, delta, value) = follower.take(&p);
        assert_eq!((offset, value), (n, quote(n)), "{p}");
        // The first one has no predecessor the subscriber holds.
        assert_eq!(delta, n > 1, "{p}");
        if delta {
            assert!(p.to_string().len() < full_form(ch, &p, n).len());
        }
        let whole = full.push().await;
        assert_eq!(
            (whole["offset"].clone(), whole["data"].clone()),
            (json!(n), quote(n)),
            "{whole}"
        );
        assert!(
            whole.get("delta").is_none(),
            "a subscriber that did not ask gets full data"
        );
    }
    // A publication of another shape: the patch would not be smaller, so it goes in full.
    publish(&publisher, ch, json!({"halted": true})).await;
    let p = deltas.push().await;
    assert_eq!(follower.take(&p), (6, false, json!({"halted": true})));
    // Nor can a merge patch set a member to null: full.
    publish(&publisher, ch, json!({"halted": null})).await;
    let p = deltas.push().await;
    assert_eq!(follower.take(&p), (7, false, json!({"halted": null})));

    // A resume: history in full first, then deltas again.
    let epoch = p["epoch"].clone();
    drop(deltas);
    publish_quotes(publisher, ch, 8..=9).await;
    let mut resumed = WsClient::connect(&subscriber).await;
    let result = resumed
        .ok(json!({"op": "subscribe", "channel": ch, "delta": true,
                   "since": {"epoch": epoch, "offset": 7}}))
        .await;
    assert_eq!(result["recovered"], true, "{result}");
    let mut follower = Follower::new();
    for n in 8..=9 {
        let p = resumed.push().await;
        assert_eq!(
            follower.take(&p),
            (n, false, quote(n)),
            "from history, in full"
        );
    }
    publish_quotes(publisher, ch, 10..=10).await;
    let p = resumed.push().await;
    assert_eq!(
        follower.take(&p),
        (10, true, quote(10)),
        "live again: a delta"
    );
}

/// The full form of publication `n` as a subscriber without deltas would get it.
fn full_form(ch: &str, p: &Value, n: u64) -> String {
    json!({"channel": ch, "offset": n, "epoch": p["epoch"], "tag": p["tag"], "data": quote(n)})
        .to_string()
}

async fn over_sse(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:delta-sse";
    let mut sse = Sse::open_query(&subscriber, &format!("channel={}&delta=true", enc(ch))).await;
    sse.connected().await;
    publish_quotes(publisher, ch, 1..=3).await;
    let mut follower = Follower::new();
    for n in 1..=3 {
        let (_, p) = sse.publication().await;
        assert_eq!(follower.take(&p), (n, n > 1, quote(n)), "{p}");
    }
}

async fn over_poll(publisher: SocketAddr, subscriber: SocketAddr) {
    let ch = "ticker:delta-poll";
    let (_, first) = get(
        &subscriber,
        &format!("/poll?channel={}&delta=true", enc(ch)),
    )
    .await;
    let mut cursor = first["cursor"].as_str().expect("cursor").to_string();
    let mut follower = Follower::new();
    let mut got = Vec::new();
    publish_quotes(publisher, ch, 1..=3).await;
    while got.len() < 3 {
        let (status, answer) = get(
            &subscriber,
            &format!(
                "/poll?channel={}&delta=true&cursor={cursor}&timeout=5",
                enc(ch)
            ),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        for p in answer["events"].as_array().expect("events") {
            got.push(follower.take(p));
        }
        cursor = answer["cursor"].as_str().expect("cursor").to_string();
    }
    // Each poll is a new session: the first publication of an answer is full, later ones of
    // the same answer may be deltas; applied, they always give the published data.
    let values: Vec<(u64, Value)> = got.into_iter().map(|(o, _, v)| (o, v)).collect();
    assert_eq!(values, (1..=3).map(|n| (n, quote(n))).collect::<Vec<_>>());
}

async fn every_transport(publisher: SocketAddr, subscriber: SocketAddr) {
    over_websocket(publisher, subscriber).await;
    over_sse(publisher, subscriber).await;
    over_poll(publisher, subscriber).await;
}

#[tokio::test]
async fn deltas_on_memory() {
    let node = Node::default().await;
    every_transport(node.addr(), node.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_across_nodes_on_redis() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    every_transport(nodes[0].addr(), nodes[1].addr()).await;
}

/// Inflates a permessage-deflate message (RFC 7692: the tail 00 00 ff ff restored).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut decompress = flate2::Decompress::new(false);
    let input = [payload, &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(1 << 16);
    decompress
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .unwrap();
    out
}

/// A raw WebSocket that negotiated permessage-deflate, subscribed to `ch` asking for deltas.
async fn deflating_delta_subscriber(node: &GatewayProcess, ch: &str) -> RawWs {
    let mut ws = RawWs::connect_with(
        node.addr,
        "/ws",
        &[("Sec-WebSocket-Extensions", "permessage-deflate")],
    )
    .await;
    assert!(ws.response_header("Sec-WebSocket-Extensions").is_some());
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": ch, "delta": true});
    ws.send_frame(true, 0, OP_TEXT, subscribe.to_string().as_bytes())
        .await;
    let reply = next_compressed(&mut ws).await.1;
    assert_eq!(reply["id"], 1, "{reply}");
    ws
}

/// The next text frame: its payload as sent, and its JSON.
async fn next_compressed(ws: &mut RawWs) -> (Vec<u8>, Value) {
    loop {
        let frame = ws.read_frame().await.expect("connection ended");
        if frame.opcode != OP_TEXT {
            continue;
        }
        let text = if frame.rsv & 0b100 != 0 {
            inflate(&frame.payload)
        } else {
            frame.payload.clone()
        };
        return (frame.payload, serde_json::from_slice(&text).expect("JSON"));
    }
}

#[tokio::test]
async fn compressed_deltas_are_made_once_and_shared() {
    let node = GatewayProcess::start(
        "delta-deflate",
        &[],
        &[("GATEWAY__WEBSOCKET__COMPRESSION_MIN_SIZE", "0")],
    )
    .await;
    let ch = "ticker:delta-deflate";
    let mut a = deflating_delta_subscriber(&node, ch).await;
    let mut b = deflating_delta_subscriber(&node, ch).await;
    publish_quotes(node.addr, ch, 1..=4).await;
    let (mut follow_a, mut follow_b) = (Follower::new(), Follower::new());
    for n in 1..=4 {
        let (bytes_a, p_a) = next_compressed(&mut a).await;
        let (bytes_b, p_b) = next_compressed(&mut b).await;
        assert_eq!(bytes_a, bytes_b, "one compressed form for every subscriber");
        assert_eq!(follow_a.take(&p_a), (n, n > 1, quote(n)), "{p_a}");
        assert_eq!(follow_b.take(&p_b), (n, n > 1, quote(n)), "{p_b}");
    }
}

/// Redis, node A on it, and node B reaching it through a proxy that can freeze or cut B's
/// connections (its pub/sub link among them).
async fn node_b_behind_a_link(
    env: &[(&str, &str)],
) -> (RedisServer, TcpProxy, GatewayProcess, GatewayProcess) {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let link = TcpProxy::start(redis.addr().parse().unwrap()).await;
    let a = GatewayProcess::start("node-a", &Backend::standalone(&redis).args, env).await;
    let through_link = [
        "--redis-url".to_string(),
        format!("redis://{}", link.addr()),
    ];
    let b = GatewayProcess::start("node-b", &through_link, env).await;
    (redis, link, a, b)
}

/// A WebSocket and an SSE subscriber of `ch` on `node`, both asking for deltas, subscribed.
async fn delta_subscribers(node: &impl Endpoint, ch: &str) -> (WsClient, Sse) {
    let mut ws = WsClient::connect(node).await;
    ws.ok(json!({"op": "subscribe", "channel": ch, "delta": true}))
        .await;
    let mut sse = Sse::open_query(node, &format!("channel={}&delta=true", enc(ch))).await;
    sse.connected().await;
    (ws, sse)
}

/// A gap on Redis: node B's connections to Redis freeze while node A publishes, then are cut,
/// so what Redis sent B meanwhile is lost and B must fill the gap from history. Its delta
/// subscribers (WebSocket and SSE) still get every publication once, in order, and every patch
/// applies to the very publication they received right before it, reproducing the published
/// data exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_chain_broken_by_a_gap_on_redis_never_patches_what_the_subscriber_lacks() {
    let (_redis, link, a, b) = node_b_behind_a_link(&PATIENT).await;
    let ch = "ticker:delta-gap";
    let (mut ws, mut sse) = delta_subscribers(&b, ch).await;

    publish_quotes(a.addr, ch, 1..=5).await;
    let mut follow_ws = Follower::new();
    for n in 1..=5 {
        let p = ws.push().await;
        assert_eq!(follow_ws.take(&p), (n, n > 1, quote(n)), "{p}");
    }
    let fills_before = metric_of(b.addr, "gateway_backplane_gap_fills_total").await;

    // Node B hears nothing of 6..=25, and the cut drops whatever Redis had sent it: a gap.
    link.pause();
    publish_quotes(a.addr, ch, 6..=25).await;
    link.cut();
    link.resume();
    publish_quotes(a.addr, ch, 26..=40).await;

    let mut deltas = 0;
    for n in 6..=40 {
        let p = ws.push().await;
        assert!(
            p.get("skipped").is_none(),
            "a gap is filled, not skipped: {p}"
        );
        let (offset, delta, value) = follow_ws.take(&p);
        assert_eq!((offset, &value), (n, &quote(n)), "{p}");
        deltas += u64::from(delta);
    }
    let mut follow_sse = Follower::new();
    for n in 1..=40 {
        let (_, p) = sse.publication().await;
        let (offset, _, value) = follow_sse.take(&p);
        assert_eq!((offset, value), (n, quote(n)), "{p}");
    }
    let fills = metric_of(b.addr, "gateway_backplane_gap_fills_total").await;
    eprintln!(
        "after the gap: {deltas} of 35 as deltas; node B's gap fills {fills_before} -> {fills}"
    );
}

/// An epoch change on Redis: Redis, without persistence, restarts while a delta subscriber is
/// connected, so the channel's history is lost and publishing goes on in a new epoch. The
/// subscriber is told with a reset to the new epoch's start, gets its first publication in
/// full, and from then on patches reproduce the new epoch's data; no patch spans two epochs.
/// A client resuming from the lost epoch is told `epoch_changed` and starts in full too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_chain_broken_by_an_epoch_change_on_redis_restarts_in_full() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = "ticker:delta-epoch";
    let mut ws = WsClient::connect(b).await;
    ws.ok(json!({"op": "subscribe", "channel": ch, "delta": true}))
        .await;
    let mut sse = Sse::open_query(b, &format!("channel={}&delta=true", enc(ch))).await;
    sse.connected().await;

    let mut old = Vec::new();
    for n in 1..=5 {
        old.push(publish(&a.addr, ch, quote(n)).await);
    }
    let old_epoch = old[0]["epoch"].clone();
    let mut follow_ws = Follower::new();
    for n in 1..=5 {
        let p = ws.push().await;
        assert_eq!(p["epoch"], old_epoch, "{p}");
        assert_eq!(follow_ws.take(&p), (n, n > 1, quote(n)), "{p}");
    }

    redis.kill9();
    redis.restart().await;
    for n in 101..=110 {
        publish_until_acked(a.addr, ch, &quote(n)).await;
    }
    // What the new epoch holds is the truth to compare with (a publish that failed in the
    // restart may still have been stored).
    let (new_epoch, top, stored) = full_history(a.addr, ch).await;
    assert_ne!(
        json!(new_epoch),
        old_epoch,
        "the history was lost: a new epoch"
    );
    assert_eq!(
        stored.iter().map(|p| p.offset).collect::<Vec<_>>(),
        (1..=top).collect::<Vec<_>>()
    );
    let expected = |offset: u64| stored[offset as usize - 1].data.clone();

    let reset = json!({"channel": ch, "epoch": new_epoch, "offset": 0, "reason": "epoch_changed"});
    let p = ws.push().await;
    assert_eq!(p["reset"], reset, "the epoch change is announced: {p}");
    follow_ws.reset();
    for n in 1..=top {
        let p = ws.push().await;
        assert_eq!(p["epoch"], new_epoch.as_str(), "{p}");
        let (offset, delta, value) = follow_ws.take(&p);
        assert_eq!((offset, &value), (n, &expected(n)), "{p}");
        assert!(
            n > 1 || !delta,
            "the new epoch's first publication is full: {p}"
        );
    }

    let mut follow_sse = Follower::new();
    for n in 1..=5 {
        let (_, p) = sse.publication().await;
        assert_eq!(follow_sse.take(&p), (n, n > 1, quote(n)), "{p}");
    }
    let ev = sse.next_event().await;
    assert_eq!((ev.kind(), ev.json()), ("reset", reset.clone()), "{ev:?}");
    follow_sse.reset();
    for n in 1..=top {
        let (_, p) = sse.publication().await;
        let (offset, delta, value) = follow_sse.take(&p);
        assert_eq!((offset, &value), (n, &expected(n)), "{p}");
        assert!(
            n > 1 || !delta,
            "the new epoch's first publication is full: {p}"
        );
    }

    // A client coming back with a position of the lost epoch: told so, then the new epoch from
    // its start, read from history and so in full; live ones after it may be deltas again.
    let mut resumed = WsClient::connect(b).await;
    let result = resumed
        .ok(json!({"op": "subscribe", "channel": ch, "delta": true,
                   "since": {"epoch": old_epoch, "offset": 5, "tag": old[4]["tag"]}}))
        .await;
    assert_eq!(
        (&result["recovered"], &result["reason"], &result["epoch"]),
        (&json!(false), &json!("epoch_changed"), &json!(new_epoch)),
        "{result}"
    );
    let mut follow_resumed = Follower::new();
    for n in 1..=top {
        let p = resumed.push().await;
        assert_eq!(
            follow_resumed.take(&p),
            (n, false, expected(n)),
            "from history, in full: {p}"
        );
    }
    publish(&a.addr, ch, quote(111)).await;
    let p = resumed.push().await;
    assert_eq!(
        follow_resumed.take(&p),
        (top + 1, true, quote(111)),
        "live again: a delta"
    );
    let p = ws.push().await;
    assert_eq!(follow_ws.take(&p), (top + 1, true, quote(111)), "{p}");
}

/// What a subscriber received of a channel, in order: publications, each taken by a
/// [`Follower`], and resets, each making it forget its value.
struct Received {
    /// `(offset, was a delta, value)` of each publication, or the reset.
    items: Vec<Result<(u64, bool, Value), Value>>,
}

impl Received {
    fn take(&mut self, follower: &mut Follower, message: &Value) {
        if let Some(reset) = message.get("reset") {
            follower.reset();
            self.items.push(Err(reset.clone()));
        } else {
            self.items.push(Ok(follower.take(message)));
        }
    }

    /// Whether the last thing received is a publication at `top` or after it.
    fn reached(&self, top: u64) -> bool {
        matches!(self.items.last(), Some(Ok((offset, _, _))) if *offset >= top)
    }

    /// Asserts the one reset `reason` of `epoch`, every publication once and in order around
    /// it, the first after it in full, and each value the published `quote`.
    fn assert_one_reset_then_full(&self, epoch: &Value, reason: &str) {
        let resets: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.items[i].is_err())
            .collect();
        assert_eq!(resets.len(), 1, "one reset: {:?}", self.items);
        let Err(reset) = &self.items[resets[0]] else {
            unreachable!()
        };
        assert_eq!((&reset["epoch"], &reset["reason"]), (epoch, &json!(reason)));
        let after_reset = reset["offset"].as_u64().expect("reset offset") + 1;
        let mut next = 1;
        for item in &self.items {
            match item {
                Err(_) => next = after_reset,
                Ok((offset, delta, value)) => {
                    assert_eq!((*offset, value), (next, &quote(next)), "{:?}", self.items);
                    if next == after_reset {
                        assert!(!delta, "the first after a reset is full: {:?}", self.items);
                    }
                    next += 1;
                }
            }
        }
    }
}

/// A gap history no longer covers, on Redis: node B's connections freeze while node A publishes
/// past what the channel's history keeps, then are cut. The delta subscribers on B are told
/// (`history_truncated`), and the first publication after the reset is full: a patch never
/// meets a base they do not have. Live again, deltas resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_chain_broken_by_a_gap_past_history_on_redis_resets_then_starts_in_full() {
    let short_history = [(
        "GATEWAY__CHANNELS__NAMESPACES__BRIEF__HISTORY_MAX_COUNT",
        "5",
    )];
    let env: Vec<(&str, &str)> = PATIENT.iter().chain(&short_history).copied().collect();
    let (_redis, link, a, b) = node_b_behind_a_link(&env).await;
    let ch = "brief:delta-gap";
    let (mut ws, mut sse) = delta_subscribers(&b, ch).await;
    publish_quotes(a.addr, ch, 1..=5).await;
    let (mut follow_ws, mut follow_sse) = (Follower::new(), Follower::new());
    let mut got_ws = Received { items: Vec::new() };
    let mut got_sse = Received { items: Vec::new() };
    while !got_ws.reached(5) {
        got_ws.take(&mut follow_ws, &ws.push().await);
    }

    // 6..=25 never reach node B live, and history keeps only the last five of them.
    link.pause();
    publish_quotes(a.addr, ch, 6..=25).await;
    link.cut();
    link.resume();
    // Nothing more is published until B delivered this one, so one reset says it all.
    let last = publish(&a.addr, ch, quote(26)).await;
    while !got_ws.reached(26) {
        got_ws.take(&mut follow_ws, &ws.push().await);
    }
    while !got_sse.reached(26) {
        let ev = sse.next_event().await;
        assert!(matches!(ev.kind(), "message" | "reset"), "{ev:?}");
        let message = match ev.kind() {
            "reset" => json!({ "reset": ev.json() }),
            _ => ev.json(),
        };
        got_sse.take(&mut follow_sse, &message);
    }
    for got in [&got_ws, &got_sse] {
        got.assert_one_reset_then_full(&last["epoch"], "history_truncated");
    }

    // Live again: each next publication is a patch of the one received right before it.
    publish_quotes(a.addr, ch, 27..=30).await;
    for n in 27..=30 {
        let p = ws.push().await;
        assert_eq!(follow_ws.take(&p), (n, true, quote(n)), "{p}");
        let (_, p) = sse.publication().await;
        assert_eq!(follow_sse.take(&p), (n, true, quote(n)), "{p}");
    }
}
