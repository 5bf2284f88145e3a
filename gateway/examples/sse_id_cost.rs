//! What an SSE event id costs on the seed-003 stream (one EventSource over 50 symbols), in bytes
//! and in the server's CPU per event, for the full cursor form and the compact one event ids use:
//!
//! ```text
//! cargo run --release -p gateway --example sse_id_cost
//! ```
//!
//! Each round moves one channel (as a publication does) and writes the stream's id, the way the
//! SSE task does per event. Offsets are those of a ticker a day old (20 ticks/s: seven digits),
//! once with symbols that tick at about the same rate, once with rates twice apart.

use std::sync::Arc;
use std::time::Instant;

use gateway::cursor::{self, StreamCursor};

const CHANNELS: usize = 50;
const EVENTS: u64 = 2_000_000;

fn main() {
    let channels: Vec<Arc<str>> = (0..CHANNELS)
        .map(|i| Arc::from(format!("prices:SYM{i:02}")))
        .collect();
    let epochs: Vec<Arc<str>> = (0..CHANNELS)
        .map(|i| Arc::from(format!("{:016x}", 0x7a2d_ed16_0958_8a1d_u64 + i as u64)))
        .collect();
    let tag = |offset: u64| Some(offset as u32 ^ 0x9e37_79b9);
    let close: Vec<u64> = (0..CHANNELS).map(|i| 1_728_000 + 20 * i as u64).collect();
    let spread: Vec<u64> = (0..CHANNELS)
        .map(|i| 1_000_000 + 20_000 * i as u64)
        .collect();

    println!("| id form | offsets | bytes per id | ns per event (id written) |");
    println!("|---|---|---:|---:|");
    let mut offsets = close.clone();
    let mut full = String::new();
    let mut scratch = Vec::new();
    let started = Instant::now();
    for n in 0..EVENTS {
        let i = n as usize % CHANNELS;
        offsets[i] += 1;
        full.clear();
        let positions =
            (0..CHANNELS).map(|c| (&*channels[c], &*epochs[c], offsets[c], tag(offsets[c])));
        cursor::encode_into(positions, &mut scratch, &mut full);
    }
    let ns = started.elapsed().as_nanos() as f64 / EVENTS as f64;
    println!("| full | within 1,000 | {} | {ns:.0} |", full.len());

    for (name, start) in [("within 1,000", &close), ("1M to 2M", &spread)] {
        let mut offsets = start.clone();
        let mut stream = StreamCursor::new(channels.clone());
        for c in 0..CHANNELS {
            stream.set(c, &epochs[c], offsets[c], tag(offsets[c]));
        }
        let mut compact = String::new();
        let started = Instant::now();
        for n in 0..EVENTS {
            let i = n as usize % CHANNELS;
            offsets[i] += 1;
            stream.set(i, &epochs[i], offsets[i], tag(offsets[i]));
            compact.clear();
            stream.write(&mut compact);
        }
        let ns = started.elapsed().as_nanos() as f64 / EVENTS as f64;
        println!("| compact | {name} | {} | {ns:.0} |", compact.len());
    }
}
