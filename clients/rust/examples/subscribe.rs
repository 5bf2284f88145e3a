//! Subscribes to channels and prints every publication, exactly once, across reconnects and
//! node changes; positions are kept in a file so a restart resumes where it stopped.
//!
//! ```sh
//! cargo run -p realtime-gateway-client --example subscribe -- chat:lobby
//! GATEWAY_WS=ws://127.0.0.1:8080/ws,ws://127.0.0.1:8081/ws cargo run … --example subscribe -- chat:lobby
//! ```

use std::collections::HashMap;

use gateway_client::{Event, Position, Subscriber};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("GATEWAY_WS").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let token = std::env::var("GATEWAY_TOKEN").ok();
    let channels: Vec<String> = std::env::args().skip(1).collect();
    let channels = if channels.is_empty() {
        vec!["chat:lobby".to_string()]
    } else {
        channels
    };
    let store = std::env::var("POSITIONS_FILE").unwrap_or_else(|_| "positions.json".into());
    let saved: HashMap<String, Position> = std::fs::read_to_string(&store)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();

    let mut subscriber = Subscriber::builder(nodes.split(','))
        .token(token.as_deref())
        .with_positions(saved)
        .connect()?;
    for channel in &channels {
        subscriber.subscribe(channel).await?;
    }
    while let Some(event) = subscriber.recv().await {
        match event {
            Event::Publication(p) => println!("{} #{} {}", p.channel, p.offset, p.data),
            Event::Reset(r) => {
                eprintln!("{}: lost messages ({}), reload state", r.channel, r.reason)
            }
            Event::Subscribed {
                channel, recovered, ..
            } => {
                eprintln!("subscribed {channel} (recovered: {recovered})")
            }
            Event::Connected { node } | Event::Reconnected { node } => {
                eprintln!("connected to {node}")
            }
            Event::Unsubscribed { channel, reason } => {
                eprintln!("the server ended {channel} ({reason})")
            }
            Event::Join { channel, member } => {
                eprintln!(
                    "{channel}: {} joined",
                    member.user.as_deref().unwrap_or("guest")
                )
            }
            Event::Leave { channel, member } => {
                eprintln!(
                    "{channel}: {} left",
                    member.user.as_deref().unwrap_or("guest")
                )
            }
            Event::Ended { node, reason, .. } => {
                eprintln!("{node} closed for good ({reason})");
                break;
            }
            Event::Disconnected {
                node,
                reason,
                retry_in,
                ..
            } => {
                eprintln!("lost {node} ({reason}); retrying in {retry_in:?}")
            }
            Event::Error {
                channel,
                code,
                message,
            } => eprintln!("{channel:?}: {code}: {message}"),
        }
        // Persist after handling: a crash replays at most the last publication.
        std::fs::write(&store, serde_json::to_string(&subscriber.positions())?)?;
    }
    Ok(())
}
