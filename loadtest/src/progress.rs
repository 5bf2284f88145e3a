//! Progress bars on stderr for the long phases of a run (hidden when stderr is not a terminal, so
//! CI logs and JSON output stay clean).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting `total` items (connections opened, clients finished).
pub fn counter(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A bar that fills over `duration` of wall time (publishing for D seconds).
pub fn timer(duration: Duration, what: &str) -> ProgressBar {
    let total_ms = duration.as_millis().max(1) as u64;
    let bar = ProgressBar::with_draw_target(Some(total_ms), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {elapsed}/{duration}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    let ticker = bar.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        while !ticker.is_finished() {
            ticker.set_position((start.elapsed().as_millis() as u64).min(total_ms));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    bar
}
