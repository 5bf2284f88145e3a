//! Staggered drain: a node stopped with SIGTERM reports not ready, keeps serving for the delay,
//! then closes its WebSocket clients in batches spread over the window with 1001 and a jittered
//! reconnect hint. Its clients land on the other nodes and, resuming from their positions, lose
//! and duplicate nothing. The spread is read from the node's own drain log, not from timing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const CLIENTS: usize = 2000;
const CHANNELS: usize = 20;

/// One client: subscribed on the draining node, then (after its close) on another node.
async fn client(
    i: usize,
    drained: std::net::SocketAddr,
    others: [std::net::SocketAddr; 2],
    subscribed: tokio::sync::mpsc::UnboundedSender<()>,
) -> (String, u64, Vec<Pub>, u16, String) {
    let channel = format!("drain{}", i % CHANNELS);
    let first = Sub::connect(&format!("c{i}"), drained).await;
    let start = first.subscribe(&channel, None).await;
    let epoch = start["epoch"].as_str().unwrap().to_string();
    let start_offset = start["offset"].as_u64().unwrap();
    let _ = subscribed.send(());
    let ended = first.wait_ended().await;
    // "close Some((1001, \"{\\\"reason\\\":...,\\\"reconnect_ms\\\":N}\"))"
    let code: u16 = ended
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reconnect_ms: u64 = ended
        .split("reconnect_ms")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
        })
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("c{i}: no reconnect hint in {ended}"));
    let mut pubs = first.pubs(&channel);
    // The epoch of the last publication: the subscribe result's is '' while the channel had
    // none (#12.5).
    let position = pubs.last().map_or((epoch.clone(), start_offset), |p| {
        (p.epoch.clone(), p.offset)
    });
    // The hint is part of the protocol: a well-behaved client waits before reconnecting.
    tokio::time::sleep(Duration::from_millis(reconnect_ms)).await;
    let second = Sub::connect(&format!("c{i}'"), others[i % 2]).await;
    let resumed = second.subscribe(&channel, Some(&position)).await;
    assert_eq!(resumed["recovered"], true, "c{i}: {resumed}");
    pubs.extend(wait_all(&second, &channel).await);
    (channel, start_offset, pubs, code, ended)
}

/// Waits until the client has the final marker publication (`{"last": true}`), then returns
/// everything it received on this connection.
async fn wait_all(sub: &Sub, channel: &str) -> Vec<Pub> {
    let channel_owned = channel.to_string();
    sub.wait_for(
        "the final publication",
        Duration::from_secs(120),
        move |log| {
            log.pubs(&channel_owned)
                .iter()
                .any(|p| p.data.get("last") == Some(&json!(true)))
        },
    )
    .await;
    sub.pubs(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_over_the_window_to_other_nodes_without_loss() {
    let redis = RedisServer::start(RedisOpts {
        aof: false,
        cluster: false,
    })
    .await;
    let backend = Backend::standalone(&redis);
    // A debug build on two shared cores answers 2,000 simultaneous subscribes slowly: give Redis
    // commands room so the test is about draining, not about timeouts.
    let timeouts = [
        ("GATEWAY__REDIS__COMMAND_TIMEOUT", "5s"),
        ("GATEWAY__REDIS__CONNECT_TIMEOUT", "5s"),
    ];
    let others = start_nodes(&backend, 2, &timeouts).await;
    let mut args = backend.args.clone();
    args.push("--log-json".into());
    let drained = GatewayProcess::start(
        "drained",
        &args,
        &[
            ("GATEWAY__DRAIN__DELAY", "300ms"),
            ("GATEWAY__DRAIN__WINDOW", "2s"),
            ("GATEWAY__DRAIN__RECONNECT_JITTER", "300ms"),
            ("GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "30s"),
            timeouts[0],
            timeouts[1],
        ],
    )
    .await;
    let other_addrs = [others[0].addr, others[1].addr];

    // Every client subscribed on the node about to drain.
    let mut clients = Vec::with_capacity(CLIENTS);
    let (subscribed, mut subscribed_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..CLIENTS {
        let subscribed = subscribed.clone();
        clients.push(tokio::spawn(client(
            i,
            drained.addr,
            other_addrs,
            subscribed,
        )));
    }
    within_for("every client subscribed", Duration::from_secs(120), async {
        for _ in 0..CLIENTS {
            subscribed_rx
                .recv()
                .await
                .expect("a client failed before subscribing");
        }
    })
    .await;

    // Publish continuously through another node while the drain runs.
    let acks = Arc::new(tokio::sync::Mutex::new(
        BTreeMap::<String, Vec<(u64, Value)>>::new(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (acks, stop, addr) = (acks.clone(), stop.clone(), others[0].addr);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let channel = format!("drain{}", n % CHANNELS as u64);
                let data = json!({"n": n});
                let (status, ack) = publish_http(addr, &channel, &data).await;
                assert_eq!(status, 200, "{ack}");
                acks.lock()
                    .await
                    .entry(channel)
                    .or_default()
                    .push((ack["offset"].as_u64().unwrap(), data));
                n += 1;
            }
        })
    };

    drained.sigterm();
    // Not ready at once, while the delay keeps it serving.
    poll_until(
        "readyz 503 after SIGTERM",
        Duration::from_secs(10),
        || async { (readyz(drained.addr).await.0 == 503).then_some(()) },
    )
    .await;
    // Every client has left the drained node when both others hold them all.
    poll_until(
        "clients on the other nodes",
        Duration::from_secs(90),
        || async {
            let mut total = 0.0;
            for node in &others {
                let text = metrics_text(node.addr).await;
                total += metric(&text, "gateway_subscriptions", &[]).unwrap_or(0.0);
            }
            (total as usize >= CLIENTS).then_some(())
        },
    )
    .await;
    // Both other nodes took a share.
    for node in &others {
        let text = metrics_text(node.addr).await;
        let share = metric(&text, "gateway_subscriptions", &[]).unwrap_or(0.0);
        assert!(share > 0.0, "{} took no client", node.name);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.unwrap();
    for c in 0..CHANNELS {
        let channel = format!("drain{c}");
        let data = json!({"last": true});
        let (status, ack) = publish_http(others[1].addr, &channel, &data).await;
        assert_eq!(status, 200, "{ack}");
        acks.lock()
            .await
            .entry(channel)
            .or_default()
            .push((ack["offset"].as_u64().unwrap(), data));
    }

    let acks = acks.lock().await.clone();
    let mut lost_or_dup = Vec::new();
    for client in clients {
        let (channel, start, pubs, code, ended) =
            within_for("client", Duration::from_secs(120), client)
                .await
                .unwrap();
        assert_eq!(code, 1001, "close on drain: {ended}");
        let want: Vec<u64> = acks[&channel]
            .iter()
            .map(|(o, _)| *o)
            .filter(|o| *o > start)
            .collect();
        let got: Vec<u64> = pubs.iter().map(|p| p.offset).collect();
        if got != want {
            lost_or_dup.push(format!(
                "{channel} from {start}: got {} want {}",
                got.len(),
                want.len()
            ));
        }
    }
    assert!(
        lost_or_dup.is_empty(),
        "lost, duplicated or reordered: {lost_or_dup:?}"
    );

    // The spread, from the node's own account of its drain.
    let batches: Vec<Value> = drained
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["fields"]["message"] == "drain batch")
        .collect();
    let closed: u64 = batches
        .iter()
        .map(|b| b["fields"]["closed"].as_u64().unwrap())
        .sum();
    assert_eq!(
        closed as usize, CLIENTS,
        "every connection closed by a batch: {batches:?}"
    );
    assert!(
        batches.len() >= 10,
        "closes spread over the window: {} batches",
        batches.len()
    );
    let planned = batches[0]["fields"]["batches"].as_u64().unwrap() as usize;
    assert_eq!(batches.len(), planned);
    let largest = batches
        .iter()
        .map(|b| b["fields"]["closed"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        largest as usize <= CLIENTS.div_ceil(planned),
        "no batch larger than an even share: {largest} of {CLIENTS} over {planned}"
    );
}
