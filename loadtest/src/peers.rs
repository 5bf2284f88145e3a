//! Peer servers (loadtest/peers: `ws`, uWebSockets, a Socket.IO cluster) started for a run:
//! free loopback ports, waiting for readiness, killing nodes, and reaping every process at the end.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long a peer may take to print its `listening on` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a peer's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// Which peer server to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// The `ws` library on Node's http server.
    Ws,
    /// uWebSockets (uWS.js native binary).
    Uws,
    /// Socket.IO 4 with the Redis streams adapter and connection-state recovery.
    SocketIo,
}

impl PeerKind {
    fn script(self) -> &'static str {
        match self {
            PeerKind::Ws => "ws-server.mjs",
            PeerKind::Uws => "uws-server.mjs",
            PeerKind::SocketIo => "socketio-server.mjs",
        }
    }
}

/// One running peer process.
pub struct PeerNode {
    pub port: u16,
    pub pid: u32,
    /// None once the process was killed with SIGKILL and reaped.
    child: Option<Child>,
}

/// The peer processes of a run; dropping it kills (SIGKILL) and reaps every one.
pub struct Peers {
    nodes: Vec<PeerNode>,
}

impl Peers {
    /// Starts `nodes` processes of `kind` on free loopback ports; for SocketIo `redis_port` must
    /// be Some. Waits for each one's `listening on` line (30 s at most); on failure the error
    /// carries the process's stderr tail.
    pub async fn start(
        kind: PeerKind,
        nodes: usize,
        redis_port: Option<u16>,
    ) -> Result<Peers, String> {
        let dir = Self::peers_dir();
        if !dir.join("node_modules").is_dir() {
            return Err(format!(
                "{}/node_modules is missing: run {}/install.sh first",
                dir.display(),
                dir.display()
            ));
        }
        let redis_port = match (kind, redis_port) {
            (PeerKind::SocketIo, None) => {
                return Err("the Socket.IO peer needs a redis port".to_string())
            }
            (PeerKind::SocketIo, Some(p)) => Some(p),
            _ => None,
        };
        let ports = free_ports(nodes)?;
        let mut peers = Peers {
            nodes: Vec::with_capacity(nodes),
        };
        // All nodes start at once; then each is awaited in turn.
        let mut pending = Vec::with_capacity(nodes);
        for port in ports {
            let mut cmd = Command::new("node");
            cmd.arg(dir.join(kind.script()))
                .arg("--port")
                .arg(port.to_string())
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(r) = redis_port {
                cmd.arg("--redis-port").arg(r.to_string());
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start node {}: {e}", kind.script()))?;
            let ready = watch_stdout(&mut child, port);
            let stderr = StderrTail::drain(child.stderr.take().expect("piped stderr"));
            peers.nodes.push(PeerNode {
                port,
                pid: child.id(),
                child: Some(child),
            });
            pending.push((ready, stderr));
        }
        for (index, (ready, stderr)) in pending.into_iter().enumerate() {
            let outcome = tokio::time::timeout(READY_TIMEOUT, ready).await;
            if !matches!(outcome, Ok(Ok(()))) {
                let why = match outcome {
                    Err(_) => format!("not listening within {} s", READY_TIMEOUT.as_secs()),
                    Ok(_) => "exited before listening".to_string(),
                };
                // Killing it closes its stderr, so the tail is complete.
                peers.kill(index, libc::SIGKILL);
                return Err(format!(
                    "peer {} on port {}: {why}; stderr:\n{}",
                    kind.script(),
                    peers.nodes[index].port,
                    stderr.finish()
                ));
            }
        }
        Ok(peers)
    }

    pub fn nodes(&self) -> &[PeerNode] {
        &self.nodes
    }

    /// Sends `sig` (SIGKILL or SIGTERM) to one node; after SIGKILL the process is also reaped.
    pub fn kill(&mut self, index: usize, sig: libc::c_int) {
        let node = &mut self.nodes[index];
        let Some(child) = node.child.as_mut() else {
            return;
        };
        if sig == libc::SIGKILL {
            let _ = child.kill();
            let _ = child.wait();
            node.child = None;
        } else {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet, so not reused.
            unsafe {
                libc::kill(node.pid as libc::pid_t, sig);
            }
        }
    }

    /// Runs `install.sh` (npm ci of the pinned versions; quick when already installed).
    pub fn install() -> Result<(), String> {
        let script = Self::peers_dir().join("install.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// loadtest/peers as found at compile time, or $LOADTEST_PEERS_DIR.
    pub fn peers_dir() -> PathBuf {
        match std::env::var_os("LOADTEST_PEERS_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("peers"),
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index, libc::SIGKILL);
        }
    }
}

/// `count` distinct free loopback ports (all held at once while choosing, so they differ).
fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("no free port: {e}"))
}

/// Reads the child's stdout on a thread, which resolves the receiver at `listening on PORT` and
/// then keeps draining so the child never blocks on a full pipe. The receiver fails if stdout
/// ends first.
fn watch_stdout(child: &mut Child, port: u16) -> oneshot::Receiver<()> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = oneshot::channel();
    let wanted = format!("listening on {port}");
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        // Bytes, not lines of UTF-8: a stray invalid byte must not stop the draining.
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if String::from_utf8_lossy(&line).trim() == wanted {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx
}

/// The last bytes of a child's stderr, drained on a thread until the child closes it.
struct StderrTail {
    tail: Arc<Mutex<VecDeque<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl StderrTail {
    fn drain(mut stderr: ChildStderr) -> StderrTail {
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let kept = tail.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                let mut kept = kept.lock().expect("stderr tail");
                kept.extend(&buf[..n]);
                let excess = kept.len().saturating_sub(STDERR_TAIL);
                kept.drain(..excess);
            }
        });
        StderrTail { tail, thread }
    }

    /// Waits for stderr to close and returns its tail as text.
    fn finish(self) -> String {
        let _ = self.thread.join();
        let tail = self.tail.lock().expect("stderr tail");
        String::from_utf8_lossy(&tail.iter().copied().collect::<Vec<_>>()).into_owned()
    }
}
