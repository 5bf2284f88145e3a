//! History count and age per channel namespace, on the embedded backplane and on Redis.

use std::time::Duration;

use crate::support::*;
use gateway::config::{Config, NamespaceConfig};
use serde_json::json;

fn brief(config: &mut Config) {
    config.history.max_count = 100;
    config.channels.namespaces.insert(
        "brief".into(),
        NamespaceConfig {
            history_max_count: Some(2),
            ..NamespaceConfig::default()
        },
    );
    config.channels.namespaces.insert(
        "fleeting".into(),
        NamespaceConfig {
            history_max_age: Some(Duration::from_millis(200)),
            ..NamespaceConfig::default()
        },
    );
}

async fn kept(node: &Node, channel: &str) -> Vec<u64> {
    let (status, page) = history(node, &format!("channel={}", enc(channel))).await;
    assert_eq!(status, 200, "{page}");
    page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

async fn check(node: &Node) {
    for channel in ["brief:a", "other:a", "plain", "fleeting:a"] {
        for i in 0..5 {
            publish(node, channel, json!(i)).await;
        }
    }
    assert_eq!(kept(node, "brief:a").await, vec![4, 5]);
    assert_eq!(kept(node, "other:a").await, vec![1, 2, 3, 4, 5]);
    assert_eq!(kept(node, "plain").await, vec![1, 2, 3, 4, 5]);
    // The short-lived namespace empties once its age passes; the others keep everything.
    eventually("fleeting history to expire", || async move {
        kept(node, "fleeting:a").await.is_empty()
    })
    .await;
    assert_eq!(kept(node, "plain").await.len(), 5);
}

#[tokio::test]
async fn namespaces_keep_their_own_history_in_memory() {
    let node = Node::with(brief).await;
    check(&node).await;
}

#[tokio::test]
async fn namespaces_keep_their_own_history_on_redis() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let node = Node::with(|c| {
        brief(c);
        c.redis.url = Some(redis.url());
    })
    .await;
    check(&node).await;
}
