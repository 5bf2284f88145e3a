//! Runs every scenario at tiny scale against a spawned gateway; asserts success and no loss.
//! No timing assertions.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The gateway binary: $GATEWAY_BIN, else the one next to this crate's binary, built with
/// `cargo build -p gateway --bin gateway` first (`cargo test -p loadtest` does not build it).
fn gateway_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("GATEWAY_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "GATEWAY_BIN={} does not exist", p.display());
            return p;
        }
        let dir = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
            .parent()
            .expect("binary directory")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "gateway", "--bin", "gateway"]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cannot run cargo to build the gateway");
        assert!(status.success(), "cargo build -p gateway failed");
        let p = dir.join("gateway");
        assert!(
            p.is_file(),
            "gateway binary missing at {} (set GATEWAY_BIN)",
            p.display()
        );
        p
    })
    .clone()
}

fn run(name: &str, args: &[&str]) -> Value {
    let json =
        std::env::temp_dir().join(format!("loadtest-smoke-{name}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("--spawn")
        .arg("--gateway-bin")
        .arg(gateway_bin())
        .arg("--json")
        .arg(&json)
        .args(args)
        .output()
        .expect("run loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json).expect("json result written");
    let _ = std::fs::remove_file(&json);
    let v: Value = serde_json::from_str(&text).expect("valid json");
    assert_eq!(v["ok"], true, "{v:#}");
    v
}

#[test]
fn fanout_tiny() {
    let v = run(
        "fanout",
        &[
            "fanout",
            "--clients",
            "20",
            "--channels",
            "2",
            "--rate",
            "200",
            "--duration",
            "2",
        ],
    );
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicated"], 0);
    assert_eq!(v["out_of_order"], 0);
    assert_eq!(v["publications"], 400);
    // Every client sees every publication of its channel.
    assert_eq!(v["deliveries"], 400 * 10);
}

#[test]
fn echo_tiny() {
    let v = run(
        "echo",
        &[
            "echo",
            "--clients",
            "4",
            "--messages",
            "200",
            "--size",
            "128",
            "--window",
            "4",
        ],
    );
    assert_eq!(v["echoed"], 800);
    assert_eq!(v["mismatched"], 0);
}

#[test]
fn connections_tiny() {
    for transport in ["ws", "sse"] {
        let v = run(
            transport,
            &[
                "connections",
                "--count",
                "50",
                "--hold",
                "0.5",
                "--transport",
                transport,
            ],
        );
        assert_eq!(v["opened"], 50);
        assert!(v["rss_after_bytes"].is_u64(), "{v:#}");
    }
}
