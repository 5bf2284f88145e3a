//! `healthcheck [PATH] [ADDR]`: the container image's HEALTHCHECK probe.
//!
//! The runtime image is distroless (no shell, no curl, no wget), so Docker's HEALTHCHECK needs a
//! program of its own. This one is std-only, built with plain `rustc` in the Dockerfile's builder
//! stage (no Cargo, no crates, not a workspace member): it sends `GET PATH` (default `/healthz`)
//! to ADDR (default `127.0.0.1:8080`) and exits 0 only on an HTTP 200 status line, 1 otherwise,
//! within a few seconds. Compose uses it with `/readyz` to gate nginx on ready nodes;
//! Kubernetes ignores HEALTHCHECK and uses its own httpGet probes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/healthz".to_owned());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    match probe(&addr, &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("healthcheck: GET {path} on {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(addr: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("the path must start with / and contain no spaces or controls".to_owned());
    }
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address (want IP:PORT): {e}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: gateway-healthcheck\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    // Only the status line matters: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim_end();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        _ => Err(format!("unhealthy answer {line:?}")),
    }
}
