//! Publishes one JSON message through the server API, retried across nodes with one
//! idempotency key, and prints the ack and the channel's latest history.
//!
//! ```sh
//! cargo run -p realtime-gateway-client --example publish -- chat:lobby '{"text":"hi"}'
//! GATEWAY_API=http://127.0.0.1:8080,http://127.0.0.1:8081 GATEWAY_API_KEY=secret cargo run … --example publish
//! ```

use futures_util::TryStreamExt;
use gateway_client::{ApiClient, Position};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("GATEWAY_API").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let key = std::env::var("GATEWAY_API_KEY").ok();
    let mut args = std::env::args().skip(1);
    let channel = args.next().unwrap_or_else(|| "chat:lobby".into());
    let data: serde_json::Value = match args.next() {
        Some(text) => serde_json::from_str(&text)?,
        None => serde_json::json!({"text": "hello from Rust"}),
    };

    let api = ApiClient::new(nodes.split(','), key.as_deref())?;
    let ack = api.publish(&channel, &data).await?;
    println!(
        "stored as {}#{} (epoch {}, tag {:?})",
        ack.channel, ack.offset, ack.epoch, ack.tag
    );

    // Everything the channel still holds, paged.
    let all: Vec<_> = api
        .history_after(&channel, Position::start(), Some(100))
        .try_collect()
        .await?;
    println!("history: {} publications", all.len());
    Ok(())
}
