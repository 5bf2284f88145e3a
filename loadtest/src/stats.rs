//! Pure accounting: per-channel offset tracking and latency summaries.

use std::collections::BTreeSet;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Tracks the offsets received on one channel after a subscription that started at `base`
/// (the channel offset in the subscribe reply; the first expected push is `base + 1`).
#[derive(Debug, Clone)]
pub struct OffsetTracker {
    base: u64,
    /// Every offset in `base+1 ..= contiguous` has been received.
    contiguous: u64,
    /// Offsets received beyond `contiguous + 1` (a gap is open below them).
    ahead: BTreeSet<u64>,
    /// Highest offset received so far.
    max_seen: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub received: u64,
}

impl OffsetTracker {
    pub fn new(base: u64) -> Self {
        OffsetTracker {
            base,
            contiguous: base,
            ahead: BTreeSet::new(),
            max_seen: base,
            duplicated: 0,
            out_of_order: 0,
            received: 0,
        }
    }

    /// Records one received offset.
    pub fn record(&mut self, offset: u64) {
        self.received += 1;
        if offset <= self.contiguous || self.ahead.contains(&offset) {
            self.duplicated += 1;
            return;
        }
        if offset < self.max_seen {
            self.out_of_order += 1;
        }
        self.max_seen = self.max_seen.max(offset);
        if offset == self.contiguous + 1 {
            self.contiguous = offset;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.ahead.insert(offset);
        }
    }

    /// True once every offset up to `last` has been received.
    pub fn complete_up_to(&self, last: u64) -> bool {
        self.contiguous >= last
    }

    /// Offsets in `base+1 ..= last` never received.
    pub fn lost(&self, last: u64) -> u64 {
        if last <= self.base {
            return 0;
        }
        let expected = last - self.base;
        let have =
            (self.contiguous.min(last) - self.base) + self.ahead.range(..=last).count() as u64;
        expected - have
    }
}

/// A latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records a value, clamping into the histogram range.
pub fn record_clamped(h: &mut Histogram<u64>, micros: u64) {
    let v = micros.clamp(1, h.high());
    h.record(v).expect("value clamped into range");
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Latency summary in milliseconds (3 decimals): p50, p90, p99, p99.9, max, plus count.
pub fn latency_summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0, "p50_ms": null, "p90_ms": null, "p99_ms": null,
            "p999_ms": null, "max_ms": null, "mean_ms": null});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
    })
}

/// Prints a flat two-column table of a JSON object (nested objects are prefixed with their key).
pub fn print_table(title: &str, v: &Value) {
    println!("== {title} ==");
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = OffsetTracker::new(5);
        for o in 6..=15 {
            t.record(o);
        }
        assert!(t.complete_up_to(15));
        assert_eq!((t.lost(15), t.duplicated, t.out_of_order), (0, 0, 0));
        // Published beyond what arrived: those are lost.
        assert_eq!(t.lost(18), 3);
        assert!(!t.complete_up_to(16));
    }

    #[test]
    fn gaps_duplicates_and_reordering() {
        let mut t = OffsetTracker::new(0);
        for o in [1, 2, 4, 5, 3, 5, 1, 7] {
            t.record(o);
        }
        assert_eq!(t.duplicated, 2, "5 and 1 again");
        assert_eq!(t.out_of_order, 1, "3 after 5");
        assert_eq!(t.lost(7), 1, "6 never came");
        assert_eq!(t.lost(9), 3);
        assert!(t.complete_up_to(5));
        assert!(!t.complete_up_to(7));
        t.record(6);
        assert!(t.complete_up_to(7));
        assert_eq!(t.out_of_order, 2);
        assert_eq!(t.lost(7), 0);
        assert_eq!(t.lost(0), 0);
    }

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record_clamped(&mut h, us * 10); // 10 µs .. 10 ms
        }
        record_clamped(&mut h, 0);
        record_clamped(&mut h, u64::MAX);
        let s = latency_summary(&h);
        assert_eq!(s["count"], 1002);
        let p50 = s["p50_ms"].as_f64().unwrap();
        assert!((4.9..=5.1).contains(&p50), "p50 {p50}");
        let p99 = s["p99_ms"].as_f64().unwrap();
        assert!((9.8..=10.0).contains(&p99), "p99 {p99}");
        assert!(s["max_ms"].as_f64().unwrap() >= 599_000.0);
        assert_eq!(latency_summary(&new_histogram())["p50_ms"], Value::Null);
    }
}
