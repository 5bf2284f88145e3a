//! The demo price feed (`demo.publisher`, `--demo-publisher`): made-up stock quotes published on
//! `prices:<SYMBOL>` every `demo.publisher_interval`, so the demo page's tickers move without
//! any other program. Off by default; it publishes through the node like any API client, each
//! quote versioned by its tick so a stale one could never overwrite a newer one. Most fields
//! stay the same from tick to tick, which the page's delta subscription makes use of.

use std::sync::Arc;

use crate::node::Node;

/// The symbols of the demo tickers, with their opening prices.
pub const SYMBOLS: [(&str, f64); 4] = [
    ("ACME", 120.0),
    ("GLOBEX", 48.5),
    ("INITECH", 310.25),
    ("UMBRELLA", 72.8),
];

/// Publishes a random walk of every symbol until the node stops accepting.
pub async fn run_publisher(node: Arc<Node>) {
    let mut prices: Vec<f64> = SYMBOLS.iter().map(|(_, p)| *p).collect();
    let mut volumes: Vec<u64> = vec![0; SYMBOLS.len()];
    let mut ticker = tokio::time::interval(node.config().demo.publisher_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown_token().cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Microseconds since the Unix epoch: increasing, so a fine version.
        let tick = backplane::now_us();
        for (((symbol, open), price), volume) in SYMBOLS
            .iter()
            .zip(prices.iter_mut())
            .zip(volumes.iter_mut())
        {
            // A step of at most ±1%, rounded to cents.
            let step = *price * (rand::random::<f64>() - 0.5) / 50.0;
            let next = ((*price + step).max(1.0) * 100.0).round() / 100.0;
            let change = ((next - *price) * 100.0).round() / 100.0;
            *price = next;
            *volume += 100 * (1 + rand::random::<u64>() % 10);
            let data = serde_json::json!({
                "symbol": symbol, "currency": "USD", "exchange": "DEMO", "open": open,
                "price": next, "change": change,
                "bid": ((next - 0.01) * 100.0).round() / 100.0,
                "ask": ((next + 0.01) * 100.0).round() / 100.0,
                "volume": volume, "time": tick / 1000,
            });
            let channel = format!("prices:{symbol}");
            if let Err(e) = node
                .publish(&channel, data.to_string().into(), None, Some(tick))
                .await
            {
                tracing::warn!(%channel, error = %e, "demo price not published");
            }
        }
    }
}
