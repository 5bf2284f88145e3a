//! The client against real processes: redis-server and gateway nodes started by `testkit`,
//! killed with `kill -9` mid-stream. The one rule checked throughout: the application receives
//! every acknowledged publication exactly once, in order, or an explicit reset first.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use gateway_client::{
    new_idempotency_key, ApiClient, Backoff, Error, Event, Position, Publication, PublishAck,
    Subscriber,
};
use serde_json::json;
use testkit::{
    channel, start_nodes, within, Backend, GatewayProcess, RedisOpts, RedisServer, PATIENT,
};
use tokio::sync::mpsc;

/// Quick retries: a test waits for a node change, not for a production backoff.
const QUICK: Backoff = Backoff {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(500),
};

async fn cluster(n: usize, env: &[(&str, &str)]) -> (RedisServer, Vec<GatewayProcess>) {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let mut all: Vec<(&str, &str)> = PATIENT.to_vec();
    all.extend_from_slice(env);
    let nodes = start_nodes(&Backend::standalone(&redis), n, &all).await;
    (redis, nodes)
}

fn base(node: &GatewayProcess) -> String {
    node.url("")
}

/// The next event that is not about the connection itself.
async fn next_event(sub: &mut Subscriber) -> Event {
    loop {
        let event = within("a subscriber event", sub.recv())
            .await
            .expect("subscriber open");
        match event {
            Event::Connected { .. } | Event::Reconnected { .. } | Event::Disconnected { .. } => {}
            other => return other,
        }
    }
}

async fn subscribed(sub: &mut Subscriber) -> (bool, Position) {
    match next_event(sub).await {
        Event::Subscribed {
            recovered,
            position,
            ..
        } => (recovered, position),
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

async fn next_publication(sub: &mut Subscriber) -> Publication {
    match next_event(sub).await {
        Event::Publication(p) => p,
        other => panic!("expected a publication, got {other:?}"),
    }
}

fn same(p: &Publication, ack: &PublishAck) -> bool {
    p.channel == ack.channel && p.epoch == ack.epoch && p.offset == ack.offset && p.tag == ack.tag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retries_on_the_next_node_and_refusals_are_typed() {
    let (mut redis, mut nodes) = cluster(2, &[]).await;
    let down = base(&nodes[0]);
    nodes[0].kill9();
    let api = ApiClient::new([down, base(&nodes[1])], None)
        .unwrap()
        .with_retries(8, QUICK);
    let ch = channel("rc-publish");

    // The first node refuses connections: the publish goes to the second.
    let first = api.publish(&ch, &json!({"n": 1})).await.unwrap();
    assert_eq!((first.channel.as_str(), first.offset), (ch.as_str(), 1));
    assert_eq!(first.tag.as_ref().map(String::len), Some(8));

    // One key, one publication: a repeat returns the first ack; other data is a conflict.
    let key = new_idempotency_key();
    let a = api
        .publish_with_key(&ch, &json!({"n": 2}), &key)
        .await
        .unwrap();
    let b = api
        .publish_with_key(&ch, &json!({"n": 2}), &key)
        .await
        .unwrap();
    assert_eq!(a, b);
    match api.publish_with_key(&ch, &json!({"n": 3}), &key).await {
        Err(e @ Error::IdempotencyConflict { .. }) => {
            assert_eq!(e.code(), Some("idempotency_conflict"))
        }
        other => panic!("expected idempotency_conflict, got {other:?}"),
    }
    match api.publish("bad channel", &json!(1)).await {
        Err(Error::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (400, "invalid_channel"))
        }
        other => panic!("expected invalid_channel, got {other:?}"),
    }
    let page = api.history(&ch, 0, None).await.unwrap();
    let data: Vec<_> = page.publications.iter().map(|p| p.data.clone()).collect();
    assert_eq!(data, [json!({"n": 1}), json!({"n": 2})]);

    // Redis down: 503 backplane_unavailable is "outcome unknown", retried, then given up.
    redis.kill9();
    let impatient = ApiClient::new([base(&nodes[1])], None)
        .unwrap()
        .with_retries(2, QUICK);
    match impatient.publish(&ch, &json!({"n": 4})).await {
        Err(e @ Error::Exhausted { attempts: 2, .. }) => {
            assert_eq!(e.code(), Some("backplane_unavailable"))
        }
        other => panic!("expected exhausted retries, got {other:?}"),
    }
    redis.restart().await;
    let after = api.publish(&ch, &json!({"n": 5})).await.unwrap();
    let page = api.history(&ch, 0, None).await.unwrap();
    assert_eq!(
        page.publications.last().map(|p| p.offset),
        Some(after.offset)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_everything_after_a_position() {
    let (_redis, nodes) = cluster(1, &[]).await;
    let api = ApiClient::new([base(&nodes[0])], None).unwrap();
    let ch = channel("rc-history");
    let mut acks = Vec::new();
    for i in 0..25 {
        acks.push(api.publish(&ch, &json!({"i": i})).await.unwrap());
    }

    let all: Vec<Publication> = api
        .history_after(&ch, Position::start(), Some(10))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.iter().zip(&acks).all(|(p, a)| same(p, a)));
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, p)| p.data == json!({"i": i})));

    let rest: Vec<Publication> = api
        .history_after(&ch, Position::of_ack(&acks[9]), Some(7))
        .try_collect()
        .await
        .unwrap();
    let offsets: Vec<u64> = rest.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (11..=25).collect::<Vec<_>>());

    let none: Vec<Publication> = api
        .history_after(&ch, Position::of_ack(&acks[24]), None)
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());

    let lost = Position {
        epoch: "not-this-epoch".into(),
        offset: 3,
        tag: None,
    };
    let mut stream = std::pin::pin!(api.history_after(&ch, lost, None));
    match stream.next().await {
        Some(Err(Error::HistoryGap { reason, .. })) => assert_eq!(reason, "epoch_changed"),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
}

/// How node A goes away under the subscriber.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `kill -9`: the connection breaks at once.
    Kill,
    /// SIGTERM: a drain closes the WebSocket with 1001 and a reconnect hint.
    Drain,
    /// SIGSTOP: the connection stays open but silent; only the heartbeat notices.
    Freeze,
}

/// A subscriber on node A, a publisher going on all along; A goes away (`fault`). The
/// subscriber moves to node B and what it received is exactly the acknowledged sequence.
async fn subscriber_survives(fault: Fault) {
    // The publisher is unthrottled: history must span the seconds a heartbeat takes to notice
    // a frozen node, or the resume would (rightly) be a `history_truncated` reset.
    let (_redis, mut nodes) = cluster(2, &[("GATEWAY__HISTORY__MAX_COUNT", "1000000")]).await;
    let (a, b) = (base(&nodes[0]), base(&nodes[1]));
    let ch = channel("rc-fault");
    let mut builder = Subscriber::builder([a.clone(), b.clone()]).backoff(QUICK);
    if fault == Fault::Freeze {
        builder = builder.heartbeat(Duration::from_secs(1), Duration::from_secs(2));
    }
    let mut sub = builder.connect().unwrap();
    sub.subscribe(&ch).await.unwrap();
    let (recovered, _) = subscribed(&mut sub).await;
    assert!(!recovered, "a fresh subscription starts live");

    // The publisher also starts on A and fails over to B with the same idempotency keys (a
    // frozen A would only hold it up until the request timeout: it publishes on B then).
    let publish_to = if fault == Fault::Freeze {
        vec![b.clone()]
    } else {
        vec![a, b.clone()]
    };
    let api = ApiClient::new(publish_to, None)
        .unwrap()
        .with_retries(20, QUICK);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<PublishAck>();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher_channel = ch.clone();
    let publisher = tokio::spawn(async move {
        let mut i = 0u64;
        while stop_rx.try_recv().is_err() {
            let ack = api
                .publish(&publisher_channel, &json!({"i": i}))
                .await
                .unwrap();
            acks_tx.send(ack).unwrap();
            i += 1;
        }
    });

    let b_ws = format!("{}/ws", b.replace("http", "ws"));
    let mut received: Vec<Publication> = Vec::new();
    let mut faulted_at = None;
    let mut reconnected_at = None;
    let mut close_codes = Vec::new();
    loop {
        let event = within("a subscriber event", sub.recv()).await.unwrap();
        match event {
            Event::Publication(p) => received.push(p),
            Event::Reconnected { node } => {
                assert!(faulted_at.is_some(), "reconnected before the fault");
                if reconnected_at.is_none() {
                    assert_eq!(node, b_ws, "the first reconnect goes to the next node");
                    reconnected_at = Some(received.len());
                }
            }
            Event::Subscribed { recovered, .. } => {
                assert!(recovered, "the resume on B must recover: {event:?}")
            }
            Event::Reset(r) => panic!("no history was lost, yet a reset came: {r:?}"),
            Event::Error { .. }
            | Event::Unsubscribed { .. }
            | Event::Ended { .. }
            | Event::Join { .. }
            | Event::Leave { .. } => {
                panic!("unexpected {event:?}")
            }
            Event::Disconnected { code, .. } => close_codes.push(code),
            Event::Connected { .. } => {}
        }
        if faulted_at.is_none() && received.len() >= 20 {
            match fault {
                Fault::Kill => nodes[0].kill9(),
                Fault::Drain => nodes[0].sigterm(),
                Fault::Freeze => nodes[0].raw_signal(libc::SIGSTOP),
            }
            faulted_at = Some(received.len());
        }
        if let Some(at) = reconnected_at {
            if received.len() >= at + 20 {
                break;
            }
        }
    }
    stop_tx.send(()).unwrap();
    within("the publisher to stop", publisher).await.unwrap();
    let mut acks = Vec::new();
    while let Ok(ack) = acks_rx.try_recv() {
        acks.push(ack);
    }
    let last = acks.last().expect("acks").offset;
    while received.last().map(|p| p.offset) != Some(last) {
        received.push(next_publication(&mut sub).await);
    }
    assert_eq!(received.len(), acks.len(), "nothing lost, nothing twice");
    for (i, (p, ack)) in received.iter().zip(&acks).enumerate() {
        assert!(same(p, ack), "#{i}: received {p:?}, acknowledged {ack:?}");
        assert_eq!(p.data, json!({"i": i}));
    }
    assert!(received.len() > faulted_at.unwrap());
    if fault == Fault::Drain {
        assert_eq!(
            close_codes.first(),
            Some(&Some(1001)),
            "a drain closes with 1001"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_survives_a_node_kill_exactly_once() {
    subscriber_survives(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_follows_a_drain_to_the_next_node_exactly_once() {
    subscriber_survives(Fault::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_detects_a_frozen_node_by_heartbeat_and_resumes_exactly_once() {
    subscriber_survives(Fault::Freeze).await;
}

/// Positions read from one subscriber, persisted as JSON, given to another on another node:
/// it receives exactly what the first one had not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_resumes_from_persisted_positions() {
    let (_redis, nodes) = cluster(2, &[]).await;
    let api = ApiClient::new([base(&nodes[0])], None).unwrap();
    let ch = channel("rc-resume");

    let mut first = Subscriber::connect([base(&nodes[0])], None).unwrap();
    first.subscribe(&ch).await.unwrap();
    subscribed(&mut first).await;
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(api.publish(&ch, &json!(i)).await.unwrap());
        assert!(same(&next_publication(&mut first).await, &acks[i]));
    }
    let saved = serde_json::to_string(&first.positions()).unwrap();
    first.close();
    assert_eq!(
        first_position(&saved, &ch),
        Position::of_ack(&acks[4]),
        "the position is the last publication received, with its tag"
    );

    for i in 5..10 {
        acks.push(api.publish(&ch, &json!(i)).await.unwrap());
    }
    let positions: HashMap<String, Position> = serde_json::from_str(&saved).unwrap();
    let mut second = Subscriber::builder([base(&nodes[1])])
        .with_positions(positions)
        .connect()
        .unwrap();
    second.subscribe(&ch).await.unwrap();
    let (recovered, position) = subscribed(&mut second).await;
    assert!(recovered);
    assert_eq!(position, Position::of_ack(&acks[4]));
    for ack in &acks[5..10] {
        assert!(same(&next_publication(&mut second).await, ack));
    }
    // The next one is live: nothing of the first five came again in between.
    let live = api.publish(&ch, &json!(10)).await.unwrap();
    assert!(same(&next_publication(&mut second).await, &live));
    assert_eq!(second.positions()[&ch], Position::of_ack(&live));
}

fn first_position(saved: &str, ch: &str) -> Position {
    let map: HashMap<String, Position> = serde_json::from_str(saved).unwrap();
    map[ch].clone()
}

/// A position history no longer covers (trimmed to 5): a reset comes first, then live
/// publications; paging from there names the gap too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_history_no_longer_covers_surfaces_a_reset() {
    let (_redis, nodes) = cluster(1, &[("GATEWAY__HISTORY__MAX_COUNT", "5")]).await;
    let api = ApiClient::new([base(&nodes[0])], None).unwrap();
    let ch = channel("rc-reset");
    let mut acks = Vec::new();
    for i in 0..20 {
        acks.push(api.publish(&ch, &json!(i)).await.unwrap());
    }
    let old = Position::of_ack(&acks[1]);
    let mut sub = Subscriber::builder([base(&nodes[0])])
        .with_positions([(ch.clone(), old.clone())].into())
        .connect()
        .unwrap();
    sub.subscribe(&ch).await.unwrap();
    let (recovered, _) = subscribed(&mut sub).await;
    assert!(!recovered);
    match next_event(&mut sub).await {
        Event::Reset(reset) => {
            assert_eq!(reset.reason, "history_truncated");
            assert_eq!(
                (reset.epoch.as_str(), reset.offset),
                (acks[19].epoch.as_str(), 20)
            );
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert_eq!(sub.positions()[&ch].offset, 20);
    let live = api.publish(&ch, &json!("live")).await.unwrap();
    assert!(same(&next_publication(&mut sub).await, &live));

    let mut pages = std::pin::pin!(api.history_after(&ch, old, None));
    match pages.next().await {
        Some(Err(Error::HistoryGap { reason, .. })) => assert_eq!(reason, "history_truncated"),
        other => panic!("expected a gap, got {other:?}"),
    }
}

/// Two nodes on embedded backplanes: each has its own epoch for the channel. When the
/// subscriber's node dies, the other one's history is another epoch: a reset to offset 0 of
/// that epoch, then that epoch from its start, then live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_epoch_is_a_reset_then_the_new_epoch_from_its_start() {
    let mut a = GatewayProcess::start("embedded-a", &[], &[]).await;
    let b = GatewayProcess::start("embedded-b", &[], &[]).await;
    let ch = channel("rc-epoch");
    let on_a = ApiClient::new([base(&a)], None).unwrap();
    let on_b = ApiClient::new([base(&b)], None).unwrap();

    let mut sub = Subscriber::builder([base(&a), base(&b)])
        .backoff(QUICK)
        .connect()
        .unwrap();
    sub.subscribe(&ch).await.unwrap();
    subscribed(&mut sub).await;
    for i in 0..3 {
        let ack = on_a.publish(&ch, &json!(i)).await.unwrap();
        assert!(same(&next_publication(&mut sub).await, &ack));
    }
    let mut b_acks = Vec::new();
    for i in 0..2 {
        b_acks.push(on_b.publish(&ch, &json!(format!("b{i}"))).await.unwrap());
    }
    assert_ne!(b_acks[0].epoch, sub.positions()[&ch].epoch);

    a.kill9();
    let (recovered, position) = subscribed(&mut sub).await;
    assert!(!recovered);
    assert_eq!(
        position,
        Position {
            epoch: b_acks[0].epoch.clone(),
            offset: 0,
            tag: None
        }
    );
    match next_event(&mut sub).await {
        Event::Reset(reset) => {
            assert_eq!(reset.reason, "epoch_changed");
            assert_eq!(
                (reset.epoch.as_str(), reset.offset),
                (b_acks[0].epoch.as_str(), 0)
            );
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    for ack in &b_acks {
        assert!(same(&next_publication(&mut sub).await, ack));
    }
    let live = on_b.publish(&ch, &json!("live")).await.unwrap();
    assert!(same(&next_publication(&mut sub).await, &live));
}

/// A batch is one request: every publication is answered in order, a repeated key with other
/// data is that publication's conflict (the others are stored), and publications of one channel
/// are stored in list order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_answers_each_publication_in_order() {
    let (_redis, nodes) = cluster(1, &[]).await;
    let api = ApiClient::new([base(&nodes[0])], None).unwrap();
    let (a, b) = (channel("rc-batch-a"), channel("rc-batch-b"));
    let items: Vec<(&str, serde_json::Value)> = vec![
        (&a, json!(1)),
        (&b, json!("x")),
        (&a, json!(2)),
        (&a, json!(3)),
    ];
    let results = api.publish_batch(&items).await.unwrap();
    let acks: Vec<(String, u64)> = results
        .into_iter()
        .map(|r| r.map(|ack| (ack.channel, ack.offset)).unwrap())
        .collect();
    assert_eq!(
        acks,
        [
            (a.clone(), 1),
            (b.clone(), 1),
            (a.clone(), 2),
            (a.clone(), 3)
        ]
    );
    let page = api.history(&a, 0, None).await.unwrap();
    let data: Vec<_> = page.publications.iter().map(|p| p.data.clone()).collect();
    assert_eq!(data, [json!(1), json!(2), json!(3)]);
    // Nothing to publish sends nothing; a list the server refuses as a whole is its error.
    assert!(api.publish_batch::<u8>(&[]).await.unwrap().is_empty());
    let too_many: Vec<(&str, u8)> = (0..1001).map(|_| (a.as_str(), 0)).collect();
    match api.publish_batch(&too_many).await {
        // Over the count (400) or, with their keys, over the body limit first (413).
        Err(Error::Api { status, code, .. }) => assert!(
            matches!(
                (status, code.as_str()),
                (400, "bad_request") | (413, "payload_too_large")
            ),
            "{status} {code}"
        ),
        other => panic!("1001 publications are refused, got {other:?}"),
    }
}

/// The management API through the client, on two nodes: a broadcast answers per channel and
/// reaches the subscriber; `unsubscribe` ends one of the user's channels (an `Unsubscribed`
/// event, the other channel goes on); `disconnect` ends the subscriber for good (`Ended`, 4010,
/// no reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_manages_a_users_subscriber_and_broadcasts() {
    const KEY: &str = "client-secret-0123456789";
    let (_redis, nodes) = cluster(2, &[("GATEWAY__AUTH__JWT_HS256_KEYS", KEY)]).await;
    let (status, token, stderr) = testkit::run_to_exit(
        &["token", "--sub", "alice"],
        &[("GATEWAY__AUTH__JWT_HS256_KEYS", KEY)],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let api = ApiClient::new([base(&nodes[1])], None).unwrap();
    let (left, kept) = (channel("rc-left"), channel("rc-kept"));
    let mut sub = Subscriber::connect([base(&nodes[0])], Some(token.trim())).unwrap();
    sub.subscribe(&left).await.unwrap();
    sub.subscribe(&kept).await.unwrap();
    subscribed(&mut sub).await;
    subscribed(&mut sub).await;

    let results = api
        .broadcast(&[&left, &kept], &json!("both"))
        .await
        .unwrap();
    let acked: Vec<(String, u64)> = results
        .into_iter()
        .map(|r| r.map(|ack| (ack.channel, ack.offset)).unwrap())
        .collect();
    assert_eq!(acked, [(left.clone(), 1), (kept.clone(), 1)]);
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        got.push(next_publication(&mut sub).await.channel);
    }
    got.sort();
    let mut both = vec![left.clone(), kept.clone()];
    both.sort();
    assert_eq!(got, both);

    api.unsubscribe("alice", &left).await.unwrap();
    match next_event(&mut sub).await {
        Event::Unsubscribed { channel, reason } => {
            assert_eq!((channel, reason.as_str()), (left.clone(), "server"))
        }
        other => panic!("expected Unsubscribed, got {other:?}"),
    }
    api.publish(&left, &json!("gone")).await.unwrap();
    api.publish(&kept, &json!("still")).await.unwrap();
    assert_eq!(next_publication(&mut sub).await.channel, kept);

    api.disconnect("alice").await.unwrap();
    match next_event(&mut sub).await {
        Event::Ended { code, .. } => assert_eq!(code, 4010),
        other => panic!("expected Ended, got {other:?}"),
    }
    assert_eq!(within("the subscriber's end", sub.recv()).await, None);
}

/// Presence through the API client, and joins and leaves as subscriber events, across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_events() {
    let (_redis, nodes) = cluster(
        2,
        &[
            ("GATEWAY__CHANNELS__NAMESPACES__ROOM__PRESENCE", "true"),
            ("GATEWAY__CHANNELS__NAMESPACES__ROOM__JOIN_LEAVE", "true"),
        ],
    )
    .await;
    let room = format!("room:{}", channel("rc"));
    let api = ApiClient::new([base(&nodes[1])], None).unwrap();
    let mut watcher = Subscriber::connect([base(&nodes[0])], None).unwrap();
    watcher.subscribe(&room).await.unwrap();
    subscribed(&mut watcher).await;
    let own = match next_event(&mut watcher).await {
        Event::Join { channel, member } => {
            assert_eq!(channel, room);
            member
        }
        other => panic!("expected the watcher's own join, got {other:?}"),
    };

    let mut visitor = Subscriber::connect([base(&nodes[1])], None).unwrap();
    visitor.subscribe(&room).await.unwrap();
    subscribed(&mut visitor).await;
    let visiting = match next_event(&mut watcher).await {
        Event::Join { member, .. } => member,
        other => panic!("expected the visitor's join, got {other:?}"),
    };
    assert_ne!(visiting.client, own.client);
    assert_eq!(visiting.user, None);

    let presence = api.presence(&room, false).await.unwrap();
    assert_eq!((presence.count, presence.users), (2, 0));
    let mut clients: Vec<String> = presence
        .clients
        .unwrap()
        .into_iter()
        .map(|m| m.client)
        .collect();
    clients.sort();
    let mut expected = vec![own.client.clone(), visiting.client.clone()];
    expected.sort();
    assert_eq!(clients, expected);
    assert_eq!(api.presence(&room, true).await.unwrap().clients, None);

    visitor.close();
    match next_event(&mut watcher).await {
        Event::Leave { channel, member } => assert_eq!((channel, member), (room, visiting)),
        other => panic!("expected the visitor's leave, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_is_suppressed_across_nodes() {
    let (_redis, nodes) = cluster(2, &[]).await;
    let first = ApiClient::new([base(&nodes[0])], None).unwrap();
    let second = ApiClient::new([base(&nodes[1])], None).unwrap();
    let ch = channel("rc-versioned");
    let newer = first
        .publish_versioned(&ch, &json!({"price": 2}), 2)
        .await
        .unwrap();
    assert!(!newer.suppressed);
    // An out-of-order producer on another node cannot move the price back.
    let stale = second
        .publish_versioned(&ch, &json!({"price": 1}), 1)
        .await
        .unwrap();
    assert!(stale.suppressed, "{stale:?}");
    assert_eq!(
        (stale.offset, &stale.epoch, &stale.tag),
        (newer.offset, &newer.epoch, &newer.tag),
        "the answer names the current top"
    );
    let page = second.history(&ch, 0, None).await.unwrap();
    assert_eq!(page.publications.len(), 1, "nothing suppressed is stored");
}
