//! A mock OpenAI-compatible upstream that speaks the real wire format, for tests and load tests.
//!
//! It serves `POST /v1/chat/completions` (JSON, or SSE when `"stream": true`),
//! `POST /v1/completions`, `POST /v1/embeddings`, `POST /v1/responses` (OpenAI's Responses API,
//! JSON or typed SSE events), `POST /v1/messages` (Anthropic's Messages API, JSON or SSE, with
//! Anthropic's error shape), `POST /v1/audio/speech` (an `audio/mpeg` body, for opaque
//! responses) and `GET /v1/models`, with each API's usage objects and error bodies. Like OpenAI,
//! a chat or completion stream carries its usage **only** when the request asks for
//! `stream_options.include_usage`; the Responses and Messages APIs refuse `stream_options`, as
//! the real ones do.
//!
//! Behaviour is set per server ([`MockConfig`]) and may be overridden per request by headers
//! (which the gateway forwards): `x-mock-status` (answer with that error), `x-mock-fail-first`
//! (the first N requests the server receives fail, with `x-mock-fail-status` or the server's
//! error status), `x-mock-retry-after` (`Retry-After` seconds on injected errors),
//! `x-mock-latency-ms` (slow first byte: delay before the header), `x-mock-chunks`,
//! `x-mock-chunk-interval-ms`, `x-mock-hang` (hang: never answer),
//! `x-mock-reset-after-headers: 1` (a 200 header, then the connection aborted before any body
//! byte), `x-mock-close-after-events: N` (the first N SSE events, then the abort: no `[DONE]`,
//! no terminating chunk; a JSON answer aborts right after its header; see [`faults`]),
//! `x-mock-abort-pause-ms` (pause before such an abort, default 20; 1 sends the last bytes and
//! the break together),
//! `x-mock-usage-shape` (`choices-empty`, `empty-delta`, `on-finish`: where a stream's usage
//! goes), `x-mock-usage-null` (`0`/`1`: `"usage": null` on the other chunks),
//! `x-mock-cached-tokens` and `x-mock-cache-write-tokens` (prompt tokens reported as cached).
//! Every response carries `x-mock-request-sha256`/`x-mock-request-bytes` (what arrived),
//! `x-mock-body-sha256` (what is being sent) and `x-mock-server` (the server's name), so tests
//! can prove bodies crossed the gateway byte for byte; `openai-organization`/`openai-project`
//! (as OpenAI names the account), `x-mock-request-query` (the query string received) and
//! `x-mock-request-<name>` for each header `x-mock-echo` names, and
//! `x-mock-request-openai-organization`/`-project` echoing those request headers when they
//! arrived.
//!
//! With [`MockConfig::tls`] (`--tls-cert`/`--tls-key`, optionally `--tls-client-ca` to require
//! a client certificate) it serves HTTPS only. Control endpoints outside `/v1` change or report
//! the server at run time: `POST /__mock/fail` `{"status": 503}` (every request fails until
//! `{"status": null}` or `DELETE /__mock/fail`) and `GET /__mock/stats` (requests received, by
//! method and path); see [`control`].
//!
//! # Layout
//! - this file: the server loop, routing and error bodies;
//! - [`tls`]: the HTTPS acceptor and handshake;
//! - [`faults`]: SSE streaming, and the faults that break an answer (reset after headers,
//!   close after N events);
//! - [`control`]: the `/__mock/` endpoints (forced failure, request counters);
//! - [`wire`]: the OpenAI response bodies (chat, completion, embeddings, SSE events);
//! - [`responses`]: the Responses API's object and events;
//! - [`messages`]: the Messages API's message, events and errors.

pub mod control;
pub mod faults;
pub mod messages;
pub mod responses;
pub mod tls;
pub mod wire;

pub use faults::{ChannelBody, Fault};
pub use tls::{acceptor, TlsAcceptor};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

/// Server-wide behaviour.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Name reported in `x-mock-server` (tells endpoints apart in failover tests).
    pub name: String,
    /// When set, requests must carry `Authorization: Bearer <api_key>` (401 otherwise).
    pub api_key: Option<String>,
    /// Delay before the response header.
    pub latency: Duration,
    /// Content chunks in a completion (one token each).
    pub chunks: usize,
    /// Delay between SSE events.
    pub chunk_interval: Duration,
    /// Every Nth request fails with `error_status` (0 = never).
    pub error_every: u64,
    pub error_status: u16,
    /// The first N requests the server receives fail with `error_status` (0 = none).
    pub fail_first: u64,
    /// Seconds put in `Retry-After` on injected errors (none when unset).
    pub retry_after: Option<u64>,
    /// The `error.code` of injected errors instead of the status's usual one (e.g.
    /// `context_length_exceeded` with status 400).
    pub error_code: Option<String>,
    /// Where a chat or completion stream puts the usage it was asked for.
    pub usage_shape: wire::UsageShape,
    /// Serve HTTPS only, with this acceptor ([`tls::acceptor`]).
    pub tls: Option<TlsAcceptor>,
    /// Break every successful answer this way (requests may override it by header).
    pub fault: Option<Fault>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            name: "mock".into(),
            api_key: None,
            latency: Duration::ZERO,
            chunks: 16,
            chunk_interval: Duration::ZERO,
            error_every: 0,
            error_status: 500,
            fail_first: 0,
            retry_after: None,
            error_code: None,
            usage_shape: wire::UsageShape::default(),
            tls: None,
            fault: None,
        }
    }
}

struct State {
    config: MockConfig,
    requests: AtomicU64,
    control: control::Control,
}

/// Serves on `listener` until the task is dropped (HTTPS only when `config.tls` is set; a failed
/// handshake costs only its connection).
pub async fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<()> {
    let tls = config.tls.clone();
    let state = Arc::new(State {
        config,
        requests: AtomicU64::new(0),
        control: control::Control::default(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        match &tls {
            None => {
                tokio::spawn(connection(stream, state));
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Some(stream) = tls.accept(stream, peer).await {
                        connection(stream, state).await;
                    }
                });
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection until it closes.
async fn connection<I>(io: I, state: Arc<State>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn spawn(addr: SocketAddr, config: MockConfig) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, config));
    Ok(local)
}

type MockBody = http_body_util::Either<Full<Bytes>, ChannelBody>;

/// Per-request behaviour: the server's, overridden by `x-mock-*` headers.
struct Behaviour {
    status: Option<u16>,
    /// `Retry-After` seconds on an injected error.
    retry_after: Option<u64>,
    latency: Duration,
    chunks: usize,
    interval: Duration,
    hang: bool,
    usage: wire::StreamUsage,
    cached: u64,
    cache_write: u64,
    fault: Option<Fault>,
    /// Pause between a broken answer's last byte and the abort (`x-mock-abort-pause-ms`).
    abort_pause: Duration,
}

impl Behaviour {
    /// `forced`: the status set by `POST /__mock/fail`.
    fn of(config: &MockConfig, headers: &HeaderMap, n: u64, forced: Option<u16>) -> Behaviour {
        let num = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
        let error_status = num("x-mock-fail-status").map_or(config.error_status, |s| s as u16);
        let fail_first = num("x-mock-fail-first").unwrap_or(config.fail_first);
        let injected = ((config.error_every > 0 && n.is_multiple_of(config.error_every))
            || n <= fail_first)
            .then_some(error_status);
        Behaviour {
            status: num("x-mock-status")
                .map(|s| s as u16)
                .or(forced.or(injected)),
            retry_after: num("x-mock-retry-after").or(config.retry_after),
            latency: num("x-mock-latency-ms").map_or(config.latency, Duration::from_millis),
            chunks: num("x-mock-chunks").map_or(config.chunks, |c| c as usize),
            interval: num("x-mock-chunk-interval-ms")
                .map_or(config.chunk_interval, Duration::from_millis),
            hang: headers.contains_key("x-mock-hang"),
            usage: wire::StreamUsage {
                shape: headers
                    .get("x-mock-usage-shape")
                    .and_then(|v| wire::UsageShape::parse(v.to_str().ok()?))
                    .unwrap_or(config.usage_shape),
                null_elsewhere: num("x-mock-usage-null").is_none_or(|n| n != 0),
            },
            cached: num("x-mock-cached-tokens").unwrap_or(0),
            cache_write: num("x-mock-cache-write-tokens").unwrap_or(0),
            fault: Fault::of(config.fault, headers),
            abort_pause: num("x-mock-abort-pause-ms")
                .map_or(faults::ABORT_PAUSE, Duration::from_millis),
        }
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<MockBody> {
    if req.uri().path().starts_with(control::PREFIX) {
        return state.control.handle(req).await;
    }
    state.control.record(req.method(), req.uri().path());
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                400,
                "invalid_request_error",
                None,
                "Could not read the body.",
            )
        }
    };
    let forced = state.control.fail_status();
    let behaviour = Behaviour::of(&state.config, &parts.headers, n, forced);
    let mut resp = route(
        state,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &body,
        &behaviour,
        n,
    )
    .await;
    if let Some(fault) = behaviour.fault {
        resp = faults::apply(resp, fault, behaviour.abort_pause);
    }
    let h = resp.headers_mut();
    h.insert(
        "x-mock-request-sha256",
        hv(&hex::encode(Sha256::digest(&body))),
    );
    h.insert("x-mock-request-bytes", hv(&body.len().to_string()));
    h.insert("x-mock-server", hv(&state.config.name));
    h.insert("x-request-id", hv(&format!("req_mock{n}")));
    // Like OpenAI, name the account; echo the account headers received (`x-mock-request-*`).
    h.insert("openai-organization", HeaderValue::from_static("org-mock"));
    h.insert("openai-project", HeaderValue::from_static("proj_mock"));
    for (name, echo) in [
        ("openai-organization", "x-mock-request-openai-organization"),
        ("openai-project", "x-mock-request-openai-project"),
    ] {
        if let Some(v) = parts.headers.get(name) {
            h.insert(echo, v.clone());
        }
    }
    // The query string received, and the headers `x-mock-echo` names (comma-separated).
    if let Some(q) = parts.uri.query() {
        h.insert("x-mock-request-query", hv(q));
    }
    let echo = parts
        .headers
        .get("x-mock-echo")
        .and_then(|v| v.to_str().ok());
    for name in echo.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
        let (Some(v), Ok(echo)) = (
            parts.headers.get(name),
            http::HeaderName::try_from(format!("x-mock-request-{name}")),
        ) else {
            continue;
        };
        h.insert(echo, v.clone());
    }
    resp
}

async fn route(
    state: &State,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    b: &Behaviour,
    n: u64,
) -> Response<MockBody> {
    if let Some(expected) = &state.config.api_key {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(expected.as_str());
        if !ok {
            return error(
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided.",
            );
        }
    }
    if b.hang {
        std::future::pending::<()>().await;
    }
    if !b.latency.is_zero() {
        tokio::time::sleep(b.latency).await;
    }
    if let Some(status) = b.status {
        let mut resp = match &state.config.error_code {
            Some(code) => error(
                status,
                "invalid_request_error",
                Some(code),
                "Injected error.",
            ),
            None => injected_error(status),
        };
        if let Some(secs) = b.retry_after {
            resp.headers_mut()
                .insert("retry-after", hv(&secs.to_string()));
        }
        return resp;
    }
    if method == Method::GET && path == "/v1/models" {
        return json(200, &wire::models());
    }
    if method != Method::POST {
        return error(
            404,
            "invalid_request_error",
            Some("unknown_url"),
            &format!("Unknown request URL: {method} {path}."),
        );
    }
    let request: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return error(
                400,
                "invalid_request_error",
                None,
                "We could not parse the JSON body of your request.",
            )
        }
    };
    let Some(model) = request
        .get("model")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
    else {
        return error(
            400,
            "invalid_request_error",
            None,
            "you must provide a model parameter",
        );
    };
    let id = format!("mock{n}");
    let stream = request.get("stream").and_then(|s| s.as_bool()) == Some(true);
    match path {
        "/v1/chat/completions" | "/v1/completions" => {
            let chat = path == "/v1/chat/completions";
            let mut c = wire::Completion::new(&request, &model, &id, chat, b.chunks);
            c.cached_tokens = b.cached;
            if stream {
                let include_usage = request
                    .pointer("/stream_options/include_usage")
                    .and_then(|v| v.as_bool())
                    == Some(true);
                faults::sse(c.events_with(include_usage.then_some(b.usage)), b.interval)
            } else {
                json(200, &c.body())
            }
        }
        "/v1/embeddings" => json(200, &wire::embeddings(&request, &model)),
        "/v1/responses" => {
            if let Some(p) = responses::UNKNOWN_PARAMETERS
                .iter()
                .find(|p| request.get(**p).is_some())
            {
                return json(
                    400,
                    &serde_json::json!({"error": {"message": format!("Unknown parameter: '{p}'."),
                        "type": "invalid_request_error", "param": p, "code": "unknown_parameter"}}),
                );
            }
            let r = responses::Response::new(&request, &model, &id, b.chunks, b.cached);
            if stream {
                faults::sse(r.events(), b.interval)
            } else {
                json(200, &r.object(true))
            }
        }
        "/v1/messages" => {
            if let Some(field) = messages::unknown_field(&request) {
                let message = format!("{field}: Extra inputs are not permitted");
                return json(
                    400,
                    &messages::error_body("invalid_request_error", &message),
                );
            }
            if request.get("max_tokens").and_then(|m| m.as_u64()).is_none() {
                let message = "max_tokens: Field required";
                return json(400, &messages::error_body("invalid_request_error", message));
            }
            let m =
                messages::Message::new(&request, &model, &id, b.chunks, b.cached, b.cache_write);
            if stream {
                faults::sse(m.events(), b.interval)
            } else {
                json(200, &m.body())
            }
        }
        "/v1/audio/speech" => audio(&request),
        _ => error(
            404,
            "invalid_request_error",
            Some("unknown_url"),
            &format!("Unknown request URL: POST {path}."),
        ),
    }
}

fn injected_error(status: u16) -> Response<MockBody> {
    match status {
        400 => error(400, "invalid_request_error", None, "Injected bad request."),
        401 => error(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.",
        ),
        404 => error(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            "The model does not exist.",
        ),
        429 => error(
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests.",
        ),
        503 => error(
            503,
            "server_error",
            None,
            "The engine is currently overloaded, please try again later.",
        ),
        s => error(
            s,
            "server_error",
            None,
            "The server had an error while processing your request.",
        ),
    }
}

/// `POST /v1/audio/speech`: an MP3-looking body whose length follows the input text.
fn audio(request: &serde_json::Value) -> Response<MockBody> {
    let text = request.get("input").and_then(|i| i.as_str()).unwrap_or("");
    let mut body = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    body.extend(text.bytes().cycle().take(text.len() * 64).map(|b| b ^ 0x5a));
    let mut r = Response::new(MockBody::Left(Full::new(Bytes::from(body))));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("audio/mpeg"));
    r
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn json(status: u16, value: &serde_json::Value) -> Response<MockBody> {
    let body = serde_json::to_vec(value).expect("json serializes");
    let mut r = Response::new(MockBody::Left(Full::new(Bytes::from(body.clone()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "x-mock-body-sha256",
        hv(&hex::encode(Sha256::digest(&body))),
    );
    h.insert("openai-processing-ms", HeaderValue::from_static("1"));
    r
}

/// An OpenAI error response.
pub fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Response<MockBody> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}
