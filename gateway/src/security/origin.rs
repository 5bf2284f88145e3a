//! The `Origin` allow-list (cross-site WebSocket hijacking, foreign pages reading streams) and the
//! CORS headers of SSE and the API.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::http::response::{self, Body};
use crate::protocol::error_code;
use crate::security::auth::glob;

/// Whether a request's `Origin` is allowed by `allowed` (patterns with `*`; empty allows all).
/// A request without `Origin` is not from a browser page and is allowed.
pub fn allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if allowed.is_empty() {
        return true;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        pattern == "*"
            || glob(
                pattern
                    .trim_end_matches('/')
                    .to_ascii_lowercase()
                    .as_bytes(),
                origin.as_bytes(),
            )
    })
}

/// The 403 for a foreign origin.
pub fn refused() -> Response<Body> {
    response::error(
        StatusCode::FORBIDDEN,
        error_code::ORIGIN_NOT_ALLOWED,
        "this Origin may not use the gateway (origin.allowed)",
    )
}

/// Adds `Access-Control-Allow-Origin` (the request's own origin) to a response for an allowed
/// cross-origin request.
pub fn add_cors(request: &HeaderMap, response: &mut Response<Body>) {
    let Some(origin) = request.get(header::ORIGIN) else {
        return;
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After"),
    );
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn preflight(request: &HeaderMap, methods: &'static str) -> Response<Body> {
    let mut response = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, methods)
        .header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type, Last-Event-ID",
        )
        .header(header::ACCESS_CONTROL_MAX_AGE, "600")
        .body(response::empty())
        .expect("static parts are valid");
    add_cors(request, &mut response);
    response
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(o: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, o.parse().unwrap());
        h
    }

    #[test]
    fn allow_list() {
        let list = vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ];
        assert!(allowed(&list, &HeaderMap::new()));
        assert!(allowed(&list, &with_origin("https://app.example.com")));
        assert!(allowed(&list, &with_origin("https://a.example.org")));
        assert!(!allowed(&list, &with_origin("https://evil.example.net")));
        assert!(!allowed(&list, &with_origin("null")));
        assert!(allowed(&[], &with_origin("https://evil.example.net")));
    }
}
