//! Quantiles of a Prometheus histogram between two scrapes of `/metrics` text, as the upper
//! bound of the bucket that holds them (what a scrape can say: no interpolation).

/// The `le` bound of the bucket of `series` (a bucket line's prefix, e.g.
/// `gateway_fanout_latency_seconds_bucket{transport="ws"`) holding quantile `q` of the samples
/// added between the scrapes `before` and `after`; `None` when nothing was added.
pub fn bucket_quantile(before: &str, after: &str, series: &str, q: f64) -> Option<String> {
    let buckets = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let (b, a) = (buckets(before), buckets(after));
    let total = a.last().map_or(0.0, |x| x.1) - b.last().map_or(0.0, |x| x.1);
    if total <= 0.0 {
        return None;
    }
    a.iter()
        .zip(&b)
        .find(|((_, n_after), (_, n_before))| n_after - n_before >= q * total)
        .map(|((le, _), _)| le.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantile_is_the_bound_of_its_bucket_among_the_new_samples() {
        let s = "h_bucket{le=\"0.1\"}";
        let before = format!("{s} 5\nh_bucket{{le=\"1\"}} 5\nh_bucket{{le=\"+Inf\"}} 5\n");
        let after = format!("{s} 95\nh_bucket{{le=\"1\"}} 104\nh_bucket{{le=\"+Inf\"}} 105\n");
        assert_eq!(
            bucket_quantile(&before, &after, "h_bucket", 0.5).as_deref(),
            Some("0.1")
        );
        assert_eq!(
            bucket_quantile(&before, &after, "h_bucket", 0.99).as_deref(),
            Some("1")
        );
        assert_eq!(bucket_quantile(&after, &after, "h_bucket", 0.5), None);
    }
}
