//! The server API client: `POST /api/publish` and `POST /api/broadcast` with idempotent retries
//! across nodes, `GET /api/history` with a paging helper, and the management of users and
//! channels (`/api/disconnect`, `/api/unsubscribe`, `/api/channels`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::types::{ChannelCount, HistoryPage, Position, Presence, Publication, PublishAck};

/// A client of the server API of one or more gateway nodes (`http://node:8080`, …).
///
/// Requests that may be retried — a publish with its idempotency key, a history read — go to
/// the next node after a transport error or a 502/503/504 (the outcome is unknown there), with
/// jittered exponential backoff, up to [`ApiClient::with_retries`] attempts.
#[derive(Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base_urls: Vec<String>,
    api_key: Option<String>,
    attempts: u32,
    backoff: Backoff,
    /// The node to try first: the last one that answered.
    current: AtomicUsize,
}

#[derive(Serialize)]
struct PublishBody<'a, T: Serialize + ?Sized> {
    channel: &'a str,
    data: &'a T,
    idempotency_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

/// `POST /api/publish` with `publications`: a batch.
#[derive(Serialize)]
struct BatchBody<'a, T: Serialize> {
    publications: Vec<PublishBody<'a, T>>,
}

/// One answer of a batch: an ack, or that publication's error.
#[derive(Deserialize)]
#[serde(untagged)]
enum BatchResult {
    Error(ErrorBody),
    Ack(PublishAck),
}

/// `POST /api/broadcast`.
#[derive(Serialize)]
struct BroadcastBody<'a, T: Serialize + ?Sized> {
    channels: Vec<&'a str>,
    data: &'a T,
    idempotency_key: &'a str,
}

#[derive(Deserialize)]
struct Disconnected {
    disconnected_at: u64,
}

#[derive(Deserialize)]
struct ChannelList {
    channels: Vec<ChannelCount>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl ApiClient {
    /// A client of the nodes at `base_urls` (tried in order, the next one on failure), sending
    /// `Authorization: apikey <api_key>` when a key is given.
    pub fn new<I, S>(base_urls: I, api_key: Option<&str>) -> Result<ApiClient>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let base_urls: Vec<String> = base_urls
            .into_iter()
            .map(|u| u.into().trim_end_matches('/').to_string())
            .collect();
        if base_urls.is_empty() {
            return Err(Error::Config("no base URL".into()));
        }
        for url in &base_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Config(format!("{url}: not an http(s) URL")));
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(ApiClient {
            http,
            base_urls,
            api_key: api_key.map(String::from),
            attempts: 8,
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(3),
            },
            current: AtomicUsize::new(0),
        })
    }

    /// At most `attempts` tries per request (at least 1), waiting `backoff` between them.
    pub fn with_retries(mut self, attempts: u32, backoff: Backoff) -> ApiClient {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    /// Publishes `data` on `channel` with a fresh idempotency key, retried across nodes until
    /// acknowledged; the ack names the stored publication.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
    ) -> Result<PublishAck> {
        self.publish_with_key(channel, data, &new_idempotency_key())
            .await
    }

    /// [`ApiClient::publish`] with the caller's idempotency key (1–256 bytes): repeating a call
    /// with the same key and data within the server's window returns the first result instead
    /// of publishing again; other data gives [`Error::IdempotencyConflict`].
    pub async fn publish_with_key<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
        idempotency_key: &str,
    ) -> Result<PublishAck> {
        self.publish_keyed(channel, data, idempotency_key, None)
            .await
    }

    /// [`ApiClient::publish`] of a versioned value: when `version` is not greater than the
    /// channel's last one, nothing is published and the ack has `suppressed` set (with the
    /// channel's current top), so an out-of-order producer cannot move the value back.
    pub async fn publish_versioned<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
        version: u64,
    ) -> Result<PublishAck> {
        self.publish_keyed(channel, data, &new_idempotency_key(), Some(version))
            .await
    }

    async fn publish_keyed<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
        idempotency_key: &str,
        version: Option<u64>,
    ) -> Result<PublishAck> {
        let body = serde_json::to_vec(&PublishBody {
            channel,
            data,
            idempotency_key,
            version,
        })
        .map_err(|e| Error::Config(format!("data does not serialise: {e}")))?;
        self.with_retry(|base| {
            let request = self
                .authorized(self.http.post(format!("{base}/api/publish")))
                .header("content-type", "application/json")
                .body(body.clone());
            async move { send(request).await }
        })
        .await
    }

    /// Publishes several publications in one request (`POST /api/publish` with `publications`,
    /// 1 to 1000 of them): one round trip to the gateway and, on Redis, to the store. Each gets
    /// a fresh idempotency key; the request is retried across nodes like [`ApiClient::publish`],
    /// and so is every publication whose own answer was "outcome unknown"
    /// (`backplane_unavailable`), with the same keys, so nothing is stored twice. Returns one
    /// result per publication, in order; a publication of one channel is stored after the
    /// channel's earlier ones in the list. An empty list sends nothing.
    pub async fn publish_batch<T: Serialize>(
        &self,
        publications: &[(&str, T)],
    ) -> Result<Vec<Result<PublishAck>>> {
        let keys: Vec<String> = publications.iter().map(|_| new_idempotency_key()).collect();
        self.answer_each(publications.len(), "/api/publish", |pending| {
            serde_json::to_vec(&BatchBody {
                publications: pending
                    .iter()
                    .map(|&i| PublishBody {
                        channel: publications[i].0,
                        data: &publications[i].1,
                        idempotency_key: &keys[i],
                        version: None,
                    })
                    .collect(),
            })
        })
        .await
    }

    /// Publishes one `data` to every channel of `channels` (1 to 1000) in one request
    /// (`POST /api/broadcast`), with one fresh idempotency key that applies to each channel on its
    /// own: the request, and every channel whose own answer was "outcome unknown"
    /// (`backplane_unavailable`), is retried across nodes with the same key, so nothing is stored
    /// twice. Returns one result per channel, in order. An empty list sends nothing.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        channels: &[&str],
        data: &T,
    ) -> Result<Vec<Result<PublishAck>>> {
        let key = new_idempotency_key();
        self.answer_each(channels.len(), "/api/broadcast", |pending| {
            serde_json::to_vec(&BroadcastBody {
                channels: pending.iter().map(|&i| channels[i]).collect(),
                data,
                idempotency_key: &key,
            })
        })
        .await
    }

    /// Sends `count` items answered one by one (`{"results": [...]}` in order) to `path`, the
    /// body made by `body` from the indexes still to send; retried across nodes like
    /// [`ApiClient::publish`], and so is every item whose own answer was "outcome unknown"
    /// (`backplane_unavailable`): `body` must give a retried item the same idempotency key.
    async fn answer_each(
        &self,
        count: usize,
        path: &str,
        body: impl Fn(&[usize]) -> serde_json::Result<Vec<u8>>,
    ) -> Result<Vec<Result<PublishAck>>> {
        let mut results: Vec<Option<Result<PublishAck>>> = (0..count).map(|_| None).collect();
        let mut tried = 0;
        loop {
            // Only those still unanswered (or outcome unknown), in list order.
            let pending: Vec<usize> = (0..count)
                .filter(|&i| match &results[i] {
                    None => true,
                    Some(result) => result.as_ref().is_err_and(Error::is_retryable),
                })
                .collect();
            if pending.is_empty() || tried >= self.attempts {
                break;
            }
            if tried > 0 {
                tokio::time::sleep(self.backoff.delay(tried - 1)).await;
            }
            tried += 1;
            let body = body(&pending)
                .map_err(|e| Error::Config(format!("data does not serialise: {e}")))?;
            let answer: BatchAnswer = self
                .with_retry(|base| {
                    let request = self
                        .authorized(self.http.post(format!("{base}{path}")))
                        .header("content-type", "application/json")
                        .body(body.clone());
                    async move { send(request).await }
                })
                .await?;
            if answer.results.len() != pending.len() {
                return Err(Error::Protocol(format!(
                    "{} results for {} items sent",
                    answer.results.len(),
                    pending.len()
                )));
            }
            for (i, result) in pending.into_iter().zip(answer.results) {
                results[i] = Some(match result {
                    BatchResult::Ack(ack) => Ok(ack),
                    BatchResult::Error(ErrorBody { error }) => Err(item_error(error)),
                });
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item was sent at least once"))
            .collect())
    }

    /// Closes every connection of `user` (a token's `sub`) on every node (`POST
    /// /api/disconnect`): WebSockets get close code 4010 with `"reconnect":false`. The user's
    /// tokens issued at or before the returned time (Unix seconds) are refused for the server's
    /// `api.disconnect_window`. Retried across nodes (repeating it changes nothing but the time).
    pub async fn disconnect(&self, user: &str) -> Result<u64> {
        let body = serde_json::json!({ "user": user }).to_string();
        let answer: Disconnected = self
            .with_retry(|base| {
                let request = self
                    .authorized(self.http.post(format!("{base}/api/disconnect")))
                    .header("content-type", "application/json")
                    .body(body.clone());
                async move { send(request).await }
            })
            .await?;
        Ok(answer.disconnected_at)
    }

    /// Makes every connection of `user` on every node leave `channel`, each told so with
    /// reason `server` (`POST /api/unsubscribe`). Retried across nodes (it is idempotent).
    pub async fn unsubscribe(&self, user: &str, channel: &str) -> Result<()> {
        let body = serde_json::json!({ "user": user, "channel": channel }).to_string();
        let _: Value = self
            .with_retry(|base| {
                let request = self
                    .authorized(self.http.post(format!("{base}/api/unsubscribe")))
                    .header("content-type", "application/json")
                    .body(body.clone());
                async move { send(request).await }
            })
            .await?;
        Ok(())
    }

    /// The channels starting with `prefix` that have subscribers anywhere in the cluster, with
    /// their subscriber counts, sorted by name (`GET /api/channels`).
    pub async fn channels(&self, prefix: &str) -> Result<Vec<ChannelCount>> {
        let answer: ChannelList = self
            .with_retry(|base| {
                let request = self
                    .authorized(self.http.get(format!("{base}/api/channels")))
                    .query(&[("prefix", prefix)]);
                async move { send(request).await }
            })
            .await?;
        Ok(answer.channels)
    }

    /// Who is in `channel` across the cluster (its namespace must keep presence); without the
    /// member list when `count_only`.
    pub async fn presence(&self, channel: &str, count_only: bool) -> Result<Presence> {
        self.with_retry(|base| {
            let request = self
                .authorized(self.http.get(format!("{base}/api/presence")))
                .query(&[
                    ("channel", channel),
                    ("count_only", &count_only.to_string()),
                ]);
            async move { send(request).await }
        })
        .await
    }

    /// One page of history: publications of `channel` after offset `since`, oldest first, at
    /// most `limit` (the server's default and maximum page when `None`).
    pub async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: Option<u32>,
    ) -> Result<HistoryPage> {
        let mut query = vec![
            ("channel", channel.to_string()),
            ("since", since.to_string()),
        ];
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        self.with_retry(|base| {
            let request = self
                .authorized(self.http.get(format!("{base}/api/history")))
                .query(&query);
            async move { send(request).await }
        })
        .await
    }

    /// Every publication of `channel` after `position`, in order, read in pages of `page_size`
    /// (the server's maximum when `None`) until the newest one. When history cannot continue
    /// from `position` — its epoch is gone (`epoch_changed`) or it no longer reaches back to
    /// `position.offset + 1` (`history_truncated`) — the stream yields [`Error::HistoryGap`]
    /// instead of skipping anything, and ends.
    pub fn history_after<'a>(
        &'a self,
        channel: &'a str,
        position: Position,
        page_size: Option<u32>,
    ) -> impl Stream<Item = Result<Publication>> + 'a {
        struct State {
            position: Position,
            page: std::vec::IntoIter<Publication>,
            done: bool,
        }
        let state = State {
            position,
            page: Vec::new().into_iter(),
            done: false,
        };
        futures_util::stream::unfold(state, move |mut state| async move {
            loop {
                if let Some(p) = state.page.next() {
                    state.position = Position::of(&p);
                    return Some((Ok(p), state));
                }
                if state.done {
                    return None;
                }
                let page = match self
                    .history(channel, state.position.offset, page_size)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        state.done = true;
                        return Some((Err(e), state));
                    }
                };
                if let Some(reason) = gap(&state.position, &page) {
                    state.done = true;
                    let e = Error::HistoryGap {
                        channel: channel.to_string(),
                        reason: reason.to_string(),
                        epoch: page.epoch,
                    };
                    return Some((Err(e), state));
                }
                let last = page.publications.last().map(|p| p.offset);
                state.done = match last {
                    Some(last) => last >= page.top,
                    None => true,
                };
                state.page = page.publications.into_iter();
            }
        })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.header("authorization", format!("apikey {key}")),
            None => request,
        }
    }

    /// Runs `attempt` against one node after another until it succeeds or fails for good.
    async fn with_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut tried = 0;
        loop {
            let index = self.current.load(Ordering::Relaxed) % self.base_urls.len();
            let base = self.base_urls[index].clone();
            match attempt(base).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() => {
                    tried += 1;
                    // A node change: the next attempt goes to the next node (and stays there).
                    let _ = self.current.compare_exchange(
                        index,
                        index + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if tried >= self.attempts {
                        return Err(Error::Exhausted {
                            attempts: tried,
                            last: Box::new(e),
                        });
                    }
                    tokio::time::sleep(self.backoff.delay(tried - 1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Why `page` cannot continue from `position`, if it cannot.
fn gap(position: &Position, page: &HistoryPage) -> Option<&'static str> {
    if position.offset == 0 {
        // Offset 0 belongs to every epoch: only trimming can leave a gap.
        return match page.publications.first() {
            Some(first) if first.offset > 1 => Some("history_truncated"),
            _ => None,
        };
    }
    if page.top == 0 || page.epoch != position.epoch {
        // No publication at the position's offset under its epoch: its history was lost.
        return Some("epoch_changed");
    }
    match page.publications.first() {
        Some(first) if first.offset > position.offset + 1 => Some("history_truncated"),
        _ => None,
    }
}

/// Sends `request`; a 2xx body is decoded as `T`, anything else becomes the server's error.
async fn send<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> Result<T> {
    let response = request
        .send()
        .await
        .map_err(|e| Error::Transport(error_chain(&e)))?;
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Error::Transport(error_chain(&e)))?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&bytes)
            .map_err(|e| Error::Protocol(format!("{e}: {}", String::from_utf8_lossy(&bytes))));
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (
            "http_error".to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ),
    };
    if status == 409 && code == "idempotency_conflict" {
        return Err(Error::IdempotencyConflict { message });
    }
    Err(Error::Api {
        status,
        code,
        message,
    })
}

/// The error of one publication of a batch (the request itself was answered 200).
fn item_error(error: ErrorDetail) -> Error {
    match error.code.as_str() {
        "idempotency_conflict" => Error::IdempotencyConflict {
            message: error.message,
        },
        code => Error::Api {
            // The status the same refusal has as a single publish.
            status: if code == "backplane_unavailable" {
                503
            } else {
                0
            },
            code: error.code,
            message: error.message,
        },
    }
}

/// A reqwest error with its causes ("error sending request: … connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A fresh idempotency key: 128 random bits in hex.
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(epoch: &str, top: u64, offsets: &[u64]) -> HistoryPage {
        HistoryPage {
            channel: "c".into(),
            epoch: epoch.into(),
            top,
            publications: offsets
                .iter()
                .map(|&offset| Publication {
                    channel: "c".into(),
                    offset,
                    epoch: epoch.into(),
                    tag: None,
                    data: json!(null),
                })
                .collect(),
        }
    }

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
            tag: None,
        }
    }

    #[test]
    fn history_gaps_are_named_like_subscribe_reasons() {
        assert_eq!(gap(&at("", 0), &page("e", 3, &[1, 2, 3])), None);
        assert_eq!(gap(&at("", 0), &page("", 0, &[])), None);
        assert_eq!(
            gap(&at("", 0), &page("e", 9, &[5])),
            Some("history_truncated")
        );
        assert_eq!(gap(&at("e", 4), &page("e", 9, &[5, 6])), None);
        assert_eq!(gap(&at("e", 9), &page("e", 9, &[])), None);
        assert_eq!(
            gap(&at("e", 4), &page("e", 9, &[7])),
            Some("history_truncated")
        );
        assert_eq!(gap(&at("e", 4), &page("f", 9, &[5])), Some("epoch_changed"));
        assert_eq!(gap(&at("e", 4), &page("", 0, &[])), Some("epoch_changed"));
    }

    #[test]
    fn idempotency_keys_are_fresh() {
        let a = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_idempotency_key());
    }
}
