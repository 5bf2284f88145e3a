//! Results as markdown: one table per scenario, a row per run (gateway and peers side by side).

use serde_json::Value;

/// A column: header and how to read the cell from a result.
struct Column {
    header: &'static str,
    cell: fn(&Value) -> String,
}

pub fn num(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if n.is_f64() && f.fract() != 0.0 {
                if f.abs() >= 100.0 {
                    group(f.round() as i64)
                } else {
                    format!("{f:.2}")
                }
            } else {
                group(f as i64)
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// 1234567 → "1 234 567" (readable in tables).
fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

macro_rules! col {
    ($h:expr, $($path:tt)+) => {
        Column { header: $h, cell: |v| num(&v$($path)+) }
    };
}

/// "gateway", "gateway (sse-h2)", "uws, 100 channels, round 2": the system, a non-WebSocket
/// transport, the suite's variant and round.
pub fn label(v: &Value) -> String {
    let mut l = v["system"].as_str().unwrap_or("?").to_string();
    if let Some(t) = v["transport"].as_str().filter(|t| *t != "ws") {
        l.push_str(&format!(" ({t})"));
    }
    if let Some(variant) = v["variant"].as_str() {
        l.push_str(&format!(", {variant}"));
    }
    if let Some(round) = v["round"].as_u64() {
        l.push_str(&format!(", round {round}"));
    }
    l
}

fn columns(scenario: &str) -> Vec<Column> {
    let system = Column {
        header: "system",
        cell: label,
    };
    match scenario {
        "ticker" => vec![
            Column {
                header: "mode",
                cell: |v| num(&v["mode"]),
            },
            col!("deliveries", ["deliveries"]),
            col!("deliveries/s", ["deliveries_per_s"]),
            col!("bytes/delivery", ["bytes_per_delivery"]),
            col!("CPU µs/delivery", ["cpu_us_per_delivery"]),
            col!("deltas %", ["delta_share"]),
            col!("ticks behind p50", ["ticks_behind_p50"]),
            col!("ticks behind p99", ["ticks_behind_p99"]),
            col!("ticks behind max", ["ticks_behind_max"]),
            col!("skipped", ["skipped"]),
            col!("ok", ["ok"]),
        ],
        "fanout" => vec![
            system,
            col!("clients", ["clients"]),
            col!("channels", ["channels"]),
            col!("publications", ["publications"]),
            col!("deliveries/s", ["deliveries_per_s"]),
            col!("server CPU s", ["server_cpu_s"]),
            col!("deliveries per CPU s", ["deliveries_per_cpu_s"]),
            col!("p50 ms", ["latency"]["p50_ms"]),
            col!("p99 ms", ["latency"]["p99_ms"]),
            col!("max ms", ["latency"]["max_ms"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
            col!("out of order", ["out_of_order"]),
        ],
        "latency" => vec![
            system,
            col!("nodes", ["nodes"]),
            col!("clients", ["clients"]),
            col!("publications/s", ["publish_rate"]),
            col!("deliveries/s", ["deliveries_per_s"]),
            col!("p50 ms", ["latency"]["p50_ms"]),
            col!("p90 ms", ["latency"]["p90_ms"]),
            col!("p99 ms", ["latency"]["p99_ms"]),
            col!("p99.9 ms", ["latency"]["p999_ms"]),
            col!("max ms", ["latency"]["max_ms"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
        ],
        "storm" => vec![
            system,
            col!("signal", ["storm"]["signal"]),
            col!("clients", ["clients"]),
            col!("jitter ms", ["storm"]["jitter_ms"]),
            col!("reconnects", ["storm"]["reconnects"]),
            col!("all caught up ms", ["storm"]["all_caught_up_ms"]),
            col!("p50 ms", ["storm"]["caught_up_p50_ms"]),
            col!("p99 ms", ["storm"]["caught_up_p99_ms"]),
            col!("not recovered", ["storm"]["not_recovered"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
            col!("out of order", ["out_of_order"]),
        ],
        "echo" => vec![
            system,
            col!("clients", ["clients"]),
            col!("window", ["window"]),
            col!("bytes", ["size_bytes"]),
            col!("messages/s", ["messages_per_s"]),
            col!("server CPU s", ["server_cpu_s"]),
            col!("messages per CPU s", ["messages_per_cpu_s"]),
            col!("rtt p50 ms", ["rtt"]["p50_ms"]),
            col!("rtt p99 ms", ["rtt"]["p99_ms"]),
            col!("mismatched", ["mismatched"]),
        ],
        "connections" => vec![
            system,
            col!("connections", ["opened"]),
            col!("failed", ["failed"]),
            col!("opened/s", ["opened_per_s"]),
            col!("RSS bytes per connection", ["bytes_per_connection"]),
            col!("idle CPU %", ["idle_cpu_percent"]),
        ],
        "failover" => vec![
            system,
            col!("min replicas acked", ["min_replicas_acked"]),
            col!("clients", ["clients"]),
            col!("publications/s", ["publish_rate"]),
            col!("acked", ["acked"]),
            col!("refused (retried)", ["refused_retried"]),
            col!("publishing recovered ms", ["publishing_recovered_ms"]),
            col!("all caught up ms", ["all_caught_up_ms"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
            col!("resets", ["resets"]),
        ],
        "publish-latency" => vec![
            system,
            col!("replicas", ["replicas"]),
            col!("min replicas acked", ["min_replicas_acked"]),
            col!("publishes", ["publishes"]),
            col!("p50 ms", ["latency"]["p50_ms"]),
            col!("p90 ms", ["latency"]["p90_ms"]),
            col!("p99 ms", ["latency"]["p99_ms"]),
            col!("max ms", ["latency"]["max_ms"]),
            col!("refused", ["refused"]),
        ],
        "publish" => vec![
            system,
            col!("publishers", ["publishers"]),
            col!("acknowledged", ["published"]),
            col!("publishes/s", ["publishes_per_s"]),
            col!("× ceiling", ["ratio_to_ceiling"]),
            col!("rtt p50 ms", ["rtt"]["p50_ms"]),
            col!("rtt p99 ms", ["rtt"]["p99_ms"]),
            col!("CPU/s gateway", ["cpu_per_s"]["gateway"]),
            col!("CPU/s Redis", ["cpu_per_s"]["redis"]),
            col!("CPU/s loadtest", ["cpu_per_s"]["loadtest"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
            col!("history mismatched", ["history_mismatched"]),
            col!("errors", ["errors"]),
        ],
        "ramp" => vec![
            system,
            col!("clients", ["clients"]),
            col!("channels", ["channels"]),
            col!("p99 limit ms", ["p99_limit_ms"]),
            col!("capacity deliveries/s", ["capacity_deliveries_per_s"]),
            col!("at pub/s", ["capacity_publish_rate"]),
            col!("p99 ms there", ["capacity_p99_ms"]),
            col!("stopped by", ["stopped_by"]),
        ],
        "soak" => vec![
            system,
            col!("backplane", ["backplane"]),
            col!("s", ["duration_s"]),
            col!("clients", ["clients"]),
            col!("pub/s", ["publish_rate"]),
            col!("deliveries", ["deliveries"]),
            col!("resumes", ["resumes"]),
            col!("fresh subscribes", ["fresh_subscribes"]),
            col!("resets", ["resets"]),
            col!("lost", ["lost"]),
            col!("dup", ["duplicated"]),
            col!("RSS flat", ["flat"]["rss_bytes"]["flat"]),
            col!("fds flat", ["flat"]["fds"]["flat"]),
            col!("queued flat", ["flat"]["queued_bytes"]["flat"]),
            col!("ok", ["ok"]),
        ],
        _ => vec![system, col!("ok", ["ok"])],
    }
}

/// One markdown table per scenario, in the order the scenarios first appear.
pub fn markdown(results: &[Value]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for v in results {
        let s = v["scenario"].as_str().unwrap_or("result");
        if !scenarios.contains(&s) {
            scenarios.push(s);
        }
    }
    let mut out = String::new();
    for s in scenarios {
        let mut cols = columns(s);
        let rows = || results.iter().filter(|v| v["scenario"] == s);
        if rows().any(|v| v.get("cpu_steal_pct").is_some()) {
            cols.push(col!("host steal %", ["cpu_steal_pct"]));
        }
        out.push_str(&format!("\n**{s}**\n\n|"));
        for c in &cols {
            out.push_str(&format!(" {} |", c.header));
        }
        out.push_str("\n|");
        for (i, _) in cols.iter().enumerate() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for v in rows() {
            out.push('|');
            for c in &cols {
                out.push_str(&format!(" {} |", (c.cell)(v)));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_table_per_scenario_with_a_row_per_run() {
        let results = vec![
            json!({"scenario": "echo", "system": "gateway", "clients": 2, "window": 1,
                   "size_bytes": 64, "messages_per_s": 12345.0, "rtt": {"p50_ms": 0.25},
                   "mismatched": 0}),
            json!({"scenario": "fanout", "system": "uws", "transport": "ws", "lost": 0}),
            json!({"scenario": "echo", "system": "uws", "clients": 2, "messages_per_s": 99.5}),
        ];
        let md = markdown(&results);
        assert_eq!(md.matches("**echo**").count(), 1);
        assert_eq!(md.matches("**fanout**").count(), 1);
        assert!(
            md.contains("| gateway | 2 | 1 | 64 | 12\u{202f}345 |"),
            "{md}"
        );
        assert!(md.contains("| uws | 2 | – | – | 99.50 |"), "{md}");
        assert!(md.find("**echo**") < md.find("**fanout**"));
    }

    #[test]
    fn a_table_shows_the_hosts_steal_where_it_was_measured() {
        let results = vec![
            json!({"scenario": "echo", "system": "gateway", "cpu_steal_pct": 12.5}),
            json!({"scenario": "echo", "system": "uws"}),
            json!({"scenario": "storm", "system": "gateway"}),
        ];
        let md = markdown(&results);
        assert_eq!(md.matches("host steal %").count(), 1, "{md}");
        assert!(md.contains("| 12.50 |\n| uws |"), "{md}");
    }

    #[test]
    fn labels_name_non_websocket_transports() {
        assert_eq!(
            label(&json!({"system": "gateway", "transport": "sse-h2"})),
            "gateway (sse-h2)"
        );
        assert_eq!(label(&json!({"system": "ws", "transport": "ws"})), "ws");
    }
}
