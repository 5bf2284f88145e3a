//! `GET /api/openapi.json`: the HTTP contract, `openapi.json` next to this file, with the limits
//! of this node's configuration written into it (the file itself has the defaults).

use bytes::Bytes;
use serde_json::Value;

use crate::config::Config;

/// The document as kept in the repository.
const DOCUMENT: &str = include_str!("openapi.json");

/// The document with `config`'s limits: the most channels per SSE stream or poll, the largest
/// history page, the longest poll timeout.
pub(crate) fn document(config: &Config) -> Bytes {
    let mut doc: Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
    let max_channels = Value::from(config.client.max_subscriptions);
    for path in ["/sse", "/poll"] {
        set(&mut doc, path, "channel", "maxItems", max_channels.clone());
    }
    let max_page = Value::from(config.history.max_page);
    set(&mut doc, "/api/history", "limit", "maximum", max_page);
    let timeout = config.poll.max_timeout;
    let max_timeout = if timeout.subsec_nanos() == 0 {
        Value::from(timeout.as_secs())
    } else {
        Value::from(timeout.as_secs_f64())
    };
    set(&mut doc, "/poll", "timeout", "maximum", max_timeout);
    Bytes::from(serde_json::to_vec(&doc).expect("cannot fail"))
}

/// Sets `field` of the schema of query parameter `param` of `GET`/`POST` `path`.
fn set(doc: &mut Value, path: &str, param: &str, field: &str, value: Value) {
    let operation = doc["paths"][path]
        .as_object_mut()
        .and_then(|ops| ops.values_mut().next())
        .expect("documented path");
    let params = operation["parameters"]
        .as_array_mut()
        .expect("documented parameters");
    let param = params
        .iter_mut()
        .find(|p| p["name"] == param && p["in"] == "query")
        .expect("documented parameter");
    param["schema"][field] = value;
}

/// The (path, method) pairs the document describes.
#[cfg(test)]
pub(crate) fn operations() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            out.push((path.clone(), method.to_uppercase()));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The served document is the file with this node's limits, and the file holds the defaults.
    #[test]
    fn the_file_has_the_defaults_and_a_node_serves_its_own_limits() {
        let file: Value = serde_json::from_str(DOCUMENT).unwrap();
        let served: Value = serde_json::from_slice(&document(&Config::default())).unwrap();
        assert_eq!(
            served, file,
            "openapi.json does not hold the default limits"
        );

        let mut config = Config::default();
        config.client.max_subscriptions = 7;
        config.history.max_page = 50;
        config.poll.max_timeout = std::time::Duration::from_millis(1500);
        let served: Value = serde_json::from_slice(&document(&config)).unwrap();
        let query = |path: &str, name: &str| -> Value {
            let ops = served["paths"][path].as_object().unwrap();
            let op = ops.values().next().unwrap();
            op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap()["schema"]
                .clone()
        };
        assert_eq!(query("/sse", "channel")["maxItems"], 7);
        assert_eq!(query("/poll", "channel")["maxItems"], 7);
        assert_eq!(query("/api/history", "limit")["maximum"], 50);
        assert_eq!(query("/poll", "timeout")["maximum"], 1.5);
    }

    /// Every `$ref` names a component that exists.
    #[test]
    fn every_reference_resolves() {
        fn walk(v: &Value, doc: &Value, refs: &mut usize) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("local $ref");
                        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
                        *refs += 1;
                    }
                    map.values().for_each(|v| walk(v, doc, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc, refs)),
                _ => {}
            }
        }
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        let mut refs = 0;
        walk(&doc, &doc, &mut refs);
        assert!(refs > 20, "{refs} references");
    }
}
