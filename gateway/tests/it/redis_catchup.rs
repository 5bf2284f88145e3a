//! A client offline for 100,000 publications resumes while live traffic goes on: it receives all
//! of them once and in order, then live ones, while the node's queues and memory stay bounded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const QUEUE_MAX_BYTES: u64 = 1_048_576;
const RSS_LIMIT: u64 = 200 * 1024 * 1024;
const OFFLINE: u64 = 100_000;

#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    samples: u64,
    queued_bytes_max: f64,
    queued_bytes: f64,
    catching_up: f64,
    rss: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_client_resumes_100k_while_live_traffic_continues() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let queue_max = QUEUE_MAX_BYTES.to_string();
    let env = [
        ("GATEWAY__HISTORY__MAX_COUNT", "200000"),
        ("GATEWAY__CLIENT__QUEUE_MAX_BYTES", queue_max.as_str()),
        PATIENT[0],
        PATIENT[1],
    ];
    // node0 serves the resuming client; node1 takes every publish, so node0's memory is that of
    // the catch-up.
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &env).await;
    let channel = "bulk:offline".to_string();
    let channels = [channel.clone()];
    let acks = Acks::default();

    let client = Sub::connect("client@node0", nodes[0].addr).await;
    let start = client.subscribe(&channel, None).await["offset"]
        .as_u64()
        .unwrap();
    Publisher::start(nodes[1].addr, Via::Ws, &channels, "warm", &acks, 10, 10)
        .await
        .finish()
        .await;
    client.wait_offset(&channel, start + 10).await;
    let before = client.pubs(&channel);
    let position = client.log().position(&channel).unwrap();
    client.close().await;

    let t0 = std::time::Instant::now();
    let mut bulk = Vec::new();
    for k in 0..2 {
        let (addr, channel, acks) = (nodes[1].addr, channel.clone(), acks.clone());
        bulk.push(tokio::spawn(async move {
            bulk_publish(addr, &channel, &format!("bulk{k}"), OFFLINE / 2, 64, &acks).await
        }));
    }
    for p in bulk {
        within_for("bulk publishing", Duration::from_secs(300), p)
            .await
            .expect("bulk publisher failed");
    }
    assert_eq!(acks.count_of(&channel) as u64, OFFLINE + 10);
    eprintln!("{OFFLINE} publications in {}", elapsed(t0));
    let t0 = std::time::Instant::now();

    let live = Publisher::start(nodes[1].addr, Via::Ws, &channels, "live", &acks, 1 << 40, 5).await;

    // Sample node0's metrics and RSS for as long as the catch-up runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let addr = nodes[0].addr;
        let pid = nodes[0].pid();
        tokio::spawn(async move {
            let mut peaks = Peaks::default();
            while !stop.load(Ordering::Relaxed) {
                let text = metrics_text(addr).await;
                let get = |name| {
                    metric(&text, name, &[])
                        .unwrap_or_else(|| panic!("metric {name} missing from /metrics"))
                };
                peaks.queued_bytes_max =
                    peaks.queued_bytes_max.max(get("gateway_queued_bytes_max"));
                peaks.queued_bytes = peaks.queued_bytes.max(get("gateway_queued_bytes"));
                peaks.catching_up = peaks
                    .catching_up
                    .max(get("gateway_catching_up_subscriptions"));
                peaks.rss = peaks.rss.max(rss_bytes_of(pid).expect("node0 is running"));
                peaks.samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peaks
        })
    };

    let resumed = Sub::connect("resumed@node0", nodes[0].addr).await;
    let r = resumed.subscribe(&channel, Some(&position)).await;
    assert_eq!(r["recovered"], true, "resume of 100k: {r}");
    assert_eq!(r["epoch"], position.0.as_str(), "{r}");
    let top_at_resume = r["offset"].as_u64().unwrap();
    assert!(top_at_resume >= position.1 + OFFLINE, "{r}");
    resumed
        .wait_for(
            "the catch-up and then live publications",
            Duration::from_secs(300),
            |log| last_delivered(log, &channel) >= top_at_resume + 50,
        )
        .await;
    live.stop().await;
    let (epoch, acked) = acks.single(&channel);
    assert_contiguous(&channel, &acked);
    let top = *acked.keys().next_back().unwrap();
    // On the publications themselves: the subscribe result already names an offset (the top at
    // the resume), which `wait_offset` would take for a delivery.
    resumed
        .wait_for(&format!("offset {top} delivered"), WAIT, |log| {
            last_delivered(log, &channel) >= top
        })
        .await;
    resumed.ping().await;
    stop.store(true, Ordering::Relaxed);
    let peaks = within("sampler", sampler).await.expect("sampler failed");
    eprintln!(
        "catch-up in {}; node0 during the catch-up: {peaks:?}",
        elapsed(t0)
    );

    assert!(
        resumed.ended().is_none(),
        "resuming client was disconnected: {:?}",
        resumed.ended()
    );
    let mut all = before;
    all.extend(resumed.pubs(&channel));
    assert_exact("resumed client", &all, &epoch, &acked, start);

    assert!(peaks.samples > 0, "no metrics sample taken");
    assert!(
        peaks.queued_bytes_max <= QUEUE_MAX_BYTES as f64,
        "gateway_queued_bytes_max reached {} > client.queue_max_bytes {QUEUE_MAX_BYTES}",
        peaks.queued_bytes_max
    );
    assert!(
        peaks.rss <= RSS_LIMIT,
        "node0 RSS reached {} MiB (limit {} MiB)",
        peaks.rss >> 20,
        RSS_LIMIT >> 20
    );
    let addr = nodes[0].addr;
    poll_until(
        "no subscription catching up any more",
        WAIT,
        || async move {
            let v = metric(
                &metrics_text(addr).await,
                "gateway_catching_up_subscriptions",
                &[],
            )?;
            (v == 0.0).then_some(())
        },
    )
    .await;
}

/// The offset of the last publication delivered on `channel` (0 before any).
/// Scans from the end, not cloning the log: it holds 100,000 publications here.
fn last_delivered(log: &SubLog, channel: &str) -> u64 {
    log.channels
        .get(channel)
        .and_then(|items| {
            items.iter().rev().find_map(|i| match i {
                Item::Pub(p) => Some(p.offset),
                _ => None,
            })
        })
        .unwrap_or(0)
}
