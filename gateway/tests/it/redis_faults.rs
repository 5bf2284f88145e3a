//! The Redis pub/sub link under the faults production Redis has (issue #12), each with real
//! processes: clients that leave mid-subscribe, a flood of subscribes over fresh channel names, a
//! Redis Cluster slot migration, and Redis restarting from an older RDB snapshot. Every test
//! asserts the one rule: every acknowledged publication reaches every subscriber, or the
//! subscriber gets an explicit reset first.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use crate::support::*;
use serde_json::{json, Value};

/// Channels of the node's link at Redis, health channels excepted.
async fn pubsub_channels(redis: &RedisServer) -> usize {
    redis
        .cli(&["pubsub", "channels", "gw:*"])
        .await
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("{health."))
        .count()
}

async fn subscribe_calls(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]).await;
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_subscribe:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// #12.5: 500 WebSocket connections each subscribe to a fresh channel and close in the same
/// write. The subscriptions their subscribes made at Redis must be released after the linger:
/// Redis' channel count and the node's gauge go back to the baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_of_clients_that_left_are_released_after_the_linger() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    // 500 fresh channels from one address in a moment: the fresh-channel rate is not what
    // this test is about.
    let linger = [
        ("GATEWAY__REDIS__SUBSCRIBE_LINGER", "1s"),
        ("GATEWAY__LIMITS__FRESH_CHANNELS_PER_SECOND", "0"),
    ];
    let env: Vec<(&str, &str)> = PATIENT.iter().chain(&linger).copied().collect();
    let node = GatewayProcess::start("node", &Backend::standalone(&redis).args, &env).await;
    // A subscriber that stays: its channel is part of the baseline and must stay subscribed.
    let stays = Sub::connect("stays", node.addr).await;
    stays.subscribe("leak:stays", None).await;
    let baseline = pubsub_channels(&redis).await;
    assert_eq!(
        baseline, 2,
        "only the staying subscriber's channel and the node's control channel"
    );
    let calls_before = subscribe_calls(&redis).await;

    let run = format!("{:x}", rand::random::<u32>());
    for batch in 0..10 {
        let clients = (0..50).map(|i| {
            let channel = format!("leak:{run}:{batch}:{i}");
            async move {
                if i == 0 {
                    // One per batch waits for its subscribe's answer, which comes once the
                    // link has subscribed at Redis, then leaves: whatever the race of the others
                    // (whose close may be read before their subscribe reaches the link), some
                    // subscriptions exist to be released.
                    let sub = Sub::connect("leaves", node.addr).await;
                    sub.subscribe(&channel, None).await;
                    sub.close().await;
                } else {
                    subscribe_and_close_in_one_write(node.addr, &channel).await
                }
            }
        });
        futures_util::future::join_all(clients).await;
    }
    let calls = subscribe_calls(&redis).await - calls_before;
    assert!(calls >= 10, "{calls} SUBSCRIBE commands reached Redis");

    let (channels, gauge) = poll_until(
        "Redis subscriptions and the gauge back to the baseline",
        WAIT,
        || async {
            let channels = pubsub_channels(&redis).await;
            let gauge = metric_of(node.addr, "gateway_backplane_pubsub_subscriptions").await;
            (channels == baseline && gauge == baseline as f64).then_some((channels, gauge))
        },
    )
    .await;
    eprintln!("{calls} SUBSCRIBE commands; back to {channels} channel(s), gauge {gauge}");
    assert_eq!(metric_of(node.addr, "gateway_channels").await, 1.0);

    // The staying subscriber still receives.
    let (status, body) = publish_http(node.addr, "leak:stays", &json!({"i": 1})).await;
    assert_eq!(status, 200, "{body}");
    stays.wait_offset("leak:stays", 1).await;
}

/// Upper bound of the histogram bucket holding quantile `q` of the samples added between two
/// scrapes of `gateway_fanout_latency_seconds{transport="ws"}`.
fn latency_quantile(before: &str, after: &str, q: f64) -> String {
    let series = "gateway_fanout_latency_seconds_bucket{transport=\"ws\"";
    bucket_quantile(before, after, series, q).map_or("n/a".into(), |le| format!("<= {le}s"))
}

/// #12.5: the link never waits on Redis in its own loop. While 16 clients flood the node with
/// subscribes of fresh channel names (each one a SUBSCRIBE and a position read at Redis), a
/// subscriber on another channel receives every publication, in order, exactly once (300 before
/// the flood, 300 during it). Latency is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_subscribes_does_not_hold_up_other_channels() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    // The flood is what the link must withstand, so the per-IP fresh-channel rate that would
    // refuse most of it is off here (`fresh_channels` tests that limit).
    let unlimited = [("GATEWAY__LIMITS__FRESH_CHANNELS_PER_SECOND", "0")];
    let env: Vec<(&str, &str)> = PATIENT.iter().chain(&unlimited).copied().collect();
    let node = GatewayProcess::start("node", &Backend::standalone(&redis).args, &env).await;
    let hot = "flood:hot";
    let live = Sub::connect("live", node.addr).await;
    live.subscribe(hot, None).await;

    // The same publishing without the flood, for the latency figure printed at the end.
    let quiet_before = metrics_text(node.addr).await;
    let acks = Acks::default();
    let quiet = [hot.to_string()];
    Publisher::start(node.addr, Via::Http, &quiet, "quiet", &acks, 300, 2)
        .await
        .finish()
        .await;
    live.wait_offset(hot, 300).await;
    let quiet_after = metrics_text(node.addr).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flooders = Vec::new();
    for f in 0..16 {
        let (stop, flooded) = (stop.clone(), flooded.clone());
        let addr = node.addr;
        flooders.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sub = Sub::connect(&format!("flood{f}"), addr).await;
                let subscribes = (0..64).map(|i| {
                    let channel = format!("flood:{f}:{round}:{i}");
                    let sub = &sub;
                    async move { sub.subscribe(&channel, None).await }
                });
                futures_util::future::join_all(subscribes).await;
                flooded.fetch_add(64, std::sync::atomic::Ordering::Relaxed);
                sub.close().await;
                round += 1;
            }
        }));
    }
    poll_until("the flood to get going", WAIT, || async {
        (flooded.load(std::sync::atomic::Ordering::Relaxed) >= 256).then_some(())
    })
    .await;

    let before = metrics_text(node.addr).await;
    let publisher = Publisher::start(
        node.addr,
        Via::Http,
        &[hot.to_string()],
        "hot",
        &acks,
        300,
        2,
    )
    .await;
    publisher.finish().await;
    let (epoch, expected) = acks.single(hot);
    assert_contiguous(hot, &expected);
    // Still flooding: the hot channel's last publication arrives.
    live.wait_offset(hot, *expected.keys().next_back().unwrap())
        .await;
    let after = metrics_text(node.addr).await;
    let during = flooded.load(std::sync::atomic::Ordering::Relaxed);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        within("flooder to stop", f).await.expect("flooder failed");
    }
    let total = flooded.load(std::sync::atomic::Ordering::Relaxed);

    live.ping().await;
    assert_exact(
        "live subscriber during the flood",
        &live.pubs(hot),
        &epoch,
        &expected,
        0,
    );
    eprintln!(
        "fresh subscribes: {during} while publishing, {total} in all; fan-out latency of the \
         hot channel without the flood: p50 {}, p99 {}; during the flood: p50 {}, p99 {}",
        latency_quantile(&quiet_before, &quiet_after, 0.5),
        latency_quantile(&quiet_before, &quiet_after, 0.99),
        latency_quantile(&before, &after, 0.5),
        latency_quantile(&before, &after, 0.99)
    );
}

/// #12.4: on Redis Cluster, the slot of a channel moves to another master while a subscriber
/// listens (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on every master). Redis ends the node's
/// sharded subscription with a `sunsubscribe` push; the link subscribes again at the new owner
/// and fills from history what was published meanwhile. Every acknowledged publication arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_migration_keeps_live_delivery() {
    let cluster = RedisCluster::start(3).await;
    let node = GatewayProcess::start("node", &cluster.backend().args, &PATIENT).await;
    let channel = "reshard:c";
    let sub = Sub::connect("sub", node.addr).await;
    sub.subscribe(channel, None).await;

    let mut acked: Vec<(Value, Value)> = Vec::new();
    let publish = |i: u64| async move {
        let data = json!({"i": i});
        let (ack, _) = publish_until_acked(node.addr, channel, &data).await;
        (ack, data)
    };
    for i in 1..=3 {
        acked.push(publish(i).await);
    }
    sub.wait_offset(channel, 3).await;

    let slot = cluster.slot_of("gw:{reshard:c}:p").await;
    let from = cluster.owner_of(slot).await;
    let to = (from + 1) % 3;
    let moving = cluster.begin_slot_move(slot, to).await;
    acked.push(publish(4).await);
    moving.move_keys().await;
    acked.push(publish(5).await);
    moving.finish().await;
    for i in 6..=8 {
        acked.push(publish(i).await);
    }
    assert_eq!(cluster.owner_of(slot).await, to, "the slot moved");

    let epoch = acked[0].0["epoch"].as_str().unwrap().to_string();
    let mut expected = BTreeMap::new();
    for (ack, data) in &acked {
        assert_eq!(ack["epoch"], epoch.as_str(), "one epoch throughout: {ack}");
        expected.insert(ack["offset"].as_u64().unwrap(), data.clone());
    }
    assert_contiguous(channel, &expected);
    sub.wait_offset(channel, 8).await;
    sub.ping().await;
    assert!(
        !sub.items(channel)
            .iter()
            .any(|i| matches!(i, Item::Reset { .. })),
        "no reset needed: {:?}",
        sub.items(channel)
    );
    assert_exact(
        "subscriber across the migration",
        &sub.pubs(channel),
        &epoch,
        &expected,
        0,
    );
    // The node listens at the slot's new owner.
    let numsub = cluster.nodes[to]
        .cli(&["pubsub", "shardnumsub", "gw:{reshard:c}:p"])
        .await;
    assert_eq!(numsub.lines().nth(1).map(str::trim), Some("1"), "{numsub}");
}

/// #12.1 and #12.7, the live half: Redis with RDB snapshots only. Publish 10, SAVE, publish 5,
/// `kill -9`, restart (it loads the snapshot: top 10, same epoch), publish 7. The offsets 11..15
/// are reused; the link notices (the top went below what it delivered, or the publication at
/// its delivered offset is another one), exactly one node rotates the epoch, and each subscriber
/// that stayed connected receives all 22 acknowledged publications, the 7 after the restart after
/// an explicit reset. A client resuming from a position of the lost history is not recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdb_snapshot_rollback_is_made_explicit_and_loses_nothing() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let channel = "rollback:c";
    let subs = [
        Sub::connect("sub@node0", nodes[0].addr).await,
        Sub::connect("sub@node1", nodes[1].addr).await,
    ];
    for sub in &subs {
        sub.subscribe(channel, None).await;
    }
    let mut acked: Vec<(Value, Value)> = Vec::new();
    for i in 1..=10 {
        let data = json!({"i": i});
        acked.push((
            publish_until_acked(nodes[0].addr, channel, &data).await.0,
            data,
        ));
    }
    assert_eq!(redis.cli(&["save"]).await, "OK");
    for i in 11..=15 {
        let data = json!({"i": i});
        acked.push((
            publish_until_acked(nodes[0].addr, channel, &data).await.0,
            data,
        ));
    }
    let e1 = acked[0].0["epoch"].as_str().unwrap().to_string();
    for sub in &subs {
        sub.wait_offset(channel, 15).await;
    }
    redis.kill9();
    redis.restart().await;
    let restarted = Instant::now();
    let mut after_restart = Vec::new();
    let mut maybe_stored = 0;
    for i in 16..=22 {
        let data = json!({"i": i});
        let (ack, failures) = publish_until_acked(nodes[1].addr, channel, &data).await;
        maybe_stored += failures;
        acked.push((ack.clone(), data.clone()));
        after_restart.push((ack, data));
    }
    eprintln!(
        "7 publishes acknowledged {} after the restart ({maybe_stored} refused attempts): {:?}",
        elapsed(restarted),
        after_restart
            .iter()
            .map(|(a, _)| (&a["epoch"], &a["offset"]))
            .collect::<Vec<_>>()
    );
    // The rollback is real: offsets were reused.
    assert!(
        after_restart
            .iter()
            .any(|(a, _)| a["offset"].as_u64() <= Some(15)),
        "Redis did not roll back: {after_restart:?}"
    );

    let wanted: HashSet<String> = acked.iter().map(|(_, d)| d.to_string()).collect();
    for sub in &subs {
        sub.wait_for("all 22 acknowledged publications", WAIT, |log| {
            let got: HashSet<String> = log
                .pubs(channel)
                .iter()
                .map(|p| p.data.to_string())
                .collect();
            wanted.is_subset(&got)
        })
        .await;
        sub.ping().await;
        assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
        let items = sub.items(channel);
        let reset_at = items
            .iter()
            .position(|i| matches!(i, Item::Reset { .. }))
            .unwrap_or_else(|| panic!("{}: no reset: {items:?}", sub.name));
        let Item::Reset {
            epoch: e2, reason, ..
        } = &items[reset_at]
        else {
            unreachable!()
        };
        assert_ne!(e2, &e1, "{}: the reset names a new epoch", sub.name);
        assert_eq!(reason, "epoch_changed");
        // Before the reset: 1..=15 of the old epoch in order (nothing reused delivered there).
        let before = pubs_of(&items[..reset_at]);
        let want_before: Vec<(String, u64, Value)> = acked[..15]
            .iter()
            .map(|(a, d)| (e1.clone(), a["offset"].as_u64().unwrap(), d.clone()))
            .collect();
        let got_before: Vec<(String, u64, Value)> = before
            .iter()
            .map(|p| (p.epoch.clone(), p.offset, p.data.clone()))
            .collect();
        assert_eq!(got_before, want_before, "{}: before the reset", sub.name);
        // After it: the new epoch, gap-free and in order, holding every publication
        // acknowledged after the restart.
        let after = pubs_of(&items[reset_at + 1..]);
        assert!(
            after.iter().all(|p| &p.epoch == e2),
            "{}: {after:?}",
            sub.name
        );
        let offsets: Vec<u64> = after.iter().map(|p| p.offset).collect();
        let first = offsets.first().copied().unwrap_or(1);
        assert_eq!(
            offsets,
            (first..first + offsets.len() as u64).collect::<Vec<_>>(),
            "{}: the new epoch gap-free from its start",
            sub.name
        );
        let after_data: HashSet<String> = after.iter().map(|p| p.data.to_string()).collect();
        for (_, data) in &after_restart {
            assert!(
                after_data.contains(&data.to_string()),
                "{}: {data} (acknowledged after the restart) not delivered after the reset",
                sub.name
            );
        }
        assert!(
            !items[reset_at + 1..]
                .iter()
                .any(|i| matches!(i, Item::Reset { .. })),
            "{}: one reset: {items:?}",
            sub.name
        );
    }

    // A position from before the loss is not recovered, on either node.
    for node in &nodes {
        let resumer = Sub::connect("resumer", node.addr).await;
        let r = resumer.subscribe(channel, Some(&(e1.clone(), 15))).await;
        assert_eq!(r["recovered"], false, "{r}");
        assert_eq!(r["reason"], "epoch_changed", "{r}");
    }
}

/// #12.4: reconnects are tracked per shard. On a 3-master cluster (AOF `always`, so nothing is
/// lost), the master owning a channel is killed and restarted while the shard of the node's
/// health channel stays up, so the link turns healthy again before that shard's subscription is
/// back. What is published right after the restart must still reach the subscriber: the channel
/// is re-read when Redis confirms its subscription again, not when the health echo returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shard_restart_is_resynced_when_its_subscription_returns() {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            RedisServer::start(RedisOpts {
                aof: true,
                cluster: true,
            })
            .await,
        );
    }
    let mut cluster = RedisCluster::create(nodes).await;
    let node = GatewayProcess::start("node", &cluster.backend().args, &PATIENT).await;
    // The shard holding the node's health channel.
    let mut health_shard = None;
    for (n, redis) in cluster.nodes.iter().enumerate() {
        if redis
            .cli(&["pubsub", "shardchannels", "*health*"])
            .await
            .contains("health")
        {
            health_shard = Some(n);
        }
    }
    let health_shard = health_shard.expect("the health channel is on some shard");
    let mut channel = String::new();
    let mut owner = health_shard;
    for i in 0.. {
        channel = format!("shard:{i}");
        owner = cluster
            .owner_of(cluster.slot_of(&format!("gw:{{{channel}}}:p")).await)
            .await;
        if owner != health_shard {
            break;
        }
    }
    let sub = Sub::connect("sub", node.addr).await;
    sub.subscribe(&channel, None).await;
    let mut acked: Vec<(Value, Value)> = Vec::new();
    for i in 1..=3 {
        let data = json!({"i": i});
        acked.push((
            publish_until_acked(node.addr, &channel, &data).await.0,
            data,
        ));
    }
    sub.wait_offset(&channel, 3).await;

    let reconnects = metric_of(node.addr, "gateway_backplane_pubsub_reconnects_total").await;
    cluster.nodes[owner].kill9();
    // The link saw the shard go, and is healthy again through the health channel's shard while
    // the channel's shard is still down.
    poll_until("the link to notice the shard's loss", WAIT, || async {
        let now = metric_of(node.addr, "gateway_backplane_pubsub_reconnects_total").await;
        (now > reconnects).then_some(())
    })
    .await;
    node.wait_ready().await;
    cluster.nodes[owner].restart().await;
    cluster.wait_ok().await;
    for i in 4..=5 {
        let data = json!({"i": i});
        acked.push((
            publish_until_acked(node.addr, &channel, &data).await.0,
            data,
        ));
    }

    let epoch = acked[0].0["epoch"].as_str().unwrap().to_string();
    let mut expected = BTreeMap::new();
    for (ack, data) in &acked {
        assert_eq!(
            ack["epoch"],
            epoch.as_str(),
            "AOF always keeps the epoch: {ack}"
        );
        expected.insert(ack["offset"].as_u64().unwrap(), data.clone());
    }
    assert_contiguous(&channel, &expected);
    sub.wait_offset(&channel, 5).await;
    sub.ping().await;
    assert_exact(
        "subscriber across the shard restart",
        &sub.pubs(&channel),
        &epoch,
        &expected,
        0,
    );
}

/// #12.7: Redis restarts empty (no persistence) and the channel gets a new epoch; publications
/// are made before the nodes notice. A subscriber that stayed connected gets a reset to the new
/// epoch at offset 0 and then every publication of the new epoch from offset 1, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_change_is_delivered_from_offset_1() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let channel = "epoch:c";
    let sub = Sub::connect("sub@node0", nodes[0].addr).await;
    sub.subscribe(channel, None).await;
    for i in 1..=5 {
        publish_until_acked(nodes[1].addr, channel, &json!({"i": i})).await;
    }
    sub.wait_offset(channel, 5).await;
    let e1 = sub.log().position(channel).unwrap().0;

    redis.kill9();
    redis.restart().await;
    let mut expected = BTreeMap::new();
    let mut e2 = String::new();
    for i in 6..=8 {
        let data = json!({"i": i});
        let (ack, _) = publish_until_acked(nodes[1].addr, channel, &data).await;
        e2 = ack["epoch"].as_str().unwrap().to_string();
        expected.insert(ack["offset"].as_u64().unwrap(), data);
    }
    assert_ne!(e2, e1, "Redis restarted empty: a new epoch");
    assert_contiguous(channel, &expected);

    sub.wait_for("the new epoch's publications", WAIT, |log| {
        log.position(channel) == Some((e2.clone(), 3))
    })
    .await;
    sub.ping().await;
    let items = sub.items(channel);
    let reset_at = items
        .iter()
        .position(|i| matches!(i, Item::Reset { .. }))
        .unwrap_or_else(|| panic!("no reset: {items:?}"));
    assert_eq!(
        items[reset_at],
        Item::Reset {
            epoch: e2.clone(),
            offset: 0,
            reason: "epoch_changed".into()
        },
        "{items:?}"
    );
    let after: Vec<Pub> = items[reset_at + 1..]
        .iter()
        .filter_map(|i| match i {
            Item::Pub(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_exact(
        "subscriber after the epoch change",
        &after,
        &e2,
        &expected,
        0,
    );
}
