//! `connections`: N idle subscribed connections (WebSocket, SSE over HTTP/1.1 or HTTP/2), and
//! what they cost the server: resident memory per connection (VmRSS before vs after) and CPU
//! while idle (heartbeats only).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::net::{cpu_seconds_all, raise_nofile, vm_rss, Sources};
use crate::progress;
use crate::pubsub::{sse_client_for, sse_clients};
use crate::subscriber::{Event, Resume, Subscriber, Target, Transport};
use crate::system::System;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
    /// Seconds to hold the connections open (idle) before measuring; CPU is measured over it.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Connections opened concurrently.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

pub async fn run(system: &mut System, a: &Args) -> (Value, bool) {
    let nofile = raise_nofile(2 * a.count as u64 + 4096);
    let pids = system.pids();
    let rss = |pids: &[u32]| -> Option<u64> { pids.iter().map(|p| vm_rss(*p)).sum() };
    let rss_before = rss(&pids);
    let start = Instant::now();
    let sources = Arc::new(Sources::for_connections(a.count));
    let http = Arc::new(sse_clients(a.transport, a.count, &sources));
    let (release_tx, release_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let (opened_tx, mut opened_rx) = mpsc::channel::<Result<(), String>>(1024);
    let nodes: Arc<Vec<String>> = Arc::new(system.nodes.iter().map(|n| n.http.clone()).collect());
    let mut handles = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let (gate, mut release, opened) = (gate.clone(), release_rx.clone(), opened_tx.clone());
        let (sources, http, nodes) = (sources.clone(), http.clone(), nodes.clone());
        let (kind, transport) = (system.kind, a.transport);
        handles.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("open");
            let http = sse_client_for(transport, &http, i);
            let target = Target {
                kind,
                transport,
                origin: &nodes[i % nodes.len()],
                channel: "idle",
                source: sources.pick(),
                http,
            };
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                Subscriber::connect(&target, &Resume::Fresh),
            )
            .await
            .unwrap_or_else(|_| Err("open timed out".into()));
            drop(permit);
            match r {
                Ok((mut sub, _)) => {
                    let _ = opened.send(Ok(())).await;
                    drop(opened);
                    // Idle, but still reading: pings are answered as a real client would.
                    loop {
                        tokio::select! {
                            ev = sub.next() => if let Event::Closed { .. } = ev { return Some("closed while idle".to_string()) },
                            _ = release.wait_for(|v| *v) => break,
                        }
                    }
                    sub.close().await;
                    None
                }
                Err(e) => {
                    let _ = opened.send(Err(e)).await;
                    None
                }
            }
        }));
    }
    drop(opened_tx);
    let bar = progress::counter(a.count as u64, "connecting");
    let (mut opened, mut failed) = (0usize, 0usize);
    let mut first_errors = Vec::new();
    while let Some(r) = opened_rx.recv().await {
        bar.inc(1);
        match r {
            Ok(()) => opened += 1,
            Err(e) => {
                failed += 1;
                if first_errors.len() < 3 {
                    first_errors.push(e);
                }
            }
        }
    }
    bar.finish_and_clear();
    let open_secs = start.elapsed().as_secs_f64();
    let cpu_before = cpu_seconds_all(&pids);
    let bar = progress::timer(crate::secs(a.hold), "idle");
    tokio::time::sleep(crate::secs(a.hold)).await;
    bar.finish_and_clear();
    let cpu_idle = cpu_seconds_all(&pids) - cpu_before;
    let rss_after = rss(&pids);
    let _ = release_tx.send(true);
    let mut dropped = 0usize;
    for h in handles {
        if let Ok(Some(e)) = h.await {
            dropped += 1;
            if first_errors.len() < 3 {
                first_errors.push(e);
            }
        }
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some(((a as f64 - b as f64) / opened as f64).round()),
        _ => None,
    };
    let ok = failed == 0 && dropped == 0 && opened == a.count;
    let result = json!({
        "scenario": "connections",
        "ok": ok,
        "transport": a.transport,
        "requested": a.count,
        "opened": opened,
        "failed": failed,
        "dropped_while_idle": dropped,
        "first_errors": first_errors,
        "nofile_limit": nofile,
        "source_addresses": sources.all().len(),
        "open_s": (open_secs * 1000.0).round() / 1000.0,
        "opened_per_s": (opened as f64 / open_secs.max(1e-9)).round(),
        "hold_s": a.hold,
        "pids": pids,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_connection": per_conn,
        "idle_cpu_percent": (a.hold > 0.0).then(|| (cpu_idle / a.hold * 1000.0).round() / 10.0),
    });
    (result, ok)
}
