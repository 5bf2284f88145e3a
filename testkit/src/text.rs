//! Text formats the tests read: query encoding, the Prometheus exposition format and the
//! gateway's `listening on` log line.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of the sample `name` whose labels include every pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (sname, slabels) = match series.find('{') {
            Some(i) => (&series[..i], parse_labels(&series[i + 1..series.len() - 1])),
            None => (series, BTreeMap::new()),
        };
        if sname != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| slabels.get(*k).map(String::as_str) == Some(*v))
        {
            return value.parse().ok();
        }
    }
    None
}

pub fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let after = after.strip_prefix('"').unwrap_or(after);
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

/// Finds a socket address on a line that says `listening on` (human or JSON log formats, with or
/// without ANSI colours).
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let clean = strip_ansi(line);
    let at = clean.find("listening on")?;
    let tail = &clean[at..];
    let candidates = tail
        .split(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
        .filter(|s| !s.is_empty());
    for c in candidates {
        if let Ok(a) = c.parse::<SocketAddr>() {
            return Some(a);
        }
    }
    // JSON logs may carry the address in a field before the message.
    clean
        .split(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
        .filter_map(|s| s.parse::<SocketAddr>().ok())
        .next()
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
