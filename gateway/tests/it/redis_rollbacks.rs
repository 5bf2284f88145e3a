//! #12 tests: the two ways production Redis loses acknowledged writes that the RDB test in
//! `redis_faults` does not cover — a crash with `appendfsync everysec`, and a failover to a
//! replica that lagged. Real processes throughout: redis-server (master, replica), gateway
//! nodes, a testkit TCP proxy that freezes replication or moves the nodes to the promoted
//! replica. Subscribers stay connected through the fault on every node, publishers retry
//! through it, and a client resumes afterwards from a position it held. The one rule: every
//! acknowledged publication is delivered, or the subscriber got an explicit reset first; never
//! `recovered: true` over a rolled-back position.

use std::path::PathBuf;

use crate::support::*;
use serde_json::{json, Value};

const CHANNEL: &str = "rollbacks:c";

/// Redis' own idea of how much it has written: `master_repl_offset`.
async fn repl_offset(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["info", "replication"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no master_repl_offset in {info}"))
}

/// The incremental AOF file Redis 7 appends to (`appendonlydir/*.incr.aof`).
fn incr_aof(redis: &RedisServer) -> PathBuf {
    let dir = redis.dir().join("appendonlydir");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .unwrap_or_else(|| panic!("no incr AOF in {}", dir.display()))
}

/// The last acknowledged publication with its tag, as a client holds it.
fn held_position(ack: &Acked, history: &[Value]) -> (String, u64, Option<String>) {
    let tag = history
        .iter()
        .find(|p| p["offset"].as_u64() == Some(ack.offset) && p["data"] == ack.data)
        .and_then(|p| p["tag"].as_str().map(str::to_string));
    (ack.epoch.clone(), ack.offset, tag)
}

/// Raw history of the channel (publication objects with their tags).
async fn raw_history(addr: std::net::SocketAddr) -> Vec<Value> {
    let (status, body) = history(&addr, &format!("channel={CHANNEL}&since=0&limit=1000")).await;
    assert_eq!(status, 200, "{body}");
    body["publications"].as_array().cloned().unwrap_or_default()
}

/// What a subscriber's log says about the acks, by data rather than by position: publications
/// acknowledged after Redis lost writes but before a node noticed reuse the lost positions
/// under the old epoch, so a position names the ack only together with its data (and tag).
/// After a reset to the new epoch the subscriber receives that epoch's history from its start,
/// older data included; so an ack it never got is covered by a reset that came after what it
/// last got *of the ack's epoch*, and the new epoch's stream itself must have no gap (an ack
/// that survived into it is delivered there).
#[derive(Debug, Default)]
struct DataCheck {
    /// Acked, never delivered, and no reset after the last publication of its epoch delivered
    /// before it.
    silently_lost: Vec<Value>,
    covered_by_reset: usize,
    resets: usize,
    /// Publications delivered twice within one epoch.
    repeated: Vec<String>,
    /// Where the stream skipped offsets of an epoch, or changed epoch without a reset.
    gaps: Vec<String>,
}

/// The publishers' `i` of a publication's data: their order of acknowledgement.
fn i_of(data: &Value) -> u64 {
    data["i"].as_u64().expect("data.i")
}

fn check_by_data(items: &[Item], acked: &[Acked]) -> DataCheck {
    let mut check = DataCheck::default();
    // (index in the log, epoch, i) of each delivery.
    let mut delivered: Vec<(usize, &str, u64)> = Vec::new();
    let mut positions = std::collections::HashSet::new();
    let mut resets = Vec::new();
    // Where the stream stands: the epoch and the offset it continues after.
    let mut at: Option<(String, u64)> = None;
    for (index, item) in items.iter().enumerate() {
        match item {
            Item::Pub(p) => {
                if !positions.insert((p.epoch.clone(), p.offset)) {
                    check.repeated.push(format!("{}/{}", p.epoch, p.offset));
                }
                match &at {
                    Some((epoch, offset)) if *epoch == p.epoch && p.offset != offset + 1 => {
                        check
                            .gaps
                            .push(format!("{epoch}: {offset} -> {}", p.offset));
                    }
                    Some((epoch, _)) if *epoch != p.epoch && !epoch.is_empty() => {
                        check
                            .gaps
                            .push(format!("{epoch} -> {} without a reset", p.epoch));
                    }
                    _ => {}
                }
                at = Some((p.epoch.clone(), p.offset));
                delivered.push((index, &p.epoch, i_of(&p.data)));
            }
            Item::Reset { epoch, offset, .. } => {
                resets.push(index);
                at = Some((epoch.clone(), *offset));
            }
            // Where a subscription starts is its first publication.
            Item::Subscribed(_) => at = None,
            Item::Join(_) | Item::Leave(_) => {}
        }
    }
    check.resets = resets.len();
    for a in acked {
        let i = i_of(&a.data);
        if delivered.iter().any(|(_, _, d)| *d == i) {
            continue;
        }
        let before = delivered
            .iter()
            .filter(|(_, epoch, d)| *epoch == a.epoch && *d < i)
            .map(|(index, _, _)| *index)
            .max();
        if resets.iter().any(|&r| before.is_none_or(|b| r > b)) {
            check.covered_by_reset += 1;
        } else {
            check.silently_lost.push(a.data.clone());
        }
    }
    check
}

/// The check itself, on logs of the shapes a rollback gives: an ack lost with Redis' writes is
/// covered by the reset after the last delivery of its epoch, even though the new epoch replays
/// older data; a gap in the new epoch, or a loss with no reset, is not.
#[test]
fn the_check_covers_a_rollback_and_finds_gaps_and_silent_losses() {
    let delivery = |epoch: &str, offset, i| {
        Item::Pub(Pub {
            epoch: epoch.into(),
            offset,
            data: json!({ "i": i }),
        })
    };
    let ack = |epoch: &str, offset, i| Acked {
        epoch: epoch.into(),
        offset,
        data: json!({ "i": i }),
    };
    let reset = Item::Reset {
        epoch: "new".into(),
        offset: 0,
        reason: "epoch_changed".into(),
    };
    // Acked 0..=2 as old/1..=3; Redis kept old/1 only; 3 acked after the restart as old/2.
    let acked = [
        ack("old", 1, 0),
        ack("old", 2, 1),
        ack("old", 3, 2),
        ack("old", 2, 3),
    ];
    let rolled_back = [
        delivery("old", 1, 0),
        delivery("old", 2, 1),
        reset.clone(),
        delivery("new", 1, 0),
        delivery("new", 2, 3),
    ];
    let check = check_by_data(&rolled_back, &acked);
    assert!(
        check.silently_lost.is_empty() && check.gaps.is_empty(),
        "{check:?}"
    );
    assert_eq!(check.covered_by_reset, 1, "the ack Redis lost");

    let gap_in_the_new_epoch = [
        delivery("old", 1, 0),
        delivery("old", 2, 1),
        reset,
        delivery("new", 2, 3),
    ];
    let check = check_by_data(&gap_in_the_new_epoch, &acked);
    assert_eq!(check.gaps, vec!["new: 0 -> 2".to_string()], "{check:?}");

    let no_reset = [
        delivery("old", 1, 0),
        delivery("old", 2, 1),
        delivery("old", 4, 3),
    ];
    let check = check_by_data(&no_reset, &acked);
    assert_eq!(check.silently_lost, vec![json!({ "i": 2 })], "{check:?}");
}

/// Waits until every subscriber got the last ack, then checks the one rule on each; returns
/// the resets they got.
async fn assert_the_one_rule(subs: &[Sub], acked: &[Acked]) -> usize {
    let last = acked.last().expect("acks").clone();
    let mut resets = 0;
    for sub in subs {
        sub.wait_for("the last acknowledged publication", WAIT, |log| {
            log.pubs(CHANNEL).iter().any(|p| p.data == last.data)
        })
        .await;
        sub.ping().await;
        assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
        let items = sub.items(CHANNEL);
        let check = check_by_data(&items, acked);
        assert!(
            check.silently_lost.is_empty() && check.repeated.is_empty() && check.gaps.is_empty(),
            "{}: {check:?}",
            sub.name
        );
        resets += check.resets;
        eprintln!(
            "{}: {} publications, {} resets, {} acks covered by a reset",
            sub.name,
            pubs_of(&items).len(),
            check.resets,
            check.covered_by_reset
        );
    }
    resets
}

/// A client resumes from a position it held: never `recovered: true` if that position is not
/// the history's any more; when recovered, it receives every ack after it.
async fn assert_resume(
    name: &str,
    addr: std::net::SocketAddr,
    held: &(String, u64, Option<String>),
    survived: bool,
    acked: &[Acked],
) -> Value {
    let resumer = Sub::connect(name, addr).await;
    let mut since = json!({"epoch": held.0, "offset": held.1});
    if let Some(tag) = &held.2 {
        since["tag"] = json!(tag);
    }
    let reply = resumer
        .request(json!({"op": "subscribe", "channel": CHANNEL, "since": since}))
        .await;
    let result = reply["result"].clone();
    assert!(result.is_object(), "{name}: {reply}");
    if !survived {
        assert_eq!(
            result["recovered"], false,
            "{name}: a lost position: {reply}"
        );
        let reason = result["reason"].as_str().unwrap_or("");
        assert!(
            ["history_diverged", "epoch_changed", "offset_ahead"].contains(&reason),
            "{name}: {reply}"
        );
    }
    if result["recovered"] == true {
        let last = acked.last().unwrap();
        resumer
            .wait_for("the resume to reach the last ack", WAIT, |log| {
                log.pubs(CHANNEL)
                    .iter()
                    .any(|p| p.epoch == last.epoch && p.offset == last.offset)
            })
            .await;
        let check = check_delivery(&resumer.items(CHANNEL), acked, &(held.0.clone(), held.1));
        assert!(
            check.silently_lost.is_empty() && check.corrupt.is_empty() && check.resets == 0,
            "{name}: recovered, yet {check:?}"
        );
    }
    result
}

/// An SSE client resuming from a lost position of the old epoch: after `epoch_changed` the
/// `connected` event's cursor names where delivery starts (the reset's offset), not the new
/// epoch's top, so reconnecting with it misses nothing (#12, SSE after an epoch change).
async fn assert_sse_resume_names_the_start(
    addr: std::net::SocketAddr,
    held: &(String, u64, Option<String>),
) {
    let tag = held.2.as_deref().and_then(backplane::parse_tag);
    let cursor = gateway::cursor::encode_tagged([(CHANNEL, held.0.as_str(), held.1, tag)]);
    let mut sse = Sse::resume(&addr, &[CHANNEL], &cursor).await;
    sse.assert_stream();
    let connected = sse.connected().await;
    let result = connected_channels(&connected)[CHANNEL].clone();
    assert_eq!(result["recovered"], false, "{result}");
    let Ok(gateway::cursor::Cursor::Compact(id)) =
        gateway::cursor::decode_any(connected.id.as_deref().unwrap())
    else {
        panic!("an event id is a compact cursor: {connected:?}");
    };
    let start = id.offsets().next().expect("one channel");
    let reset = sse.next_event().await;
    assert_eq!(reset.kind(), "reset", "{reset:?}");
    let reset = reset.json();
    assert_eq!(start, reset["offset"].as_u64().unwrap(), "{reset}");
    // The nodes rotated the epoch (their subscribers got `epoch_changed`), so the held
    // position's epoch is gone: the new epoch follows from its start, and the cursor says so.
    assert_eq!(result["reason"], "epoch_changed", "{result}");
    assert!(
        start < result["offset"].as_u64().unwrap(),
        "connected names the top {result}, cursor at {start}"
    );
    let (_, first) = sse.publication().await;
    assert_eq!(first["offset"].as_u64().unwrap(), start + 1);
}

/// #12 `appendfsync everysec`: a crash loses the writes of the last second that were not yet on
/// disk. A `kill -9` of the process alone loses nothing (its writes are in the page cache), so the
/// machine crash is simulated the way it happens: Redis is killed, and its AOF is cut back to the
/// size it had at a moment before the last acknowledged publications — what an fsync every
/// second leaves on disk — then Redis restarts from it. Subscribers on both nodes stay
/// connected; each must get every acknowledged publication, or a reset before what it missed; a
/// client holding the last acknowledged position is not told `recovered: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_everysec_crash_loses_nothing_silently() {
    let mut redis = RedisServer::start_with(
        RedisOpts {
            aof: true,
            cluster: false,
        },
        vec!["--appendfsync".into(), "everysec".into()],
    )
    .await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let subs = [
        Sub::connect("sub@node0", addrs[0]).await,
        Sub::connect("sub@node1", addrs[1]).await,
    ];
    for sub in &subs {
        sub.subscribe(CHANNEL, None).await;
    }
    let channels = [CHANNEL.to_string()];
    let publishers = RetryingPublishers::start(&addrs, &channels);
    publishers.wait_acked(&channels, 20, WAIT).await;
    // What the disk holds when the machine dies: the AOF as of now.
    let aof = incr_aof(&redis);
    let on_disk = std::fs::metadata(&aof).expect("aof").len();
    let durable = publishers.count_of(CHANNEL);
    publishers.wait_acked(&channels, durable + 20, WAIT).await;
    // The position a client holds: the last ack it saw, with its tag.
    let before_crash = publishers.acked_of(CHANNEL);
    let held = held_position(before_crash.last().unwrap(), &raw_history(addrs[0]).await);
    redis.kill9();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&aof)
        .and_then(|f| f.set_len(on_disk))
        .expect("cut the AOF back");
    redis.restart().await;
    let count = publishers.count_of(CHANNEL);
    publishers.wait_acked(&channels, count + 20, WAIT).await;
    let acked = publishers.stop().await.remove(CHANNEL).unwrap();
    eprintln!(
        "{} acked in all, {} before the crash; the AOF kept the first {durable} or so",
        acked.len(),
        before_crash.len()
    );
    // The crash really lost acknowledged writes: the last ack before it is not in history (by
    // its data: its position may name a later publication, before or after the rotation).
    let lost_data = &before_crash.last().unwrap().data;
    let survived = raw_history(addrs[0])
        .await
        .iter()
        .any(|p| p["data"] == *lost_data);
    assert!(
        !survived,
        "the cut AOF still held the last ack before the crash"
    );

    let resets = assert_the_one_rule(&subs, &acked).await;
    assert!(resets >= 2, "every subscriber was told of the loss");
    for (n, addr) in addrs.iter().enumerate() {
        assert_resume(&format!("resumer@node{n}"), *addr, &held, false, &acked).await;
    }
    assert_sse_resume_names_the_start(addrs[1], &held).await;
}

/// #12 failover to a lagging replica: master and replica (replication through a testkit proxy),
/// gateway nodes reaching Redis through another proxy (the fixed address a Service or VIP gives).
/// Replication is frozen, more publications are acknowledged by the master alone, the master is
/// killed, the replica promoted (`REPLICAOF NO ONE`) and the nodes' address moved to it. Every
/// subscriber gets every acknowledged publication or a reset first; a client holding a position
/// only the old master had is not recovered; one holding a replicated position is recovered
/// exactly, or told why not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_lagging_replica_loses_nothing_silently() {
    let mut master = RedisServer::start(RedisOpts::default()).await;
    let master_addr: std::net::SocketAddr = master.addr().parse().unwrap();
    let replication = TcpProxy::start(master_addr).await;
    let replica = RedisServer::start_with(
        RedisOpts::default(),
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            replication.port.to_string(),
        ],
    )
    .await;
    let front = TcpProxy::start(master_addr).await;
    let backend = Backend {
        args: vec!["--redis-url".into(), format!("redis://{}", front.addr())],
    };
    let nodes = start_nodes(&backend, 2, &PATIENT).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let subs = [
        Sub::connect("sub@node0", addrs[0]).await,
        Sub::connect("sub@node1", addrs[1]).await,
    ];
    for sub in &subs {
        sub.subscribe(CHANNEL, None).await;
    }
    let channels = [CHANNEL.to_string()];
    let publishers = RetryingPublishers::start(&addrs, &channels);
    publishers.wait_acked(&channels, 20, WAIT).await;

    // Freeze replication once the replica has everything acknowledged so far.
    let replicated = publishers.acked_of(CHANNEL);
    let want = repl_offset(&master).await;
    poll_until("the replica in sync", WAIT, || async {
        (repl_offset(&replica).await >= want).then_some(())
    })
    .await;
    replication.pause();
    let synced = held_position(replicated.last().unwrap(), &raw_history(addrs[0]).await);
    let count = publishers.count_of(CHANNEL);
    publishers.wait_acked(&channels, count + 20, WAIT).await;
    let lag_history = raw_history(addrs[0]).await;
    let before_failover = publishers.acked_of(CHANNEL);
    let lost = held_position(before_failover.last().unwrap(), &lag_history);
    let master_offset = repl_offset(&master).await;

    // The master dies; the replica, behind it, is promoted; the nodes' address moves to it.
    master.kill9();
    replication.cut();
    let replica_offset = repl_offset(&replica).await;
    assert!(
        replica_offset < master_offset,
        "the replica lagged: {replica_offset} < {master_offset}"
    );
    assert_eq!(replica.cli(&["replicaof", "no", "one"]).await, "OK");
    front.retarget(replica.addr().parse().unwrap());
    front.cut();
    let count = publishers.count_of(CHANNEL);
    publishers.wait_acked(&channels, count + 20, WAIT).await;
    let acked = publishers.stop().await.remove(CHANNEL).unwrap();
    let lost_data = &before_failover.last().unwrap().data;
    let survived = raw_history(addrs[0])
        .await
        .iter()
        .any(|p| p["data"] == *lost_data);
    assert!(!survived, "the promoted replica held the master's last ack");

    let resets = assert_the_one_rule(&subs, &acked).await;
    assert!(resets >= 2, "every subscriber was told of the loss");
    for (n, addr) in addrs.iter().enumerate() {
        assert_resume(&format!("lost@node{n}"), *addr, &lost, false, &acked).await;
        let r = assert_resume(&format!("synced@node{n}"), *addr, &synced, true, &acked).await;
        eprintln!("resume from the replicated position {synced:?} on node{n}: {r}");
    }
    assert_sse_resume_names_the_start(addrs[0], &lost).await;
}
