//! Connections: N idle WebSocket or SSE connections, and the gateway's memory per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::{raise_nofile, vm_rss};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Ws,
    Sse,
}

pub struct Params {
    pub ws_origin: String,
    pub http_origin: String,
    pub count: usize,
    pub transport: Transport,
    pub pid: Option<u32>,
    pub hold: Duration,
    pub concurrency: usize,
}

pub async fn run(p: Params) -> (Value, bool) {
    let nofile = raise_nofile();
    let rss_before = p.pid.and_then(vm_rss);
    let start = Instant::now();
    // Every connection task holds its connection until `release` is set.
    let (release_tx, release_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(p.concurrency.max(1)));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(1024);
    let mut handles = Vec::with_capacity(p.count);
    for _ in 0..p.count {
        let (gate, mut release, opened) = (gate.clone(), release_rx.clone(), opened_tx.clone());
        let (ws_url, sse_url) = (
            format!("{}/ws", p.ws_origin),
            format!("{}/sse?channel=idle", p.http_origin),
        );
        let http = http.clone();
        let transport = p.transport;
        handles.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("open");
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                match transport {
                    Transport::Ws => {
                        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                        let sub = json!({"id": 1, "op": "subscribe", "channel": "idle"});
                        ws.send(Message::text(sub.to_string()))
                            .await
                            .map_err(|e| format!("send: {e}"))?;
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) if t.contains("\"result\"") => {
                                Ok(Conn::Ws(Box::new(ws)))
                            }
                            other => Err(format!("subscribe: {other:?}")),
                        }
                    }
                    Transport::Sse => {
                        let r = http
                            .get(&sse_url)
                            .header("accept", "text/event-stream")
                            .send()
                            .await
                            .map_err(|e| format!("sse: {e}"))?;
                        if r.status().is_success() {
                            Ok(Conn::Sse(r))
                        } else {
                            Err(format!("sse status {}", r.status()))
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err("open timed out".into()));
            drop(permit);
            match r {
                Ok(conn) => {
                    let _ = opened.send(Ok(())).await;
                    drop(opened);
                    let _ = release.wait_for(|v| *v).await;
                    if let Conn::Ws(mut ws) = conn {
                        let _ = futures_util::SinkExt::close(&mut ws).await;
                    }
                }
                Err(e) => {
                    let _ = opened.send(Err(e)).await;
                }
            }
        }));
    }
    drop(opened_tx);
    let (mut opened, mut failed) = (0usize, 0usize);
    let mut first_errors = Vec::new();
    while let Some(r) = opened_rx.recv().await {
        match r {
            Ok(()) => opened += 1,
            Err(e) => {
                failed += 1;
                if first_errors.len() < 3 {
                    first_errors.push(e);
                }
            }
        }
        if opened + failed == p.count {
            break;
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(p.hold).await;
    let rss_after = p.pid.and_then(vm_rss);
    let _ = release_tx.send(true);
    for h in handles {
        let _ = h.await;
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => {
            Value::from(((a as f64 - b as f64) / opened as f64).round())
        }
        _ => Value::Null,
    };
    let ok = failed == 0 && opened == p.count;
    let result = json!({
        "scenario": "connections",
        "ok": ok,
        "transport": format!("{:?}", p.transport).to_lowercase(),
        "requested": p.count,
        "opened": opened,
        "failed": failed,
        "first_errors": first_errors,
        "nofile_limit": nofile,
        "open_s": (open_secs * 1000.0).round() / 1000.0,
        "hold_s": p.hold.as_secs_f64(),
        "pid": p.pid,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_connection": per_conn,
    });
    (result, ok)
}

enum Conn {
    Ws(
        Box<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
        >,
    ),
    Sse(#[allow(dead_code)] reqwest::Response),
}
