//! A mock OpenAI-compatible upstream that speaks the real wire format, for tests and load tests.
//!
//! It serves `POST /v1/chat/completions` (JSON, or SSE when `"stream": true`),
//! `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`, with OpenAI's usage objects
//! and error bodies. Like OpenAI, a stream carries a usage chunk (`"choices": []`) **only** when
//! the request asks for `stream_options.include_usage`.
//!
//! Behaviour is set per server ([`MockConfig`]) and may be overridden per request by headers
//! (which the gateway forwards): `x-mock-status` (answer with that error), `x-mock-latency-ms`
//! (delay before the header), `x-mock-chunks`, `x-mock-chunk-interval-ms`, `x-mock-hang` (never
//! answer). Every response carries `x-mock-request-sha256`/`x-mock-request-bytes` (what arrived),
//! `x-mock-body-sha256` (what is being sent) and `x-mock-server` (the server's name), so tests
//! can prove bodies crossed the gateway byte for byte.
//!
//! # Layout
//! - this file: the server loop, routing and error bodies;
//! - [`wire`]: the OpenAI response bodies (chat, completion, embeddings, SSE events).

pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

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
        }
    }
}

struct State {
    config: MockConfig,
    requests: AtomicU64,
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<()> {
    let state = Arc::new(State {
        config,
        requests: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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
    latency: Duration,
    chunks: usize,
    interval: Duration,
    hang: bool,
}

impl Behaviour {
    fn of(config: &MockConfig, headers: &HeaderMap, n: u64) -> Behaviour {
        let num = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
        let injected = (config.error_every > 0 && n.is_multiple_of(config.error_every))
            .then_some(config.error_status);
        Behaviour {
            status: num("x-mock-status").map(|s| s as u16).or(injected),
            latency: num("x-mock-latency-ms").map_or(config.latency, Duration::from_millis),
            chunks: num("x-mock-chunks").map_or(config.chunks, |c| c as usize),
            interval: num("x-mock-chunk-interval-ms")
                .map_or(config.chunk_interval, Duration::from_millis),
            hang: headers.contains_key("x-mock-hang"),
        }
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<MockBody> {
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
    let behaviour = Behaviour::of(&state.config, &parts.headers, n);
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
    let h = resp.headers_mut();
    h.insert(
        "x-mock-request-sha256",
        hv(&hex::encode(Sha256::digest(&body))),
    );
    h.insert("x-mock-request-bytes", hv(&body.len().to_string()));
    h.insert("x-mock-server", hv(&state.config.name));
    h.insert("x-request-id", hv(&format!("req_mock{n}")));
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
        return injected_error(status);
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
    match path {
        "/v1/chat/completions" | "/v1/completions" => {
            let chat = path == "/v1/chat/completions";
            let c = wire::Completion::new(&request, &model, &id, chat, b.chunks);
            if request.get("stream").and_then(|s| s.as_bool()) == Some(true) {
                let include_usage = request
                    .pointer("/stream_options/include_usage")
                    .and_then(|v| v.as_bool())
                    == Some(true);
                sse(c.events(include_usage), b.interval)
            } else {
                json(200, &c.body())
            }
        }
        "/v1/embeddings" => json(200, &wire::embeddings(&request, &model)),
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

/// Streams pre-rendered SSE events, `interval` apart; `x-mock-body-sha256` covers them all.
fn sse(events: Vec<Bytes>, interval: Duration) -> Response<MockBody> {
    let mut hasher = Sha256::new();
    for e in &events {
        hasher.update(e);
    }
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx.send(e).await.is_err() {
                return; // client went away
            }
        }
    });
    let mut r = Response::new(MockBody::Right(ChannelBody { rx }));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-mock-body-sha256", hv(&hex::encode(hasher.finalize())));
    r
}

/// A response body fed by a channel, one frame per message.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
