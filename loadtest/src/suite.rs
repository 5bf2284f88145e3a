//! `suite`: every scenario against the gateway and the peers, one after the other on the same
//! machine, each system started fresh and stopped after its run. Writes results.json, results.md
//! (machine, one table per scenario, the targets as same-run ratios) and SVG charts.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::subscriber::Transport;
use crate::system::{Spec, System, SystemKind};
use crate::{connections, echo, fanout, latency, report, storm};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    /// Seconds in all: proves the tool and every system run (CI).
    Tiny,
    /// The published benchmark (docs/benchmarks.md): minutes.
    Full,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, value_enum, default_value = "full")]
    pub scale: Scale,
    /// Directory for results.json, results.md and the charts.
    #[arg(long, default_value = "target/loadtest")]
    pub out: PathBuf,
    /// Systems to include (repeat); all by default.
    #[arg(long = "only", value_enum)]
    pub only: Vec<SystemKind>,
}

enum Job {
    Fanout(fanout::Args),
    Latency(latency::Args),
    Storm(storm::Args),
    Echo(echo::Args),
    Connections(connections::Args),
}

struct Run {
    variant: &'static str,
    system: SystemKind,
    nodes: usize,
    job: Job,
    /// Which of a repeated measurement's rounds this is (see [`plan`]).
    round: Option<usize>,
}

/// Idle connections per run at full scale.
const CONNECTIONS: usize = 19_000;

/// The tiny or the full value of a parameter.
fn pick<T>(full: bool, tiny: T, big: T) -> T {
    if full {
        big
    } else {
        tiny
    }
}

/// The fan-out runs of the gateway and uWS, the rows with a target against uWS, are repeated in
/// rounds that alternate the two, and the targets take the median: one 15 s run on a shared
/// machine moves by ±15% from run to run (docs/benchmarks.md, "Express delivery"), more than
/// what the target is about. The other peers run once.
fn plan(scale: Scale) -> Vec<Run> {
    use SystemKind::*;
    let full = scale == Scale::Full;
    let rounds = pick(full, 2, 3);
    let mut runs = Vec::new();
    let fan = |clients, channels, rate: f64, transport| fanout::Args {
        clients,
        channels,
        rate,
        duration: pick(full, 1.0, 15.0),
        payload: 0,
        transport,
        drain: 10.0,
    };
    let fan_rounds = |variant, channels, rate, once: &[SystemKind]| {
        let mut runs = Vec::new();
        for round in 1..=rounds {
            let systems = [Gateway, Uws].into_iter();
            let systems = systems.chain(once.iter().copied().filter(|_| round == 1));
            for system in systems {
                runs.push(Run {
                    variant,
                    system,
                    nodes: 1,
                    job: Job::Fanout(fan(pick(full, 20, 1000), channels, rate, Transport::Ws)),
                    round: Some(round),
                });
            }
        }
        runs
    };
    runs.extend(fan_rounds(
        "1 channel",
        1,
        pick(full, 50.0, 200.0),
        &[Ws, Socketio],
    ));
    runs.extend(fan_rounds(
        "100 channels",
        pick(full, 5, 100),
        pick(full, 50.0, 20_000.0),
        &[Ws],
    ));
    for transport in [Transport::Sse, Transport::SseH2] {
        runs.push(Run {
            variant: "1 channel",
            system: Gateway,
            nodes: 1,
            job: Job::Fanout(fan(
                pick(full, 20, 1000),
                1,
                pick(full, 50.0, 200.0),
                transport,
            )),
            round: None,
        });
    }
    for system in [Gateway, Uws, Ws] {
        runs.push(Run {
            variant: "",
            system,
            nodes: 1,
            job: Job::Echo(echo::Args {
                clients: pick(full, 4, 50),
                messages: pick(full, 200, 20_000),
                size: 64,
                window: 16,
                text: false,
            }),
            round: None,
        });
    }
    // 19k, not the issue's 100k: this machine's hard RLIMIT_NOFILE is 20000 and the sandbox
    // lacks CAP_SYS_RESOURCE to raise it, for the server and the load generator alike.
    let conns = |count, transport| connections::Args {
        count,
        transport,
        hold: pick(full, 0.5, 10.0),
        concurrency: 256,
    };
    for transport in [Transport::Ws, Transport::Sse, Transport::SseH2] {
        runs.push(Run {
            variant: "",
            system: Gateway,
            nodes: 1,
            job: Job::Connections(conns(pick(full, 50, CONNECTIONS), transport)),
            round: None,
        });
    }
    for system in [Uws, Ws, Socketio] {
        runs.push(Run {
            variant: "",
            system,
            nodes: 1,
            job: Job::Connections(conns(pick(full, 50, CONNECTIONS), Transport::Ws)),
            round: None,
        });
    }
    for system in [Gateway, Socketio] {
        runs.push(Run {
            variant: "3 nodes + Redis",
            system,
            nodes: 3,
            job: Job::Latency(latency::Args {
                clients: pick(full, 30, 1000),
                channels: pick(full, 3, 10),
                rate: pick(full, 50.0, 500.0),
                duration: pick(full, 1.0, 20.0),
                payload: 0,
                transport: Transport::Ws,
            }),
            round: None,
        });
    }
    let storm_args = |signal| storm::Args {
        clients: pick(full, 30, 10_000),
        channels: pick(full, 3, 100),
        rate: pick(full, 50.0, 200.0),
        duration: pick(full, 2.0, 15.0),
        kill_after: pick(full, 0.5, 5.0),
        signal,
        jitter_ms: pick(full, 100, 1000),
        transport: Transport::Ws,
    };
    for (system, signal) in [
        (Gateway, storm::Signal::Kill),
        (Gateway, storm::Signal::Term),
        (Socketio, storm::Signal::Kill),
    ] {
        runs.push(Run {
            variant: "3 nodes + Redis",
            system,
            nodes: 3,
            job: Job::Storm(storm_args(signal)),
            round: None,
        });
    }
    runs
}

pub async fn run(args: &Args, gateway_bin: Option<PathBuf>) -> Result<(Vec<Value>, bool), String> {
    let runs: Vec<Run> = plan(args.scale)
        .into_iter()
        .filter(|r| args.only.is_empty() || args.only.contains(&r.system))
        .collect();
    if runs.iter().any(|r| r.system != SystemKind::Gateway) {
        crate::peers::Peers::install()?;
    }
    let mut results = Vec::new();
    let mut all_ok = true;
    for (i, r) in runs.iter().enumerate() {
        let name = scenario_name(&r.job);
        let round = r.round.map(|k| format!(", round {k}")).unwrap_or_default();
        eprintln!(
            "loadtest suite: [{}/{}] {name} on {} {}{round}",
            i + 1,
            runs.len(),
            r.system.name(),
            r.variant
        );
        let spec = Spec {
            kind: r.system,
            nodes: r.nodes,
            redis: false,
            echo: matches!(r.job, Job::Echo(_)),
            gateway_bin: gateway_bin.clone(),
        };
        let before = cpu_ticks();
        let (mut v, ok) = match System::start(&spec).await {
            Err(e) => (
                json!({"scenario": name, "ok": false, "first_errors": [e]}),
                false,
            ),
            Ok(mut system) => {
                let out = match &r.job {
                    Job::Fanout(a) => crate::passed(fanout::run(&mut system, a).await),
                    Job::Latency(a) => crate::passed(latency::run(&mut system, a).await),
                    Job::Storm(a) => crate::passed(storm::run(&mut system, a).await),
                    Job::Echo(a) => echo::run(&system.echo_url(0), &system.pids(), a).await,
                    Job::Connections(a) => connections::run(&mut system, a).await,
                };
                drop(system);
                out
            }
        };
        if let Some(steal) = steal_percent(before, cpu_ticks()) {
            v["cpu_steal_pct"] = json!((steal * 10.0).round() / 10.0);
        }
        v["system"] = r.system.name().into();
        if !r.variant.is_empty() {
            v["variant"] = r.variant.into();
        }
        if let Some(round) = r.round {
            v["round"] = round.into();
        }
        if !ok {
            let why = why_failed(&v);
            eprintln!(
                "loadtest suite: {name} on {} FAILED: {why}",
                r.system.name()
            );
            v["why"] = why.into();
        }
        all_ok &= ok;
        results.push(v);
    }
    write(args, &results)?;
    Ok((results, all_ok))
}

/// Why a run did not pass, in words: its first errors, else the counts that fell short (a run
/// can fail with no error of its own, e.g. connections opened short of the count, or a loss).
fn why_failed(v: &Value) -> String {
    if let Some(errors) = v["first_errors"].as_array().filter(|e| !e.is_empty()) {
        return errors
            .iter()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let mut parts = Vec::new();
    if let (Some(opened), Some(requested)) = (v["opened"].as_u64(), v["requested"].as_u64()) {
        if opened < requested {
            parts.push(format!("{opened} of {requested} connections opened"));
        }
    }
    for key in [
        "failed",
        "dropped_while_idle",
        "lost",
        "duplicated",
        "out_of_order",
    ] {
        if let Some(n) = v[key].as_u64().filter(|&n| n > 0) {
            parts.push(format!("{key} {n}"));
        }
    }
    if let Some(n) = v["publish_errors"].as_u64().filter(|&n| n > 0) {
        let first = v["first_publish_error"].as_str().unwrap_or("no message");
        parts.push(format!("{n} publishes failed (the first: {first})"));
    }
    if parts.is_empty() {
        "the scenario reported ok = false without a count that explains it".into()
    } else {
        parts.join(", ")
    }
}

fn scenario_name(job: &Job) -> &'static str {
    match job {
        Job::Fanout(_) => "fanout",
        Job::Latency(_) => "latency",
        Job::Storm(_) => "storm",
        Job::Echo(_) => "echo",
        Job::Connections(_) => "connections",
    }
}

fn write(args: &Args, results: &[Value]) -> Result<(), String> {
    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(&json!({"machine": machine(), "results": results}))
        .expect("serializable");
    std::fs::write(dir.join("results.json"), json + "\n").map_err(|e| e.to_string())?;
    let charts = crate::charts::write_all(&dir.join("charts"), results)?;
    let mut md = String::from("## Machine\n\n");
    for (k, v) in machine().as_object().expect("object") {
        md.push_str(&format!(
            "- {k}: {}\n",
            v.as_str().unwrap_or(&v.to_string())
        ));
    }
    md.push_str("\n## Targets (ratios from this run)\n\n");
    md.push_str(&targets(results));
    md.push_str("\n## Results\n");
    md.push_str(&report::markdown(results));
    md.push_str("\n## Charts\n\n");
    for c in charts {
        md.push_str(&format!("![{c}](charts/{c})\n"));
    }
    std::fs::write(dir.join("results.md"), md).map_err(|e| e.to_string())?;
    eprintln!("loadtest suite: wrote {}", dir.display());
    Ok(())
}

/// What the numbers were measured on.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "not found".into())
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem_gib,
        "kernel": version("uname", "-r"),
        "node": version("node", "--version"),
        "redis": version("redis-server", "--version"),
        "note": "load generator, servers and Redis share the same cores",
    })
}

/// The issue's targets as same-run ratios.
fn targets(results: &[Value]) -> String {
    let find = |scenario: &str, system: &str, variant: Option<&str>, transport: Option<&str>| {
        results.iter().find(|v| {
            v["scenario"] == scenario
                && v["system"] == system
                && variant.is_none_or(|x| v["variant"] == x)
                && transport.is_none_or(|t| v["transport"] == t)
        })
    };
    let f = |v: Option<&Value>, path: &[&str]| -> Option<f64> {
        let mut cur = v?;
        for p in path {
            cur = cur.get(*p)?;
        }
        cur.as_f64()
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "missed",
        None => "not measured",
    };
    let fmt = |x: Option<f64>, unit: &str| x.map(|x| format!("{x:.2}{unit}")).unwrap_or("–".into());
    let int = |x: Option<f64>| {
        x.map(|x| format!("{}", x.round() as i64))
            .unwrap_or("–".into())
    };
    let mut rows: Vec<(String, String, &str)> = Vec::new();
    // A fan-out row's rounds (one run if it was not repeated), in round order.
    let fan = |system: &str, variant: &str| -> Vec<&Value> {
        let mut runs: Vec<&Value> = results
            .iter()
            .filter(|v| {
                v["scenario"] == "fanout"
                    && v["system"] == system
                    && v["variant"] == variant
                    && v["transport"] == "ws"
            })
            .collect();
        runs.sort_by_key(|v| v["round"].as_u64());
        runs
    };
    let median_of = |runs: &[&Value], path: &[&str]| median(runs.iter().map(|v| f(Some(v), path)));
    let cpu = ["deliveries_per_cpu_s"];
    let rate = ["deliveries_per_s"];
    for (variant, peer, want) in [
        ("1 channel", "uws", 0.9),
        ("100 channels", "uws", 0.9),
        ("1 channel", "socketio", 10.0),
    ] {
        let (ours, theirs) = (fan("gateway", variant), fan(peer, variant));
        let r_cpu = ratio(median_of(&ours, &cpu), median_of(&theirs, &cpu));
        let r_rate = ratio(median_of(&ours, &rate), median_of(&theirs, &rate));
        let mut measured = format!(
            "{} (deliveries/s ratio {})",
            fmt(r_cpu, "×"),
            fmt(r_rate, "×")
        );
        if ours.len() > 1 && ours.len() == theirs.len() {
            let each: Vec<String> = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| fmt(ratio(f(Some(a), &cpu), f(Some(b), &cpu)), "×"))
                .collect();
            measured.push_str(&format!(
                "; medians of {} rounds, round by round {}",
                ours.len(),
                each.join(", ")
            ));
        }
        rows.push((
            format!("fan-out, {variant}, ≥ {want}× {peer} (deliveries per server CPU second)"),
            measured,
            verdict(r_cpu.map(|r| r >= want)),
        ));
    }
    for t in ["ws", "sse"] {
        let b = f(
            find("connections", "gateway", None, Some(t)),
            &["bytes_per_connection"],
        );
        let n = f(find("connections", "gateway", None, Some(t)), &["opened"]);
        rows.push((
            format!("idle memory ≤ 4 KiB per {t} connection"),
            format!("{} bytes at {} connections", int(b), int(n)),
            verdict(b.map(|b| b <= 4096.0)),
        ));
    }
    let lat = find("latency", "gateway", None, None);
    let p99 = f(lat, &["latency", "p99_ms"]);
    let dps = f(lat, &["deliveries_per_s"]);
    // The offered load: every publication goes to clients / channels subscribers.
    let offered = lat.and_then(|v| {
        Some(v["rate_target"].as_f64()? * v["clients"].as_f64()? / v["channels"].as_f64()?)
    });
    let clean = lat.map(|v| v["ok"] == true);
    rows.push((
        "p99 publish→deliver ≤ 5 ms, 3 nodes + Redis, 50k deliveries/s".into(),
        format!(
            "{} at {} deliveries/s offered, {} measured over the run",
            fmt(p99, " ms"),
            int(offered),
            int(dps)
        ),
        verdict(
            p99.zip(offered)
                .zip(clean)
                .map(|((p, o), clean)| p <= 5.0 && o >= 50_000.0 && clean),
        ),
    ));
    let storm = results.iter().find(|v| {
        v["scenario"] == "storm" && v["system"] == "gateway" && v["storm"]["signal"] == "kill"
    });
    let caught = f(storm, &["storm", "all_caught_up_ms"]);
    let clean = storm.map(|v| v["lost"] == 0 && v["duplicated"] == 0 && v["out_of_order"] == 0);
    rows.push((
        "kill -9 storm of 10k clients caught up ≤ 5 s, 0 lost / 0 dup".into(),
        format!(
            "{} ms for {} clients, clean: {}",
            int(caught),
            int(f(storm, &["clients"])),
            clean.map(|c| c.to_string()).unwrap_or("–".into())
        ),
        verdict(caught.zip(clean).map(|(c, clean)| c <= 5000.0 && clean)),
    ));
    let echo = |s| f(find("echo", s, None, None), &["messages_per_s"]);
    let r = ratio(echo("gateway"), echo("uws"));
    rows.push((
        "WebSocket echo ≥ 0.95× uws".into(),
        fmt(r, "×"),
        verdict(r.map(|r| r >= 0.95)),
    ));
    let mut md = String::from("| target | measured | verdict |\n|---|---|---|\n");
    for (t, m, v) in rows {
        md.push_str(&format!("| {t} | {m} | {v} |\n"));
    }
    md
}

/// The machine's CPU time so far, per state, in ticks (the `cpu` line of `/proc/stat`).
fn cpu_ticks() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    line.split_whitespace().map(|n| n.parse().ok()).collect()
}

/// The share of the machine's CPU time between two readings that its host gave to others
/// (`steal`, the eighth field): on a shared VM, the noise a run's timings carry.
fn steal_percent(before: Option<Vec<u64>>, after: Option<Vec<u64>>) -> Option<f64> {
    let (before, after) = (before?, after?);
    let spent: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is counted in user already.
    let total: u64 = spent.iter().take(8).sum();
    (total > 0 && spent.len() >= 8).then(|| 100.0 * spent[7] as f64 / total as f64)
}

/// The median of the values present; `None` if there are none.
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut xs: Vec<f64> = values.flatten().collect();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_says_why() {
        let short = json!({"opened": 9243, "requested": 19000, "failed": 9757, "first_errors": []});
        assert_eq!(
            why_failed(&short),
            "9243 of 19000 connections opened, failed 9757"
        );
        let publishes = json!({"lost": 0, "publish_errors": 69,
                               "first_publish_error": "request: error sending request"});
        assert_eq!(
            why_failed(&publishes),
            "69 publishes failed (the first: request: error sending request)"
        );
        let errors = json!({"first_errors": ["connect: refused"], "lost": 3});
        assert_eq!(why_failed(&errors), "connect: refused");
        assert!(why_failed(&json!({"ok": false})).contains("without a count"));
    }

    #[test]
    fn fan_out_targets_take_the_median_of_the_rounds() {
        let run = |system: &str, variant: &str, round: u64, per_cpu: f64| {
            json!({"scenario": "fanout", "system": system, "variant": variant, "transport": "ws",
                   "round": round, "deliveries_per_cpu_s": per_cpu, "deliveries_per_s": 1.0})
        };
        let results = vec![
            run("gateway", "100 channels", 1, 80.0),
            run("uws", "100 channels", 1, 100.0),
            run("gateway", "100 channels", 2, 95.0),
            run("uws", "100 channels", 2, 100.0),
            run("gateway", "100 channels", 3, 200.0),
            run("uws", "100 channels", 3, 90.0),
        ];
        let md = targets(&results);
        let row = md
            .lines()
            .find(|l| l.contains("100 channels, ≥ 0.9× uws"))
            .expect("a row for 100 channels");
        // Medians 95 and 100; each round's own ratio is listed beside.
        assert!(row.contains("| 0.95× (deliveries/s ratio 1.00×)"), "{row}");
        assert!(row.contains("round by round 0.80×, 0.95×, 2.22×"), "{row}");
        assert!(row.ends_with("| met |"), "{row}");
        assert_eq!(median([Some(3.0), None, Some(1.0)].into_iter()), Some(2.0));
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn steal_is_the_hosts_share_of_the_time_between_two_readings() {
        let before = Some(vec![100, 0, 50, 800, 0, 0, 10, 40, 0, 0]);
        let after = Some(vec![160, 0, 80, 880, 0, 0, 20, 60, 0, 0]);
        // 60 + 30 + 80 + 10 + 20 = 200 ticks, 20 of them stolen.
        assert_eq!(steal_percent(before.clone(), after), Some(10.0));
        assert_eq!(steal_percent(before.clone(), before), None);
        assert_eq!(steal_percent(None, Some(vec![0; 10])), None);
        let now = cpu_ticks().expect("/proc/stat");
        assert!(now.len() >= 8, "{now:?}");
    }
}
