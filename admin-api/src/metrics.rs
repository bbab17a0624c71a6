//! The admin API's Prometheus metrics, in their own registry. Labels only take values from
//! fixed sets, whatever a client sends: the route is the matched route template or `unmatched`,
//! the method one of the standard methods or `other`, the status a valid HTTP status code or
//! `other`, account events fixed names.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The admin API's metrics, in its own registry.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Account events by kind (`registered`, `verified`, `login_ok`, `login_failed`, …).
    pub events: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "aihub_admin_requests_total",
                "Admin API requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "aihub_admin_request_duration_seconds",
                "Admin API request duration",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route"],
        )
        .expect("metric");
        let events = IntCounterVec::new(
            Opts::new(
                "aihub_admin_account_events_total",
                "Account and key events by kind",
            ),
            &["event"],
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(events.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            requests,
            duration,
            events,
        }
    }

    /// Counts an account event; `kind` is a fixed name, never client input.
    pub fn event(&self, kind: &'static str) {
        self.events.with_label_values(&[kind]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Counts one finished request.
    pub fn request(&self, route: &str, method: &Method, status: StatusCode, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, method_label(method), status_label(&status)])
            .inc();
        self.duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }
}

/// The `method` label: a standard method, else `other` (a client may send any token as its
/// method; each distinct value would be a new series, kept forever).
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The `status` label: a valid status code (100 to 599), else `other`.
pub fn status_label(s: &StatusCode) -> &str {
    if (100..600).contains(&s.as_u16()) {
        // `StatusCode::as_str` is a static table of the codes' decimal strings.
        s.as_str()
    } else {
        "other"
    }
}
