//! The gateway's Prometheus metrics, in a registry of their own (served on the ops listener).
//!
//! Label values are bounded: the `model` label is a routed model name or `unknown`, never a
//! string a client made up; endpoints are labelled by their configured base URL.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// Authentication failures by reason (missing, malformed, not_found, disabled, expired,
    /// forbidden_ip, batch_token, batch_token_not_accepted).
    pub auth_failures: IntCounterVec,
    /// Batch items (requests with a verified batch token) by final status.
    pub batch_items: IntCounterVec,
    /// Files and Batches calls the admin API did not take, by kind (connect, timeout,
    /// exchange).
    pub admin_errors: IntCounterVec,
    /// Upstream connect/exchange failures by upstream, endpoint and kind.
    pub upstream_errors: IntCounterVec,
    /// Requests sent to an endpoint, by outcome: `answered`, `retried_status`,
    /// `retried_timeout`.
    pub upstream_attempts: IntCounterVec,
    /// Requests moved from a route to its fallback, by route, fallback and why.
    pub fallbacks: IntCounterVec,
    /// 1 when an endpoint is taking traffic, 0 while it is skipped after failures.
    pub endpoint_healthy: IntGaugeVec,
    /// Per-endpoint gauges, health checks, ejections and DNS: see [`EndpointMetrics`].
    pub endpoints: EndpointMetrics,
    pub in_flight: IntGauge,
    /// Keys held in memory, both sources.
    pub keys_loaded: IntGauge,
    /// Key sync (control plane): see [`KeySyncMetrics`].
    pub key_sync: KeySyncMetrics,
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
        let key_sync = KeySyncMetrics::new(&registry);
        let endpoints = EndpointMetrics::new(&registry);
        Metrics {
            endpoints,
            key_sync,
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
            batch_items: counter(
                "batch_item_requests_total",
                "Batch items (requests with a verified batch token) by final status",
                &["status"],
            ),
            admin_errors: counter(
                "admin_forward_errors_total",
                "Files and Batches calls the admin API did not take, by kind",
                &["kind"],
            ),
            upstream_errors: counter(
                "upstream_errors_total",
                "Upstream failures by upstream, endpoint and kind",
                &["upstream", "endpoint", "kind"],
            ),
            upstream_attempts: counter(
                "upstream_attempts_total",
                "Requests sent upstream by upstream, endpoint and outcome (answered, retried_status, retried_timeout)",
                &["upstream", "endpoint", "result"],
            ),
            fallbacks: counter(
                "fallbacks_total",
                "Requests moved from a route to its next fallback, by route model, fallback model and why",
                &["from", "to", "why"],
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

/// Per-endpoint metrics (labels `upstream`, `endpoint`): live gauges set at scrape time, and
/// what [`crate::upkeep`] and passive health did.
#[derive(Clone)]
pub struct EndpointMetrics {
    /// Requests in flight to the endpoint from this node.
    pub in_flight: IntGaugeVec,
    /// Moving average of the time to the response header, seconds.
    pub latency: prometheus::GaugeVec,
    /// Addresses the endpoint's host resolves to.
    pub addresses: IntGaugeVec,
    /// Active health checks by result (`pass`, `fail`).
    pub checks: IntCounterVec,
    /// Times the endpoint was taken out of rotation, by reason (`passive`: failures of real
    /// requests; `active`: failed checks).
    pub ejections: IntCounterVec,
    /// Host-name resolutions by result (`changed`, `unchanged`, `failed`).
    pub resolutions: IntCounterVec,
}

impl EndpointMetrics {
    fn new(registry: &Registry) -> EndpointMetrics {
        const LABELS: &[&str] = &["upstream", "endpoint"];
        fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        }
        let int_gauge = |name: &str, help: &str| {
            register(
                registry,
                IntGaugeVec::new(Opts::new(name, help), LABELS).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str, extra: &str| {
            register(
                registry,
                IntCounterVec::new(Opts::new(name, help), &["upstream", "endpoint", extra])
                    .expect("valid metric"),
            )
        };
        EndpointMetrics {
            in_flight: int_gauge(
                "upstream_endpoint_in_flight",
                "Requests in flight to the endpoint from this node",
            ),
            latency: register(
                registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "upstream_endpoint_latency_seconds",
                        "Moving average of the time to the response header",
                    ),
                    LABELS,
                )
                .expect("valid metric"),
            ),
            addresses: int_gauge(
                "upstream_endpoint_addresses",
                "Addresses the endpoint's host name resolves to",
            ),
            checks: counter(
                "upstream_health_checks_total",
                "Active health checks by result (pass, fail)",
                "result",
            ),
            ejections: counter(
                "upstream_ejections_total",
                "Endpoints taken out of rotation, by reason (passive, active)",
                "reason",
            ),
            resolutions: counter(
                "upstream_dns_resolutions_total",
                "Host-name resolutions by result (changed, unchanged, failed)",
                "result",
            ),
        }
    }
}

/// Metrics of the control-plane key sync ([`crate::keysync`]).
#[derive(Clone)]
pub struct KeySyncMetrics {
    /// Keys held from the control plane.
    pub keys: IntGauge,
    /// Change-feed reads (initial load pages included) that succeeded.
    pub polls: IntCounter,
    /// Feed rows applied (a key created, changed or revoked).
    pub changes: IntCounter,
    /// Failed database reads (unreachable, missing tables, timeouts).
    pub errors: IntCounter,
    /// 1 while the last database read succeeded, else 0.
    pub up: IntGauge,
    /// Unix seconds of the last successful read (0 before the first).
    pub last_success: IntGauge,
    /// Seconds the initial load took (0 until it completed).
    pub initial_load_seconds: Gauge,
    /// 1 while the Redis change subscription is live (0 without Redis).
    pub push_connected: IntGauge,
    /// Last-used write-backs by result (ok, error).
    pub last_used_flushes: IntCounterVec,
}

/// Rate limits and quotas; registered only with a `limits` section (the Redis ones only with
/// `limits.redis`), so their absence says the feature is off.
#[derive(Clone)]
pub struct LimitMetrics {
    /// Requests refused with 429, by reason (concurrency, requests, tokens, quota, spend_cap).
    pub rate_limited: IntCounterVec,
    /// 1 while limits are decided in Redis; 0 while this node decides alone (before the first
    /// connection, during an outage).
    pub redis_up: IntGauge,
    /// Failed or timed-out Redis calls.
    pub redis_errors: IntCounter,
    /// Time of a Redis admission round trip.
    pub redis_latency: Histogram,
    /// Gateway nodes sharing the limits (node registry; last known value).
    pub nodes: IntGauge,
    /// Local bucket entries held (keys and developers with recent traffic).
    pub entries: IntGauge,
    /// 1 once this period's usage was read from ClickHouse.
    pub quota_seeded: IntGauge,
    /// Usage alerts by result (recorded, duplicate, logged, dropped).
    pub usage_alerts: IntCounterVec,
}

impl LimitMetrics {
    pub fn new(registry: &Registry, redis: bool) -> Self {
        let register = |m: Box<dyn prometheus::core::Collector>, on: bool| {
            if on {
                registry.register(m).expect("unique metric");
            }
        };
        let gauge = |n: &str, h: &str, on: bool| {
            let g = IntGauge::new(n, h).expect("valid metric");
            register(Box::new(g.clone()), on);
            g
        };
        let vec = |n: &str, h: &str, l: &[&str]| {
            let c = IntCounterVec::new(Opts::new(n, h), l).expect("valid metric");
            register(Box::new(c.clone()), true);
            c
        };
        let redis_errors = IntCounter::new(
            "limits_redis_errors_total",
            "Failed or timed-out Redis limit calls",
        )
        .expect("valid metric");
        register(Box::new(redis_errors.clone()), redis);
        let redis_latency = Histogram::with_opts(
            HistogramOpts::new("limits_redis_seconds", "Redis admission round trip")
                .buckets(BUCKETS.to_vec()),
        )
        .expect("valid metric");
        register(Box::new(redis_latency.clone()), redis);
        LimitMetrics {
            rate_limited: vec(
                "rate_limited_total",
                "Requests refused by a limit or quota, by reason",
                &["reason"],
            ),
            redis_up: gauge(
                "limits_redis_up",
                "1 while limits are decided in Redis, 0 while this node decides alone",
                redis,
            ),
            redis_errors,
            redis_latency,
            nodes: gauge("limits_nodes", "Gateway nodes sharing the limits", redis),
            entries: gauge("limits_local_entries", "Local limiter entries held", true),
            quota_seeded: gauge(
                "limits_quota_seeded",
                "1 once this period's usage was read from ClickHouse",
                true,
            ),
            usage_alerts: vec("usage_alerts_total", "Usage alerts by result", &["result"]),
        }
    }
}

impl KeySyncMetrics {
    fn new(registry: &Registry) -> Self {
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let gauge = |n: &str, h: &str| reg(registry, IntGauge::new(n, h).expect("valid metric"));
        let counter =
            |n: &str, h: &str| reg(registry, IntCounter::new(n, h).expect("valid metric"));
        KeySyncMetrics {
            keys: gauge("key_sync_keys", "API keys held from the control plane"),
            polls: counter(
                "key_sync_polls_total",
                "Successful reads of the control-plane key change feed",
            ),
            changes: counter(
                "key_sync_changes_total",
                "Key changes applied from the control-plane feed",
            ),
            errors: counter(
                "key_sync_errors_total",
                "Failed reads of the control-plane database",
            ),
            up: gauge(
                "key_sync_up",
                "1 when the last read of the control-plane database succeeded",
            ),
            last_success: gauge(
                "key_sync_last_success_timestamp_seconds",
                "Unix time of the last successful key sync",
            ),
            initial_load_seconds: reg(
                registry,
                Gauge::new(
                    "key_sync_initial_load_seconds",
                    "Duration of the initial key load from the control plane",
                )
                .expect("valid metric"),
            ),
            push_connected: gauge(
                "key_sync_push_connected",
                "1 while the Redis key-change subscription is live",
            ),
            last_used_flushes: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "key_last_used_flushes_total",
                        "Last-used write-backs to the control plane by result",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
