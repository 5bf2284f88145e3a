//! `ticker`: the stock-ticker workload of issue #16. `--symbols` quotes of realistic shape (bid,
//! ask, last, volume, time and static fields; most unchanged from tick to tick) published at
//! `--ticks` per second per symbol (one batch `POST /api/publish` per tick), `--clients`
//! WebSocket subscribers on `--per-client` symbols each. One fresh gateway node per mode — full
//! JSON, deltas (`"delta": true`), permessage-deflate, both — reports bytes on the wire per
//! delivery (WebSocket frame headers included, counted by a client that only parses frames) and
//! the node's CPU time per delivery. A last run on a conflating namespace (`slow_consumer =
//! "conflate"`) follow a deliberately slow subscriber on every symbol: how many ticks behind the
//! newest price each quote it reads is, whether every skip is reported, and that it ends on the
//! newest prices — with the kernel's own send buffer, with `server.send_buffer_bytes`, with the
//! node's defaults (a low-water mark, as a namespace conflates) and with
//! `server.send_low_water_bytes` 1024.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::cpu_seconds;
use testkit::{encode_frame, GatewayProcess};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value_t = 50)]
    pub symbols: usize,
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Symbols each client subscribes to.
    #[arg(long, default_value_t = 5)]
    pub per_client: usize,
    /// Ticks per second per symbol.
    #[arg(long, default_value_t = 20.0)]
    pub ticks: f64,
    /// Seconds of publishing per mode.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Quotes per second the slow subscriber of the conflation runs reads (on every symbol:
    /// the feed is `--symbols` × `--ticks`).
    #[arg(long, default_value_t = 500.0)]
    pub slow_reads: f64,
    /// Skip the four delivery modes: only the conflation runs.
    #[arg(long)]
    pub conflation_only: bool,
}

/// How the subscribers of one run ask for their publications.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    delta: bool,
    deflate: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "full JSON",
        delta: false,
        deflate: false,
    },
    Mode {
        name: "deltas",
        delta: true,
        deflate: false,
    },
    Mode {
        name: "permessage-deflate",
        delta: false,
        deflate: true,
    },
    Mode {
        name: "deltas + deflate",
        delta: true,
        deflate: true,
    },
];

pub async fn run(bin: &Path, a: &Args) -> Result<Vec<Value>, String> {
    if a.symbols == 0 || a.per_client == 0 || a.per_client > a.symbols || a.ticks <= 0.0 {
        return Err("ticker needs 1 <= --per-client <= --symbols and a positive --ticks".into());
    }
    let mut results = Vec::new();
    let modes = if a.conflation_only {
        &MODES[..0]
    } else {
        &MODES[..]
    };
    for &mode in modes {
        let v = run_mode(bin, a, mode).await?;
        eprintln!(
            "ticker {}: {} deliveries, {} bytes/delivery, {} us CPU/delivery",
            mode.name, v["deliveries"], v["bytes_per_delivery"], v["cpu_us_per_delivery"]
        );
        results.push(v);
    }
    for socket in [
        SocketSetting::Kernel,
        SocketSetting::SendBuffer(4096),
        SocketSetting::LowWater(None),
        SocketSetting::LowWater(Some(1024)),
    ] {
        let v = run_conflation(bin, a, socket).await?;
        eprintln!(
            "ticker {}: ticks behind p50 {} max {}, {} skipped",
            v["mode"], v["ticks_behind_p50"], v["ticks_behind_max"], v["skipped"]
        );
        results.push(v);
    }
    Ok(results)
}

/// One symbol's quote, moved one tick: the time always, the rest now and then.
struct Quote {
    symbol: String,
    bid: f64,
    ask: f64,
    last: f64,
    volume: u64,
    open: f64,
    high: f64,
    low: f64,
}

impl Quote {
    fn new(i: usize) -> Quote {
        let price = 20.0 + (i as f64 * 7.3) % 400.0;
        Quote {
            symbol: format!("S{i:03}"),
            bid: price - 0.01,
            ask: price + 0.01,
            last: price,
            volume: 100_000 + i as u64 * 1000,
            open: price,
            high: price,
            low: price,
        }
    }

    fn tick(&mut self) -> Value {
        let cents = |x: f64| (x * 100.0).round() / 100.0;
        if rand::random::<f64>() < 0.3 {
            self.bid = cents(self.bid + (rand::random::<f64>() - 0.5) * 0.1);
        }
        if rand::random::<f64>() < 0.3 {
            self.ask = cents((self.bid + 0.01).max(self.ask + (rand::random::<f64>() - 0.5) * 0.1));
        }
        if rand::random::<f64>() < 0.2 {
            self.last = cents((self.bid + self.ask) / 2.0);
            self.volume += 100 * (1 + rand::random::<u64>() % 20);
            self.high = self.high.max(self.last);
            self.low = self.low.min(self.last);
        }
        json!({
            "symbol": self.symbol, "name": format!("{} Holdings Inc.", self.symbol),
            "exchange": "XNAS", "currency": "USD",
            "bid": self.bid, "ask": self.ask, "last": self.last, "volume": self.volume,
            "open": self.open, "high": self.high, "low": self.low,
            "time": crate::publisher::now_micros() / 1000,
        })
    }
}

fn channel(symbol: usize) -> String {
    format!("ticks:S{symbol:03}")
}

/// A running publisher of ticks (see [`publish_ticks`]).
struct Ticks {
    stop: Arc<AtomicBool>,
    newest: Arc<Vec<AtomicU64>>,
    publisher: tokio::task::JoinHandle<Result<u64, String>>,
}

/// Starts publishing ticks through the node at `addr`.
fn start_ticks(addr: SocketAddr, a: &Args) -> Ticks {
    let stop = Arc::new(AtomicBool::new(false));
    let newest = Arc::new(
        (0..a.symbols)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>(),
    );
    let publisher = tokio::spawn(publish_ticks(
        format!("http://{addr}"),
        a.clone(),
        stop.clone(),
        newest.clone(),
    ));
    Ticks {
        stop,
        newest,
        publisher,
    }
}

/// Publishes one batch per tick, every symbol once, until `stop`; the newest offset of each
/// symbol lands in `newest`. Returns the publications acknowledged.
async fn publish_ticks(
    origin: String,
    a: Args,
    stop: Arc<AtomicBool>,
    newest: Arc<Vec<AtomicU64>>,
) -> Result<u64, String> {
    let http = reqwest::Client::new();
    let mut quotes: Vec<Quote> = (0..a.symbols).map(Quote::new).collect();
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / a.ticks));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut published = 0;
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let items: Vec<Value> = quotes
            .iter_mut()
            .enumerate()
            .map(|(i, q)| json!({"channel": channel(i), "data": q.tick()}))
            .collect();
        let answer: Value = http
            .post(format!("{origin}/api/publish"))
            .json(&json!({ "publications": items }))
            .send()
            .await
            .map_err(|e| format!("publish: {e}"))?
            .json()
            .await
            .map_err(|e| format!("publish answer: {e}"))?;
        let results = answer["results"]
            .as_array()
            .ok_or_else(|| format!("publish answered {answer}"))?;
        for (i, r) in results.iter().enumerate() {
            let offset = r["offset"]
                .as_u64()
                .ok_or_else(|| format!("publish failed: {r}"))?;
            newest[i].store(offset, Ordering::Relaxed);
            published += 1;
        }
    }
    Ok(published)
}

/// A WebSocket client that only parses frame headers: it counts the bytes and frames it
/// receives, and how many of them are deltas (when not compressed).
struct Counting {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Counting {
    async fn connect(
        addr: SocketAddr,
        deflate: bool,
        stream: Option<TcpStream>,
    ) -> Result<Counting, String> {
        let mut stream = match stream {
            Some(s) => s,
            None => TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        };
        let extension = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut c = Counting {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        };
        let end = loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !c.read_more().await {
                return Err("connection closed during the handshake".into());
            }
        };
        let head = String::from_utf8_lossy(&c.buf[..end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("handshake refused: {head}"));
        }
        if deflate && !head.to_ascii_lowercase().contains("permessage-deflate") {
            return Err("the node did not negotiate permessage-deflate".into());
        }
        c.buf.drain(..end);
        Ok(c)
    }

    async fn read_more(&mut self) -> bool {
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        match self.stream.read(&mut self.buf[len..]).await {
            Ok(0) | Err(_) => {
                self.buf.truncate(len);
                false
            }
            Ok(n) => {
                self.buf.truncate(len + n);
                true
            }
        }
    }

    async fn send(&mut self, command: &Value) -> Result<(), String> {
        let frame = encode_frame(true, 0, 1, command.to_string().as_bytes());
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// The next frame: its size on the wire, its opcode and payload. None when the connection ended.
    async fn frame(&mut self) -> Option<(usize, u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (opcode, short) = (self.buf[0] & 0x0f, (self.buf[1] & 0x7f) as usize);
                let (header, len) = match short {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if header != usize::MAX && self.buf.len() >= header + len {
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Some((header + len, opcode, payload));
                }
            }
            if !self.read_more().await {
                return None;
            }
        }
    }
}

/// What the subscribers of one run received.
#[derive(Default)]
struct Received {
    frames: AtomicU64,
    bytes: AtomicU64,
    deltas: AtomicU64,
}

async fn run_mode(bin: &Path, a: &Args, mode: Mode) -> Result<Value, String> {
    let node = GatewayProcess::try_start(bin, "ticker", &[], &[]).await?;
    let addr = node.addr;
    let received = Arc::new(Received::default());
    let mut per_symbol = vec![0u64; a.symbols];
    let mut readers = Vec::with_capacity(a.clients);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(a.clients);
    for i in 0..a.clients {
        let symbols: Vec<usize> = (0..a.per_client)
            .map(|k| (i * a.per_client + k) % a.symbols)
            .collect();
        for &s in &symbols {
            per_symbol[s] += 1;
        }
        let (received, ready) = (received.clone(), ready_tx.clone());
        readers.push(tokio::spawn(async move {
            let mut c = match Counting::connect(addr, mode.deflate, None).await {
                Ok(c) => c,
                Err(e) => return drop(ready.send(Err(e)).await),
            };
            for &s in &symbols {
                let mut op = json!({"op": "subscribe", "channel": channel(s), "id": s});
                if mode.delta {
                    op["delta"] = true.into();
                }
                if let Err(e) = c.send(&op).await {
                    return drop(ready.send(Err(e)).await);
                }
            }
            // The replies come before any publication of their channel.
            let mut replies = 0;
            while replies < symbols.len() {
                match c.frame().await {
                    Some((_, 1, _)) => replies += 1,
                    Some(_) => {}
                    None => return drop(ready.send(Err("closed while subscribing".into())).await),
                }
            }
            let _ = ready.send(Ok(())).await;
            while let Some((size, opcode, payload)) = c.frame().await {
                if opcode == 1 || opcode == 2 {
                    received.frames.fetch_add(1, Ordering::Relaxed);
                    received.bytes.fetch_add(size as u64, Ordering::Relaxed);
                    if !mode.deflate && payload.windows(8).any(|w| w == b"\"delta\":") {
                        received.deltas.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..a.clients {
        ready_rx.recv().await.ok_or("a subscriber task ended")??;
    }
    // Only publications count from here on: the replies were read before `ready`.
    received.frames.store(0, Ordering::Relaxed);
    received.bytes.store(0, Ordering::Relaxed);
    received.deltas.store(0, Ordering::Relaxed);

    let cpu_before = cpu_seconds(node.pid()).unwrap_or(0.0);
    let started = Instant::now();
    let Ticks {
        stop,
        newest,
        publisher,
    } = start_ticks(addr, a);
    tokio::time::sleep(crate::secs(a.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let published = publisher.await.map_err(|e| e.to_string())??;
    let expected: u64 = (0..a.symbols)
        .map(|s| newest[s].load(Ordering::Relaxed) * per_symbol[s])
        .sum();
    // Every delivery has to arrive; a deadline only bounds a broken run.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.frames.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(node.pid()).unwrap_or(0.0) - cpu_before;
    for r in readers {
        r.abort();
    }
    let frames = received.frames.load(Ordering::Relaxed);
    let bytes = received.bytes.load(Ordering::Relaxed);
    let per = |x: f64| (frames > 0).then(|| (x / frames as f64 * 100.0).round() / 100.0);
    Ok(json!({
        "scenario": "ticker",
        "system": "gateway",
        "mode": mode.name,
        "symbols": a.symbols,
        "clients": a.clients,
        "per_client": a.per_client,
        "ticks_per_s": a.ticks,
        "publications": published,
        "deliveries": frames,
        "expected_deliveries": expected,
        "deliveries_per_s": (frames as f64 / elapsed).round(),
        "bytes_per_delivery": per(bytes as f64),
        "delta_share": (!mode.deflate).then(|| per(received.deltas.load(Ordering::Relaxed) as f64 * 100.0)),
        "server_cpu_s": (cpu * 100.0).round() / 100.0,
        "cpu_us_per_delivery": per(cpu * 1e6),
        "ok": frames == expected,
    }))
}

/// How the node's sockets of a conflation run hold what the slow subscriber has not read.
#[derive(Clone, Copy)]
enum SocketSetting {
    /// No bound (`server.send_low_water_bytes = 0`): the kernel's own send buffer, which grows
    /// to several MiB.
    Kernel,
    /// `server.send_buffer_bytes`, without a low-water mark.
    SendBuffer(usize),
    /// `server.send_low_water_bytes`; `None`: the node's default with a conflating namespace.
    LowWater(Option<u32>),
}

impl SocketSetting {
    fn env(self) -> Vec<(&'static str, String)> {
        const LOW_WATER: &str = "GATEWAY__SERVER__SEND_LOW_WATER_BYTES";
        match self {
            SocketSetting::Kernel => vec![(LOW_WATER, "0".into())],
            SocketSetting::SendBuffer(n) => vec![
                (LOW_WATER, "0".into()),
                ("GATEWAY__SERVER__SEND_BUFFER_BYTES", n.to_string()),
            ],
            SocketSetting::LowWater(Some(n)) => vec![(LOW_WATER, n.to_string())],
            SocketSetting::LowWater(None) => vec![],
        }
    }

    fn mode(self) -> String {
        match self {
            SocketSetting::Kernel => "conflation, kernel send buffer".into(),
            SocketSetting::SendBuffer(n) => format!("conflation, send_buffer_bytes {n}"),
            SocketSetting::LowWater(Some(n)) => format!("conflation, send_low_water_bytes {n}"),
            SocketSetting::LowWater(None) => "conflation, defaults".into(),
        }
    }
}

/// The slow subscriber under conflation: one client on every symbol, reading `--slow-reads`
/// quotes per second (the feed is `--symbols` × `--ticks`) through a small receive buffer, on a
/// node whose `ticks` namespace conflates; with the kernel's own send buffer, then with the
/// node's side of the socket bounded, so the backlog stays where conflation can reach it.
async fn run_conflation(bin: &Path, a: &Args, setting: SocketSetting) -> Result<Value, String> {
    let mut env = vec![
        (
            "GATEWAY__CHANNELS__NAMESPACES__TICKS__SLOW_CONSUMER",
            "conflate".to_string(),
        ),
        ("GATEWAY__CLIENT__QUEUE_MAX_BYTES", "65536".to_string()),
    ];
    env.extend(setting.env());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = GatewayProcess::try_start(bin, "ticker-conflate", &[], &env).await?;
    let addr = node.addr;
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .set_recv_buffer_size(2048)
        .map_err(|e| e.to_string())?;
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let mut slow = Counting::connect(addr, false, Some(stream)).await?;
    for s in 0..a.symbols {
        slow.send(&json!({"op": "subscribe", "channel": channel(s), "id": s}))
            .await?;
    }
    for _ in 0..a.symbols {
        slow.frame().await.ok_or("closed while subscribing")?;
    }

    let Ticks {
        stop,
        newest,
        publisher,
    } = start_ticks(addr, a);
    let mut behind = Vec::new();
    let mut last = vec![0u64; a.symbols];
    let (mut skipped_total, mut honest) = (0u64, true);
    let mut read = |payload: &[u8], last: &mut [u64]| -> Result<(usize, u64), String> {
        let p: Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let offset = p["offset"]
            .as_u64()
            .ok_or_else(|| format!("not a publication: {p}"))?;
        let symbol = p["channel"]
            .as_str()
            .and_then(|c| c.strip_prefix("ticks:S"))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("not a ticker channel: {p}"))?;
        let skipped = p["skipped"].as_u64().unwrap_or(0);
        honest &= last[symbol] == 0 || offset == last[symbol] + 1 + skipped;
        skipped_total += skipped;
        last[symbol] = offset;
        Ok((symbol, offset))
    };
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / a.slow_reads));
    let until = Instant::now() + crate::secs(a.duration);
    while Instant::now() < until {
        pace.tick().await;
        let (_, _, payload) = slow
            .frame()
            .await
            .ok_or("the slow subscriber was cut off")?;
        let (symbol, offset) = read(&payload, &mut last)?;
        behind.push(
            newest[symbol]
                .load(Ordering::Relaxed)
                .saturating_sub(offset),
        );
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await.map_err(|e| e.to_string())??;
    // Then it catches up, ending on the newest price of every symbol.
    let final_newest: Vec<u64> = newest.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let catch_up = Instant::now();
    while last != final_newest {
        let (_, _, payload) = tokio::time::timeout(Duration::from_secs(60), slow.frame())
            .await
            .map_err(|_| "the slow subscriber never reached the newest prices")?
            .ok_or("the slow subscriber was cut off")?;
        read(&payload, &mut last)?;
    }
    behind.sort_unstable();
    let quantile = |q: f64| {
        behind
            .get(((behind.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let mode = setting.mode();
    let bounded = !matches!(setting, SocketSetting::Kernel);
    Ok(json!({
        "scenario": "ticker",
        "system": "gateway",
        "mode": mode,
        "symbols": a.symbols,
        "ticks_per_s": a.ticks,
        "slow_reads_per_s": a.slow_reads,
        "quotes_read": behind.len(),
        "ticks_behind_p50": quantile(0.5),
        "ticks_behind_p99": quantile(0.99),
        "ticks_behind_max": quantile(1.0),
        "skipped": skipped_total,
        "skips_reported_exactly": honest,
        "ends_on_newest": true,
        "catch_up_ms": catch_up.elapsed().as_millis() as u64,
        // With the kernel's buffer the backlog may never reach the queue: nothing to skip then.
        "ok": honest && (!bounded || skipped_total > 0),
    }))
}
