//! `echo`: clients send messages to the WebSocket echo endpoint and check every echo equals what
//! was sent (the fastwebsockets benchmark shape); messages per second and round-trip times.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::net::cpu_seconds_all;
use crate::stats::{latency_summary, new_histogram, record_clamped};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Messages per client.
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Messages a client may have in flight (1 = strictly sequential).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Send text frames instead of binary.
    #[arg(long)]
    pub text: bool,
}

#[derive(Default)]
struct ClientResult {
    echoed: u64,
    mismatched: u64,
    error: Option<String>,
}

/// The deterministic payload of message `seq` of client `client` (text stays valid UTF-8).
pub fn payload(client: usize, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{client}:{seq}:").into_bytes();
    let mut x = (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq;
    while p.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(b'a' + (x % 26) as u8);
    }
    p.truncate(size.max(1));
    p
}

pub async fn run(url: &str, server_pids: &[u32], p: &Args) -> (Value, bool) {
    let cpu_before = cpu_seconds_all(server_pids);
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..p.clients {
        let (url, m, size, window, text) = (url.to_string(), p.messages, p.size, p.window, p.text);
        handles.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let r = tokio::time::timeout(
                Duration::from_secs(300),
                client(&url, c, m, size, window.max(1), text, &mut hist),
            )
            .await
            .unwrap_or_else(|_| ClientResult {
                error: Some("timed out".into()),
                ..Default::default()
            });
            (r, hist)
        }));
    }
    let mut hist = new_histogram();
    let (mut echoed, mut mismatched, mut errors) = (0u64, 0u64, 0u64);
    let mut first_errors = Vec::new();
    for h in handles {
        match h.await {
            Ok((r, h)) => {
                hist.add(&h).expect("same bounds");
                echoed += r.echoed;
                mismatched += r.mismatched;
                if let Some(e) = r.error {
                    errors += 1;
                    if first_errors.len() < 3 {
                        first_errors.push(e);
                    }
                }
            }
            Err(e) => {
                errors += 1;
                first_errors.push(format!("task: {e}"));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_seconds_all(server_pids) - cpu_before;
    let expected = p.messages * p.clients as u64;
    let ok = mismatched == 0 && errors == 0 && echoed == expected;
    let result = json!({
        "scenario": "echo",
        "ok": ok,
        "clients": p.clients,
        "messages_per_client": p.messages,
        "size_bytes": p.size,
        "window": p.window,
        "echoed": echoed,
        "mismatched": mismatched,
        "client_errors": errors,
        "first_errors": first_errors,
        "elapsed_s": (secs * 1000.0).round() / 1000.0,
        "messages_per_s": (echoed as f64 / secs).round(),
        "server_cpu_s": (cpu * 100.0).round() / 100.0,
        "messages_per_cpu_s": (cpu > 0.0).then(|| (echoed as f64 / cpu).round()),
        "bytes_per_s": (echoed as f64 * p.size as f64 / secs).round(),
        "rtt": latency_summary(&hist),
    });
    (result, ok)
}

async fn client(
    url: &str,
    id: usize,
    messages: u64,
    size: usize,
    window: usize,
    text: bool,
    hist: &mut Histogram<u64>,
) -> ClientResult {
    let mut out = ClientResult::default();
    let ws = match tokio_tungstenite::connect_async_with_config(
        url,
        Some(crate::subscriber::ws_config()),
        true,
    )
    .await
    {
        Ok((ws, _)) => ws,
        Err(e) => {
            out.error = Some(format!("connect: {e}"));
            return out;
        }
    };
    let (mut sink, mut stream) = ws.split();
    let mut pending: VecDeque<(Vec<u8>, Instant)> = VecDeque::with_capacity(window);
    let mut next = 0u64;
    while out.echoed + out.mismatched < messages {
        while next < messages && pending.len() < window {
            let body = payload(id, next, size);
            let msg = if text {
                Message::text(String::from_utf8(body.clone()).expect("ascii"))
            } else {
                Message::binary(body.clone())
            };
            if let Err(e) = sink.send(msg).await {
                out.error = Some(format!("send: {e}"));
                return out;
            }
            pending.push_back((body, Instant::now()));
            next += 1;
        }
        let got: Vec<u8> = match stream.next().await {
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                out.error = Some(format!("read: {e}"));
                return out;
            }
            None => {
                out.error = Some("connection closed".into());
                return out;
            }
        };
        let Some((sent, at)) = pending.pop_front() else {
            out.error = Some("unsolicited message".into());
            return out;
        };
        record_clamped(hist, at.elapsed().as_micros() as u64);
        if got == sent {
            out.echoed += 1;
        } else {
            out.mismatched += 1;
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    out
}

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn payloads_are_sized_distinct_and_ascii() {
        let a = payload(1, 2, 64);
        assert_eq!(a.len(), 64);
        assert_ne!(a, payload(1, 3, 64));
        assert_ne!(a, payload(2, 2, 64));
        assert!(a.is_ascii());
        assert_eq!(payload(0, 0, 0).len(), 1);
    }
}
