//! permessage-deflate measured on a real gateway process, with compression off and on: idle
//! memory per connection that negotiated it, gateway CPU per delivery and bytes on the wire per
//! message, for a ticker payload and a 2 KB JSON document. The figures in docs/benchmarks.md
//! ("Compression") come from:
//!
//! ```sh
//! cargo build --release -p gateway --bin gateway --example ws_compression
//! target/release/examples/ws_compression [IDLE_CONNECTIONS] [SUBSCRIBERS] [PUBLICATIONS]
//! ```
//!
//! Every client is a raw WebSocket ([`testkit::RawWs`]) that offers `permessage-deflate` and
//! counts each frame's header and payload bytes as they arrive.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{publish, GatewayProcess, RawWs, OP_TEXT};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let idle = args.first().copied().unwrap_or(2000);
    let subscribers = args.get(1).copied().unwrap_or(200);
    let publications = args.get(2).copied().unwrap_or(500);
    let exe = std::env::current_exe().expect("current exe");
    let gateway = exe
        .parent()
        .and_then(|examples| examples.parent())
        .expect("target/<profile>/examples")
        .join("gateway");
    assert!(
        gateway.is_file(),
        "build the gateway first: cargo build -p gateway --bin gateway (same profile)"
    );
    testkit::gateway_process::use_binary(gateway);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(idle, subscribers, publications));
}

fn ticker(i: usize) -> Value {
    json!({"symbol": "AAPL", "bid": 189.25 + (i % 100) as f64 / 100.0, "ask": 189.31 + (i % 100) as f64 / 100.0, "ts": 1_764_130_000_000u64 + i as u64})
}

/// About 2 KB of compact JSON: an order book snapshot.
fn document(i: usize) -> Value {
    let levels: Vec<Value> = (0..64)
        .map(|l| json!({"px": 189.0 + l as f64 * 0.01, "qty": 100 * (l + 1) + i % 7, "n": l % 5 + 1}))
        .collect();
    json!({"symbol": "AAPL", "seq": i, "bids": levels})
}

const OFFER: (&str, &str) = (
    "Sec-WebSocket-Extensions",
    "permessage-deflate; client_max_window_bits",
);

async fn run(idle: usize, subscribers: usize, publications: usize) {
    println!(
        "idle connections {idle}, subscribers {subscribers}, publications {publications} per payload"
    );
    for (name, make) in [
        ("ticker", ticker as fn(usize) -> Value),
        ("2 KB JSON", document),
    ] {
        println!(
            "compressing one {name} publication: {:.1} µs (what each delivery would pay if every subscriber compressed its own copy)",
            compress_cost(make)
        );
    }
    println!(
        "| compression | min_size | idle KiB/conn | payload | JSON bytes | wire bytes/msg | gateway CPU µs/delivery |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (mode, min_size) in [("off", "256"), ("on", "256"), ("on", "0")] {
        let node = GatewayProcess::start(
            "bench",
            &[],
            &[
                ("GATEWAY__WEBSOCKET__COMPRESSION", mode),
                ("GATEWAY__WEBSOCKET__COMPRESSION_MIN_SIZE", min_size),
            ],
        )
        .await;
        let idle_kib = idle_memory(&node, idle).await;
        for (name, make) in [
            ("ticker", ticker as fn(usize) -> Value),
            ("2 KB JSON", document),
        ] {
            let json_len = make(0).to_string().len();
            let (wire, cpu_us) = deliveries(&node, name, make, subscribers, publications).await;
            println!(
                "| {mode} | {min_size} | {idle_kib:.2} | {name} | {json_len} | {wire:.0} | {cpu_us:.2} |"
            );
        }
    }
}

/// RSS growth per connection that negotiated the extension, subscribed and then went quiet.
async fn idle_memory(node: &GatewayProcess, n: usize) -> f64 {
    settle().await;
    let before = node.rss_bytes();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut ws = RawWs::connect_with(node.addr, "/ws", &[OFFER]).await;
        let subscribe = json!({"id": 1, "op": "subscribe", "channel": format!("idle{}", i % 100)});
        ws.send_frame(true, 0, OP_TEXT, subscribe.to_string().as_bytes())
            .await;
        ws.read_frame().await.expect("subscribe reply");
        conns.push(ws);
    }
    settle().await;
    let after = node.rss_bytes();
    drop(conns);
    (after.saturating_sub(before)) as f64 / n as f64 / 1024.0
}

/// Wire bytes per message and gateway CPU per delivery for `publications` publications to
/// `subscribers` subscribers.
async fn deliveries(
    node: &GatewayProcess,
    channel: &str,
    make: fn(usize) -> Value,
    subscribers: usize,
    publications: usize,
) -> (f64, f64) {
    let channel = format!("bench-{}", channel.replace(' ', "-"));
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let mut ws = RawWs::connect_with(node.addr, "/ws", &[OFFER]).await;
        let subscribe = json!({"id": 1, "op": "subscribe", "channel": channel});
        ws.send_frame(true, 0, OP_TEXT, subscribe.to_string().as_bytes())
            .await;
        ws.read_frame().await.expect("subscribe reply");
        readers.push(tokio::spawn(async move {
            let mut bytes = 0usize;
            for _ in 0..publications {
                let frame = ws.read_frame().await.expect("publication");
                let len = frame.payload.len();
                bytes += len
                    + if len < 126 {
                        2
                    } else if len < 65536 {
                        4
                    } else {
                        10
                    };
            }
            bytes
        }));
    }
    let cpu_before = cpu_time(node.pid());
    for i in 0..publications {
        publish(node, &channel, make(i)).await;
    }
    let mut wire = 0;
    for reader in readers {
        wire += reader.await.unwrap();
    }
    let cpu = cpu_time(node.pid()) - cpu_before;
    let deliveries = (subscribers * publications) as f64;
    (
        wire as f64 / deliveries,
        cpu.as_secs_f64() * 1e6 / deliveries,
    )
}

/// Time to compress one publication's wire form as the gateway does (level 6, 32 KiB window,
/// a reused compressor reset per message), averaged over many.
fn compress_cost(make: fn(usize) -> Value) -> f64 {
    use flate2::{Compress, Compression, FlushCompress};
    let messages: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            json!({"channel": "bench", "offset": i, "epoch": "6f1c2a9b3e4d5f60", "tag": "0badf00d", "data": make(i)})
                .to_string()
                .into_bytes()
        })
        .collect();
    let mut compress = Compress::new_with_window_bits(Compression::new(6), false, 15);
    let mut out = Vec::with_capacity(64 * 1024);
    let start = std::time::Instant::now();
    for message in &messages {
        compress.reset();
        out.clear();
        compress
            .compress_vec(message, &mut out, FlushCompress::Sync)
            .unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / messages.len() as f64
}

/// Lets the allocator and the node's tasks come to rest before reading RSS.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// User + system CPU time of a process, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}
