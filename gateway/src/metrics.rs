//! The gateway's Prometheus metrics, in a registry of their own (served on the ops listener).
//!
//! Label values are bounded: the `model` label is a routed model name or `unknown`, never a
//! string a client made up; endpoints are labelled by their configured base URL.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: fine below a millisecond (gateway overhead), coarse up to
/// minutes (long generations).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    pub registry: Registry,
    /// Requests by routed model and final status.
    pub requests: IntCounterVec,
    /// Time from request received to response finished, by model.
    pub request_duration: HistogramVec,
    /// Time the gateway itself added before the upstream got the request.
    pub gateway_overhead: Histogram,
    /// Time from upstream request sent to upstream response header, by upstream.
    pub upstream_latency: HistogramVec,
    /// Authentication failures by reason (missing, malformed, not_found, disabled, expired).
    pub auth_failures: IntCounterVec,
    /// Upstream connect/exchange failures by upstream, endpoint and kind.
    pub upstream_errors: IntCounterVec,
    /// 1 when an endpoint is taking traffic, 0 while it is skipped after failures.
    pub endpoint_healthy: IntGaugeVec,
    pub in_flight: IntGauge,
    pub keys_loaded: IntGauge,
    /// Configuration reloads by result (ok, error).
    pub config_reloads: IntCounterVec,
    /// Usage records whose tokens are the gateway's estimate.
    pub usage_estimated: prometheus::IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("aihub".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let endpoint_healthy = IntGaugeVec::new(
            Opts::new(
                "upstream_endpoint_healthy",
                "1 when the endpoint takes traffic, 0 while skipped after failures",
            ),
            &["upstream", "endpoint"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(endpoint_healthy.clone()))
            .expect("unique metric");
        Metrics {
            requests: counter(
                "requests_total",
                "Requests by routed model and status",
                &["model", "status"],
            ),
            request_duration: histogram(
                "request_duration_seconds",
                "Request duration, first byte in to last byte out",
                &["model"],
            ),
            gateway_overhead: {
                let opts = HistogramOpts::new(
                    "gateway_overhead_seconds",
                    "Time the gateway added before the upstream got the request",
                )
                .buckets(BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            upstream_latency: histogram(
                "upstream_latency_seconds",
                "Upstream request sent to response header received",
                &["upstream"],
            ),
            auth_failures: counter(
                "auth_failures_total",
                "Authentication failures by reason",
                &["reason"],
            ),
            upstream_errors: counter(
                "upstream_errors_total",
                "Upstream failures by upstream, endpoint and kind",
                &["upstream", "endpoint", "kind"],
            ),
            endpoint_healthy,
            in_flight: gauge("in_flight_requests", "Requests being processed"),
            keys_loaded: gauge("keys_loaded", "API keys held in memory"),
            config_reloads: counter(
                "config_reloads_total",
                "Configuration reloads by result",
                &["result"],
            ),
            usage_estimated: {
                let c = prometheus::IntCounter::new(
                    "usage_estimated_total",
                    "Usage records with estimated tokens (no upstream usage, or client left mid-stream)",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
