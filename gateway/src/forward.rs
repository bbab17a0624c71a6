//! Sends a buffered request to an upstream and streams the answer back to the client.
//!
//! Endpoints are tried in [`Upstream::attempt_order`], each at the next of its resolved
//! addresses; a connect failure moves on to the next endpoint or address (the request has not
//! left the gateway, so this is always safe). The route's timeouts bound each step: connect,
//! first byte, idle between body reads, and the whole exchange (`timeouts.total`). A stale pooled
//! connection that fails before any response byte is retried on the same endpoint. An answer
//! with a retry status, or no answer in time, is sent again to the next endpoint within the
//! upstream's `retry:` budget ([`exchange`]); otherwise a timeout is a 504, any other failure
//! a 502. The response body is written to the client chunk by chunk as it arrives; pingora flushes
//! every chunk of a chunked (SSE) body immediately.

use std::fmt::Write as _;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::api::Api;
use crate::client::{client_error, client_write};
use crate::context::{RequestCtx, ResponseMeter, Shared};
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::metering::{JsonMeter, SseMeter};
use crate::routing::{Route, Timeouts, Upstream};
use crate::wire::{Target, WireRequest};

/// How many times a request may meet a stale pooled connection before giving up on an endpoint.
const STALE_RETRIES: usize = 2;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
const X_OVERHEAD: HeaderName = HeaderName::from_static("x-aihub-overhead-ms");

/// Headers naming the platform's provider account, sent by the upstream: stripped unless the
/// upstream has `forward_account_headers` (the client's own are stripped on the way up,
/// [`crate::wire`]).
const ACCOUNT_RESPONSE_HEADERS: [&str; 3] = [
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
];

/// Proxies `body` to `route`'s upstream and streams the response to `session`.
///
/// Endpoints are tried in [`Upstream::attempt_order`], wrapping around. A connect failure moves
/// on at once (nothing was sent) until every endpoint failed to connect in a row. A request the
/// upstream answered with a status of `retry.on_status`, or did not answer within
/// `read_timeout` (`retry.on_timeout`), is sent again to the next endpoint, after the wait the
/// answer names or a backoff, while `retry.attempts` and `retry.deadline` allow and its path is
/// in `retry.paths` ([`crate::retry`]); otherwise the answer goes to the client as it came.
/// Nothing is retried once a byte went to the client.
///
/// With `fallback` (the codes of the route's `fallback_on`; `None` for the last route of a
/// chain), a last answer that is a failure (a retry status or a 5xx) or a 4xx whose error code
/// is listed is not relayed: the caller moves on to the next route ([`Exchanged::FellBack`]).
pub async fn exchange(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &Route,
    body: Bytes,
    fallback: Option<&[String]>,
) -> Result<Exchanged, GatewayError> {
    let upstream = &*route.upstream;
    let policy = &upstream.retry;
    let path = session.req_header().uri.path();
    let retries = policy.retries_path(path.strip_prefix("/v1/").unwrap_or(path));
    let started = Instant::now();
    let total = route.timeouts.total.map(|t| started + t);
    let deadline = total.map_or(started + policy.deadline, |t| {
        t.min(started + policy.deadline)
    });
    let limits = Limits {
        timeouts: route.timeouts,
        total,
    };
    let order = upstream.attempt_order();
    let mut last_connect_error = None;
    let mut connect_failures = 0;
    let mut sent = 0u32;
    for (k, i) in order.iter().copied().cycle().enumerate() {
        let attempt_started = Instant::now();
        let endpoint = &upstream.endpoints[i];
        let address = endpoint.pick(crate::clock::now_ms());
        // In flight until this attempt ends (a relayed answer: until its last byte).
        let _in_flight = endpoint.load.enter();
        let target = Target::of(endpoint, upstream);
        let request =
            WireRequest::render(session.req_header(), &target, &body, &ctx.request_id_header)?;
        let may_retry = retries && sent + 1 < policy.attempts && attempt_started < deadline;
        match send(shared, address.peer(), &request, &body, &limits).await {
            Ok((up, sent_at)) => {
                endpoint.load.observe(sent_at.elapsed());
                sent += 1;
                ctx.attempts = sent.min(u32::from(u8::MAX)) as u8;
                connect_failures = 0;
                let answer = up
                    .response_header()
                    .map(|h| (h.status.as_u16(), &h.headers));
                if let Some((status, headers)) =
                    answer.filter(|(s, _)| may_retry && policy.on_status.contains(s))
                {
                    // The next endpoint not tried yet is tried at once (this answer speaks for
                    // its own endpoint); coming back to one already tried waits first.
                    let round = ((k + 1) / order.len()) as u32;
                    let wait = match round {
                        0 => Duration::ZERO,
                        r => crate::retry::wait(headers, r, policy.backoff),
                    };
                    if Instant::now() + wait < deadline {
                        count_attempt(shared, upstream, endpoint, "retried_status");
                        if status >= 500 {
                            failed(shared, upstream, i);
                        }
                        // The connection goes back to the pool when the error body already
                        // arrived whole (it usually comes with the header); else it is dropped.
                        recycle(shared, up, address.peer()).await;
                        if !wait.is_zero() {
                            // A zero sleep would still wait for the timer's next tick (1 ms).
                            tokio::time::sleep(wait).await;
                        }
                        ctx.waited += attempt_started.elapsed();
                        continue;
                    }
                }
                let status = answer.map_or(0, |(s, _)| s);
                if status >= 500 {
                    failed(shared, upstream, i);
                } else {
                    upstream.record_success(i);
                }
                let mut up = up;
                let mut prefix = None;
                if let Some(codes) = fallback {
                    if status >= 500 || policy.on_status.contains(&status) {
                        count_attempt(shared, upstream, endpoint, "fell_back");
                        recycle(shared, up, address.peer()).await;
                        ctx.waited += attempt_started.elapsed();
                        return Ok(Exchanged::FellBack("status"));
                    }
                    if (400..500).contains(&status) && !codes.is_empty() {
                        let head = read_head(&mut up)
                            .await
                            .map_err(|e| exchange_error(shared, upstream, endpoint, &e))?;
                        if error_code(&head).is_some_and(|c| codes.iter().any(|x| x == c)) {
                            count_attempt(shared, upstream, endpoint, "fell_back");
                            recycle(shared, up, address.peer()).await;
                            ctx.waited += attempt_started.elapsed();
                            return Ok(Exchanged::FellBack("code"));
                        }
                        prefix = Some(head);
                    }
                }
                count_attempt(shared, upstream, endpoint, "answered");
                ctx.endpoint = Some(i);
                let answer = Answer {
                    up,
                    prefix,
                    sent_at,
                    peer: address.peer(),
                };
                relay(shared, session, ctx, (upstream, endpoint), answer, &limits).await?;
                return Ok(Exchanged::Relayed);
            }
            Err(SendError::Connect(e)) => {
                count_error(shared, upstream, endpoint, "connect");
                if upstream.record_connect_failure(i, &address) {
                    ejected(shared, upstream, endpoint);
                }
                last_connect_error = Some(e);
                connect_failures += 1;
                ctx.waited += attempt_started.elapsed();
                if connect_failures >= upstream.connect_budget() || Instant::now() >= deadline {
                    break;
                }
            }
            Err(SendError::Exchange(e, sent_at)) => {
                sent += 1;
                ctx.attempts = sent.min(u32::from(u8::MAX)) as u8;
                connect_failures = 0;
                let timed_out = matches!(e.etype(), ErrorType::ReadTimedout);
                if timed_out {
                    failed(shared, upstream, i);
                }
                if timed_out && policy.on_timeout && may_retry && Instant::now() < deadline {
                    count_error(shared, upstream, endpoint, "timeout");
                    count_attempt(shared, upstream, endpoint, "retried_timeout");
                    ctx.waited += attempt_started.elapsed();
                    continue;
                }
                ctx.endpoint = Some(i);
                ctx.upstream_latency = Some(sent_at.elapsed());
                return Err(exchange_error(shared, upstream, endpoint, &e));
            }
        }
    }
    Err(GatewayError::UpstreamUnreachable {
        upstream: upstream.name.clone(),
        detail: last_connect_error.map_or_else(|| "no endpoint".into(), |e| e.to_string()),
    })
}

/// A request's time limits toward the upstream: its route's timeouts and the end of its
/// total budget.
struct Limits {
    timeouts: Timeouts,
    total: Option<Instant>,
}

impl Limits {
    /// The read timeout for the next wait: `each`, cut to what is left of the total.
    fn read_timeout(&self, each: Duration) -> Duration {
        match self.total {
            Some(end) => each.min(end.saturating_duration_since(Instant::now())),
            None => each,
        }
    }
}

/// An upstream answer being relayed: its session, the body start already read (an error
/// checked for a fallback), when the request was sent, and the address it came from (where its
/// connection returns to the pool).
struct Answer<'a> {
    up: HttpSession,
    prefix: Option<Bytes>,
    sent_at: Instant,
    peer: &'a HttpPeer,
}

/// Returns the connection of an answer that is not relayed to the pool when its body already
/// sits whole in the read buffer (error bodies come with their header), without waiting for
/// more; otherwise drops it. Saves a new connection per retried or fallen-back answer.
async fn recycle(shared: &Shared, mut up: HttpSession, peer: &HttpPeer) {
    let (_, error) = take_buffered(&mut up, Bytes::new());
    if error.is_none() && up.response_done() {
        shared
            .connector
            .release_http_session(up, peer, peer.options.idle_timeout)
            .await;
    }
}

/// Records a failed request to endpoint `i` for passive health (5xx, timeout).
fn failed(shared: &Shared, upstream: &Upstream, i: usize) {
    if upstream.record_failure(i) {
        ejected(shared, upstream, &upstream.endpoints[i]);
    }
}

/// An endpoint just left the rotation after failures of real requests.
fn ejected(shared: &Shared, upstream: &Upstream, endpoint: &Endpoint) {
    shared
        .metrics
        .endpoints
        .ejections
        .with_label_values(&[upstream.name.as_str(), endpoint.url.as_str(), "passive"])
        .inc();
    tracing::warn!(upstream = %upstream.name, endpoint = %endpoint.url, "endpoint skipped after repeated failures");
}

/// What [`exchange`] did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchanged {
    /// The upstream's answer went to the client.
    Relayed,
    /// Nothing went to the client: the route failed (`status`) or answered a `fallback_on`
    /// code (`code`), and the next route of the chain is to be tried.
    FellBack(&'static str),
}

/// The most of an error answer read to find its code before deciding to fall back.
const ERROR_HEAD_BYTES: usize = 64 * 1024;

/// Reads the start of an answer's body (all of a small error body), at most
/// [`ERROR_HEAD_BYTES`] and whatever arrived past it in the last read.
async fn read_head(up: &mut HttpSession) -> Result<Bytes, Box<Error>> {
    let mut head = BytesMut::new();
    while head.len() < ERROR_HEAD_BYTES && !up.response_done() {
        match up.read_response_body().await? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => break,
        }
    }
    Ok(head.freeze())
}

/// The `error.code` (else `error.type`) of an OpenAI-shaped error body.
fn error_code(body: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        error: Detail<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Detail<'a> {
        #[serde(borrow, default)]
        code: Option<&'a str>,
        #[serde(borrow, default, rename = "type")]
        kind: Option<&'a str>,
    }
    let b: Body<'_> = serde_json::from_slice(body).ok()?;
    b.error.code.or(b.error.kind)
}

enum SendError {
    /// No connection could be made: safe to try another endpoint.
    Connect(Box<Error>),
    /// The request may have reached the upstream.
    Exchange(Box<Error>, Instant),
}

/// Connects (or reuses a pooled connection) to `peer`, writes the request and reads the
/// response header, within the route's connect and first-byte timeouts.
async fn send(
    shared: &Shared,
    peer: &HttpPeer,
    request: &WireRequest,
    body: &Bytes,
    limits: &Limits,
) -> Result<(HttpSession, Instant), SendError> {
    let mut stale = 0;
    loop {
        let sent_at = Instant::now();
        let connect = shared.connector.get_http_session(peer);
        let connected = match limits.timeouts.connect {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::explain(
                        ErrorType::ConnectTimedout,
                        "connect timed out (route timeouts.connect)",
                    ))
                }),
            None => connect.await,
        };
        let (up, reused) = connected.map_err(SendError::Connect)?;
        let result = async {
            let mut up = request.write(up, peer, body).await?;
            // The connector does not apply the peer's I/O timeouts to the session; we must.
            up.set_read_timeout(Some(limits.read_timeout(limits.timeouts.first_byte)));
            up.set_write_timeout(peer.options.write_timeout);
            up.read_response_header().await?;
            Ok::<_, Box<Error>>(up)
        }
        .await;
        match result {
            Ok(up) => return Ok((up, sent_at)),
            // A pooled connection the upstream closed meanwhile: nothing was processed.
            Err(e) if reused && stale < STALE_RETRIES && is_stale_connection(&e) => stale += 1,
            Err(e) => return Err(SendError::Exchange(e, sent_at)),
        }
    }
}

fn is_stale_connection(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
    )
}

/// Sends the response header, then the body as it arrives.
async fn relay(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
    (upstream, endpoint): (&Upstream, &Endpoint),
    answer: Answer<'_>,
    limits: &Limits,
) -> Result<(), GatewayError> {
    let Answer {
        mut up,
        prefix: mut pending,
        sent_at,
        peer,
    } = answer;
    let upstream_wait = sent_at.elapsed();
    ctx.upstream_latency = Some(upstream_wait);
    ctx.waited += upstream_wait;
    let m = &shared.metrics;
    m.upstream_latency
        .with_label_values(&[upstream.name.as_str()])
        .observe(upstream_wait.as_secs_f64());

    let source = up
        .response_header()
        .ok_or_else(|| GatewayError::Internal("no upstream response header".into()))?;
    ctx.settle_batch_request_id(source.status.as_u16());
    let mut resp = downstream_response(source, ctx, upstream.forward_account_headers);
    ctx.rate_headers.apply(&mut resp.headers);
    ctx.status = resp.status.as_u16();
    let strip_usage = ctx.metering.strip_stream_usage;
    ctx.meter = response_meter(&resp, ctx.api, strip_usage, ctx.metering.read_usage);
    if matches!(ctx.meter, ResponseMeter::Sse(_)) && strip_usage {
        // Removing the usage event changes the length: let the body be chunked.
        if resp.headers.remove(header::CONTENT_LENGTH).is_some() {
            resp.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
    }
    let overhead = ctx.start.elapsed().saturating_sub(ctx.waited);
    ctx.overhead = Some(overhead);
    m.gateway_overhead.observe(overhead.as_secs_f64());
    let mut value = BytesMut::with_capacity(16);
    let _ = write!(value, "{}", crate::accesslog::Millis(overhead));
    if let Ok(v) = HeaderValue::from_maybe_shared(value.freeze()) {
        resp.headers.insert(X_OVERHEAD, v);
    }

    ctx.response_started = true;
    // Every write to the client is bounded by `server.response_write_timeout`: a client that
    // stops reading ends the exchange (the upstream connection is dropped, not pooled).
    let limit = session.downstream_session.get_write_timeout();
    let header = Box::new(ResponseHeader::from(resp));
    client_write(limit, session.write_response_header(header, false)).await?;
    // From here on, the longest silence between two body reads is the route's idle timeout
    // (cut to what is left of its total).
    up.set_read_timeout(Some(limits.read_timeout(limits.timeouts.idle)));
    // A read error met while taking buffered chunks: raised once those chunks went out.
    let mut broken: Option<Box<Error>> = None;
    // The body's last chunk, held back until the usage record is in the WAL.
    let mut last = Bytes::new();
    loop {
        // The start of the body when it was read already (an error checked for a fallback).
        let chunk = match pending.take() {
            Some(head) => head,
            None => {
                if let Some(e) = broken.take() {
                    return Err(exchange_error(shared, upstream, endpoint, &e));
                }
                if limits.total.is_some() {
                    up.set_read_timeout(Some(limits.read_timeout(limits.timeouts.idle)));
                }
                let chunk = match up.read_response_body().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => return Err(exchange_error(shared, upstream, endpoint, &e)),
                };
                // Chunks that already sit in the read buffer go out in the same write: one
                // syscall for a burst of SSE events instead of one per event. Nothing waits
                // for data to arrive. Bytes that came before a break still reach the client.
                let (chunk, error) = take_buffered(&mut up, chunk);
                broken = error;
                chunk
            }
        };
        let chunk = meter(&mut ctx.meter, chunk);
        if broken.is_none() && up.response_done() {
            last = chunk;
            break;
        }
        ctx.bytes_out += chunk.len() as u64;
        // Bounded by the session's own write timeout (HTTP/1 body writes apply it): no second
        // timer per chunk.
        session
            .write_response_body(Some(chunk), false)
            .await
            .map_err(|e| client_error(&e))?;
    }
    let rest = match &mut ctx.meter {
        ResponseMeter::Sse(sse) => sse.finish(),
        _ => Bytes::new(),
    };
    // The usage record reaches the WAL before the response's last bytes leave: a kill -9 from
    // here on cannot lose the usage of a response the client received whole. (A body whose end
    // is known only at EOF has sent its last data chunk already; its end still waits.)
    crate::usage::commit(shared, session, ctx).await;
    for tail in [last, rest] {
        if !tail.is_empty() {
            ctx.bytes_out += tail.len() as u64;
            session
                .write_response_body(Some(tail), false)
                .await
                .map_err(|e| client_error(&e))?;
        }
    }
    client_write(limit, session.write_response_body(None, true)).await?;
    shared
        .connector
        .release_http_session(up, peer, peer.options.idle_timeout)
        .await;
    Ok(())
}

/// How to meter a response: errors carry zero tokens; successful JSON and SSE bodies are read
/// for their usage; any other successful body (audio, images) is estimated.
fn response_meter(
    resp: &http::response::Parts,
    api: Api,
    strip_usage: bool,
    read_usage: bool,
) -> ResponseMeter {
    if !read_usage || !resp.status.is_success() {
        return ResponseMeter::None;
    }
    let content_type = resp
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("text/event-stream") {
        ResponseMeter::Sse(SseMeter::new(api, strip_usage))
    } else if content_type.starts_with("application/json") {
        ResponseMeter::Json(JsonMeter::default())
    } else {
        ResponseMeter::Opaque // audio, images…: no usage to read
    }
}

/// Passes a body chunk through the meter; returns what the client gets.
fn meter(m: &mut ResponseMeter, chunk: Bytes) -> Bytes {
    match m {
        ResponseMeter::None | ResponseMeter::Opaque => chunk,
        ResponseMeter::Sse(sse) => sse.feed(chunk),
        ResponseMeter::Json(kept) => {
            kept.push(&chunk);
            chunk
        }
    }
}

/// Appends to `first` every body chunk the upstream session can hand over without waiting;
/// a read error ends the batch and comes back beside it (the bytes before it are the client's).
///
/// pingora's body reads are cancel-safe (its reader commits its state before awaiting), so a
/// read that is not ready at once is simply dropped and retried by the caller's next read.
fn take_buffered(up: &mut HttpSession, first: Bytes) -> (Bytes, Option<Box<Error>>) {
    let mut batch: Option<BytesMut> = None;
    let mut cx = Context::from_waker(Waker::noop());
    let mut error = None;
    while !up.response_done() {
        let next = {
            let read = std::pin::pin!(up.read_response_body());
            match read.poll(&mut cx) {
                Poll::Ready(Ok(next)) => next,
                Poll::Ready(Err(e)) => {
                    error = Some(e);
                    break;
                }
                Poll::Pending => break,
            }
        };
        let Some(more) = next else { break };
        batch
            .get_or_insert_with(|| BytesMut::from(&first[..]))
            .extend_from_slice(&more);
    }
    (batch.map_or(first, BytesMut::freeze), error)
}

/// The response header sent to the client: the upstream's, with our request id (the upstream's
/// moves to `x-upstream-request-id`) and without hop-by-hop headers or the provider account's
/// rate-limit headers (nor its account headers unless `forward_account`). Built as plain `http`
/// parts: header names go out in canonical case, and edits are single map operations
/// (pingora's case-preserving map costs two allocations and a name parse per header).
fn downstream_response(
    source: &ResponseHeader,
    ctx: &RequestCtx,
    forward_account: bool,
) -> http::response::Parts {
    let mut resp = source.as_owned_parts();
    let h = &mut resp.headers;
    for name in ["connection", "keep-alive", "proxy-connection"] {
        h.remove(name);
    }
    if !forward_account {
        for name in ACCOUNT_RESPONSE_HEADERS {
            h.remove(name);
        }
    }
    // The provider account's own limits are not the client's: ours replace them, or none.
    let theirs: Vec<HeaderName> = h
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.starts_with("x-ratelimit-") || n == "ratelimit" || n == "ratelimit-policy"
        })
        .cloned()
        .collect();
    for name in theirs {
        h.remove(&name);
    }
    if let Some(theirs) = h.remove(&X_REQUEST_ID) {
        h.insert(X_UPSTREAM_REQUEST_ID, theirs);
    }
    h.insert(X_REQUEST_ID, ctx.request_id_header.clone());
    resp
}

fn exchange_error(
    shared: &Shared,
    upstream: &Upstream,
    endpoint: &Endpoint,
    e: &Error,
) -> GatewayError {
    let timed_out = matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
    );
    count_error(
        shared,
        upstream,
        endpoint,
        if timed_out { "timeout" } else { "exchange" },
    );
    let detail = format!("{}: {e}", endpoint.url);
    if timed_out {
        GatewayError::UpstreamTimeout {
            upstream: upstream.name.clone(),
            detail,
        }
    } else {
        GatewayError::UpstreamFailed {
            upstream: upstream.name.clone(),
            detail,
        }
    }
}

/// Counts an attempt sent to an endpoint: `answered` (its answer went to the client),
/// `retried_status`, `retried_timeout`.
fn count_attempt(shared: &Shared, upstream: &Upstream, endpoint: &Endpoint, result: &str) {
    shared
        .metrics
        .upstream_attempts
        .with_label_values(&[upstream.name.as_str(), endpoint.url.as_str(), result])
        .inc();
}

fn count_error(shared: &Shared, upstream: &Upstream, endpoint: &Endpoint, kind: &str) {
    shared
        .metrics
        .upstream_errors
        .with_label_values(&[upstream.name.as_str(), endpoint.url.as_str(), kind])
        .inc();
}
