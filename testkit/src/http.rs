//! Plain HTTP against a node: [`Endpoint`] (whatever has an address), the JSON API (publish,
//! history, readyz), error-body checks and `/metrics` scraping.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::gateway_process::GatewayProcess;
use crate::recording::Pub;
use crate::text::{enc, metric};
use crate::wait::{within, WAIT};

/// Something with a loopback address to talk to: a `SocketAddr`, a [`GatewayProcess`], an
/// in-process node.
pub trait Endpoint {
    fn addr(&self) -> SocketAddr;

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr(), path)
    }
}

impl Endpoint for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

impl Endpoint for GatewayProcess {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl<T: Endpoint + ?Sized> Endpoint for &T {
    fn addr(&self) -> SocketAddr {
        (**self).addr()
    }
}

/// A client with a whole-request timeout of [`WAIT`]. A new one per call: a pooled connection
/// must not outlive the test runtime that opened it.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("reqwest client")
}

/// Status and parsed JSON body (Value::Null when the body is not JSON).
pub async fn json_response(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = within("response body", resp.bytes()).await.expect("body");
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

pub async fn post_raw(
    node: &impl Endpoint,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let resp = within(
        "POST",
        http()
            .post(node.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {path} to {}: {e}", node.addr()));
    json_response(resp).await
}

pub async fn get(node: &impl Endpoint, path: &str) -> (u16, Value) {
    let resp = within("GET", http().get(node.url(path)).send())
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", node.addr()));
    json_response(resp).await
}

pub async fn get_text(node: &impl Endpoint, path: &str) -> (u16, String) {
    let resp = within("GET", http().get(node.url(path)).send())
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", node.addr()));
    let status = resp.status().as_u16();
    (
        status,
        within("text body", resp.text()).await.expect("text"),
    )
}

/// `POST /api/publish`; status and body (a transport error panics).
pub async fn publish_http(node: impl Endpoint, channel: &str, data: &Value) -> (u16, Value) {
    post_raw(
        &node,
        "/api/publish",
        json!({"channel": channel, "data": data}).to_string(),
    )
    .await
}

/// `POST /api/publish`, asserting success; returns the ack.
pub async fn publish(node: &impl Endpoint, channel: &str, data: Value) -> Value {
    let (status, body) = publish_http(node, channel, &data).await;
    assert_eq!(status, 200, "publish to {channel:?} failed: {body}");
    body
}

pub async fn history(node: &impl Endpoint, query: &str) -> (u16, Value) {
    get(node, &format!("/api/history?{query}")).await
}

/// `GET /readyz`; a transport error is status 0 (the node may be starting or gone).
pub async fn readyz(node: impl Endpoint) -> (u16, Value) {
    match http().get(node.url("/readyz")).send().await {
        Ok(resp) => json_response(resp).await,
        Err(e) => (0, json!({"transport_error": e.to_string()})),
    }
}

/// The whole history of `channel` through `GET /api/history`, paged.
pub async fn full_history(node: impl Endpoint, channel: &str) -> (String, u64, Vec<Pub>) {
    let mut since = 0;
    let mut out = Vec::new();
    loop {
        let query = format!("channel={}&since={since}&limit=1000", enc(channel));
        let (status, body) = history(&node, &query).await;
        assert_eq!(status, 200, "history of {channel}: {body}");
        let epoch = body["epoch"].as_str().expect("history epoch").to_string();
        let top = body["top"].as_u64().expect("history top");
        let page = body["publications"].as_array().expect("publications");
        for p in page {
            out.push(Pub::from_json(p).expect("publication in history"));
        }
        match out.last() {
            Some(last) if !page.is_empty() && last.offset < top => since = last.offset,
            _ => return (epoch, top, out),
        }
    }
}

/// The offsets of a long-poll answer's events, in order.
pub fn poll_offsets(answer: &Value) -> Vec<u64> {
    answer["events"]
        .as_array()
        .unwrap_or_else(|| panic!("poll answer without events: {answer}"))
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect()
}

/// Asserts an error response `{"error":{"code":code,"message":..}}` with the given status.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "expected HTTP {status} {code}, got {got:?}");
    assert_eq!(
        got.1["error"]["code"], code,
        "expected error code {code:?}, got {}",
        got.1
    );
    assert!(
        got.1["error"]["message"].is_string(),
        "error without message: {}",
        got.1
    );
}

/// A channel name unique within the process, so tests never share channels by accident.
pub fn channel(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The `/metrics` text, asserting 200.
pub async fn metrics(node: &impl Endpoint) -> String {
    let (status, text) = get_text(node, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    text
}

/// [`metrics`] by value, for callers holding a `SocketAddr`.
pub async fn metrics_text(node: impl Endpoint) -> String {
    metrics(&node).await
}

/// One unlabelled sample, which must exist.
pub async fn metric_of(node: impl Endpoint, name: &str) -> f64 {
    let text = metrics(&node).await;
    metric(&text, name, &[]).unwrap_or_else(|| panic!("metric {name} missing from /metrics"))
}

/// Polls `/metrics` until `pred` holds for the sample (an awaited condition, not a timed sleep;
/// the short pause only keeps the loop from spinning).
pub async fn wait_metric(
    node: &impl Endpoint,
    name: &str,
    labels: &[(&str, &str)],
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let desc = format!("metric {name}{labels:?}");
    within(&desc, async {
        loop {
            let text = metrics(node).await;
            if let Some(v) = metric(&text, name, labels) {
                if pred(v) {
                    return v;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
