//! Cross-cutting HTTP concerns: request ids (`x-request-id`, kept when the client sends a sane
//! one), one access-log line per request, Prometheus metrics, `/healthz`, `/readyz`,
//! `/metrics`, the request-body deadline and size limit, and the JSON 404 for unknown paths.
//!
//! Metric labels only take values from fixed sets, whatever a client sends: the route is the
//! matched route template or `unmatched`, the method one of the standard methods or `other`,
//! the status a valid HTTP status code or `other`.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
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
        .with_label_values(&[route.as_str(), method_label(&method), status_label(&status)])
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

/// The deadline and size limit of [`read_body`] (`server` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// Why a request body was not read.
enum BodyFailure {
    TooLarge,
    Broken,
}

/// Reads the whole request body before the handler runs, so no handler (nor a handler that
/// ignores the body) can be held by a slow client: the body must arrive within
/// `limits.timeout` of the request header (else 408 `request_timeout`) and hold at most
/// `limits.max_bytes` (else 413 `request_too_large`, checked on `Content-Length` first). Both
/// answers close the connection, whose unread rest cannot be trusted. Admin API bodies are
/// small JSON or form documents, so holding one in memory costs what the extractors would.
pub async fn read_body(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    use axum::body::HttpBody;
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return too_large(limits.max_bytes);
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| BodyFailure::Broken)?;
            if buf.len() + chunk.len() > limits.max_bytes {
                return Err(BodyFailure::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(buf)) => next.run(Request::from_parts(parts, Body::from(buf))).await,
        Ok(Err(BodyFailure::TooLarge)) => too_large(limits.max_bytes),
        Ok(Err(BodyFailure::Broken)) => refusal(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "The request body could not be read.".into(),
        ),
        Err(_) => refusal(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "Timed out while reading the request body (the limit is {} ms).",
                limits.timeout.as_millis()
            ),
        ),
    }
}

fn too_large(max: usize) -> Response {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("The request body is larger than the maximum of {max} bytes."),
    )
}

/// An error in the OpenAI shape (as [`AppError`] writes them) that also closes the connection.
fn refusal(status: StatusCode, code: &'static str, message: String) -> Response {
    let body = serde_json::json!({ "error": {
        "message": message, "type": "invalid_request_error", "param": null, "code": code,
    }});
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
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
