//! The node's Prometheus metrics. Labels are bounded sets (transport, result, reason): never a
//! channel name or a user.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
        for transport in ["ws", "sse"] {
            connections.with_label_values(&[transport]);
            deliveries.with_label_values(&[transport]);
        }
        resumes.with_label_values(&["recovered", "none"]);
        let families: [Box<dyn prometheus::core::Collector>; 8] = [
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
        }
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
