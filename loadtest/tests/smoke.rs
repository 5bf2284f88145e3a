//! Runs every scenario at tiny scale, against the gateway and the peers, so the tool cannot rot:
//! the gateway's runs must count 0 lost / duplicated / out of order; the peers' runs must have run.
//! No timing assertions.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("loadtest-smoke-{name}-{}", std::process::id()))
}

/// Runs `loadtest ARGS`; returns its exit success and stdout.
fn loadtest(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("--gateway-bin")
        .arg(testkit::gateway_process::binary())
        .args(args)
        .output()
        .expect("run loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!(
            "loadtest {args:?}: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), stdout)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

#[test]
fn suite_runs_every_scenario_on_every_system() {
    let dir = temp_dir("suite");
    let (_, _) = loadtest(&["suite", "--scale", "tiny", "--out", dir.to_str().unwrap()]);
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json written");
    let all: Value = serde_json::from_str(&text).expect("valid json");
    let results = all["results"].as_array().expect("results");
    let count = |scenario: &str, system: &str| {
        results
            .iter()
            .filter(|v| v["scenario"] == scenario && v["system"] == system)
            .count()
    };
    // The plan: gateway and peers side by side in every scenario they take part in.
    for (scenario, system, runs) in [
        ("fanout", "gateway", 6),
        ("fanout", "uws", 4),
        ("fanout", "ws", 2),
        ("fanout", "socketio", 1),
        ("echo", "gateway", 1),
        ("echo", "uws", 1),
        ("echo", "ws", 1),
        ("connections", "gateway", 3),
        ("connections", "uws", 1),
        ("connections", "ws", 1),
        ("connections", "socketio", 1),
        ("latency", "gateway", 1),
        ("latency", "socketio", 1),
        ("storm", "gateway", 2),
        ("storm", "socketio", 1),
    ] {
        assert_eq!(count(scenario, system), runs, "{scenario} on {system}");
    }
    for v in results {
        let (scenario, system) = (
            v["scenario"].as_str().unwrap(),
            v["system"].as_str().unwrap(),
        );
        if system == "gateway" {
            assert_eq!(v["ok"], true, "{scenario} on the gateway: {v:#}");
        }
        // Every run did its work (a peer's own losses are its business, not a broken tool).
        match scenario {
            "fanout" | "latency" | "storm" => {
                assert!(u(v, "publications") > 0 && u(v, "deliveries") > 0, "{v:#}");
                if system == "gateway" {
                    assert_eq!(
                        (u(v, "lost"), u(v, "duplicated"), u(v, "out_of_order")),
                        (0, 0, 0)
                    );
                    assert_eq!(
                        u(v, "deliveries"),
                        u(v, "publications") * u(v, "clients") / u(v, "channels"),
                        "{v:#}"
                    );
                }
            }
            "echo" => assert_eq!(
                u(v, "echoed"),
                u(v, "clients") * u(v, "messages_per_client"),
                "{v:#}"
            ),
            "connections" => assert_eq!(u(v, "opened"), u(v, "requested"), "{v:#}"),
            other => panic!("unexpected scenario {other}"),
        }
        if scenario == "storm" {
            assert_eq!(
                v["storm"]["reconnects"], v["clients"],
                "every client reconnected: {v:#}"
            );
        }
    }
    let md = std::fs::read_to_string(dir.join("results.md")).expect("results.md written");
    for table in [
        "**fanout**",
        "**echo**",
        "**connections**",
        "**latency**",
        "**storm**",
        "## Targets",
    ] {
        assert!(md.contains(table), "{table} missing from results.md");
    }
    for chart in [
        "fanout-latency.svg",
        "fanout-deliveries.svg",
        "latency-latency.svg",
        "storm-reconnects.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join("charts").join(chart)).expect(chart);
        assert!(svg.starts_with("<svg"), "{chart}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A single scenario from its own subcommand, with every output format.
#[test]
fn fanout_over_http2_sse_writes_json_markdown_and_charts() {
    let dir = temp_dir("fanout");
    std::fs::create_dir_all(&dir).unwrap();
    let (json, md, charts) = (dir.join("r.json"), dir.join("r.md"), dir.join("charts"));
    let (ok, stdout) = loadtest(&[
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
        "--charts",
        charts.to_str().unwrap(),
        "fanout",
        "--transport",
        "sse-h2",
        "--clients",
        "30",
        "--channels",
        "3",
        "--rate",
        "100",
        "--duration",
        "1",
    ]);
    assert!(ok, "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        (u(&v, "lost"), u(&v, "duplicated"), u(&v, "out_of_order")),
        (0, 0, 0)
    );
    assert_eq!(u(&v, "publications"), 100);
    assert_eq!(u(&v, "deliveries"), 100 * 10);
    assert!(
        stdout.contains("| gateway (sse-h2) | 30 | 3 | 100 |"),
        "{stdout}"
    );
    assert!(std::fs::read_to_string(&md).unwrap().contains("**fanout**"));
    assert!(charts.join("fanout-latency.svg").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failover_on_sentinel_loses_nothing() {
    let json = temp_dir("failover.json");
    let (ok, stdout) = loadtest(&[
        "--json",
        json.to_str().unwrap(),
        "failover",
        "--nodes",
        "2",
        "--channels",
        "2",
        "--clients",
        "4",
        "--rate",
        "20",
        "--duration",
        "8",
        "--kill-after",
        "3",
    ]);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("failover JSON written"))
            .expect("JSON");
    assert_eq!(u(&v, "lost"), 0, "silent loss: {v:#}\n{stdout}");
    assert_eq!(u(&v, "subscribers_ended"), 0, "{v:#}");
    assert_ne!(v["old_master"], v["new_master"], "no failover: {v:#}");
    assert!(u(&v, "acked") > 0, "{v:#}");
    assert!(ok, "{v:#}");
}

#[test]
fn publish_latency_measures_every_replica_ack_setting() {
    let json = temp_dir("publish-latency.json");
    let (ok, _) = loadtest(&[
        "--json",
        json.to_str().unwrap(),
        "publish-latency",
        "--publishes",
        "20",
        "--replicas",
        "1",
    ]);
    assert!(ok);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written")).expect("JSON");
    let runs = v.as_array().expect("one result per setting");
    assert_eq!(runs.len(), 2, "{v:#}");
    for (n, run) in runs.iter().enumerate() {
        assert_eq!(u(run, "min_replicas_acked"), n as u64);
        assert_eq!(u(&run["latency"], "count"), 20, "{run:#}");
    }
}

#[test]
fn publish_accounts_for_every_acknowledged_publish_on_every_path() {
    let json = temp_dir("publish.json");
    let (ok, _) = loadtest(&[
        "--json",
        json.to_str().unwrap(),
        "publish",
        "--channels",
        "1,3",
        "--publishers",
        "4",
        "--count",
        "256",
        "--pipeline",
        "4",
        "--batch",
        "8",
    ]);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written")).expect("JSON");
    let runs = v.as_array().expect("one result per run");
    // Per channel count: pipelined and unpipelined script, HTTP, HTTP batch and WebSocket on
    // Redis, HTTP, HTTP batch and WebSocket on the embedded backplane.
    assert_eq!(runs.len(), 2 * 8, "{v:#}");
    for run in runs {
        assert!(u(run, "published") > 0, "{run:#}");
        for key in ["lost", "duplicated", "history_mismatched", "errors"] {
            assert_eq!(u(run, key), 0, "{key}: {run:#}");
        }
    }
    assert!(ok, "{v:#}");
}
