//! Cross-cutting HTTP concerns: request ids (`x-request-id`, kept when the client sends a sane
//! one), one access-log line and metrics ([`crate::metrics`]) per request, `/healthz`,
//! `/readyz`, `/metrics`, the request-body deadline and size limit, and the JSON 404 for unknown
//! paths.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use prometheus::{Encoder, TextEncoder};

use crate::error::AppError;
use crate::state::AppState;

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
    if !method.is_safe() {
        // The request may have written events: deliver them now, not at the next poll.
        state.wake_webhooks();
    }
    let elapsed = start.elapsed();
    let status = resp.status();
    resp.headers_mut().insert("x-request-id", id.clone());
    state.metrics.request(&route, &method, status, elapsed);
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
    // File uploads stream into the file store under their own size limit and deadline.
    let upload =
        parts.method == axum::http::Method::POST && parts.uri.path() == crate::batches::UPLOAD_PATH;
    if body.is_end_stream() || upload {
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
