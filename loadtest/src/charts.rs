//! SVG charts of a run's results (plotters): latency percentiles per system, deliveries per
//! second over time, reconnects over time after a kill, and a soak's resource samples (RSS, file
//! descriptors, queued bytes). One file per scenario and chart.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

const PERCENTILES: [(&str, &str); 5] = [
    ("p50", "p50_ms"),
    ("p90", "p90_ms"),
    ("p99", "p99_ms"),
    ("p99.9", "p999_ms"),
    ("max", "max_ms"),
];

type Series = (String, Vec<(f64, f64)>);

/// Writes every chart the results support into `dir`; returns the files written.
pub fn write_all(dir: &Path, results: &[Value]) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let mut scenarios: Vec<&str> = Vec::new();
    for v in results {
        let s = v["scenario"].as_str().unwrap_or("result");
        if !scenarios.contains(&s) {
            scenarios.push(s);
        }
    }
    for scenario in scenarios {
        let runs: Vec<&Value> = results
            .iter()
            .filter(|v| v["scenario"] == scenario)
            .collect();
        let latency: Vec<Series> = runs
            .iter()
            .filter(|v| v["latency"]["count"].as_u64().unwrap_or(0) > 0)
            .map(|v| {
                let points = PERCENTILES
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, key))| Some((i as f64, v["latency"][key].as_f64()?)))
                    .collect();
                (label(v), points)
            })
            .collect();
        if !latency.is_empty() && scenario != "storm" {
            let file = format!("{scenario}-latency.svg");
            latency_chart(&dir.join(&file), scenario, &latency)?;
            written.push(file);
        }
        let timelines: Vec<Series> = runs
            .iter()
            .filter_map(|v| {
                let bucket = v["timeline"]["bucket_ms"].as_f64()? / 1000.0;
                let points = v["timeline"]["deliveries"]
                    .as_array()?
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (i as f64 * bucket, n.as_f64().unwrap_or(0.0) / bucket))
                    .collect::<Vec<_>>();
                (!points.is_empty()).then(|| (label(v), points))
            })
            .collect();
        if !timelines.is_empty() {
            let file = format!("{scenario}-deliveries.svg");
            let title = format!("{scenario}: deliveries per second");
            line_chart(
                &dir.join(&file),
                &title,
                "seconds since the first publish",
                "deliveries/s",
                &timelines,
            )?;
            written.push(file);
        }
        let curves: Vec<Series> = runs
            .iter()
            .filter_map(|v| {
                let bucket = v["timeline"]["bucket_ms"].as_f64()?;
                let points = v["storm"]["reconnect_curve"]
                    .as_array()?
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (i as f64 * bucket, n.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>();
                (!points.is_empty()).then(|| (label(v), points))
            })
            .collect();
        if !curves.is_empty() {
            let file = format!("{scenario}-reconnects.svg");
            let y = "reconnects per 100 ms";
            line_chart(
                &dir.join(&file),
                "storm: reconnects after the kill",
                "ms since the kill",
                y,
                &curves,
            )?;
            written.push(file);
        }
        for v in runs.iter().filter(|v| v["samples"].is_array()) {
            let file = format!("{scenario}-resources.svg");
            resources_chart(&dir.join(&file), v)?;
            written.push(file);
        }
    }
    Ok(written)
}

/// Three stacked panels over time: RSS (MiB), open file descriptors, queued bytes (KiB).
fn resources_chart(path: &Path, v: &Value) -> Result<(), String> {
    let samples = v["samples"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let series = |key: &str, scale: f64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| Some((s["t_s"].as_f64()?, s[key].as_f64()? / scale)))
            .collect()
    };
    let root = SVGBackend::new(path, (800, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((3, 1));
    let name = label(v);
    let rows = [
        ("RSS", "MiB", series("rss_bytes", 1024.0 * 1024.0)),
        ("open file descriptors", "fds", series("fds", 1.0)),
        (
            "gateway_queued_bytes",
            "KiB",
            series("queued_bytes", 1024.0),
        ),
    ];
    for (area, (title, unit, points)) in panels.iter().zip(rows) {
        let title = format!(
            "{}: {title} over time ({name})",
            v["scenario"].as_str().unwrap_or("")
        );
        line_chart_on(area, &title, "seconds", unit, &[(name.clone(), points)])?;
    }
    root.present().map_err(err)
}

fn label(v: &Value) -> String {
    let mut l = crate::report::label(v);
    if let Some(signal) = v["storm"]["signal"].as_str() {
        l.push_str(&format!(" {signal}"));
    }
    l
}

fn err(e: impl std::fmt::Display) -> String {
    format!("chart: {e}")
}

fn latency_chart(path: &Path, scenario: &str, series: &[Series]) -> Result<(), String> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.01f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: publish→deliver latency"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.2f64..4.2f64, (0.01f64..max * 2.0).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            PERCENTILES
                .get(i)
                .map(|p| p.0.to_string())
                .unwrap_or_default()
        })
        .y_desc("ms (log scale)")
        .draw()
        .map_err(err)?;
    draw_series(&mut chart, series)?;
    root.present().map_err(err)
}

fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), String> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    line_chart_on(&root, title, x_desc, y_desc, series)?;
    root.present().map_err(err)
}

fn line_chart_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), String> {
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(1.0f64, f64::max);
    let y_max = points().map(|p| p.1).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.02, 0f64..y_max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    draw_series(&mut chart, series)
}

fn draw_series<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[Series],
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn charts_are_written_for_what_the_results_hold() {
        let dir = std::env::temp_dir().join(format!("loadtest-charts-{}", std::process::id()));
        let results = vec![
            json!({"scenario": "fanout", "system": "gateway",
                   "latency": {"count": 10, "p50_ms": 0.5, "p90_ms": 0.9, "p99_ms": 2.0, "p999_ms": 3.0, "max_ms": 9.0},
                   "timeline": {"bucket_ms": 500, "deliveries": [0, 100, 120, 90]}}),
            json!({"scenario": "storm", "system": "gateway", "storm": {"signal": "kill", "reconnect_curve": [0, 5, 9, 2]},
                   "latency": {"count": 0}, "timeline": {"bucket_ms": 100, "deliveries": [3, 4]}}),
            json!({"scenario": "soak", "system": "gateway",
                   "samples": [{"t_s": 0.0, "rss_bytes": 1048576, "fds": 10, "queued_bytes": 0},
                               {"t_s": 10.0, "rss_bytes": 2097152, "fds": 12, "queued_bytes": 2048}]}),
        ];
        let files = write_all(&dir, &results).unwrap();
        assert_eq!(
            files,
            [
                "fanout-latency.svg",
                "fanout-deliveries.svg",
                "storm-deliveries.svg",
                "storm-reconnects.svg",
                "soak-resources.svg"
            ]
        );
        let svg = std::fs::read_to_string(dir.join("storm-reconnects.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("gateway kill"),
            "{svg:.300}"
        );
        let svg = std::fs::read_to_string(dir.join("soak-resources.svg")).unwrap();
        assert!(svg.contains("open file descriptors"), "{svg:.300}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
