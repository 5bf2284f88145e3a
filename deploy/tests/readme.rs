//! The README's "Run a cluster" section, run exactly as it is written (the command is read from
//! README.md, so the test follows the text): the cluster comes up, a publication made through one
//! node reaches a subscriber on another, a stopped node's subscriber resumes on the next node
//! with its last position and loses nothing, and Ctrl-C stops everything (ports free again).
//! (The README's Kubernetes commands are rendered as written by deploy/checks/helm_cases.py.)
//!
//! Needs `redis-server`, `redis-cli` and `curl`; builds the gateway in release mode as the
//! script does, and uses the script's default ports (6390, 8081–8083).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use testkit::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The first command of the README section `title`'s first `sh` block, without its comment.
fn readme_command(title: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split(&format!("\n## {title}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has no section {title:?}"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("section {title:?} has no sh block"));
    let line = block.lines().next().expect("a command");
    line.split('#').next().unwrap().trim().to_string()
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_local_cluster_runs_as_written() {
    let command = readme_command("Run a cluster");
    assert_eq!(
        command, "deploy/local-cluster.sh",
        "the section's command changed: check this test"
    );
    let ports: Vec<SocketAddr> = [
        "127.0.0.1:6390",
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "127.0.0.1:8083",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for addr in &ports {
        assert!(
            !listening(*addr),
            "{addr} is taken: the README's ports must be free for this test"
        );
    }

    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("exec {command}"))
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Ctrl-C reaches the script itself; if the test dies first, the script still gets SIGTERM.
    signal_with_parent(&mut cmd, libc::SIGTERM);
    let mut script = cmd.spawn().expect("run the README's command");
    let stdout = script.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("local-cluster.sh: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The script builds a release binary first: minutes on a busy machine.
    let mut nodes: Vec<(SocketAddr, i32)> = Vec::new();
    within_for("the cluster to come up", Duration::from_secs(1800), async {
        while let Some(line) = lines.recv().await {
            if let Some(rest) = line.strip_prefix("node ") {
                let addr = rest
                    .split("http://")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap();
                let pid = rest.rsplit("pid ").next().unwrap().trim().parse().unwrap();
                nodes.push((addr.parse().unwrap(), pid));
            }
            if line.starts_with("logs in ") {
                return;
            }
        }
        panic!("local-cluster.sh ended before it was up");
    })
    .await;
    assert_eq!(nodes.len(), 3, "{nodes:?}");

    // Publish through one node, subscribe on another.
    let channel = channel("readme");
    let mut subscriber = WsClient::connect_addr(nodes[1].0, "/ws").await;
    subscriber.subscribe(&channel).await;
    for n in 1..=3 {
        publish(&nodes[0].0, &channel, json!(n)).await;
    }
    let mut last = json!(null);
    for n in 1..=3 {
        last = subscriber.push().await;
        assert_eq!(last["data"], json!(n), "{last}");
    }

    // Stop that node, publish on, and reconnect to the next one with the last position.
    // SAFETY: kill(2) on the pid the script printed for its own child.
    assert_eq!(unsafe { libc::kill(nodes[1].1, libc::SIGTERM) }, 0);
    let (code, _) = subscriber.until_close().await;
    assert_eq!(code, Some(1001), "a draining node closes with 1001");
    for n in 4..=5 {
        publish(&nodes[0].0, &channel, json!(n)).await;
    }
    let mut resumed = WsClient::connect_addr(nodes[2].0, "/ws").await;
    let result = resumed
        .subscribe_since(&channel, &last["epoch"], last["offset"].as_u64().unwrap())
        .await;
    assert_eq!(result["recovered"], json!(true), "{result}");
    for n in 4..=5 {
        let p = resumed.push().await;
        assert_eq!(p["data"], json!(n), "{p}");
    }

    // Ctrl-C stops all of it.
    // SAFETY: kill(2) on the script, our child.
    assert_eq!(unsafe { libc::kill(script.id() as i32, libc::SIGINT) }, 0);
    let status = within_for(
        "the script to stop",
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || script.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        status.code().is_some(),
        "the script died of a signal: {status:?}"
    );
    for addr in &ports {
        eventually(
            &format!("{addr} released"),
            || async move { !listening(*addr) },
        )
        .await;
    }
}
