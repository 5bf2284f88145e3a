//! Redis killed with SIGKILL while publishing: publishes are refused with 503 while it is down
//! (never a 200 for something not stored), connected clients stay connected, and after the
//! restart the channel either changes epoch (no persistence) or resumes completely (AOF).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::*;
use serde_json::{json, Value};
use tokio::sync::watch;

const UP: u8 = 0;
const DOWN: u8 = 1;
const RESTARTED: u8 = 2;

/// One HTTP publish and the outage phase when it was sent and when its answer came.
#[derive(Debug, Clone)]
struct Attempt {
    sent: u8,
    answered: u8,
    status: u16,
    body: Value,
    data: Value,
}

impl Attempt {
    /// Sent and answered while Redis was down: it cannot have been stored.
    fn during_outage(&self) -> bool {
        self.sent == DOWN && self.answered == DOWN
    }
}

/// HTTP publishers to one channel that accept 503 answers and record every attempt with the
/// phase it happened in.
struct PhasePublisher {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    progress: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PhasePublisher {
    fn start(addr: std::net::SocketAddr, channel: &str, acks: &Acks, workers: usize) -> Self {
        let phase = Arc::new(AtomicU8::new(UP));
        let stop = Arc::new(AtomicBool::new(false));
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(0));
        let (tx, progress) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let tasks = (0..workers)
            .map(|_| {
                let (phase, stop, attempts, next, tx, acks) = (
                    phase.clone(),
                    stop.clone(),
                    attempts.clone(),
                    next.clone(),
                    tx.clone(),
                    acks.clone(),
                );
                let channel = channel.to_string();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let data = json!({"tag": "p", "i": i});
                        let sent = phase.load(Ordering::SeqCst);
                        let (status, body) = publish_http(addr, &channel, &data).await;
                        let answered = phase.load(Ordering::SeqCst);
                        if status == 200 {
                            acks.record(&channel, &body, &data);
                        }
                        let n = {
                            let mut all = attempts.lock().unwrap();
                            all.push(Attempt {
                                sent,
                                answered,
                                status,
                                body,
                                data,
                            });
                            all.len() as u64
                        };
                        tx.send_replace(n);
                    }
                })
            })
            .collect();
        PhasePublisher {
            phase,
            stop,
            attempts,
            progress,
            tasks,
        }
    }

    fn set_phase(&self, p: u8) {
        self.phase.store(p, Ordering::SeqCst);
    }

    /// Waits until `pred` counts at least `n` attempts.
    async fn wait_attempts(&self, what: &str, n: usize, pred: impl Fn(&Attempt) -> bool) {
        let mut progress = self.progress.clone();
        within(what, async {
            loop {
                let _ = progress.borrow_and_update();
                if self
                    .attempts
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|a| pred(a))
                    .count()
                    >= n
                {
                    return;
                }
                progress
                    .changed()
                    .await
                    .expect("publisher stopped unexpectedly");
            }
        })
        .await
    }

    async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within("publisher to stop", t)
                .await
                .expect("publisher panicked");
        }
        let all = self.attempts.lock().unwrap().clone();
        all
    }
}

/// The checks on every attempt: only 200 or 503 backplane_unavailable, and nothing sent and
/// answered during the outage succeeded. Returns the attempts made during the outage.
fn check_attempts(attempts: &[Attempt]) -> Vec<Attempt> {
    for a in attempts {
        match a.status {
            200 => {}
            503 => assert_eq!(
                a.body["error"]["code"], "backplane_unavailable",
                "503 with another error: {a:?}"
            ),
            _ => panic!("publish answered neither 200 nor 503: {a:?}"),
        }
    }
    let outage: Vec<Attempt> = attempts
        .iter()
        .filter(|a| a.during_outage())
        .cloned()
        .collect();
    assert!(!outage.is_empty(), "no publish happened during the outage");
    for a in &outage {
        assert_eq!(
            a.status, 503,
            "a publish sent and answered while Redis was down was not refused: {a:?}"
        );
    }
    outage
}

/// While Redis is down: explicit HTTP and WebSocket publishes are refused, and both nodes stop
/// being ready.
async fn outage_checks(nodes: &[GatewayProcess], live: &Sub, channel: &str) {
    let (status, body) = publish_http(nodes[0].addr, channel, &json!({"tag": "http-outage"})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("backplane_unavailable")),
        "HTTP publish while Redis is down: {status} {body}"
    );
    let reply = live.publish(channel, &json!({"tag": "ws-outage"})).await;
    assert_eq!(
        reply["error"]["code"], "backplane_unavailable",
        "WebSocket publish while Redis is down: {reply}"
    );
    assert!(reply.get("result").is_none(), "{reply}");
    for node in nodes {
        let addr = node.addr;
        let body = poll_until(
            &format!("{}: /readyz 503 while Redis is down", node.name),
            WAIT,
            || async move {
                let (status, body) = readyz(addr).await;
                (status == 503).then_some(body)
            },
        )
        .await;
        assert_eq!(body["error"]["code"], "not_ready", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

/// Kills Redis while publishing: publishes are refused and clients stay connected (see
/// `outage_checks`); then restarts it and waits for `after` successful publishes.
async fn outage_then_restart(
    redis: &mut RedisServer,
    publisher: &PhasePublisher,
    nodes: &[GatewayProcess],
    live: &Sub,
    channel: &str,
    after: usize,
) {
    redis.kill9();
    publisher.set_phase(DOWN);
    publisher
        .wait_attempts(
            "refused publishes during the outage",
            4,
            Attempt::during_outage,
        )
        .await;
    outage_checks(nodes, live, channel).await;

    publisher.set_phase(RESTARTED);
    redis.restart().await;
    publisher
        .wait_attempts("publishes after the restart", after, |a| {
            a.sent == RESTARTED && a.status == 200
        })
        .await;
}

fn has_tag(pubs: &[Pub], tag: &str) -> bool {
    pubs.iter().any(|p| p.data["tag"] == tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_publishes_and_epoch_changes_without_persistence() {
    let mut redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &[]).await;
    let channel = "outage:volatile";

    let live = Sub::connect("live@node1", nodes[1].addr).await;
    let r = live.subscribe(channel, None).await;
    // A channel with no publication has no epoch yet (#12.5): the first publication makes it.
    assert_eq!(r["epoch"], "", "{r}");
    let live_start = r["offset"].as_u64().unwrap();

    let acks = Acks::default();
    let publisher = PhasePublisher::start(nodes[0].addr, channel, &acks, 2);
    publisher
        .wait_attempts("publishes before the outage", 30, |a| a.status == 200)
        .await;
    live.wait_for("live publications", WAIT, |l| l.pub_count(channel) >= 10)
        .await;
    let e1 = live.pubs(channel)[0].epoch.clone();

    outage_then_restart(&mut redis, &publisher, &nodes, &live, channel, 30).await;
    for node in &nodes {
        node.wait_ready().await;
    }
    let attempts = publisher.stop().await;
    check_attempts(&attempts);

    // Two epochs: the lost one and the new one. The new one is gap-free from 1; the lost one may
    // have offsets whose publish was executed but whose answer was lost in the crash (a 503 for
    // something stored: the outcome of a request in flight when Redis dies is unknowable).
    let epochs = acks.epochs(channel);
    let e2 = epochs
        .keys()
        .find(|e| **e != e1)
        .unwrap_or_else(|| panic!("no new epoch after losing Redis' data: {epochs:?}"))
        .clone();
    assert_eq!(epochs.len(), 2, "epochs: {:?}", epochs.keys());
    assert_contiguous(&format!("{channel} epoch {e2}"), &epochs[&e2]);
    let in_flight_at_crash: HashSet<String> = attempts
        .iter()
        .filter(|a| a.status != 200 && !a.during_outage())
        .map(|a| a.data.to_string())
        .collect();
    for a in attempts.iter().filter(|a| a.status == 200) {
        if a.answered == UP {
            assert_eq!(a.body["epoch"], e1.as_str(), "{a:?}");
        }
        if a.sent == RESTARTED {
            assert_eq!(a.body["epoch"], e2.as_str(), "{a:?}");
        }
    }

    // The connected client: never closed, a prefix of the old epoch, one reset to the new epoch,
    // then every later publication of the new epoch.
    let top2 = acks.top(channel, &e2);
    live.wait_for("the new epoch's last publication", WAIT, |l| {
        l.position(channel) == Some((e2.clone(), top2))
    })
    .await;
    live.ping().await;
    assert!(
        live.ended().is_none(),
        "live client closed: {:?}",
        live.ended()
    );
    let items = live.items(channel);
    let resets: Vec<(usize, &Item)> = items
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i, Item::Reset { .. }))
        .collect();
    assert_eq!(resets.len(), 1, "expected exactly one reset: {resets:?}");
    let (at, reset) = resets[0];
    let Item::Reset {
        epoch,
        offset,
        reason,
    } = reset
    else {
        unreachable!()
    };
    assert_eq!(
        (epoch.as_str(), reason.as_str()),
        (e2.as_str(), "epoch_changed"),
        "{reset:?}"
    );
    let before = pubs_of(&items[..at]);
    let after = pubs_of(&items[at + 1..]);
    // Old epoch: offsets 1..=k in order, each acknowledged with that data (or a publish in flight
    // at the crash), so nothing acknowledged up to k was skipped.
    let old = &epochs[&e1];
    let offsets: Vec<u64> = before.iter().map(|p| p.offset).collect();
    assert_eq!(
        offsets,
        (live_start + 1..=live_start + before.len() as u64).collect::<Vec<_>>(),
        "live client, old epoch: not gap-free in order"
    );
    for p in &before {
        assert_eq!(p.epoch, e1, "{p:?}");
        match old.get(&p.offset) {
            Some(data) => assert_eq!(&p.data, data, "live client, old epoch: {p:?}"),
            None => assert!(
                in_flight_at_crash.contains(&p.data.to_string()),
                "live client received {p:?}, which was neither acknowledged nor in flight at \
                 the crash"
            ),
        }
    }
    assert_exact("live client, new epoch", &after, &e2, &epochs[&e2], *offset);

    // A client coming back with a position of the lost epoch is told so.
    let resumer = Sub::connect("resumer@node1", nodes[1].addr).await;
    let pos = (e1.clone(), acks.top(channel, &e1));
    let r = resumer.subscribe(channel, Some(&pos)).await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(r["reason"], "epoch_changed", "{r}");
    assert_eq!(r["epoch"], e2.as_str(), "{r}");

    // Nothing refused was stored later on (e.g. by a deferred retry).
    let (_, _, history) = full_history(nodes[0].addr, channel).await;
    assert!(!has_tag(&history, "http-outage") && !has_tag(&history, "ws-outage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_aof_resume_is_complete() {
    let mut redis = RedisServer::start(RedisOpts {
        aof: true,
        cluster: false,
    })
    .await;
    let env = [("GATEWAY__HISTORY__MAX_COUNT", "100000")];
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &env).await;
    let channel = "outage:durable";

    let live = Sub::connect("live@node1", nodes[1].addr).await;
    let r = live.subscribe(channel, None).await;
    // A channel with no publication has no epoch yet (#12.5): the first publication makes it.
    assert_eq!(r["epoch"], "", "{r}");
    let live_start = r["offset"].as_u64().unwrap();
    let offline = Sub::connect("offline@node0", nodes[0].addr).await;
    let offline_start = offline.subscribe(channel, None).await["offset"]
        .as_u64()
        .unwrap();

    let acks = Acks::default();
    let publisher = PhasePublisher::start(nodes[0].addr, channel, &acks, 2);
    offline
        .wait_for("publications before going offline", WAIT, |l| {
            l.pub_count(channel) >= 10
        })
        .await;
    let offline_pubs = offline.pubs(channel);
    let position = offline.log().position(channel).unwrap();
    let e1 = position.0.clone();
    offline.close().await;
    publisher
        .wait_attempts("more publishes while the client is offline", 20, |a| {
            a.status == 200 && a.body["offset"].as_u64() > Some(position.1)
        })
        .await;

    outage_then_restart(&mut redis, &publisher, &nodes, &live, channel, 20).await;

    // Resume from the position taken before the outage, while publishing goes on.
    let resumed = Sub::connect("resumed@node1", nodes[1].addr).await;
    let r = resumed.subscribe(channel, Some(&position)).await;
    assert_eq!(r["recovered"], true, "resume after an AOF restart: {r}");
    assert_eq!(r["epoch"], e1.as_str(), "{r}");
    let resumed_from = r["offset"].as_u64().unwrap();
    resumed
        .wait_for("live publications after the resume", WAIT, |l| {
            l.last_offset(channel) > resumed_from + 10
        })
        .await;
    for node in &nodes {
        node.wait_ready().await;
    }
    let attempts = publisher.stop().await;
    let outage = check_attempts(&attempts);

    // Every acknowledged publication survived the crash, under the same epoch.
    let (epoch, acked) = acks.single(channel);
    assert_eq!(epoch, e1, "the epoch changed although Redis kept its data");
    let (h_epoch, top, history) = full_history(nodes[0].addr, channel).await;
    assert_eq!(h_epoch, e1);
    let offsets: Vec<u64> = history.iter().map(|p| p.offset).collect();
    assert_eq!(
        offsets,
        (1..=top).collect::<Vec<_>>(),
        "history is not 1..={top} without gaps"
    );
    let stored: BTreeMap<u64, Value> = history.iter().map(|p| (p.offset, p.data.clone())).collect();
    for (offset, data) in &acked {
        assert_eq!(
            stored.get(offset),
            Some(data),
            "acknowledged publication {offset} is not in history after the restart"
        );
    }
    // Unacknowledged entries can only be publishes whose answer was lost when Redis died.
    let failed: HashSet<String> = attempts
        .iter()
        .filter(|a| a.status != 200 && !a.during_outage())
        .map(|a| a.data.to_string())
        .collect();
    for (offset, data) in &stored {
        if !acked.contains_key(offset) {
            assert!(
                failed.contains(&data.to_string()),
                "history holds {offset} = {data}, which was neither acknowledged nor a publish \
                 in flight at the crash"
            );
            eprintln!(
                "note: publish of {data} failed at the crash but was stored (offset {offset})"
            );
        }
    }
    let refused: HashSet<String> = outage.iter().map(|a| a.data.to_string()).collect();
    for p in &history {
        assert!(
            !refused.contains(&p.data.to_string()),
            "a publish refused while Redis was down was stored later: {p:?}"
        );
    }
    assert!(!has_tag(&history, "http-outage") && !has_tag(&history, "ws-outage"));

    // The connected client and the resumed one: everything, in order, once; no reset, no close.
    for (sub, before, after) in [
        (&live, Vec::new(), live_start),
        (&resumed, offline_pubs, offline_start),
    ] {
        sub.wait_offset(channel, top).await;
        sub.ping().await;
        assert!(sub.ended().is_none(), "{}: {:?}", sub.name, sub.ended());
        let items = sub.items(channel);
        assert!(
            !items.iter().any(|i| matches!(i, Item::Reset { .. })),
            "{}: unexpected reset: {items:?}",
            sub.name
        );
        let mut all = before;
        all.extend(sub.pubs(channel));
        assert_exact(
            &format!("{} on {channel}", sub.name),
            &all,
            &e1,
            &stored,
            after,
        );
    }
}
