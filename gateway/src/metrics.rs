//! The node's Prometheus metrics. Labels are bounded sets (transport, result, reason): never a
//! channel name or a user.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Handles to every metric family; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub subscriptions: IntGauge,
    pub channels: IntGauge,
    pub publications: IntCounter,
    pub deliveries: IntCounterVec,
    pub slow_consumer_disconnects: IntCounter,
    pub resumes: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub catching_up: IntGauge,
    pub history_pages: IntCounter,
    pub fanout_latency: HistogramVec,
    pub backplane_duration: HistogramVec,
    pub draining: IntGauge,
    pub drain_remaining: IntGauge,
    pub drain_closed: IntCounter,
    pub limit_rejections: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub poll_responses: IntCounterVec,
    queued_bytes: IntGauge,
    queued_bytes_max: IntGauge,
    pubsub_healthy: IntGauge,
    pubsub_reconnects: IntCounter,
    gap_fills: IntCounter,
    backplane_errors: IntCounter,
    pubsub_subscriptions: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new(
                "gateway_connections",
                "Open client connections by transport.",
            ),
            &["transport"],
        )
        .unwrap();
        let subscriptions = IntGauge::new(
            "gateway_subscriptions",
            "Channel subscriptions of connected clients.",
        )
        .unwrap();
        let channels = IntGauge::new(
            "gateway_channels",
            "Channels with at least one subscriber on this node.",
        )
        .unwrap();
        let publications = IntCounter::new(
            "gateway_publications_total",
            "Publications accepted by this node (API and client publish).",
        )
        .unwrap();
        let deliveries = IntCounterVec::new(
            Opts::new(
                "gateway_deliveries_total",
                "Publications written to client connections, by transport.",
            ),
            &["transport"],
        )
        .unwrap();
        let slow_consumer_disconnects = IntCounter::new(
            "gateway_slow_consumer_disconnects_total",
            "Connections cut off because their outbound queue overflowed.",
        )
        .unwrap();
        let resumes = IntCounterVec::new(
            Opts::new(
                "gateway_resumes_total",
                "Subscriptions that asked to resume from a position, by outcome.",
            ),
            &["result", "reason"],
        )
        .unwrap();
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "gateway_protocol_errors_total",
                "Client input rejected, by error code.",
            ),
            &["code"],
        )
        .unwrap();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).unwrap();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).unwrap();
        let catching_up = gauge(
            "gateway_catching_up_subscriptions",
            "Subscriptions reading history to catch up (resume or gap fill).",
        );
        let queued_bytes = gauge(
            "gateway_queued_bytes",
            "Bytes waiting in all connections' outbound queues.",
        );
        let queued_bytes_max = gauge(
            "gateway_queued_bytes_max",
            "Bytes waiting in the fullest connection's outbound queue.",
        );
        let pubsub_healthy = gauge(
            "gateway_backplane_pubsub_healthy",
            "1 while live delivery from the backplane works end to end, else 0.",
        );
        let pubsub_reconnects = counter(
            "gateway_backplane_pubsub_reconnects_total",
            "Times the backplane's pub/sub link was lost and re-established.",
        );
        let gap_fills = counter(
            "gateway_backplane_gap_fills_total",
            "Gaps in live delivery filled from history.",
        );
        let backplane_errors = counter(
            "gateway_backplane_errors_total",
            "Backplane commands that failed.",
        );
        let pubsub_subscriptions = gauge(
            "gateway_backplane_pubsub_subscriptions",
            "Channels the node is subscribed to at the backplane: with local subscribers or lingering.",
        );
        let history_pages = counter(
            "gateway_history_pages_total",
            "History pages read for client catch-up (resume and gap fill).",
        );
        let draining = gauge("gateway_draining", "1 while the node is draining, else 0.");
        let drain_remaining = gauge(
            "gateway_drain_connections_remaining",
            "Connections a drain has still to close.",
        );
        let drain_closed = counter(
            "gateway_drain_closed_total",
            "Connections closed by draining.",
        );
        let limit_rejections = IntCounterVec::new(
            Opts::new(
                "gateway_limit_rejections_total",
                "Connections, requests and commands refused by a limit, by limit.",
            ),
            &["limit"],
        )
        .unwrap();
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "gateway_auth_failures_total",
                "Refused credentials and permissions, by reason.",
            ),
            &["reason"],
        )
        .unwrap();
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "gateway_tls_reloads_total",
                "Certificate reloads after the files changed, by result.",
            ),
            &["result"],
        )
        .unwrap();
        for limit in [
            "max_connections",
            "max_connections_per_user",
            "connection_rate_per_ip",
            "command_rate",
            "max_subscriptions",
            "message_size",
            "idle_timeout",
            "handshake_timeout",
        ] {
            limit_rejections.with_label_values(&[limit]);
        }
        for reason in [
            "invalid",
            "expired",
            "not_configured",
            "unauthorized",
            "forbidden",
            "origin",
            "api_key",
            "user_mismatch",
        ] {
            auth_failures.with_label_values(&[reason]);
        }
        let poll_responses = IntCounterVec::new(
            Opts::new(
                "gateway_poll_responses_total",
                "Long-poll answers, by outcome (data, positions, timeout, drained, rejected).",
            ),
            &["outcome"],
        )
        .unwrap();
        for outcome in ["data", "positions", "timeout", "drained", "rejected"] {
            poll_responses.with_label_values(&[outcome]);
        }
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ];
        let fanout_latency = HistogramVec::new(
            HistogramOpts::new(
                "gateway_fanout_latency_seconds",
                "Publish accepted to written to the client socket, live deliveries (the oldest publication of each written batch).",
            )
            .buckets(latency_buckets.clone()),
            &["transport"],
        )
        .unwrap();
        let backplane_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_backplane_command_duration_seconds",
                "Duration of backplane operations, by operation.",
            )
            .buckets(latency_buckets),
            &["op"],
        )
        .unwrap();
        for op in ["publish", "history", "subscribe"] {
            backplane_duration.with_label_values(&[op]);
        }
        for transport in ["ws", "sse", "poll"] {
            fanout_latency.with_label_values(&[transport]);
            connections.with_label_values(&[transport]);
            deliveries.with_label_values(&[transport]);
        }
        resumes.with_label_values(&["recovered", "none"]);
        let families: [Box<dyn prometheus::core::Collector>; 27] = [
            Box::new(limit_rejections.clone()),
            Box::new(auth_failures.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(poll_responses.clone()),
            Box::new(history_pages.clone()),
            Box::new(fanout_latency.clone()),
            Box::new(backplane_duration.clone()),
            Box::new(draining.clone()),
            Box::new(drain_remaining.clone()),
            Box::new(drain_closed.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
            Box::new(catching_up.clone()),
            Box::new(queued_bytes.clone()),
            Box::new(queued_bytes_max.clone()),
            Box::new(pubsub_healthy.clone()),
            Box::new(pubsub_reconnects.clone()),
            Box::new(gap_fills.clone()),
            Box::new(backplane_errors.clone()),
            Box::new(pubsub_subscriptions.clone()),
            Box::new(connections.clone()),
            Box::new(subscriptions.clone()),
            Box::new(channels.clone()),
            Box::new(publications.clone()),
            Box::new(deliveries.clone()),
            Box::new(slow_consumer_disconnects.clone()),
            Box::new(resumes.clone()),
            Box::new(protocol_errors.clone()),
        ];
        for family in families {
            registry.register(family).expect("metric names are unique");
        }
        Metrics {
            registry,
            connections,
            subscriptions,
            channels,
            publications,
            deliveries,
            slow_consumer_disconnects,
            resumes,
            protocol_errors,
            catching_up,
            history_pages,
            fanout_latency,
            backplane_duration,
            draining,
            drain_remaining,
            drain_closed,
            limit_rejections,
            auth_failures,
            tls_reloads,
            poll_responses,
            queued_bytes,
            queued_bytes_max,
            pubsub_healthy,
            pubsub_reconnects,
            gap_fills,
            backplane_errors,
            pubsub_subscriptions,
        }
    }

    /// Copies values kept elsewhere (backplane counters, queue sizes) into the families.
    pub fn observe(&self, stats: backplane::Stats, queued: usize, largest: usize) {
        self.pubsub_healthy.set(i64::from(stats.pubsub_healthy));
        self.pubsub_subscriptions
            .set(stats.pubsub_subscriptions.try_into().unwrap_or(i64::MAX));
        for (counter, value) in [
            (&self.pubsub_reconnects, stats.pubsub_reconnects),
            (&self.gap_fills, stats.gap_fills),
            (&self.backplane_errors, stats.errors),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        self.queued_bytes.set(queued as i64);
        self.queued_bytes_max.set(largest as i64);
    }

    /// The text exposition format served on `/metrics`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// Records a written batch's fan-out latency: from the publication of its oldest live item
/// (`0`: the batch held none) until now.
pub fn observe_fanout(histogram: &prometheus::Histogram, oldest_published_us: u64) {
    if oldest_published_us == 0 {
        return;
    }
    let latency_us = backplane::now_us().saturating_sub(oldest_published_us);
    histogram.observe(latency_us as f64 / 1e6);
}
