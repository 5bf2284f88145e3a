//! Server-Sent Events: one parser of the `text/event-stream` format ([`SseParser`], no I/O,
//! used by the tests and by `loadtest`) and a test client over reqwest ([`Sse`]).

use std::collections::HashMap;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use crate::http::Endpoint;
use crate::text::enc;
use crate::wait::{within, WAIT};

/// One SSE block (lines up to a blank line).
#[derive(Debug, Clone, Default)]
pub struct SseBlock {
    pub lines: Vec<String>,
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<String>,
    pub comments: Vec<String>,
    /// Lines whose field the SSE format does not define (ignored by browsers; the gateway
    /// never sends one).
    pub unknown: Vec<String>,
}

impl SseBlock {
    /// True when the block dispatches an event (it has a data field).
    pub fn is_event(&self) -> bool {
        self.data.is_some()
    }

    pub fn json(&self) -> Value {
        let data = self.data.as_deref().expect("event without data");
        serde_json::from_str(data).unwrap_or_else(|e| panic!("event data not JSON {data:?}: {e}"))
    }

    /// The event type, "message" when absent.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// Adds one non-blank line by the WHATWG field rules (`field: value`, `:comment`, multi-line
    /// `data` joined by newlines).
    fn add_line(&mut self, line: String) {
        if let Some(c) = line.strip_prefix(':') {
            self.comments.push(c.trim().to_string());
        } else {
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "id" => self.id = Some(value.to_string()),
                "event" => self.event = Some(value.to_string()),
                "retry" => self.retry = Some(value.to_string()),
                "data" => {
                    self.data = Some(match self.data.take() {
                        Some(d) => format!("{d}\n{value}"),
                        None => value.to_string(),
                    })
                }
                _ => self.unknown.push(line.clone()),
            }
        }
        self.lines.push(line);
    }
}

/// Splits a `text/event-stream` byte stream into blocks: feed it bytes as they arrive with
/// [`SseParser::push`], take complete blocks with [`SseParser::next_block`]. Lines end in LF or
/// CRLF; blank lines between blocks are skipped.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    block: SseBlock,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete block, or None until more bytes arrive.
    pub fn next_block(&mut self) -> Option<SseBlock> {
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).expect("SSE line is UTF-8");
            if !line.is_empty() {
                self.block.add_line(line);
            } else if !self.block.lines.is_empty() {
                return Some(std::mem::take(&mut self.block));
            }
        }
        None
    }

    /// Bytes received but not yet part of a block.
    pub fn unparsed(&self) -> &[u8] {
        &self.buf
    }
}

/// An open `GET /sse` response read block by block.
pub struct Sse {
    pub status: u16,
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    parser: SseParser,
    lines: Vec<String>,
    ended: bool,
    /// Why the body ended, if it did not end cleanly.
    error: Option<String>,
}

/// A client without a whole-request timeout (SSE streams are long-lived).
pub fn sse_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(WAIT)
        .build()
        .unwrap()
}

pub fn sse_client_h2() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(WAIT)
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

impl Sse {
    /// `GET /sse?<query>` with the given extra headers; asserts nothing about the status.
    pub async fn open_with(
        client: &reqwest::Client,
        node: &impl Endpoint,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let mut req = client.get(node.url(&format!("/sse?{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = within("SSE response", req.send())
            .await
            .expect("SSE request failed");
        Sse::from_response(resp)
    }

    /// Reads an already made response (e.g. one sent through a proxy) as an event stream.
    pub fn from_response(resp: reqwest::Response) -> Sse {
        Sse {
            status: resp.status().as_u16(),
            version: resp.version(),
            headers: resp.headers().clone(),
            stream: Box::pin(resp.bytes_stream()),
            parser: SseParser::new(),
            lines: Vec::new(),
            ended: false,
            error: None,
        }
    }

    /// `GET /sse` for the channels resuming from `cursor` (`Last-Event-ID`); asserts nothing
    /// about the status.
    pub async fn resume(node: &impl Endpoint, channels: &[&str], cursor: &str) -> Sse {
        let query = channel_query(channels);
        Self::open_with(&sse_client(), node, &query, &[("Last-Event-ID", cursor)]).await
    }

    /// Opens a stream for the channels, asserting 200 and `text/event-stream`.
    pub async fn open(node: &impl Endpoint, channels: &[&str]) -> Sse {
        Self::open_query(node, &channel_query(channels)).await
    }

    pub async fn open_query(node: &impl Endpoint, query: &str) -> Sse {
        let sse = Self::open_with(&sse_client(), node, query, &[]).await;
        sse.assert_stream();
        sse
    }

    #[track_caller]
    pub fn assert_stream(&self) {
        assert_eq!(self.status, 200, "SSE status");
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            ct.starts_with("text/event-stream"),
            "SSE content-type: {ct:?}"
        );
    }

    /// The whole body, for error responses.
    pub async fn body_json(mut self) -> Value {
        let mut all = self.parser.unparsed().to_vec();
        while let Some(chunk) = within("body", self.stream.next()).await {
            all.extend_from_slice(&chunk.expect("body chunk"));
        }
        serde_json::from_slice(&all).unwrap_or(Value::Null)
    }

    /// The next block, or None once the stream has ended.
    pub async fn next_block(&mut self) -> Option<SseBlock> {
        within("SSE block", async {
            loop {
                if let Some(block) = self.parser.next_block() {
                    self.lines.extend(block.lines.iter().cloned());
                    return Some(block);
                }
                if self.ended {
                    return None;
                }
                match self.stream.next().await {
                    Some(Ok(chunk)) => self.parser.push(&chunk),
                    Some(Err(e)) => {
                        self.error = Some(e.to_string());
                        self.ended = true;
                    }
                    None => self.ended = true,
                }
            }
        })
        .await
    }

    /// The next block that dispatches an event (comment-only and retry-only blocks skipped).
    pub async fn next_event(&mut self) -> SseBlock {
        loop {
            let block = self.next_block().await.expect("SSE stream ended");
            if block.is_event() {
                return block;
            }
        }
    }

    /// Reads the preamble (`retry:` and the `connected` event) and returns the connected event.
    pub async fn connected(&mut self) -> SseBlock {
        let ev = self.next_event().await;
        assert_eq!(ev.kind(), "connected", "first event: {ev:?}");
        assert!(ev.id.is_some(), "connected event without id: {ev:?}");
        ev
    }

    /// The next publication event (message events only; panics on anything else).
    pub async fn publication(&mut self) -> (String, Value) {
        let ev = self.next_event().await;
        assert_eq!(ev.kind(), "message", "expected a publication, got {ev:?}");
        let id = ev.id.clone().expect("publication without id");
        (id, ev.json())
    }

    /// After [`Sse::next_block`] returned None: the transport error that ended the body, or
    /// None for a clean end.
    pub fn stream_error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Bytes received after the last complete block (a clean end leaves none).
    pub fn unparsed(&self) -> &[u8] {
        self.parser.unparsed()
    }

    /// Every raw line of the blocks read so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

pub fn channel_query(channels: &[&str]) -> String {
    channels
        .iter()
        .map(|c| format!("channel={}", enc(c)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `channels` of a connected event, keyed by channel.
pub fn connected_channels(ev: &SseBlock) -> HashMap<String, Value> {
    let v = ev.json();
    v["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("connected without channels: {v}"))
        .iter()
        .map(|c| (c["channel"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

/// The full cursor a client builds from the positions it holds (docs/protocol.md, "The cursor and
/// resuming"): base64url of `[[channel, epoch, offset, tag?], ...]`. SSE event ids are the
/// compact form; this one names every channel and can be tens of kilobytes.
pub fn full_cursor(positions: &[(String, String, u64, Option<String>)]) -> String {
    use base64::Engine;
    let entries: Vec<Value> = positions
        .iter()
        .map(|(channel, epoch, offset, tag)| match tag {
            Some(tag) => serde_json::json!([channel, epoch, offset, tag]),
            None => serde_json::json!([channel, epoch, offset]),
        })
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&entries).expect("positions serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_end_at_blank_lines_in_any_chunking() {
        let text = b"retry: 1000\n\n: hi\nid: 7\r\nevent: connected\ndata: {\"a\":\ndata: 1}\n\n";
        for split in 0..text.len() {
            let mut p = SseParser::new();
            p.push(&text[..split]);
            let mut blocks = Vec::new();
            blocks.extend(std::iter::from_fn(|| p.next_block()));
            p.push(&text[split..]);
            blocks.extend(std::iter::from_fn(|| p.next_block()));
            assert_eq!(blocks.len(), 2, "split at {split}");
            assert_eq!(blocks[0].retry.as_deref(), Some("1000"));
            assert!(!blocks[0].is_event());
            assert_eq!(blocks[1].comments, ["hi"]);
            assert_eq!(blocks[1].id.as_deref(), Some("7"));
            assert_eq!(blocks[1].kind(), "connected");
            assert_eq!(blocks[1].data.as_deref(), Some("{\"a\":\n1}"));
        }
    }

    #[test]
    fn an_unfinished_block_waits_for_its_blank_line() {
        let mut p = SseParser::new();
        p.push(b"data: x\n");
        assert!(p.next_block().is_none());
        p.push(b"\nid: 1");
        assert_eq!(p.next_block().unwrap().data.as_deref(), Some("x"));
        assert!(p.next_block().is_none());
        assert_eq!(p.unparsed(), b"id: 1");
    }
}
