//! Gateway processes: the binary (found once per process), spawning it on port 0 and reading
//! the port from its own `listening on` log line (nothing is pre-picked, so nothing can race),
//! waiting for `/readyz`, signals, exit, logs. Every process dies with its handle, also when a
//! test panics (its log tail is printed then).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;

use crate::http::readyz;
use crate::process::{die_with_parent, kill_and_reap, rss_bytes_of, signal};
use crate::redis::Backend;
use crate::text::listening_addr;
use crate::wait::{poll_until, within, WAIT};

static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Names the gateway binary for this process, e.g. `env!("CARGO_BIN_EXE_gateway")` in the
/// gateway's own tests. Must come before the first spawn; a second, different path panics.
pub fn use_binary(path: impl Into<PathBuf>) {
    let path = path.into();
    let set = BINARY.get_or_init(|| path.clone());
    assert_eq!(*set, path, "gateway binary already chosen");
}

/// The gateway binary, found once: [`use_binary`], else `$CARGO_BIN_EXE_gateway` (cargo sets it
/// when it runs the gateway's own integration tests, after building the binary), else
/// `$GATEWAY_BIN`, else `gateway` in the target directory this test binary runs from — built
/// first with `cargo build -p gateway` when run under cargo, since `cargo test -p OTHER` does
/// not build it.
pub fn binary() -> &'static Path {
    BINARY.get_or_init(|| {
        if let Some(p) = std::env::var_os("CARGO_BIN_EXE_gateway") {
            return PathBuf::from(p);
        }
        if let Ok(p) = std::env::var("GATEWAY_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "GATEWAY_BIN={} does not exist", p.display());
            return p;
        }
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> or target/<profile>/<bin>
        let mut dir = exe.parent().expect("exe directory").to_path_buf();
        if dir.file_name().and_then(|n| n.to_str()) == Some("deps") {
            dir.pop();
        }
        if let Ok(cargo) = std::env::var("CARGO") {
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "gateway", "--bin", "gateway"]);
            if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("cannot run cargo to build the gateway");
            assert!(status.success(), "cargo build -p gateway failed");
        }
        let p = dir.join("gateway");
        assert!(
            p.is_file(),
            "gateway binary missing at {} (set GATEWAY_BIN)",
            p.display()
        );
        p
    })
}

/// The command line every spawn uses: plain logs, no inherited RUST_LOG, piped output.
fn command(bin: &Path, args: &[String], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    die_with_parent(&mut cmd);
    cmd
}

/// A spawned `gateway` binary; its stdout and stderr are collected line by line.
pub struct GatewayProcess {
    pub name: String,
    /// Known once [`GatewayProcess::listening`] has read the `listening on` line.
    pub addr: SocketAddr,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::UnboundedReceiver<String>,
    listening_line: Option<String>,
}

impl GatewayProcess {
    /// Starts `gateway --listen 127.0.0.1:0 <args>` with `env` added, waits for its
    /// `listening on` line and for `/readyz` to answer 200.
    pub async fn start(name: &str, args: &[String], env: &[(&str, &str)]) -> GatewayProcess {
        match Self::try_start(binary(), name, args, env).await {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`GatewayProcess::start`] with a given binary, reporting failure instead of panicking
    /// (for `loadtest`, which starts gateways at run time).
    pub async fn try_start(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<GatewayProcess, String> {
        let mut all = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        all.extend_from_slice(args);
        let mut process = Self::try_spawn(bin, name, &all, env)?;
        process.try_listening().await?;
        process.wait_ready().await;
        Ok(process)
    }

    /// Spawns the binary with exactly `args` and returns at once (not yet listening: see
    /// [`GatewayProcess::listening`]).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::try_spawn(binary(), "gateway", &args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<GatewayProcess, String> {
        let mut child = command(bin, args, env)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // Threads, not tasks: they keep draining the pipes whatever the runtime is doing, so
        // the child never blocks on a full pipe.
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Ok(GatewayProcess {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Some(child),
            logs,
            lines,
            listening_line: None,
        })
    }

    /// Waits for the `listening on <addr>` log line and returns the address.
    pub async fn listening(&mut self) -> SocketAddr {
        match self.try_listening().await {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    async fn try_listening(&mut self) -> Result<SocketAddr, String> {
        let name = self.name.clone();
        let logs = self.logs.clone();
        let lines = &mut self.lines;
        let found = within(&format!("{name}: `listening on` log line"), async {
            while let Some(line) = lines.recv().await {
                if let Some(addr) = listening_addr(&line) {
                    return Some((addr, line));
                }
            }
            None
        })
        .await;
        let (addr, line) = found.ok_or_else(|| {
            format!(
                "{name} exited before logging `listening on`; output:\n{}",
                logs.lock().unwrap().join("\n")
            )
        })?;
        self.addr = addr;
        self.listening_line = Some(line);
        Ok(addr)
    }

    /// The `listening on` line itself (after [`GatewayProcess::listening`]).
    pub fn listening_line(&self) -> &str {
        self.listening_line.as_deref().expect("not listening yet")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.running().id()
    }

    /// Every line the process wrote so far (stdout and stderr, interleaved as read).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("gateway not running");
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
    }

    pub fn sigterm(&self) {
        signal(self.running(), libc::SIGTERM);
    }

    fn running(&self) -> &Child {
        self.child.as_ref().expect("gateway not running")
    }

    /// Sends "TERM" or "INT" to this child only.
    pub async fn signal(&self, sig: &str) {
        let signo = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            other => panic!("unsupported signal {other}"),
        };
        signal(self.running(), signo);
    }

    /// Sends any signal; a SIGKILLed process is reaped at once.
    pub fn raw_signal(&mut self, signo: libc::c_int) {
        if signo == libc::SIGKILL {
            return self.kill9();
        }
        signal(self.running(), signo);
    }

    /// Waits for the process to exit (bounded by [`WAIT`]) and reaps it.
    pub async fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("gateway not running");
        let waited = tokio::task::spawn_blocking(move || child.wait());
        within(&format!("{}: process exit", self.name), waited)
            .await
            .expect("wait task")
            .expect("wait for child")
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        let addr = self.addr;
        poll_until(
            &format!("{}: /readyz 200", self.name),
            WAIT,
            || async move { (readyz(addr).await.0 == 200).then_some(()) },
        )
        .await
    }

    /// Resident set size from /proc/<pid>/status, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes_of(self.pid()).expect("VmRSS of a running gateway")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            eprintln!(
                "---- gateway {} ({}) log tail ----\n{}",
                self.name,
                self.addr,
                logs[logs.len().saturating_sub(40)..].join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// Starts `n` gateway nodes named `node0`, `node1`... on `backend`.
pub async fn start_nodes(backend: &Backend, n: usize, env: &[(&str, &str)]) -> Vec<GatewayProcess> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(GatewayProcess::start(&format!("node{i}"), &backend.args, env).await);
    }
    nodes
}

/// Runs the binary to completion (config errors, `--help`): status, stdout and stderr.
pub async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let child = command(binary(), &args, env)
        .spawn()
        .expect("spawn gateway");
    let out = within(
        "gateway to exit",
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("wait task")
    .expect("gateway output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
