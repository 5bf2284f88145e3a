//! Fan-out: C WebSocket subscribers over K channels, one HTTP publisher at R/s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{latency_summary, new_histogram, record_clamped, OffsetTracker};

pub struct Params {
    pub ws_origin: String,
    pub http_origin: String,
    pub clients: usize,
    pub channels: usize,
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
    pub drain: Duration,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Final last published offset per channel; `None` while publishing.
type Targets = Option<Arc<HashMap<String, u64>>>;

struct ClientResult {
    tracker: Option<OffsetTracker>,
    hist: Histogram<u64>,
    error: Option<String>,
}

pub async fn run(p: Params) -> (Value, bool) {
    let tag = format!("lt{}", now_micros() % 1_000_000_000);
    let channels: Vec<String> = (0..p.channels.max(1))
        .map(|i| format!("{tag}-{i}"))
        .collect();
    let ws_url = format!("{}/ws", p.ws_origin);
    let (targets_tx, targets_rx) = watch::channel::<Targets>(None);
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<Result<(), String>>(p.clients.max(1));

    // Subscribers, connected with bounded concurrency.
    let connect_gate = Arc::new(Semaphore::new(64));
    let mut handles = Vec::with_capacity(p.clients);
    for i in 0..p.clients {
        let channel = channels[i % channels.len()].clone();
        let url = ws_url.clone();
        let rx = targets_rx.clone();
        let ready = ready_tx.clone();
        let gate = connect_gate.clone();
        let drain = p.drain;
        handles.push(tokio::spawn(async move {
            client(url, channel, rx, ready, gate, drain).await
        }));
    }
    drop(ready_tx);
    let mut ready = 0usize;
    let mut connect_errors = Vec::new();
    let setup_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready + connect_errors.len() < p.clients {
        match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(e))) => connect_errors.push(e),
            Ok(None) | Err(_) => break,
        }
    }

    // Publisher.
    let http = reqwest::Client::new();
    let publish_url = format!("{}/api/publish", p.http_origin);
    let total = (p.rate * p.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / p.rate.max(0.001));
    let pad = "x".repeat(p.payload);
    let last: Arc<parking_last::Last> = Arc::new(parking_last::Last::default());
    let published = Arc::new(AtomicU64::new(0));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(64));
    let start = tokio::time::Instant::now();
    let wall_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let permit = in_flight.clone().acquire_owned().await.expect("open");
        let channel = channels[(i as usize) % channels.len()].clone();
        let body = json!({"channel": channel, "data": {"ts": now_micros(), "seq": i, "pad": pad}});
        let (http, url, last, published, errors) = (
            http.clone(),
            publish_url.clone(),
            last.clone(),
            published.clone(),
            publish_errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let res = http
                .post(&url)
                .json(&body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let ok = match res {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => match v["offset"].as_u64() {
                        Some(off) => {
                            last.update(&channel, off);
                            true
                        }
                        None => false,
                    },
                    Err(_) => false,
                },
                _ => false,
            };
            if ok {
                published.fetch_add(1, Ordering::Relaxed);
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let publish_elapsed = wall_start.elapsed();
    let final_targets = last.snapshot();
    let _ = targets_tx.send(Some(Arc::new(final_targets.clone())));

    // Collect.
    let mut hist = new_histogram();
    let (mut deliveries, mut lost, mut dup, mut ooo) = (0u64, 0u64, 0u64, 0u64);
    let mut client_errors = connect_errors.len() as u64;
    let mut first_errors: Vec<String> = connect_errors.into_iter().take(3).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let channel = &channels[i % channels.len()];
        let target = final_targets.get(channel).copied();
        match h.await {
            Ok(r) => {
                hist.add(&r.hist).expect("same bounds");
                if let Some(e) = r.error {
                    client_errors += 1;
                    if first_errors.len() < 3 {
                        first_errors.push(e);
                    }
                }
                if let Some(t) = r.tracker {
                    deliveries += t.received - t.duplicated;
                    dup += t.duplicated;
                    ooo += t.out_of_order;
                    lost += target.map(|last| t.lost(last)).unwrap_or(0);
                }
            }
            Err(e) => {
                client_errors += 1;
                first_errors.push(format!("task: {e}"));
            }
        }
    }
    let total_elapsed = wall_start.elapsed();
    let publications = published.load(Ordering::Relaxed);
    let failed_pub = publish_errors.load(Ordering::Relaxed);
    let ok = lost == 0 && dup == 0 && ooo == 0 && client_errors == 0 && failed_pub == 0;
    let result = json!({
        "scenario": "fanout",
        "ok": ok,
        "clients": p.clients,
        "clients_ready": ready,
        "client_errors": client_errors,
        "first_errors": first_errors,
        "channels": channels.len(),
        "rate_target": p.rate,
        "duration_s": p.duration.as_secs_f64(),
        "payload_bytes": p.payload,
        "publications": publications,
        "publish_errors": failed_pub,
        "publish_rate": round2(publications as f64 / publish_elapsed.as_secs_f64().max(1e-9)),
        "deliveries": deliveries,
        "deliveries_per_s": round2(deliveries as f64 / total_elapsed.as_secs_f64().max(1e-9)),
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "latency": latency_summary(&hist),
    });
    (result, ok)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn client(
    url: String,
    channel: String,
    mut targets: watch::Receiver<Targets>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    gate: Arc<Semaphore>,
    drain: Duration,
) -> ClientResult {
    let mut out = ClientResult {
        tracker: None,
        hist: new_histogram(),
        error: None,
    };
    let permit = gate.acquire_owned().await.expect("open");
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let sub = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
        ws.send(Message::text(sub))
            .await
            .map_err(|e| format!("send: {e}"))?;
        while let Some(msg) = ws.next().await {
            let msg = msg.map_err(|e| format!("read: {e}"))?;
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).map_err(|e| format!("json: {e}"))?;
                if v["id"] == 1 {
                    let base = v["result"]["offset"]
                        .as_u64()
                        .ok_or_else(|| format!("subscribe refused: {t}"))?;
                    return Ok((ws, base));
                }
            }
        }
        Err("closed before subscribe reply".to_string())
    })
    .await
    .unwrap_or_else(|_| Err("subscribe timed out".to_string()));
    drop(permit);
    let (ws, base) = match connected {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return out;
        }
    };
    let _ = ready.send(Ok(())).await;
    drop(ready);
    let mut tracker = OffsetTracker::new(base);
    let (mut sink, mut stream) = ws.split();
    let mut target: Option<u64> = None;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
    loop {
        if let Some(t) = target {
            if tracker.complete_up_to(t) {
                break;
            }
        }
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    out.error = Some("connection closed".into());
                    break;
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => { out.error = Some(format!("read: {e}")); break; }
                };
                let Message::Text(t) = msg else { continue };
                let recv = now_micros();
                let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                let Some(offset) = v["offset"].as_u64() else { continue };
                if v["channel"] != channel.as_str() {
                    continue;
                }
                tracker.record(offset);
                if let Some(ts) = v["data"]["ts"].as_u64() {
                    record_clamped(&mut out.hist, recv.saturating_sub(ts));
                }
            }
            changed = targets.changed(), if target.is_none() => {
                if changed.is_err() {
                    // Publisher gone without targets: stop after the drain period.
                    target = Some(u64::MAX);
                } else if let Some(map) = targets.borrow().as_ref() {
                    target = Some(map.get(&channel).copied().unwrap_or(base));
                }
                deadline = tokio::time::Instant::now() + drain;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    out.tracker = Some(tracker);
    out
}

/// Highest publish offset per channel, shared by the publishing tasks.
mod parking_last {
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Last(Mutex<HashMap<String, u64>>);

    impl Last {
        pub fn update(&self, channel: &str, offset: u64) {
            let mut m = self.0.lock().expect("not poisoned");
            let e = m.entry(channel.to_string()).or_insert(0);
            *e = (*e).max(offset);
        }

        pub fn snapshot(&self) -> HashMap<String, u64> {
            self.0.lock().expect("not poisoned").clone()
        }
    }
}
