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
    /// Open WebSockets by the HTTP version of their opening handshake.
    pub websockets: IntGaugeVec,
    pub subscriptions: IntGauge,
    pub channels: IntGauge,
    pub publications: IntCounter,
    pub deliveries: IntCounterVec,
    pub slow_consumer_disconnects: IntCounter,
    pub conflated_publications: IntCounter,
    pub express_handovers: IntCounter,
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
    presence_reaped: IntCounter,
    /// Presence entries this node's connections hold (a connection in N presence channels
    /// counts N times).
    pub(crate) presence_members: IntGauge,
    backplane_errors: IntCounter,
    pubsub_subscriptions: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Creates metric families and registers each as it is made, so a family is named once.
struct Families {
    registry: Registry,
}

impl Families {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, family: C) -> C {
        self.registry
            .register(Box::new(family.clone()))
            .expect("metric names are unique");
        family
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid metric"))
    }

    /// A gauge family with one label, its series for `values` shown at 0 from the start.
    fn gauge_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
        let family = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        for value in values {
            family.with_label_values(&[value]);
        }
        self.register(family)
    }

    /// A counter family, its series for `series` (label values) shown at 0 from the start.
    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: &[&[&str]],
    ) -> IntCounterVec {
        let family = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        for values in series {
            family.with_label_values(values);
        }
        self.register(family)
    }

    fn histogram_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let family = HistogramVec::new(opts, &[label]).expect("valid metric");
        for value in values {
            family.with_label_values(&[value]);
        }
        self.register(family)
    }
}

/// Seconds, for fan-out latency and backplane command durations.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The streaming transports, shown at 0 before their first connection.
const TRANSPORTS: [&str; 3] = ["ws", "sse", "poll"];

/// Single-label series for `counter_vec`.
fn each<'a>(values: &'a [&'a str]) -> Vec<&'a [&'a str]> {
    values.iter().map(std::slice::from_ref).collect()
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let families = Families {
            registry: Registry::new(),
        };
        let f = &families;
        let process = prometheus::process_collector::ProcessCollector::for_self();
        f.registry
            .register(Box::new(process))
            .expect("metric names are unique");
        let limits = each(&[
            "max_connections",
            "max_connections_per_user",
            "connection_rate_per_ip",
            "command_rate",
            "max_subscriptions",
            "message_size",
            "idle_timeout",
            "handshake_timeout",
        ]);
        let auth_reasons = each(&[
            "invalid",
            "expired",
            "not_configured",
            "unauthorized",
            "forbidden",
            "origin",
            "api_key",
            "user_mismatch",
        ]);
        let poll_outcomes = each(&["data", "positions", "timeout", "drained", "rejected"]);
        Metrics {
            connections: f.gauge_vec(
                "gateway_connections",
                "Open client connections by transport.",
                "transport",
                &TRANSPORTS,
            ),
            websockets: f.gauge_vec(
                "gateway_websocket_connections",
                "Open WebSockets (/ws and /ws/echo) by the HTTP version they were opened over: 1.1 (Upgrade) or 2 (extended CONNECT, RFC 8441).",
                "http_version",
                &["1.1", "2"],
            ),
            subscriptions: f.gauge(
                "gateway_subscriptions",
                "Channel subscriptions of connected clients.",
            ),
            channels: f.gauge(
                "gateway_channels",
                "Channels with at least one subscriber on this node.",
            ),
            publications: f.counter(
                "gateway_publications_total",
                "Publications accepted by this node (API and client publish).",
            ),
            deliveries: f.counter_vec(
                "gateway_deliveries_total",
                "Publications written to client connections, by transport.",
                &["transport"],
                &each(&TRANSPORTS),
            ),
            slow_consumer_disconnects: f.counter(
                "gateway_slow_consumer_disconnects_total",
                "Connections cut off because their outbound queue overflowed.",
            ),
            conflated_publications: f.counter(
                "gateway_conflated_publications_total",
                "Publications a slow consumer's queue dropped for a newer one of the same \
                 channel (namespaces with slow_consumer = conflate).",
            ),
            express_handovers: f.counter(
                "gateway_express_handovers_total",
                "Times a WebSocket connection handed its socket to the fan-out, which then \
                 writes its live publications without waking its task (express delivery).",
            ),
            resumes: f.counter_vec(
                "gateway_resumes_total",
                "Subscriptions that asked to resume from a position, by outcome.",
                &["result", "reason"],
                &[&["recovered", "none"]],
            ),
            protocol_errors: f.counter_vec(
                "gateway_protocol_errors_total",
                "Client input rejected, by error code.",
                &["code"],
                &[],
            ),
            catching_up: f.gauge(
                "gateway_catching_up_subscriptions",
                "Subscriptions reading history to catch up (resume or gap fill).",
            ),
            history_pages: f.counter(
                "gateway_history_pages_total",
                "History pages read for client catch-up (resume and gap fill).",
            ),
            fanout_latency: f.histogram_vec(
                "gateway_fanout_latency_seconds",
                "Publish accepted to written to the client socket, live deliveries (the oldest publication of each written batch).",
                "transport",
                &TRANSPORTS,
            ),
            backplane_duration: f.histogram_vec(
                "gateway_backplane_command_duration_seconds",
                "Duration of backplane operations, by operation.",
                "op",
                &["publish", "history", "subscribe"],
            ),
            draining: f.gauge("gateway_draining", "1 while the node is draining, else 0."),
            drain_remaining: f.gauge(
                "gateway_drain_connections_remaining",
                "Connections a drain has still to close.",
            ),
            drain_closed: f.counter(
                "gateway_drain_closed_total",
                "Connections closed by draining.",
            ),
            limit_rejections: f.counter_vec(
                "gateway_limit_rejections_total",
                "Connections, requests and commands refused by a limit, by limit.",
                &["limit"],
                &limits,
            ),
            auth_failures: f.counter_vec(
                "gateway_auth_failures_total",
                "Refused credentials and permissions, by reason.",
                &["reason"],
                &auth_reasons,
            ),
            tls_reloads: f.counter_vec(
                "gateway_tls_reloads_total",
                "Certificate reloads after the files changed, by result.",
                &["result"],
                &[],
            ),
            poll_responses: f.counter_vec(
                "gateway_poll_responses_total",
                "Long-poll answers, by outcome (data, positions, timeout, drained, rejected).",
                &["outcome"],
                &poll_outcomes,
            ),
            queued_bytes: f.gauge(
                "gateway_queued_bytes",
                "Bytes waiting in all connections' outbound queues.",
            ),
            queued_bytes_max: f.gauge(
                "gateway_queued_bytes_max",
                "Bytes waiting in the fullest connection's outbound queue.",
            ),
            pubsub_healthy: f.gauge(
                "gateway_backplane_pubsub_healthy",
                "1 while live delivery from the backplane works end to end, else 0.",
            ),
            pubsub_reconnects: f.counter(
                "gateway_backplane_pubsub_reconnects_total",
                "Times the backplane's pub/sub link was lost and re-established.",
            ),
            gap_fills: f.counter(
                "gateway_backplane_gap_fills_total",
                "Gaps in live delivery filled from history.",
            ),
            presence_reaped: f.counter(
                "gateway_presence_reaped_total",
                "Presence members of dead nodes (killed, cut off) this node removed, each leave announced once.",
            ),
            presence_members: f.gauge(
                "gateway_presence_members",
                "Presence entries held by this node's connections (one per connection and presence channel).",
            ),
            backplane_errors: f.counter(
                "gateway_backplane_errors_total",
                "Backplane commands that failed.",
            ),
            pubsub_subscriptions: f.gauge(
                "gateway_backplane_pubsub_subscriptions",
                "Channels the node is subscribed to at the backplane: with local subscribers or lingering.",
            ),
            registry: families.registry,
        }
    }

    /// Copies values kept elsewhere (backplane counters, queue sizes) into the families.
    pub(crate) fn observe(&self, stats: backplane::Stats, queued: usize, largest: usize) {
        self.pubsub_healthy.set(i64::from(stats.pubsub_healthy));
        for (counter, value) in [
            (&self.pubsub_reconnects, stats.pubsub_reconnects),
            (&self.gap_fills, stats.gap_fills),
            (&self.presence_reaped, stats.presence_reaped),
            (&self.backplane_errors, stats.errors),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        self.pubsub_subscriptions
            .set(stats.pubsub_subscriptions.try_into().unwrap_or(i64::MAX));
        self.queued_bytes.set(queued as i64);
        self.queued_bytes_max.set(largest as i64);
    }

    /// The text exposition format served on `/metrics`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// Records a written batch's fan-out latency: from the publication of its oldest live item
/// (`0`: the batch held none) until now.
pub(crate) fn observe_fanout(histogram: &prometheus::Histogram, oldest_published_us: u64) {
    if oldest_published_us == 0 {
        return;
    }
    observe_fanout_at(histogram, oldest_published_us, backplane::now_us());
}

/// [`observe_fanout`] with the time of writing read once by the caller, for a round of writes.
pub(crate) fn observe_fanout_at(histogram: &prometheus::Histogram, oldest_us: u64, now_us: u64) {
    if oldest_us == 0 {
        return;
    }
    histogram.observe(now_us.saturating_sub(oldest_us) as f64 / 1e6);
}
