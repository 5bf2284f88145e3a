//! The monitoring shipped in `deploy/` works against real nodes: a real `prometheus` scrapes two
//! gateway nodes on one Redis, loads `deploy/prometheus/rules.yml`, and every Grafana panel query
//! of `deploy/grafana/dashboard.json` and every rule expression must return data once traffic has
//! touched every metric family. `promtool` checks the rules and runs their unit tests.
//!
//! Needs `prometheus` and `promtool` on PATH (Debian: `apt-get install prometheus`); without them
//! the tests fail, they do not skip.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use testkit::*;
use tokio_tungstenite::tungstenite::protocol::Message;

/// What `$__rate_interval` becomes: Grafana uses max(4 × scrape interval, step + scrape
/// interval), a few seconds with 1s scrapes; 30s keeps several samples in every window.
const RATE_INTERVAL: &str = "30s";
/// Longest wait for Prometheus to have scraped and evaluated what the checks need.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(40);
/// Queue limit of the node that gets the slow consumer.
const SMALL_QUEUE: &str = "2048";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("deploy/tests sits two levels below the repository root")
}

fn rules_path() -> PathBuf {
    repo_root().join("deploy/prometheus/rules.yml")
}

fn rules_test_path() -> PathBuf {
    repo_root().join("deploy/prometheus/rules_test.yml")
}

fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/dashboard.json")
}

fn operations_doc_path() -> PathBuf {
    repo_root().join("docs/operations.md")
}

const INSTALL_HINT: &str = "install it: `apt-get install prometheus` (Debian package, ships \
                            /usr/bin/prometheus and /usr/bin/promtool)";

// ---------------------------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------------------------

/// Runs `promtool args...`; status, stdout + stderr. A missing promtool fails the test.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `promtool` ({e}): {INSTALL_HINT}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// How many rules `promtool check rules` found in rules.yml (its "SUCCESS: N rules found").
fn promtool_rule_count() -> usize {
    let path = rules_path();
    let (ok, out) = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(ok, "promtool check rules {} failed:\n{out}", path.display());
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("SUCCESS: ")?
                .strip_suffix(" rules found")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no rule count in promtool output:\n{out}"))
}

#[test]
fn promtool_checks_rules_and_runs_their_unit_tests() {
    let n = promtool_rule_count();
    assert!(n > 0, "rules.yml has no rules");
    let path = rules_test_path();
    let (ok, out) = promtool(&["test", "rules", path.to_str().unwrap()]);
    assert!(
        ok && out.contains("SUCCESS"),
        "promtool test rules {} failed:\n{out}",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Static consistency: runbook anchors, dashboard shape
// ---------------------------------------------------------------------------------------------

/// GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' => Some(c),
            ' ' => Some('-'),
            _ if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// `(alert name, runbook_url)` of every alert in rules.yml, by a line scan (the file's layout is
/// fixed by its own conventions; promtool validates the YAML itself).
fn alerts_and_runbooks() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rules_path()).expect("read rules.yml");
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            current = Some(name.trim().to_string());
        } else if let Some(url) = line.strip_prefix("runbook_url:") {
            let name = current
                .take()
                .unwrap_or_else(|| panic!("runbook_url outside an alert: {line}"));
            out.push((name, url.trim().trim_matches('"').to_string()));
        }
    }
    out
}

#[test]
fn every_alert_links_an_existing_runbook_section() {
    let text = std::fs::read_to_string(rules_path()).expect("read rules.yml");
    let alerts = text.matches("- alert:").count();
    let runbooks = alerts_and_runbooks();
    assert_eq!(
        runbooks.len(),
        alerts,
        "every alert needs a runbook_url: {runbooks:?}"
    );
    let doc = std::fs::read_to_string(operations_doc_path()).expect("read docs/operations.md");
    let anchors: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    assert!(
        anchors.contains("alerts-and-runbooks"),
        "docs/operations.md has no `## Alerts and runbooks` section"
    );
    let mut broken = Vec::new();
    for (alert, url) in &runbooks {
        match url.split_once('#') {
            Some(("docs/operations.md", anchor)) if anchors.contains(anchor) => {
                if anchor != alert.to_lowercase() {
                    broken.push(format!("{alert}: links {url}, not its own section"));
                }
            }
            _ => broken.push(format!(
                "{alert}: {url} is not a heading of docs/operations.md"
            )),
        }
    }
    assert!(
        broken.is_empty(),
        "broken runbook links:\n{}",
        broken.join("\n")
    );
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).expect("read dashboard.json");
    serde_json::from_str(&text).expect("dashboard.json is JSON")
}

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// `(panel title, refId, expr)` of every query target.
fn dashboard_targets(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title}: target without expr: {t}"));
            let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
            out.push((title.clone(), ref_id, expr.to_string()));
        }
    }
    out
}

#[test]
fn dashboard_is_importable_and_parameterised() {
    let dash = load_dashboard();
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let inst = var("instance");
    assert_eq!(inst["type"], "query");
    assert_eq!(inst["multi"], true);
    assert_eq!(inst["datasource"]["uid"], "${datasource}");
    assert_eq!(
        inst["definition"], "label_values(gateway_connections, instance)",
        "instance variable query"
    );

    let panels = all_panels(&dash);
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Overview",
        "Traffic",
        "Latency",
        "Resume",
        "Backplane",
        "Per node",
    ] {
        assert!(rows.contains(&want), "no row {want}: {rows:?}");
    }
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().expect("panel id")) {
            problems.push(format!("{title}: duplicate id"));
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!("{title}: datasource is not ${{datasource}}"));
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{title}: target datasource is not ${{datasource}}"));
            }
        }
    }
    for (title, ref_id, expr) in dashboard_targets(&dash) {
        let what = format!("{title} [{ref_id}]");
        // Rates over fixed windows only come from recording rules.
        if (expr.contains("rate(") || expr.contains("increase("))
            && !expr.contains("[$__rate_interval]")
        {
            problems.push(format!(
                "{what}: rate/increase without $__rate_interval: {expr}"
            ));
        }
        // Per-node queries follow the node selector; fleet-wide recorded series carry no
        // instance label.
        if !expr.contains("instance=~\"$instance\"") && !expr.contains("job:") {
            problems.push(format!("{what}: not filtered by $instance: {expr}"));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Alert expressions: the query without its threshold
// ---------------------------------------------------------------------------------------------

/// Walks a PromQL expression and yields the byte positions that are outside strings and at
/// bracket depth 0 (the brackets and quotes themselves are not yielded).
struct TopLevel<'a> {
    bytes: &'a [u8],
    i: usize,
    depth: i32,
    quote: Option<u8>,
}

impl<'a> TopLevel<'a> {
    fn new(expr: &'a str) -> Self {
        TopLevel {
            bytes: expr.as_bytes(),
            i: 0,
            depth: 0,
            quote: None,
        }
    }

    /// Continues the walk at `pos`, past a token the caller consumed.
    fn skip_to(&mut self, pos: usize) {
        self.i = pos;
    }
}

impl Iterator for TopLevel<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.i < self.bytes.len() {
            let (i, c) = (self.i, self.bytes[self.i]);
            self.i += 1;
            if let Some(q) = self.quote {
                if c == b'\\' {
                    self.i += 1;
                } else if c == q {
                    self.quote = None;
                }
                continue;
            }
            match c {
                b'"' | b'\'' | b'`' => self.quote = Some(c),
                b'(' | b'[' | b'{' => self.depth += 1,
                b')' | b']' | b'}' => self.depth -= 1,
                _ if self.depth == 0 => return Some(i),
                _ => {}
            }
        }
        None
    }
}

/// Splits `expr` at top-level occurrences of the set operators `and`, `or`, `unless` (outside
/// parentheses, brackets, braces and strings).
fn split_set_ops(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut scan = TopLevel::new(expr);
    while let Some(i) = scan.next() {
        if i > 0 && is_ident(bytes[i - 1]) {
            continue;
        }
        for op in ["and", "or", "unless"] {
            let end = i + op.len();
            if expr[i..].starts_with(op) && (end == bytes.len() || !is_ident(bytes[end])) {
                parts.push(expr[start..i].trim().to_string());
                start = end;
                scan.skip_to(end);
                break;
            }
        }
    }
    parts.push(expr[start..].trim().to_string());
    parts
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// `expr` without a trailing top-level `<op> [bool] <number>` comparison.
fn strip_threshold(expr: &str) -> String {
    let bytes = expr.as_bytes();
    let mut last: Option<(usize, usize)> = None;
    let mut scan = TopLevel::new(expr);
    while let Some(i) = scan.next() {
        let c = bytes[i];
        if !matches!(c, b'=' | b'!' | b'>' | b'<') {
            continue;
        }
        let two = expr.get(i..i + 2).unwrap_or("");
        let len = if ["==", "!=", ">=", "<="].contains(&two) {
            2
        } else if c == b'>' || c == b'<' {
            1
        } else {
            0
        };
        if len > 0 {
            last = Some((i, i + len));
            scan.skip_to(i + len);
        }
    }
    if let Some((at, end)) = last {
        let rhs = expr[end..].trim();
        let rhs = rhs.strip_prefix("bool").unwrap_or(rhs).trim();
        if rhs.parse::<f64>().is_ok() {
            return expr[..at].trim().to_string();
        }
    }
    expr.trim().to_string()
}

/// The queries an alert compares: each `and`/`or`/`unless` operand without its threshold.
fn alert_queries(expr: &str) -> Vec<String> {
    split_set_ops(expr)
        .iter()
        .map(|part| {
            let part = part.trim();
            let inner = part
                .strip_prefix('(')
                .and_then(|p| p.strip_suffix(')'))
                .filter(|p| split_set_ops(p).len() == 1 && balanced(p))
                .unwrap_or(part);
            strip_threshold(inner)
        })
        .collect()
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

#[test]
fn alert_thresholds_are_stripped() {
    assert_eq!(
        alert_queries("up{job=\"gateway\"} == 0"),
        ["up{job=\"gateway\"}"]
    );
    assert_eq!(
        alert_queries("a / b > 0.05\nand\nc{x!=\"y\"} > 0.05"),
        ["a / b", "c{x!=\"y\"}"]
    );
    assert_eq!(
        alert_queries("(sum by (i) (rate(x[5m])) > bool 1) unless y"),
        ["sum by (i) (rate(x[5m]))", "y"]
    );
    assert_eq!(
        alert_queries("increase(r{android=\"1\"}[15m]) > 3"),
        ["increase(r{android=\"1\"}[15m])"]
    );
    assert_eq!(alert_queries("x > y"), ["x > y"]);
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus
// ---------------------------------------------------------------------------------------------

/// A `prometheus` server on a free loopback port with its own storage and config; killed (by its
/// pid) and reaped on drop, its log printed if the test panicked.
struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Prometheus {
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir for prometheus");
        let port = free_port(false);
        let targets: Vec<String> = targets.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [{}]\n",
            rules_path().display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `prometheus` ({e}): {INSTALL_HINT}"));
        let mut prom = Prometheus {
            port,
            dir,
            child: Some(child),
        };
        let url = prom.url("/-/ready");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(child) = prom.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("prometheus exited ({status}):\n{}", prom.log_tail(40));
                }
            }
            if let Ok(resp) = http().get(&url).send().await {
                if resp.status().is_success() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {WAIT:?}:\n{}",
                prom.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prom
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `GET path` of the HTTP API; the `data` of a successful answer, or the error text.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let resp = http()
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("HTTP {status}, body is not JSON: {e}"))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "HTTP {status}: {}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// Instant query at now.
    async fn query(&self, expr: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", enc(expr)))
            .await
    }

    /// What an instant query found: `Err` for a query error, else how many series and how many
    /// of them had a number (not NaN).
    async fn probe(&self, expr: &str) -> Result<(usize, usize), String> {
        let data = self.query(expr).await?;
        let values: Vec<Value> = match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|s| s["value"][1].clone())
                .collect(),
            Some("scalar") => vec![data["result"][1].clone()],
            other => return Err(format!("unexpected result type {other:?}")),
        };
        let numbers = values
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|v| v.parse::<f64>().ok())
            .filter(|v| !v.is_nan())
            .count();
        Ok((values.len(), numbers))
    }

    /// Sum of a query's values (0 for no data or an error).
    async fn sum(&self, expr: &str) -> f64 {
        let Ok(data) = self.query(expr).await else {
            return 0.0;
        };
        data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|v| !v.is_nan())
            .sum()
    }

    /// Polls until `expr`'s values sum to at least `min` (bounded by [`SCRAPE_DEADLINE`]).
    async fn wait_sum(&self, expr: &str, min: f64) {
        let deadline = Instant::now() + SCRAPE_DEADLINE;
        loop {
            let got = self.sum(expr).await;
            if got >= min {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: `{expr}` still {got} (want >= {min}) after {SCRAPE_DEADLINE:?}:\n{}",
                self.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus :{} log tail ----\n{}",
                self.port,
                self.log_tail(30)
            );
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Publishes to `m-a` through node A's HTTP API and to `m-b` over a WebSocket of node B, a few
/// times a second, until dropped: keeps every rate and latency histogram moving.
struct Background {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Background {
    async fn start(a: SocketAddr, b: SocketAddr) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let ws = Sub::connect("background publisher", b).await;
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let (status, body) = publish_http(a, "m-a", &json!({"bg": i})).await;
                assert_eq!(status, 200, "background publish via HTTP: {body}");
                let reply = ws.publish("m-b", &json!({"bg": i})).await;
                assert!(
                    reply.get("result").is_some(),
                    "background publish via WS: {reply}"
                );
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Background {
            stop,
            task: Some(task),
        }
    }

    /// Stops and surfaces a failed publish.
    async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let task = self.task.take().unwrap();
        within("background publisher to stop", task)
            .await
            .expect("background publisher failed");
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A successful resume (a few publications behind on `m-a`), a failed one (unknown epoch) and a
/// rejected command, all on `node`.
async fn resume_and_misbehave(node: SocketAddr, watcher: &Sub, round: u32) {
    let (epoch, offset) = watcher.log().position("m-a").expect("watcher position");
    assert!(offset > 3, "not enough history on m-a yet: {offset}");
    let resumer = Sub::connect(&format!("resumer{round}"), node).await;
    let r = resumer
        .subscribe("m-a", Some(&(epoch.clone(), offset - 3)))
        .await;
    assert_eq!(r["recovered"], true, "resume from {epoch}/{offset}: {r}");
    resumer
        .wait_for("caught-up publications", WAIT, |log| {
            log.pub_count("m-a") >= 3
        })
        .await;
    let r = resumer.subscribe("m-b", Some(&("nope".into(), 1))).await;
    assert_eq!(r["recovered"], false, "resume from an unknown epoch: {r}");
    let reply = resumer.request(json!({"op": "dance"})).await;
    assert!(reply.get("error").is_some(), "unknown op accepted: {reply}");
    resumer.close().await;
}

/// A raw WebSocket client on `node` that subscribes to `m-slow` and never reads again, and
/// publications of 8 KiB to that channel until the node cuts it off.
async fn cut_off_a_slow_consumer(node: SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = within("slow consumer connect", socket.connect(node))
        .await
        .expect("slow consumer connect");
    let (mut slow, _) = within(
        "slow consumer handshake",
        tokio_tungstenite::client_async(format!("ws://{node}/ws"), stream),
    )
    .await
    .expect("slow consumer handshake");
    slow.send(Message::text(
        json!({"id": 1, "op": "subscribe", "channel": "m-slow"}).to_string(),
    ))
    .await
    .expect("slow consumer subscribe");
    let reply = within("slow consumer subscribe reply", slow.next())
        .await
        .expect("reply")
        .expect("reply");
    assert!(
        reply.to_text().unwrap_or("").contains("\"result\""),
        "slow consumer subscribe: {reply:?}"
    );
    // From here on `slow` is never read.
    let publisher = Sub::connect("slow-channel publisher", node).await;
    let pad = "s".repeat(8 * 1024);
    for round in 0..2000 {
        let data = json!({"round": round, "pad": pad});
        let replies =
            futures_util::future::join_all((0..8).map(|_| publisher.publish("m-slow", &data)))
                .await;
        for r in replies {
            assert!(r.get("result").is_some(), "publish to m-slow: {r}");
        }
        if metric_of(node, "gateway_slow_consumer_disconnects_total").await >= 1.0 {
            publisher.close().await;
            drop(slow);
            return;
        }
    }
    panic!("the node never cut off a client that does not read");
}

// ---------------------------------------------------------------------------------------------
// Every expression against the real thing
// ---------------------------------------------------------------------------------------------

/// A dashboard query as Grafana sends it, with the template variables of "all nodes".
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("${__rate_interval}", RATE_INTERVAL)
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${__interval}", "2s")
        .replace("$__interval", "2s")
        .replace("${__range}", "5m")
        .replace("$__range", "5m")
        .replace("${instance:regex}", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(
        !out.contains('$'),
        "unknown template variable left in {expr}"
    );
    out
}

struct Check {
    what: String,
    expr: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_rule_expression_returns_data() {
    let started = Instant::now();
    let expected_rules = promtool_rule_count();
    let dash = load_dashboard();

    let redis = RedisServer::start(RedisOpts::default()).await;
    let backend = Backend::standalone(&redis);
    let node_a = GatewayProcess::start("nodeA", &backend.args, &PATIENT).await;
    let small_queue: Vec<(&str, &str)> = PATIENT
        .iter()
        .copied()
        .chain([("GATEWAY__CLIENT__QUEUE_MAX_BYTES", SMALL_QUEUE)])
        .collect();
    let node_b = GatewayProcess::start("nodeB", &backend.args, &small_queue).await;
    let prom = Prometheus::start(&[node_a.addr, node_b.addr]).await;
    // Both nodes are scraped before any traffic, so that counters move while watched.
    prom.wait_sum("up{job=\"gateway\"}", 2.0).await;
    eprintln!("prometheus scraping both nodes after {}", elapsed(started));

    // Subscribers on both nodes, live traffic through both.
    let watcher_a = Sub::connect("watcher@A", node_a.addr).await;
    let watcher_b = Sub::connect("watcher@B", node_b.addr).await;
    for w in [&watcher_a, &watcher_b] {
        w.subscribe("m-a", None).await;
        w.subscribe("m-b", None).await;
    }
    let background = Background::start(node_a.addr, node_b.addr).await;
    for w in [&watcher_a, &watcher_b] {
        for c in ["m-a", "m-b"] {
            w.wait_for(&format!("publications on {c}"), WAIT, |log| {
                log.pub_count(c) >= 5
            })
            .await;
        }
    }

    // One-off events, twice with a scrape in between so that their counters rise while
    // Prometheus watches (a series' first sample is no increase).
    resume_and_misbehave(node_a.addr, &watcher_a, 1).await;
    resume_and_misbehave(node_b.addr, &watcher_b, 1).await;
    cut_off_a_slow_consumer(node_b.addr).await;
    for node in [&node_a, &node_b] {
        assert_families_exposed(node.addr).await;
    }
    prom.wait_sum("gateway_resumes_total{result=\"not_recovered\"}", 2.0)
        .await;
    prom.wait_sum("gateway_protocol_errors_total", 2.0).await;
    resume_and_misbehave(node_a.addr, &watcher_a, 2).await;
    resume_and_misbehave(node_b.addr, &watcher_b, 2).await;
    prom.wait_sum("gateway_resumes_total{result=\"not_recovered\"}", 4.0)
        .await;
    prom.wait_sum("gateway_slow_consumer_disconnects_total", 1.0)
        .await;
    eprintln!("traffic done after {}", elapsed(started));

    // Every dashboard query and every rule (with alert thresholds removed).
    let mut checks: Vec<Check> = dashboard_targets(&dash)
        .into_iter()
        .map(|(title, ref_id, expr)| Check {
            what: format!("dashboard panel \"{title}\" [{ref_id}]"),
            expr: substitute(&expr),
        })
        .collect();
    let (rules, rule_problems) = rules_when_healthy(&prom, expected_rules).await;
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let query = rule["query"].as_str().unwrap_or("");
        if rule["type"] == "alerting" {
            for (i, q) in alert_queries(query).into_iter().enumerate() {
                checks.push(Check {
                    what: format!("alert {name} (query {})", i + 1),
                    expr: q,
                });
            }
        } else {
            checks.push(Check {
                what: format!("recording rule {name}"),
                expr: query.to_string(),
            });
            // What the dashboard and the alerts read: the recorded series.
            checks.push(Check {
                what: format!("recorded series {name}"),
                expr: name.to_string(),
            });
        }
    }

    let deadline = Instant::now() + SCRAPE_DEADLINE;
    let mut failures = loop {
        let mut failures = Vec::new();
        for c in &checks {
            match prom.probe(&c.expr).await {
                Err(e) => failures.push(format!("{}: error: {e}\n    {}", c.what, c.expr)),
                Ok((0, _)) => failures.push(format!("{}: no data\n    {}", c.what, c.expr)),
                Ok((n, 0)) => failures.push(format!(
                    "{}: {n} series, all NaN (no observations)\n    {}",
                    c.what, c.expr
                )),
                Ok(_) => {}
            }
        }
        if failures.is_empty() || Instant::now() >= deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    background.finish().await;
    let failed_exprs = failures.len();
    failures.extend(rule_problems);
    assert!(
        failures.is_empty(),
        "{failed_exprs} of {} expressions failed against prometheus, and {} rule problems:\n{}",
        checks.len(),
        failures.len() - failed_exprs,
        failures.join("\n")
    );
    eprintln!(
        "{} expressions returned data after {}",
        checks.len(),
        elapsed(started)
    );
}

/// Every metric family the dashboard and the rules are written against.
const FAMILIES: [&str; 26] = [
    "gateway_connections",
    "gateway_subscriptions",
    "gateway_channels",
    "gateway_catching_up_subscriptions",
    "gateway_queued_bytes",
    "gateway_queued_bytes_max",
    "gateway_backplane_pubsub_healthy",
    "gateway_draining",
    "gateway_drain_connections_remaining",
    "gateway_publications_total",
    "gateway_deliveries_total",
    "gateway_slow_consumer_disconnects_total",
    "gateway_resumes_total",
    "gateway_protocol_errors_total",
    "gateway_backplane_pubsub_reconnects_total",
    "gateway_backplane_gap_fills_total",
    "gateway_backplane_errors_total",
    "gateway_history_pages_total",
    "gateway_drain_closed_total",
    "gateway_fanout_latency_seconds",
    "gateway_backplane_command_duration_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// Fails naming every expected family missing from the node's `/metrics` (once traffic has used
/// every label-vector family at least once: one never used has no `# TYPE` line).
async fn assert_families_exposed(node: SocketAddr) {
    let text = metrics_text(node).await;
    let typed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&str> = FAMILIES
        .iter()
        .copied()
        .filter(|f| !typed.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "the gateway does not expose {missing:?} on /metrics (has {typed:?})"
    );
}

/// Polls `/api/v1/rules` until Prometheus reports `expected` rules, each evaluated with health
/// "ok" (bounded by [`SCRAPE_DEADLINE`]). Returns the rules and what is still wrong at the end.
async fn rules_when_healthy(prom: &Prometheus, expected: usize) -> (Vec<Value>, Vec<String>) {
    let deadline = Instant::now() + SCRAPE_DEADLINE;
    loop {
        let data = prom.api("/api/v1/rules").await.expect("GET /api/v1/rules");
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let mut problems: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| {
                format!(
                    "{} rule {}: health {} {}",
                    r["type"].as_str().unwrap_or("?"),
                    r["name"].as_str().unwrap_or("?"),
                    r["health"],
                    r["lastError"].as_str().unwrap_or("")
                )
            })
            .collect();
        if rules.len() != expected {
            problems.push(format!(
                "prometheus loaded {} rules from rules.yml, promtool found {expected}",
                rules.len()
            ));
        }
        if problems.is_empty() || Instant::now() >= deadline {
            return (rules, problems);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
