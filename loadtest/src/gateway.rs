//! Gateway processes started for a run: finding the binary, starting it, signalling it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A gateway process started for a run; killed when dropped.
pub struct Spawned {
    child: Child,
    pub port: u16,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn http_origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (SIGKILL: a crash; SIGTERM: a drain); a killed process is reaped.
    pub fn signal(&mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if signal == libc::SIGKILL {
            let _ = self.child.wait();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway binary: the given path, else target/release/gateway, else target/debug/gateway
/// (relative to the current directory, then to the workspace this tool was built in).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("gateway binary {} not found", p.display()))
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for root in [Path::new("."), workspace.as_path()] {
        for profile in ["release", "debug"] {
            let p = root.join("target").join(profile).join("gateway");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(
        "no gateway binary in target/release or target/debug; build it \
         (cargo build --release -p gateway) or pass --gateway-bin"
            .to_string(),
    )
}

/// A free loopback TCP port.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Starts the gateway on a free loopback port with `args` (e.g. `--redis-url …`) and waits until
/// `/readyz` answers 200. Its log goes to a file in the temp directory, named in errors.
pub async fn spawn(bin: &Path, args: &[String]) -> Result<Spawned, String> {
    let port = free_port()?;
    let log_path = std::env::temp_dir().join(format!("loadtest-gateway-{port}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("gateway log: {e}"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("gateway log: {e}"))?)
        .stderr(log);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut spawned = Spawned { child, port };
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = spawned.child.try_wait() {
            return Err(format!(
                "gateway exited early: {status} (log: {})",
                log_path.display()
            ));
        }
        if let Ok(r) = client
            .get(&url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(spawned);
            }
        }
        if Instant::now() > deadline {
            return Err("gateway not ready within 15 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
