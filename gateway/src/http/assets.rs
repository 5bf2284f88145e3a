//! The static files a node serves: the JavaScript client at `/client.js` (always) and the demo
//! page at `/` (when `demo.page` is on). Both are compiled into the binary, so a node needs no
//! files beside it and the client always matches the node's protocol.

use hyper::{header, Response, StatusCode};

use crate::http::response::{self, Body};

/// The ES module a page imports from the node it talks to (`clients/js/index.js`).
pub const CLIENT_JS: &str = include_str!("../../../clients/js/index.js");
/// The demo page (`clients/js/demo/index.html`).
pub const DEMO_HTML: &str = include_str!("../../../clients/js/demo/index.html");

/// A file of this build: it changes only with the binary, so caches revalidate (`no-cache`) with
/// the ETag, which names the build, rather than holding a stale client after an upgrade.
pub fn serve(
    body: &'static str,
    content_type: &'static str,
    if_none_match: Option<&[u8]>,
) -> Response<Body> {
    let etag = etag(body);
    let builder = Response::builder()
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::ETAG, &etag)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if if_none_match.is_some_and(|v| v == etag.as_bytes() || v == b"*") {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(response::empty())
            .expect("static parts are valid");
    }
    builder
        .header(header::CONTENT_TYPE, content_type)
        .body(response::full(body.as_bytes()))
        .expect("static parts are valid")
}

/// A strong validator: FNV-1a of the content, so it changes exactly when the file does.
fn etag(body: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}
