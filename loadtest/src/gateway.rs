//! Starting a gateway process for a run, URL helpers and process memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A gateway started by `--spawn`; killed when dropped.
pub struct Spawned {
    child: Child,
    pub port: u16,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn base_ws(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
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

/// Starts the gateway on a free loopback port and waits until `/readyz` answers 200.
pub async fn spawn(bin: &Path, ws_echo: bool) -> Result<Spawned, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if ws_echo {
        cmd.arg("--ws-echo");
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut spawned = Spawned { child, port };
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = spawned.child.try_wait() {
            return Err(format!("gateway exited early: {status}"));
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

/// `ws://host:port/anything` -> `ws://host:port` (scheme and authority only).
pub fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("ws", url));
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}")
}

/// The HTTP origin matching a WebSocket URL (ws -> http, wss -> https).
pub fn http_origin(url: &str) -> String {
    let o = origin(url);
    if let Some(rest) = o.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = o.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        o
    }
}

/// Resident memory of a process in bytes, from /proc/PID/status.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim = wanted;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    let soft = lim.rlim_cur as u64;
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(origin("ws://127.0.0.1:8080/ws/echo"), "ws://127.0.0.1:8080");
        assert_eq!(origin("ws://127.0.0.1:8080"), "ws://127.0.0.1:8080");
        assert_eq!(http_origin("ws://h:1/ws"), "http://h:1");
        assert_eq!(http_origin("http://h:1/x"), "http://h:1");
    }
}
