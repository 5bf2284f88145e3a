//! The contract cases, each a function of the [`Store`] it runs on. A case starts its own
//! nodes; channel names only need to be unique within a case (every test has its own store).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backplane::{
    BackplaneError, BatchItem, ChannelCount, HistoryPage, Idempotency, Kind, Member, Presence,
    PublishAck, Retention, Settings,
};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::{offsets, poll_until, script, Node, NodeOptions, Store, PREFIX};

fn data(n: u64) -> Bytes {
    Bytes::from(format!("{{\"n\":{n}}}"))
}

async fn node(store: &Store) -> Node {
    store.node(NodeOptions::default()).await
}

fn with_settings(settings: Settings) -> NodeOptions {
    NodeOptions {
        settings,
        ..NodeOptions::default()
    }
}

async fn publish(node: &Node, channel: &str, n: u64) -> PublishAck {
    node.backplane
        .publish(channel, data(n), None)
        .await
        .expect("publish")
}

async fn publish_keyed(
    node: &Node,
    channel: &str,
    data: &'static str,
    key: Idempotency<'_>,
) -> Result<PublishAck, BackplaneError> {
    node.backplane
        .publish(channel, Bytes::from_static(data.as_bytes()), Some(key))
        .await
}

async fn history(node: &Node, channel: &str, since: u64, limit: usize) -> HistoryPage {
    node.backplane
        .history(channel, since, limit)
        .await
        .expect("history")
}

fn page_offsets(page: &HistoryPage) -> Vec<u64> {
    offsets(&page.publications)
}

pub async fn offsets_are_gap_free_from_one(store: &Store) {
    let node = node(store).await;
    let first = publish(&node, "gapless", 1).await;
    assert_eq!((&*first.channel, first.offset), ("gapless", 1));
    for n in 2..=20 {
        let ack = publish(&node, "gapless", n).await;
        assert_eq!(ack.offset, n, "offsets count up by one");
        assert_eq!(ack.epoch, first.epoch, "one epoch while history lives");
    }
    let other = publish(&node, "gapless-other", 1).await;
    assert_eq!(other.offset, 1, "every channel counts from 1");
    assert_ne!(other.epoch, first.epoch, "every channel has its own epoch");

    let page = history(&node, "gapless", 0, 100).await;
    assert_eq!((page.top, page.epoch.clone()), (20, first.epoch.clone()));
    assert_eq!(page_offsets(&page), (1..=20).collect::<Vec<_>>());
    for p in &page.publications {
        assert_eq!(p.data(), &data(p.offset)[..]);
        assert_eq!(p.epoch, first.epoch);
    }
}

pub async fn reads_of_unknown_channels_create_nothing(store: &Store) {
    let node = node(store).await;
    assert_eq!(store.stored(&node).await, 0, "a fresh store");
    let read = history(&node, "unknown", 0, 10).await;
    assert_eq!(
        (&*read.epoch, read.top),
        ("", 0),
        "no publication, no epoch"
    );
    assert_eq!(read.publications.len(), 0);
    assert_eq!((read.since_tag, read.top_tag), (None, None));
    history(&node, "unknown", 5, 0).await;
    let nobody = node.backplane.presence("unknown", true).await.unwrap();
    assert_eq!((nobody.count, nobody.members), (0, Some(vec![])));
    node.backplane.presence_leave("unknown", "nobody", true);
    node.backplane.flush_presence().await.unwrap();
    node.backplane.subscribe("unknown").await.unwrap();
    node.backplane.unsubscribe("unknown").await.unwrap();
    store.wait_unsubscribed("unknown").await;
    assert_eq!(
        store.stored(&node).await,
        0,
        "reads, a leave of nobody and a subscribe+unsubscribe leave nothing behind"
    );
    let ack = publish(&node, "unknown", 1).await;
    assert_eq!(ack.offset, 1);
    assert!(
        !ack.epoch.is_empty(),
        "the first publication creates the epoch"
    );
    let after = history(&node, "unknown", 0, 10).await;
    assert_eq!((after.epoch, after.top), (ack.epoch, 1));
    assert_eq!(after.top_tag, Some(ack.tag));
}

pub async fn history_is_trimmed_by_count(store: &Store) {
    let settings = Settings {
        retention: Retention {
            max_count: 5,
            max_age: Duration::from_secs(600),
        },
        ..Settings::default()
    };
    let node = store.node(with_settings(settings)).await;
    let mut acks = Vec::new();
    for n in 1..=12 {
        acks.push(publish(&node, "counted", n).await);
    }
    let page = history(&node, "counted", 0, 100).await;
    assert_eq!(page.top, 12, "offsets keep counting");
    assert_eq!(page_offsets(&page), vec![8, 9, 10, 11, 12], "the oldest go");
    assert_eq!(
        page.epoch, acks[0].epoch,
        "trimming is not a loss of history"
    );
    let from_trimmed = history(&node, "counted", 3, 100).await;
    assert_eq!(page_offsets(&from_trimmed), vec![8, 9, 10, 11, 12]);
    assert_eq!(
        from_trimmed.since_tag, None,
        "a trimmed entry's tag is gone"
    );
    let at_the_edge = history(&node, "counted", 7, 100).await;
    assert_eq!(page_offsets(&at_the_edge), vec![8, 9, 10, 11, 12]);
    assert_eq!(
        at_the_edge.since_tag,
        Some(acks[6].tag),
        "the entry after a trimmed one still names its tag, so a resume at the edge is checked"
    );
}

pub async fn history_is_trimmed_by_age_per_namespace(store: &Store) {
    let brief = Retention {
        max_count: 100,
        max_age: Duration::from_millis(200),
    };
    let settings = Settings {
        namespace_retention: Arc::from([("brief".to_string(), brief)]),
        ..Settings::default()
    };
    let node = store.node(with_settings(settings)).await;
    let mut acks = Vec::new();
    for n in 1..=3 {
        acks.push(publish(&node, "brief:c", n).await);
        publish(&node, "long:c", n).await;
    }
    let page = poll_until("brief:c to age out of history", || async {
        let page = history(&node, "brief:c", 0, 100).await;
        page.publications.is_empty().then_some(page)
    })
    .await;
    assert_eq!(page.top, 3, "the top outlives the history");
    assert_eq!(
        page.epoch, acks[0].epoch,
        "aging out is not a loss of history"
    );
    let at_top = history(&node, "brief:c", 3, 100).await;
    assert_eq!(
        at_top.since_tag,
        Some(acks[2].tag),
        "the top's tag outlives its entry"
    );
    assert_eq!(history(&node, "brief:c", 2, 100).await.since_tag, None);
    let long = history(&node, "long:c", 0, 100).await;
    assert_eq!(
        page_offsets(&long),
        vec![1, 2, 3],
        "other namespaces keep the default retention"
    );
}

pub async fn history_pages_are_contiguous_up_to_top(store: &Store) {
    let node = node(store).await;
    let mut acks = Vec::new();
    for n in 1..=25 {
        acks.push(publish(&node, "paged", n).await);
    }
    let mut all = Vec::new();
    let mut since = 0;
    for expected in [1..=10, 11..=20, 21..=25] {
        let page = history(&node, "paged", since, 10).await;
        assert_eq!((page.top, &page.epoch), (25, &acks[0].epoch));
        assert_eq!(page_offsets(&page), expected.collect::<Vec<_>>());
        since = page.publications.last().unwrap().offset;
        all.extend(page.publications);
    }
    assert_eq!(offsets(&all), (1..=25).collect::<Vec<_>>());
    for p in &all {
        assert_eq!(p.data(), &data(p.offset)[..]);
    }
    let at_top = history(&node, "paged", 25, 10).await;
    assert!(at_top.publications.is_empty());
    assert_eq!(at_top.top, 25);
    let ahead = history(&node, "paged", 30, 10).await;
    assert!(ahead.publications.is_empty());
    let end_of_time = history(&node, "paged", u64::MAX, 10).await;
    assert!(
        end_of_time.publications.is_empty(),
        "the largest since reads nothing"
    );
    assert_eq!((end_of_time.top, end_of_time.since_tag), (25, None));
    assert_eq!(ahead.top, 25, "a position ahead of the top reads the top");
    assert_eq!(ahead.since_tag, None);
    let middle = history(&node, "paged", 7, 3).await;
    assert_eq!(page_offsets(&middle), vec![8, 9, 10]);
}

pub async fn delivery_is_in_order_and_only_while_subscribed(store: &Store) {
    let options = NodeOptions {
        subscribe_linger: Some(Duration::from_millis(100)),
        ..NodeOptions::default()
    };
    let node = store.node(options.clone()).await;
    // On a shared store the publications come from another node.
    let peer = if store.shared() {
        Some(store.node(options).await)
    } else {
        None
    };
    let publisher = peer.as_ref().unwrap_or(&node);
    let bp = &node.backplane;
    publish(publisher, "live", 1).await;
    bp.subscribe("live").await.unwrap();
    for n in 2..=5 {
        publish(publisher, "live", n).await;
    }
    let got = node.sink.wait_for("live", 5).await;
    assert_eq!(
        offsets(&got),
        vec![2, 3, 4, 5],
        "in order, from the subscribe on"
    );
    for p in &got {
        assert_eq!(p.data(), &data(p.offset)[..]);
    }

    bp.unsubscribe("live").await.unwrap();
    store.wait_unsubscribed("live").await;
    publish(publisher, "live", 6).await;
    publish(publisher, "live", 7).await;
    // Subscribing again and waiting for the next publication of the same channel is the
    // barrier: had 6 or 7 been delivered, they would have arrived before 8.
    bp.subscribe("live").await.unwrap();
    publish(publisher, "live", 8).await;
    let got = node.sink.wait_for("live", 8).await;
    assert_eq!(
        offsets(&got),
        vec![2, 3, 4, 5, 8],
        "nothing is delivered while unsubscribed"
    );
    if let Some(peer) = &peer {
        assert!(
            peer.sink.of("live").is_empty(),
            "only subscribed nodes get deliveries"
        );
    }
}

pub async fn concurrent_publishers_get_distinct_gap_free_offsets(store: &Store) {
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 25;
    let mut nodes = vec![node(store).await];
    if store.shared() {
        nodes.push(node(store).await);
    }
    let mut tasks = Vec::new();
    for publisher in 0..PUBLISHERS {
        let backplane = nodes[publisher as usize % nodes.len()].backplane.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for n in 0..EACH {
                let payload = data(publisher * 1000 + n);
                let ack = backplane.publish("busy", payload.clone(), None).await;
                acks.push((ack.expect("publish"), payload));
            }
            acks
        }));
    }
    let mut by_offset = BTreeMap::new();
    for task in tasks {
        let acks = task.await.unwrap();
        let own: Vec<u64> = acks.iter().map(|(ack, _)| ack.offset).collect();
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "one publisher's acks ascend"
        );
        for (ack, payload) in acks {
            assert!(
                by_offset.insert(ack.offset, (ack, payload)).is_none(),
                "an offset was given twice"
            );
        }
    }
    let expected: Vec<u64> = (1..=PUBLISHERS * EACH).collect();
    assert_eq!(by_offset.keys().copied().collect::<Vec<_>>(), expected);
    let epochs: HashSet<_> = by_offset
        .values()
        .map(|(ack, _)| ack.epoch.clone())
        .collect();
    assert_eq!(epochs.len(), 1);

    let page = history(&nodes[0], "busy", 0, 1000).await;
    assert_eq!(page_offsets(&page), expected);
    for p in &page.publications {
        let (ack, payload) = &by_offset[&p.offset];
        assert_eq!(
            p.data(),
            &payload[..],
            "offset {} holds its publisher's data",
            p.offset
        );
        assert_eq!(p.tag, ack.tag);
    }
}

pub async fn idempotent_retry_returns_the_first_ack(store: &Store) {
    let node = node(store).await;
    node.backplane.subscribe("retried").await.unwrap();
    for (n, key) in [(1, Idempotency::server("k")), (2, Idempotency::client("k"))] {
        let first = publish_keyed(&node, "retried", "{\"a\":1}", key)
            .await
            .unwrap();
        let again = publish_keyed(&node, "retried", "{\"a\":1}", key)
            .await
            .unwrap();
        assert_eq!(first.offset, n);
        assert_eq!(again, first, "a retry answers the first ack");
        assert_eq!(again.tag, first.tag, "including its tag");
    }
    let next = publish(&node, "retried", 3).await;
    assert_eq!(next.offset, 3, "a retry takes no offset");
    let delivered = node.sink.wait_for("retried", 3).await;
    assert_eq!(
        offsets(&delivered),
        vec![1, 2, 3],
        "a retry is not delivered again"
    );
    let page = history(&node, "retried", 0, 100).await;
    assert_eq!(
        page_offsets(&page),
        vec![1, 2, 3],
        "a retry stores no second entry"
    );
}

pub async fn idempotency_key_with_other_data_is_a_conflict(store: &Store) {
    let node = node(store).await;
    for (n, key) in [(1, Idempotency::server("k")), (2, Idempotency::client("k"))] {
        let first = publish_keyed(&node, "clash", "{\"a\":1}", key)
            .await
            .unwrap();
        assert_eq!(first.offset, n);
        let other = publish_keyed(&node, "clash", "{\"a\":2}", key).await;
        assert!(
            matches!(other, Err(BackplaneError::Conflict(_))),
            "other data under a used key: {other:?}"
        );
        let retry = publish_keyed(&node, "clash", "{\"a\":1}", key)
            .await
            .unwrap();
        assert_eq!(retry, first, "the first publication still answers retries");
    }
    let page = history(&node, "clash", 0, 100).await;
    assert_eq!(
        page_offsets(&page),
        vec![1, 2],
        "the conflicting data was not stored"
    );
    assert!(page.publications.iter().all(|p| p.data() == b"{\"a\":1}"));
    assert_eq!(publish(&node, "clash", 3).await.offset, 3);
}

pub async fn idempotency_scopes_live_apart(store: &Store) {
    let node = node(store).await;
    let client = publish_keyed(
        &node,
        "scoped",
        "\"from a client\"",
        Idempotency::client("order-1"),
    )
    .await
    .unwrap();
    let server = publish_keyed(
        &node,
        "scoped",
        "\"from the backend\"",
        Idempotency::server("order-1"),
    )
    .await
    .expect("a client's key does not take the backend's");
    assert_eq!((client.offset, server.offset), (1, 2));
    let server_again = publish_keyed(
        &node,
        "scoped",
        "\"from the backend\"",
        Idempotency::server("order-1"),
    )
    .await
    .unwrap();
    assert_eq!(server_again, server);
    let client_other = publish_keyed(
        &node,
        "scoped",
        "\"from the backend\"",
        Idempotency::client("order-1"),
    )
    .await;
    assert!(matches!(client_other, Err(BackplaneError::Conflict(_))));
    let elsewhere = publish_keyed(&node, "scoped-2", "\"x\"", Idempotency::server("order-1"))
        .await
        .unwrap();
    assert_eq!(elsewhere.offset, 1, "keys are per channel");
    let page = history(&node, "scoped", 0, 100).await;
    let stored: Vec<&[u8]> = page.publications.iter().map(|p| p.data()).collect();
    assert_eq!(
        stored,
        vec![&b"\"from a client\""[..], b"\"from the backend\""]
    );
}

pub async fn tags_are_carried_everywhere(store: &Store) {
    let node = node(store).await;
    node.backplane.subscribe("tagged").await.unwrap();
    let mut acks = Vec::new();
    for n in 1..=10 {
        acks.push(publish(&node, "tagged", n).await);
    }
    let tags: Vec<u32> = acks.iter().map(|a| a.tag).collect();
    let distinct: HashSet<u32> = tags.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        tags.len(),
        "tags are random per publication: {tags:?}"
    );

    let delivered = node.sink.wait_for("tagged", 10).await;
    assert_eq!(
        delivered.iter().map(|p| p.tag).collect::<Vec<_>>(),
        tags,
        "live"
    );
    let page = history(&node, "tagged", 0, 100).await;
    assert_eq!(
        page.publications.iter().map(|p| p.tag).collect::<Vec<_>>(),
        tags,
        "history"
    );

    let mut readers = vec![node];
    if store.shared() {
        readers.push(self::node(store).await);
    }
    for reader in &readers {
        assert_eq!(history(reader, "tagged", 0, 5).await.since_tag, None);
        let inside = history(reader, "tagged", 4, 3).await;
        assert_eq!(page_offsets(&inside), vec![5, 6, 7]);
        assert_eq!(inside.since_tag, Some(tags[3]), "since inside history");
        let at_top = history(reader, "tagged", 10, 3).await;
        assert_eq!(at_top.since_tag, Some(tags[9]), "since at the top");
        let position_only = history(reader, "tagged", 6, 0).await;
        assert_eq!(
            position_only.since_tag,
            Some(tags[5]),
            "also without a page"
        );
        assert_eq!(
            history(reader, "tagged", 11, 3).await.since_tag,
            None,
            "ahead"
        );
    }
}

fn member(client: &str, user: Option<&str>) -> Member {
    Member {
        client: client.into(),
        user: user.map(Into::into),
        info: None,
    }
}

async fn flush(node: &Node) {
    node.backplane
        .flush_presence()
        .await
        .expect("flush presence");
}

async fn presence(node: &Node, channel: &str) -> Presence {
    let mut read = node
        .backplane
        .presence(channel, true)
        .await
        .expect("presence");
    if let Some(members) = &mut read.members {
        members.sort_by(|a, b| a.client.cmp(&b.client));
    }
    read
}

fn clients(read: &Presence) -> Vec<&str> {
    let members = read.members.as_ref().expect("a member list");
    members.iter().map(|m| m.client.as_str()).collect()
}

pub async fn presence_counts_members_and_distinct_users(store: &Store) {
    let node = node(store).await;
    let peer = if store.shared() {
        Some(self::node(store).await)
    } else {
        None
    };
    let empty = presence(&node, "room").await;
    assert_eq!((empty.count, empty.users), (0, 0), "nobody yet");
    assert_eq!(empty.members, Some(vec![]));

    let bp = &node.backplane;
    bp.presence_join("room", member("a", Some("u1")), false);
    bp.presence_join("room", member("b", Some("u1")), false);
    bp.presence_join("room", member("c", Some("u2")), false);
    bp.presence_join("room", member("d", None), false);
    bp.presence_join("elsewhere", member("a2", Some("u9")), false);
    flush(&node).await;
    let mut expected = vec![
        member("a", Some("u1")),
        member("b", Some("u1")),
        member("c", Some("u2")),
        member("d", None),
    ];
    if let Some(peer) = &peer {
        // The same user on another node is one user; its info is kept as given.
        let info = RawValue::from_string(r#"{"name":"E"}"#.into()).unwrap();
        let e = Member {
            info: Some(info),
            ..member("e", Some("u2"))
        };
        peer.backplane.presence_join("room", e.clone(), false);
        flush(peer).await;
        expected.push(e);
    }
    let readers: Vec<&Node> = std::iter::once(&node).chain(peer.as_ref()).collect();
    for reader in &readers {
        let read = presence(reader, "room").await;
        assert_eq!(read.count, expected.len() as u64);
        assert_eq!(read.users, 2, "u1 and u2; an anonymous member is no user");
        assert_eq!(
            read.members.as_ref(),
            Some(&expected),
            "every member, on every node"
        );
        let count_only = reader.backplane.presence("room", false).await.unwrap();
        assert_eq!(
            (count_only.count, count_only.users, count_only.members),
            (expected.len() as u64, 2, None),
            "a count-only read lists nobody"
        );
    }

    bp.presence_leave("room", "b", false);
    flush(&node).await;
    let read = presence(&node, "room").await;
    assert_eq!((read.count, read.users), (expected.len() as u64 - 1, 2));
    bp.presence_leave("room", "a", false);
    bp.presence_leave("room", "c", false);
    bp.presence_leave("room", "never-joined", false);
    flush(&node).await;
    let read = presence(&node, "room").await;
    let remaining: Vec<&str> = if peer.is_some() {
        vec!["d", "e"]
    } else {
        vec!["d"]
    };
    assert_eq!(clients(&read), remaining);
    assert_eq!(read.users, u64::from(peer.is_some()));
    let other = presence(&node, "elsewhere").await;
    assert_eq!((other.count, other.users), (1, 1), "channels are apart");

    // A member joining again with another user is updated, and counted under its new user.
    let users_before = read.users;
    bp.presence_join("room", member("d", Some("u7")), false);
    flush(&node).await;
    let read = presence(&node, "room").await;
    assert_eq!(
        (read.count, read.users),
        (remaining.len() as u64, users_before + 1)
    );
    bp.presence_join("room", member("d", None), false);
    flush(&node).await;
    let read = presence(&node, "room").await;
    assert_eq!(
        (read.count, read.users),
        (remaining.len() as u64, users_before)
    );

    bp.presence_leave("room", "d", false);
    bp.presence_leave("elsewhere", "a2", false);
    flush(&node).await;
    if let Some(peer) = &peer {
        peer.backplane.presence_leave("room", "e", false);
        flush(peer).await;
    }
    assert_eq!(
        store.stored(&node).await,
        0,
        "once every member left, no presence state remains"
    );
}

pub async fn joins_and_leaves_keep_their_place_among_publications(store: &Store) {
    let watcher = node(store).await;
    // On a shared store the changes come from another node: every node hears them.
    let peer = if store.shared() {
        Some(node(store).await)
    } else {
        None
    };
    let actor = peer.as_ref().unwrap_or(&watcher);
    let bp = &actor.backplane;
    watcher.backplane.subscribe("ordered").await.unwrap();

    bp.presence_join("ordered", member("m1", Some("u1")), true);
    flush(actor).await;
    let first = publish(actor, "ordered", 1).await;
    bp.presence_join("ordered", member("m2", None), true);
    flush(actor).await;
    publish(actor, "ordered", 2).await;
    bp.presence_join("ordered", member("quiet", Some("u3")), false);
    bp.presence_leave("ordered", "m2", true);
    bp.presence_leave("ordered", "absent", true);
    bp.presence_leave("ordered", "quiet", false);
    flush(actor).await;
    publish(actor, "ordered", 3).await;
    bp.presence_leave("ordered", "m2", true);
    bp.presence_leave("ordered", "m1", true);
    flush(actor).await;

    let got = watcher
        .sink
        .wait_until("ordered", "the leave of m1", |got| {
            script(got).contains(&"L3:m1".to_string())
        })
        .await;
    assert_eq!(
        script(&got),
        ["J0:m1", "P1", "J1:m2", "P2", "L2:m2", "P3", "L3:m1"],
        "each event between the publications it was made between; a silent join, a silent \
         leave, a leave of an absent member and a second leave are not announced"
    );
    let join = &got[0];
    assert_eq!(join.kind, Kind::Join);
    assert_eq!(
        (&*join.epoch, join.offset),
        ("", 0),
        "before the first publication: no epoch"
    );
    assert_eq!(
        &join.json()[..],
        br#"{"channel":"ordered","join":{"client":"m1","user":"u1"}}"#
    );
    let leave = &got[4];
    assert_eq!((&leave.epoch, leave.offset), (&first.epoch, 2));
    assert_eq!(
        &leave.json()[..],
        br#"{"channel":"ordered","leave":{"client":"m2","user":null}}"#
    );
    let page = history(actor, "ordered", 0, 100).await;
    assert_eq!(page_offsets(&page), [1, 2, 3], "events are not in history");
    if let Some(peer) = &peer {
        assert!(
            peer.sink.of("ordered").is_empty(),
            "a node not subscribed to the channel hears nothing"
        );
    }
}

pub async fn flush_applies_every_queued_change_in_order(store: &Store) {
    const MEMBERS: usize = 1500;
    let node = node(store).await;
    let bp = &node.backplane;
    for i in 0..MEMBERS {
        let user = format!("u{}", i % 10);
        bp.presence_join("crowd", member(&format!("c{i}"), Some(&user)), false);
    }
    // Every third leaves; every sixth joins again after leaving.
    for i in (0..MEMBERS).step_by(3) {
        bp.presence_leave("crowd", &format!("c{i}"), false);
    }
    for i in (0..MEMBERS).step_by(6) {
        bp.presence_join("crowd", member(&format!("c{i}"), Some("back")), false);
    }
    flush(&node).await;
    let read = presence(&node, "crowd").await;
    let expected: Vec<String> = (0..MEMBERS)
        .filter(|i| i % 3 != 0 || i % 6 == 0)
        .map(|i| format!("c{i}"))
        .collect();
    let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(read.count, expected.len() as u64);
    assert_eq!(clients(&read), expected);
    assert_eq!(read.users, 11, "u0..u9 and back");
    let rejoined = read
        .members
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.client == "c6");
    assert_eq!(rejoined.and_then(|m| m.user.as_deref()), Some("back"));
}

pub async fn channel_reports_are_summed_over_live_nodes(store: &Store) {
    let count = |channel: &str, subscribers: u64| ChannelCount {
        channel: channel.into(),
        subscribers,
    };
    let a = node(store).await;
    a.backplane
        .report_channels(vec![
            count("x:2", 1),
            count("x:1", 2),
            count("y", 5),
            count("x:none", 0),
        ])
        .await
        .unwrap();
    let peer = if store.shared() {
        let b = node(store).await;
        b.backplane
            .report_channels(vec![count("x:1", 3), count("x:3", 1)])
            .await
            .unwrap();
        Some(b)
    } else {
        None
    };
    let readers: Vec<&Node> = std::iter::once(&a).chain(peer.as_ref()).collect();
    let expected = if peer.is_some() {
        vec![count("x:1", 5), count("x:2", 1), count("x:3", 1)]
    } else {
        vec![count("x:1", 2), count("x:2", 1)]
    };
    for reader in &readers {
        let channels = reader.backplane.channels("x:").await.unwrap();
        assert_eq!(channels, expected, "summed, sorted, no empty channel");
        let all = reader.backplane.channels("").await.unwrap();
        assert!(
            all.contains(&count("y", 5)),
            "the empty prefix is every channel"
        );
    }
    a.backplane
        .report_channels(vec![count("x:2", 4)])
        .await
        .unwrap();
    let expected = if peer.is_some() {
        vec![count("x:1", 3), count("x:2", 4), count("x:3", 1)]
    } else {
        vec![count("x:2", 4)]
    };
    assert_eq!(
        a.backplane.channels("x:").await.unwrap(),
        expected,
        "a report replaces the node's previous one"
    );
    a.backplane.report_channels(vec![]).await.unwrap();
    let expected = if peer.is_some() {
        vec![count("x:1", 3), count("x:3", 1)]
    } else {
        vec![]
    };
    assert_eq!(a.backplane.channels("").await.unwrap(), expected);
}

/// A node dies with members (its presence writer and heartbeat stop at once, as with `kill -9`);
/// two survivors subscribed to its channels each hear exactly one leave per announced member,
/// and presence forgets them, while a survivor's own member stays.
pub async fn a_crashed_nodes_members_leave_once_each(store: &Store) {
    let ttl = Duration::from_secs(2);
    let options = with_settings(Settings {
        presence_ttl: ttl,
        ..Settings::default()
    });
    let doomed = store.node(options.clone()).await;
    let survivors = [store.node(options.clone()).await, store.node(options).await];
    for survivor in &survivors {
        survivor.backplane.subscribe("crash:a").await.unwrap();
        survivor.backplane.subscribe("crash:b").await.unwrap();
    }
    publish(&survivors[0], "crash:a", 1).await;
    let bp = &doomed.backplane;
    bp.presence_join("crash:a", member("m1", Some("u1")), true);
    bp.presence_join("crash:a", member("m2", None), true);
    bp.presence_join("crash:a", member("silent", Some("u3")), false);
    bp.presence_join("crash:b", member("m4", Some("u1")), true);
    flush(&doomed).await;
    survivors[0]
        .backplane
        .presence_join("crash:a", member("keeper", Some("u5")), true);
    flush(&survivors[0]).await;
    for survivor in &survivors {
        survivor
            .sink
            .wait_until("crash:a", "the joins", |got| {
                let got = script(got);
                got.contains(&"J1:m2".into()) && got.contains(&"J1:keeper".into())
            })
            .await;
    }

    let killed = std::time::Instant::now();
    doomed
        .redis
        .as_ref()
        .expect("a Redis node")
        .stop_presence_abruptly();
    poll_until("the dead node's members to be reaped", || async {
        let a = presence(&survivors[1], "crash:a").await;
        let b = presence(&survivors[1], "crash:b").await;
        (a.count == 1 && b.count == 0).then_some(())
    })
    .await;
    eprintln!(
        "reaped {:?} after the kill (presence_ttl {ttl:?})",
        killed.elapsed()
    );
    let a = presence(&survivors[0], "crash:a").await;
    assert_eq!(
        (clients(&a), a.users),
        (vec!["keeper"], 1),
        "only the keeper's user is left"
    );
    assert_eq!(presence(&survivors[0], "crash:b").await.users, 0);

    // The leaves were published with the deletes the reads above saw, so a publication after
    // them is a barrier: once it arrived, every leave did.
    publish(&survivors[0], "crash:a", 2).await;
    publish(&survivors[0], "crash:b", 1).await;
    for survivor in &survivors {
        let a = script(&survivor.sink.wait_for("crash:a", 2).await);
        let b = script(&survivor.sink.wait_for("crash:b", 1).await);
        let leaves = |got: &[String]| {
            let mut leaves: Vec<String> =
                got.iter().filter(|e| e.starts_with('L')).cloned().collect();
            leaves.sort();
            leaves
        };
        assert_eq!(
            leaves(&a),
            ["L1:m1", "L1:m2"],
            "one leave per announced member, none for a silent one: {a:?}"
        );
        assert_eq!(leaves(&b), ["L0:m4"], "{b:?}");
        assert_eq!(a.last().map(String::as_str), Some("P2"));
    }
}

/// Calls of `command` since the last `CONFIG RESETSTAT`, from `INFO commandstats` (commands a
/// script runs count too).
async fn command_calls(store: &Store, command: &str) -> u64 {
    let Store::Redis(server) = store else {
        panic!("a single Redis server")
    };
    let stats = server.cli(&["info", "commandstats"]).await;
    let line = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Redis loses everything (a restart without persistence): the node's periodic refresh puts its
/// members back, one script call per channel and 1,000 members (not a write per member), and
/// never a member that left before.
pub async fn refresh_restores_members_in_batches(store: &Store) {
    const MEMBERS: usize = 2500;
    let Store::Redis(server) = store else {
        panic!("a single Redis server")
    };
    let node = store
        .node(with_settings(Settings {
            presence_ttl: Duration::from_secs(3),
            ..Settings::default()
        }))
        .await;
    let bp = &node.backplane;
    for i in 0..MEMBERS {
        bp.presence_join("big", member(&format!("c{i}"), None), false);
    }
    bp.presence_leave("big", "c7", false);
    bp.presence_join("small", member("s", Some("u")), false);
    flush(&node).await;
    assert_eq!(presence(&node, "big").await.count, MEMBERS as u64 - 1);

    assert_eq!(server.cli(&["flushall"]).await, "OK");
    assert_eq!(server.cli(&["config", "resetstat"]).await, "OK");
    // Polled with plain HLEN: a presence read is a script call itself.
    let node_id = node.redis.as_ref().expect("a Redis node").node_id();
    let hlen = |channel: &str| {
        let key = format!("{PREFIX}:{{{channel}}}:pn:{node_id}");
        async move { server.cli(&["hlen", &key]).await }
    };
    poll_until("the refresh to restore the members", || async {
        let restored = hlen("big").await == (MEMBERS - 1).to_string() && hlen("small").await == "1";
        restored.then_some(())
    })
    .await;
    let scripts = command_calls(store, "evalsha").await;
    let writes = command_calls(store, "hset").await;
    assert!(writes >= MEMBERS as u64 - 1, "{writes} member writes");
    assert!(
        scripts * 100 < writes,
        "members are refreshed in batches: {scripts} script calls for {writes} member writes"
    );
    let big = presence(&node, "big").await;
    assert_eq!(big.count, MEMBERS as u64 - 1);
    assert!(
        !clients(&big).contains(&"c7"),
        "a member that left is not refreshed back"
    );
    let small = presence(&node, "small").await;
    assert_eq!(
        (small.count, small.users),
        (1, 1),
        "users are counted again too"
    );
}

/// Redis goes away (kill -9) and comes back empty: changes made meanwhile stay queued in order
/// (a flush says they are not applied) and are applied once it is back; the refresh puts back
/// what Redis lost.
pub async fn presence_changes_outlast_a_redis_outage(store: &mut Store) {
    let node = store
        .node(with_settings(Settings {
            presence_ttl: Duration::from_secs(3),
            ..Settings::default()
        }))
        .await;
    let bp = &node.backplane;
    bp.presence_join("outage", member("before", Some("u1")), false);
    flush(&node).await;
    let Store::Redis(server) = store else {
        panic!("a single Redis server")
    };
    server.kill9();
    bp.presence_join("outage", member("during", Some("u2")), false);
    bp.presence_join("outage", member("gone", None), false);
    bp.presence_leave("outage", "gone", false);
    assert!(
        bp.flush_presence().await.is_err(),
        "nothing can be applied while Redis is down"
    );
    server.restart().await;
    let read = poll_until(
        "the queued changes and the refresh to reach Redis",
        || async {
            let mut read = bp.presence("outage", true).await.ok()?;
            let members = read.members.as_mut()?;
            members.sort_by(|a, b| a.client.cmp(&b.client));
            (read.count == 2).then_some(read)
        },
    )
    .await;
    assert_eq!(
        clients(&read),
        ["before", "during"],
        "in order: gone joined, then left"
    );
    assert_eq!(read.users, 2);
    flush(&node).await;
}

/// Two survivors reap the same dead node at the same moment, over many channels: every member
/// is removed by exactly one of them and its leave is heard once.
pub async fn concurrent_reapers_announce_each_leave_once(store: &Store) {
    const CHANNELS: usize = 20;
    const EACH: usize = 5;
    let doomed = node(store).await;
    let survivors = [node(store).await, node(store).await];
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("reaped:{c}")).collect();
    for channel in &channels {
        survivors[0].backplane.subscribe(channel).await.unwrap();
        for m in 0..EACH {
            let client = format!("{channel}/{m}");
            doomed
                .backplane
                .presence_join(channel, member(&client, None), true);
        }
    }
    flush(&doomed).await;
    for channel in &channels {
        survivors[0]
            .sink
            .wait_until(channel, "the joins", |got| script(got).len() == EACH)
            .await;
    }
    let dead = doomed.redis.as_ref().expect("a Redis node");
    dead.stop_presence_abruptly();
    let reap = |survivor: &Node| {
        let redis = survivor.redis.clone().expect("a Redis node");
        let node_id = dead.node_id().to_string();
        async move { redis.reap_node(&node_id).await.expect("reap") }
    };
    let (first, second) = tokio::join!(reap(&survivors[0]), reap(&survivors[1]));
    assert_eq!(
        first + second,
        (CHANNELS * EACH) as u64,
        "each member removed by one reaper: {first} + {second}"
    );
    for channel in &channels {
        assert_eq!(presence(&survivors[1], channel).await.count, 0);
        publish(&survivors[1], channel, 1).await;
        let got = script(&survivors[0].sink.wait_for(channel, 1).await);
        let mut leaves: Vec<&String> = got.iter().filter(|e| e.starts_with('L')).collect();
        leaves.sort();
        let expected: Vec<String> = (0..EACH).map(|m| format!("L0:{channel}/{m}")).collect();
        assert_eq!(leaves, expected.iter().collect::<Vec<_>>(), "{got:?}");
    }
}

async fn publish_versioned(node: &Node, channel: &str, n: u64, version: Option<u64>) -> PublishAck {
    node.backplane
        .publish_item(&BatchItem {
            channel,
            data: data(n),
            idempotency: None,
            version,
        })
        .await
        .expect("publish")
}

pub async fn stale_versions_are_suppressed(store: &Store) {
    let node = node(store).await;
    node.backplane.subscribe("priced").await.unwrap();
    let first = publish_versioned(&node, "priced", 1, Some(10)).await;
    assert_eq!((first.offset, first.suppressed), (1, false));
    for stale in [10, 9, 0] {
        let ack = publish_versioned(&node, "priced", 2, Some(stale)).await;
        assert!(ack.suppressed, "version {stale} after 10 is suppressed");
        assert_eq!(
            (ack.offset, &ack.epoch, ack.tag),
            (1, &first.epoch, first.tag),
            "a suppressed publish answers the current top"
        );
    }
    let newer = publish_versioned(&node, "priced", 3, Some(11)).await;
    assert_eq!((newer.offset, newer.suppressed), (2, false));
    let unversioned = publish_versioned(&node, "priced", 4, None).await;
    assert_eq!(
        (unversioned.offset, unversioned.suppressed),
        (3, false),
        "a publish without a version is never suppressed"
    );
    let still = publish_versioned(&node, "priced", 5, Some(11)).await;
    assert!(still.suppressed, "nor does it reset the last version");
    assert_eq!(still.offset, 3);
    // Beyond 2^53, where a double would round 2^64-1 and 2^64-2 to the same number.
    let huge = publish_versioned(&node, "priced", 6, Some(u64::MAX - 1)).await;
    assert!(!huge.suppressed);
    let huge_again = publish_versioned(&node, "priced", 7, Some(u64::MAX - 1)).await;
    assert!(huge_again.suppressed, "compared exactly, not as doubles");
    let top = publish_versioned(&node, "priced", 8, Some(u64::MAX)).await;
    assert_eq!((top.offset, top.suppressed), (5, false));

    let delivered = node.sink.wait_for("priced", 5).await;
    assert_eq!(
        offsets(&delivered),
        vec![1, 2, 3, 4, 5],
        "nothing suppressed is delivered"
    );
    let page = history(&node, "priced", 0, 100).await;
    let stored: Vec<&[u8]> = page.publications.iter().map(|p| p.data()).collect();
    assert_eq!(
        stored,
        vec![
            &data(1)[..],
            &data(3)[..],
            &data(4)[..],
            &data(6)[..],
            &data(8)[..]
        ],
        "nothing suppressed is stored"
    );
    let other = publish_versioned(&node, "priced-other", 1, Some(1)).await;
    assert!(!other.suppressed, "versions are per channel");
}

pub async fn versions_race_atomically(store: &Store) {
    let first = node(store).await;
    let other;
    let second = if store.shared() {
        other = node(store).await;
        &other
    } else {
        &first
    };
    // Two producers send the same versions in opposite orders, concurrently: exactly one
    // publish per version can win, and the stored versions must increase.
    let up = async {
        let mut acks = Vec::new();
        for v in 1..=40 {
            acks.push((v, publish_versioned(&first, "raced", v, Some(v)).await));
        }
        acks
    };
    let down = async {
        let mut acks = Vec::new();
        for v in (1..=40).rev() {
            acks.push((v, publish_versioned(second, "raced", v, Some(v)).await));
        }
        acks
    };
    let (up, down) = tokio::join!(up, down);
    let stored = up
        .iter()
        .chain(&down)
        .filter(|(_, ack)| !ack.suppressed)
        .count() as u64;
    let page = history(&first, "raced", 0, 100).await;
    assert_eq!(page.top, stored, "every publish not suppressed was stored");
    let versions: Vec<u64> = page
        .publications
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(p.data()).unwrap();
            v["n"].as_u64().unwrap()
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "stored versions only increase: {versions:?}"
    );
    assert_eq!(versions.last(), Some(&40));
}
