//! Cross-cutting HTTP concerns: request ids (`x-request-id`, kept when the client sends a sane
//! one), one access-log line per request, Prometheus metrics, `/healthz`, `/readyz`,
//! `/metrics`, and the JSON 404 for unknown paths.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::error::AppError;
use crate::state::AppState;

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

    pub fn event(&self, kind: &str) {
        self.events.with_label_values(&[kind]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn request_id(req: &Request) -> HeaderValue {
    req.headers()
        .get("x-request-id")
        .filter(|v| {
            v.len() <= 128
                && v.to_str()
                    .is_ok_and(|s| s.bytes().all(|b| b.is_ascii_graphic()))
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
                .expect("uuid is a header value")
        })
}

/// Request id, access log and metrics around every request.
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request_id(&req);
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("request", id = id.to_str().unwrap_or(""));
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    let elapsed = start.elapsed();
    let status = resp.status();
    resp.headers_mut().insert("x-request-id", id.clone());
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .duration
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        target: "aihub::admin::access",
        request_id = id.to_str().unwrap_or(""),
        method = %method,
        path = %path,
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database answers.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response()
        }
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut buf = Vec::new();
    let families = state.metrics.registry.gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
        return AppError::internal(e).into_response();
    }
    ([("content-type", "text/plain; version=0.0.4")], buf).into_response()
}

pub async fn fallback(req: Request) -> AppError {
    AppError::UnknownUrl(format!("{} {}", req.method(), req.uri().path()))
}

pub async fn method_not_allowed(req: Request) -> AppError {
    AppError::MethodNotAllowed(format!("{} {}", req.method(), req.uri().path()))
}
