//! The pingora [`ProxyHttp`] implementation: one [`Gateway`] holding the shared state
//! ([`crate::context::Shared`]), one small [`RequestCtx`] per request.
//!
//! Every request is handled in `request_filter`: authenticate from memory (a developer's key,
//! or a batch item's token from an admin API worker), read the bounded body, route by `model`,
//! then [`crate::forward`] sends the buffered body upstream itself and streams the answer back
//! (pingora's own forwarding cannot replay a pre-read body over 64 KiB; see ARCHITECTURE.md).
//! Files and Batches calls go to the admin API instead ([`crate::internal`]). Failures become
//! responses in exactly one place, `Gateway::respond_error`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use serde::Serialize;

use crate::client::client_write;
use crate::clock::now_ms;
use aihub_apikey::internal::is_batch_token;

use crate::context::{BatchItem, Metering, RequestCtx, Shared};
use crate::error::{AuthFailure, GatewayError, Reason};
use crate::forward::{self, Exchanged};
use crate::keys::{authenticate, KeyRecord};
use crate::request;
use crate::routing::{Route, Runtime};

/// The proxy.
pub struct Gateway {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<pingora_core::upstreams::peer::HttpPeer>> {
        // `request_filter` always answers, so pingora never asks for a peer.
        Error::e_explain(
            ErrorType::InternalError,
            "request_filter handles every request",
        )
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.shared.metrics.in_flight.inc();
        ctx.counted = true;
        ctx.client_ip = self.shared.clients.load().client_ip(session);
        if self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            session.set_keepalive(None);
        }
        match self.handle(session, ctx).await {
            Ok(()) => Ok(true),
            Err(e) if !ctx.response_started => {
                self.respond_error(session, ctx, &e).await;
                Ok(true)
            }
            Err(e) => {
                // Mid-stream failure: drop the connection so the client sees a truncated body
                // (no final chunk), never a clean end.
                tracing::warn!(request_id = %ctx.request_id, error = %e, "response aborted mid-stream");
                ctx.error = Some(match e {
                    GatewayError::ClientTimeout => e.code(),
                    _ => "aborted",
                });
                Error::e_explain(ErrorType::InternalError, "response aborted mid-stream")
            }
        }
    }

    async fn fail_to_proxy(
        &self,
        _session: &mut Session,
        _e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // Only reached for mid-stream aborts: the header is out, nothing more can be said.
        FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _e: &Error) -> bool {
        true // the access log line carries the outcome
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let m = &self.shared.metrics;
        if ctx.counted {
            m.in_flight.dec();
        }
        let elapsed = ctx.start.elapsed();
        let model = ctx.route.as_ref().map_or("unknown", |r| r.model.as_str());
        // The upstream chooses the status: a label takes only real HTTP codes.
        let mut digits = itoa::Buffer::new();
        let status = match ctx.status {
            100..=599 => digits.format(ctx.status),
            _ => "other",
        };
        m.requests.with_label_values(&[model, status]).inc();
        if ctx.batch.is_some() {
            m.batch_items.with_label_values(&[status]).inc();
        }
        m.request_duration
            .with_label_values(&[model])
            .observe(elapsed.as_secs_f64());
        let req = session.req_header();
        let upstream = ctx.route.as_ref().map(|r| &r.upstream);
        let endpoint = upstream
            .zip(ctx.endpoint)
            .map(|(u, i)| u.endpoints[i].url.as_str());
        crate::accesslog::Line {
            request_id: &ctx.request_id,
            method: req.method.as_str(),
            path: req.uri.path(),
            status: ctx.status,
            model,
            key_id: ctx.key.as_deref().map(|k| &*k.key_id),
            batch_id: ctx.batch.as_ref().map(|b| &*b.task_id),
            batch_line: ctx.batch.as_ref().map(|b| b.line),
            developer_id: ctx.key.as_deref().map(|k| &*k.developer_id),
            upstream: upstream.map(|u| u.name.as_str()),
            endpoint,
            attempts: ctx.attempts,
            stream: ctx.stream,
            bytes_in: ctx.bytes_in as u64,
            bytes_out: ctx.bytes_out,
            overhead: ctx.overhead,
            upstream_latency: ctx.upstream_latency,
            duration: elapsed,
            error: ctx.error,
        }
        .emit();
        // Committed (and settled) already unless the request ended without a response of its
        // own (refused before one, client gone).
        crate::usage::commit(&self.shared, session, ctx).await;
    }
}

impl Gateway {
    pub fn new(shared: Arc<Shared>) -> Self {
        Gateway { shared }
    }

    async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let rt = self.shared.runtime.load_full();
        // Every write to the client is bounded (pingora's body writes by this setting, the
        // others by `client_write`), and so is draining an unread body after an early answer.
        let downstream = &mut session.downstream_session;
        downstream.set_write_timeout(Some(rt.response_write_timeout));
        downstream.set_total_drain_timeout(Some(rt.request_body_timeout));
        // Cheap clones (reference-counted bytes) that free `session` for the writes below.
        let uri = session.req_header().uri.clone();
        let method = session.req_header().method.clone();
        // The path as sent is the one checked, forwarded and recorded: refused unless canonical.
        let path = crate::path::check(uri.path()).map_err(GatewayError::InvalidPath)?;
        // The one expectation there is (RFC 9110 §10.1.1); any other cannot be met.
        let expect = session.get_header(header::EXPECT);
        if expect.is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"100-continue")) {
            return Err(GatewayError::ExpectationFailed);
        }
        let Some(endpoint) = path.strip_prefix("/v1/") else {
            return Err(unknown_url(&method, path));
        };
        let now = now_ms();
        let presented = presented_key(session);
        let files_or_batches = crate::internal::is_files_or_batches(endpoint);
        let key = match presented.filter(|p| is_batch_token(p)) {
            // Batch tokens are taken on model calls only.
            Some(_) if method != Method::POST || endpoint.is_empty() || files_or_batches => {
                return Err(GatewayError::Auth(AuthFailure::BatchTokenNotAccepted));
            }
            Some(token) => self.batch_item(ctx, token, now)?,
            None => {
                let key =
                    authenticate(&*self.shared.keys, presented, now).map_err(GatewayError::Auth)?;
                ctx.key = Some(Arc::clone(&key));
                if key.ip_allowlist.is_some() && !key.allows_ip(ctx.client_ip) {
                    return Err(GatewayError::IpNotAllowed);
                }
                key
            }
        };
        key.mark_used(now);

        if files_or_batches {
            return self
                .files_or_batches(session, ctx, &rt, &key, endpoint)
                .await;
        }
        if method == Method::GET {
            return match endpoint {
                "models" => self.list_models(session, ctx, &rt, &key).await,
                _ => match endpoint.strip_prefix("models/") {
                    Some(id) => self.retrieve_model(session, ctx, &rt, &key, id).await,
                    None => Err(unknown_url(&method, path)),
                },
            };
        }
        if method != Method::POST || endpoint.is_empty() {
            return Err(unknown_url(&method, path));
        }
        ctx.metering = Metering::model_call(&self.shared);
        if !key.endpoints.matches(endpoint) {
            return Err(GatewayError::EndpointNotAllowed(endpoint.to_owned()));
        }
        // A path no upstream serves is refused before its body is read.
        if !rt.paths.contains(endpoint) {
            return Err(GatewayError::UnsupportedEndpoint(endpoint.to_owned()));
        }
        ctx.api = crate::api::Api::of_path(endpoint);

        // Everything decidable without the body comes before reading it: a key at a limit is
        // refused without its body being read or buffered.
        if declared_length(session).is_some_and(|n| n > rt.max_request_body_bytes) {
            return Err(GatewayError::BodyTooLarge(rt.max_request_body_bytes));
        }
        if self.shared.usage.as_ref().is_some_and(|u| !u.admit()) {
            // Not recorded: the refusal's record would grow the very backlog that caused it.
            ctx.metering.record = false;
            return Err(GatewayError::MeteringUnavailable);
        }
        // With Redis, a small declared body is read first and the admission is one round trip
        // (`Limits::admit_whole`); otherwise it has two steps, the first before the body.
        let limits = self.shared.limits.as_deref();
        let one_step = limits.is_some_and(|l| l.prefers_one_step(declared_length(session)));
        if let Some(limits) = limits.filter(|_| !one_step) {
            match limits.admit(&key, &rt.plans).await {
                Ok(admission) => {
                    ctx.rate_headers = admission.headers;
                    ctx.admission = Some(admission).filter(|a| !a.is_inert());
                }
                Err(refusal) => return Err(limited(ctx, refusal)),
            }
        }
        let body = self.read_body(session, ctx, &rt).await?;
        ctx.request_body = Some(body.clone());
        let routed = request::inspect(&body).and_then(|probe| {
            let route = rt
                .routes
                .get(&probe.model)
                .ok_or_else(|| GatewayError::UnknownModel(probe.model.clone()))?;
            if !key.models.matches(&probe.model) {
                return Err(GatewayError::ModelNotAllowed(probe.model));
            }
            if !route.upstream.serves(endpoint) {
                return Err(GatewayError::UnsupportedEndpoint(endpoint.to_owned()));
            }
            Ok((probe, route))
        });
        let embeddings = endpoint.starts_with("embeddings");
        if let Some(limits) = limits.filter(|_| one_step) {
            let admitted = match &routed {
                Ok((probe, _)) => {
                    let cost = limits.cost(body.len(), probe.max_tokens, probe.n, embeddings);
                    limits.admit_whole(&key, &rt.plans, cost).await
                }
                // Refused for its body or its route, a request still takes its request first.
                Err(_) => limits.admit(&key, &rt.plans).await,
            };
            match admitted {
                Ok(admission) => {
                    ctx.rate_headers = admission.headers;
                    ctx.admission = Some(admission).filter(|a| !a.is_inert());
                }
                Err(refusal) => return Err(limited(ctx, refusal)),
            }
        }
        let (probe, route) = routed?;
        ctx.route = Some(Arc::clone(route));
        ctx.stream = probe.stream;
        // The second step of the admission: the token reservation, which needs the body.
        let second = if one_step {
            None
        } else {
            limits.zip(ctx.admission.take())
        };
        if let Some((limits, admission)) = second {
            let cost = limits.cost(body.len(), probe.max_tokens, probe.n, embeddings);
            match limits.reserve(admission, cost).await {
                Ok(admission) => {
                    ctx.rate_headers = admission.headers;
                    ctx.admission = Some(admission);
                }
                Err(refusal) => return Err(limited(ctx, refusal)),
            }
        }
        // The route, then its fallbacks the key may use and whose upstream serves the path,
        // each found when needed (nothing is collected for the usual route without fallbacks).
        let metering = ctx.metering;
        let mut serving = Arc::clone(route);
        let mut next = next_fallback(&rt, route, &key, endpoint, 0);
        for n in 0.. {
            let last = next.is_none();
            if n > 0 {
                ctx.requested = Some(Arc::clone(route));
                ctx.route = Some(Arc::clone(&serving));
            }
            // Chat and completion streams report usage only when asked: the gateway asks when
            // the client did not (and strips it from the client's stream) if it reads it.
            ctx.metering = metering.forwarding(ctx.admission.is_some(), &serving.upstream, ctx.api);
            // A fallback always names its own model upstream.
            let rename = (n > 0 || serving.upstream_model.is_some()).then(|| serving.sent_model());
            let (upstream_body, strip) =
                request::upstream_body(body.clone(), &probe, rename, ctx.metering.ask_stream_usage);
            ctx.metering.strip_stream_usage = strip;
            let fallback = (!last).then_some(route.fallback_on.as_slice());
            let why = match forward::exchange(
                &self.shared,
                session,
                ctx,
                &serving,
                upstream_body,
                fallback,
            )
            .await
            {
                Ok(Exchanged::Relayed) => return Ok(()),
                Ok(Exchanged::FellBack(why)) => why,
                Err(e) if !last && !ctx.response_started && e.is_upstream_failure() => e.code(),
                Err(e) => return Err(e),
            };
            let Some((pos, to)) = next else { break };
            tracing::info!(request_id = %ctx.request_id, model = %route.model, from = %serving.model, to = %to.model, why, "falling back");
            self.shared
                .metrics
                .fallbacks
                .with_label_values(&[serving.model.as_str(), to.model.as_str(), why])
                .inc();
            serving = to;
            next = next_fallback(&rt, route, &key, endpoint, pos);
        }
        Err(GatewayError::Internal(
            "the fallback chain ended without an answer".into(),
        ))
    }

    /// The key of a batch item's token (`aihub-batch.…`, sent by an admin API worker): the
    /// token verified with the internal secret, the key looked up by its hash and checked as a
    /// live request's key is (revoked: unknown; disabled; expired), but not against the key's
    /// IP allowlist: the worker runs on an admin node, and the allowlist was checked when the
    /// batch was created. From here the request is the item: its request id is the item's.
    fn batch_item(
        &self,
        ctx: &mut RequestCtx,
        token: &str,
        now: u64,
    ) -> Result<Arc<KeyRecord>, GatewayError> {
        let invalid = || GatewayError::Auth(AuthFailure::BatchToken);
        let secret = self.shared.internal_secret.load();
        let item = secret
            .as_deref()
            .ok_or_else(invalid)?
            .verify_batch_token(token, now as i64)
            .map_err(|_| invalid())?;
        let request_id = item.request_id();
        let batch = BatchItem {
            task_id: item.task_id.as_str().into(),
            line: item.line,
            own_id: false,
        };
        ctx.set_batch_item(batch, request_id);
        let key = self
            .shared
            .keys
            .get(&item.key_hash)
            .ok_or(GatewayError::Auth(AuthFailure::NotFound))?;
        key.check_usable(now).map_err(GatewayError::Auth)?;
        ctx.key = Some(Arc::clone(&key));
        Ok(key)
    }

    /// A Files or Batches call: the key's endpoint permission and request limits, then the
    /// admin API answers it ([`crate::internal`]). Not a model call: no usage record.
    async fn files_or_batches(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rt: &Runtime,
        key: &Arc<KeyRecord>,
        endpoint: &str,
    ) -> Result<(), GatewayError> {
        if !key.endpoints.matches(endpoint) {
            return Err(GatewayError::EndpointNotAllowed(endpoint.to_owned()));
        }
        let secret = crate::internal::target(&self.shared, rt)?;
        if key.source == crate::keys::KeySource::Declared {
            return Err(GatewayError::Admin {
                kind: crate::error::AdminFailure::DeclaredKey,
                detail: String::new(),
            });
        }
        if let Some(limits) = &self.shared.limits {
            match limits.admit_request(key, &rt.plans).await {
                Ok(admission) => {
                    ctx.rate_headers = admission.headers;
                    ctx.admission = Some(admission).filter(|a| !a.is_inert());
                }
                Err(refusal) => return Err(limited(ctx, refusal)),
            }
        }
        crate::internal::forward(&self.shared, session, ctx, (rt, &secret), key).await
    }

    /// Reads the whole request body, bounded in size and time.
    async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rt: &Runtime,
    ) -> Result<Bytes, GatewayError> {
        let limit = rt.max_request_body_bytes;
        let declared = declared_length(session);
        if declared.is_some_and(|n| n > limit) {
            return Err(GatewayError::BodyTooLarge(limit));
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + rt.request_body_timeout);
        if crate::client::expects_continue(session) {
            let limit = session.downstream_session.get_write_timeout();
            client_write(limit, session.downstream_session.write_continue_response()).await?;
        }
        // The common case is a body that arrives in one read: keep it without copying.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let chunk = match tokio::time::timeout_at(deadline, session.read_request_body()).await {
                Err(_) => return Err(GatewayError::BodyTimeout),
                Ok(Err(e)) if is_bad_framing(&e) => {
                    return Err(GatewayError::InvalidBody(e.to_string()))
                }
                Ok(Err(_)) => return Err(GatewayError::ClientGone),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            ctx.bytes_in += chunk.len();
            if ctx.bytes_in > limit {
                return Err(GatewayError::BodyTooLarge(limit));
            }
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                prev => {
                    if buf.is_empty() {
                        // A declared length sizes the buffer only up to a small bound: past it
                        // the buffer grows as bytes actually arrive.
                        let expected = declared.unwrap_or(0).min(BODY_PREALLOC_MAX);
                        buf.reserve(expected.max(ctx.bytes_in));
                    }
                    if let Some(prev) = prev {
                        buf.extend_from_slice(&prev);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
        ctx.waited += started.elapsed();
        Ok(first.unwrap_or_else(|| buf.freeze()))
    }

    async fn list_models(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rt: &Runtime,
        key: &KeyRecord,
    ) -> Result<(), GatewayError> {
        let data: Vec<ModelObject<'_>> = rt
            .models
            .iter()
            .filter(|m| key.models.matches(m))
            .map(|m| ModelObject::of(rt, m))
            .collect();
        let body = serde_json::to_vec(&ModelList {
            object: "list",
            data,
        })
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
        self.respond_json(session, ctx, 200, body).await
    }

    async fn retrieve_model(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rt: &Runtime,
        key: &KeyRecord,
        id: &str,
    ) -> Result<(), GatewayError> {
        if !rt.routes.contains_key(id) || !key.models.matches(id) {
            return Err(GatewayError::UnknownModel(id.to_owned()));
        }
        let body = serde_json::to_vec(&ModelObject::of(rt, id))
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        self.respond_json(session, ctx, 200, body).await
    }

    /// The one place where a failure becomes a response.
    async fn respond_error(&self, session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
        ctx.error = Some(e.code());
        let auth_failure = match e {
            GatewayError::Auth(why) => Some(why.reason()),
            GatewayError::IpNotAllowed => Some("forbidden_ip"),
            _ => None,
        };
        if let Some(reason) = auth_failure {
            self.shared
                .metrics
                .auth_failures
                .with_label_values(&[reason])
                .inc();
        }
        match e {
            GatewayError::ClientGone | GatewayError::ClientTimeout => {
                ctx.status = e.status();
                ctx.settle_batch_request_id(ctx.status);
                session.set_keepalive(None);
                return;
            }
            // The rest of an unread or partly read body would be taken for the next request.
            GatewayError::BodyTooLarge(_)
            | GatewayError::BodyTimeout
            | GatewayError::InvalidBody(_)
            | GatewayError::ExpectationFailed => session.set_keepalive(None),
            _ => {}
        }
        drain_small_h2_body(session).await;
        if e.status() >= 500 {
            // Upstream and internal failures carry details (addresses, TLS errors) for operators.
            tracing::warn!(request_id = %ctx.request_id, error = %e, "request failed");
        } else {
            tracing::debug!(request_id = %ctx.request_id, error = %e, "request refused");
        }
        let _ = self.respond_json(session, ctx, e.status(), e.body()).await;
    }

    async fn respond_json(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: Vec<u8>,
    ) -> Result<(), GatewayError> {
        ctx.status = status;
        ctx.settle_batch_request_id(status);
        let (mut resp, ()) = http::Response::builder()
            .status(status)
            .body(())
            .expect("valid status")
            .into_parts();
        let h = &mut resp.headers;
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        h.insert(
            HeaderName::from_static("x-request-id"),
            ctx.request_id_header.clone(),
        );
        ctx.rate_headers.apply(h);
        if let Some(secs) = ctx.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        ctx.response_started = true;
        ctx.bytes_out = body.len() as u64;
        // The usage record goes into the WAL before the answer leaves.
        crate::usage::commit(&self.shared, session, ctx).await;
        let limit = session.downstream_session.get_write_timeout();
        let written = async {
            let header = Box::new(ResponseHeader::from(resp));
            client_write(limit, session.write_response_header(header, false)).await?;
            let body = Some(Bytes::from(body));
            client_write(limit, session.write_response_body(body, true)).await
        }
        .await;
        if written.is_err() {
            session.set_keepalive(None);
        }
        written
    }
}

/// A body read error that is the client's malformed framing (pingora's chunk parser), not a
/// connection that went away.
fn is_bad_framing(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd")
    )
}

/// Most bytes a declared `Content-Length` reserves up front (a larger body's buffer grows as
/// its bytes arrive).
const BODY_PREALLOC_MAX: usize = 64 * 1024;

/// Most of an unread HTTP/2 request body read before an error answer, and for how long.
const H2_DRAIN_MAX: usize = 64 * 1024;
const H2_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// HTTP/2: when an answer ends while the request body is still arriving, h2 resets the stream,
/// and the reset can overtake the queued answer (under load, ~40 % of 401s to a client sending
/// a 60-byte body ended in "Stream error in the HTTP/2 framing layer" instead of the error
/// JSON). Reading the rest of a small body first lets the stream close cleanly; a larger or
/// slower one keeps the reset.
async fn drain_small_h2_body(session: &mut Session) {
    let small = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= H2_DRAIN_MAX);
    if !session.is_http2() || !small || session.is_body_done() {
        return;
    }
    let _ = tokio::time::timeout(H2_DRAIN_TIME, async {
        let mut read = 0;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            read += chunk.len();
            if read > H2_DRAIN_MAX {
                break;
            }
        }
    })
    .await;
}

/// A limit's refusal as the error it becomes; its rate-limit headers go on the response.
fn limited(ctx: &mut RequestCtx, refusal: crate::limits::Refusal) -> GatewayError {
    ctx.rate_headers = refusal.headers;
    ctx.retry_after = Some(refusal.retry_after_secs);
    let shown = match refusal.reason {
        Reason::Tokens => refusal.headers.tokens,
        _ => refusal.headers.requests,
    };
    GatewayError::Limited {
        reason: refusal.reason,
        retry_after_secs: refusal.retry_after_secs,
        limit: shown.filter(|s| s.remaining == 0).map(|s| s.limit),
    }
}

/// The body length the client declared (`Content-Length`), if any.
fn declared_length(session: &Session) -> Option<usize> {
    session
        .get_header(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
}

/// The key the client presented: `Authorization: Bearer …`, else `x-api-key`.
fn presented_key(session: &Session) -> Option<&str> {
    if let Some(v) = session.get_header(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    session
        .get_header("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn unknown_url(method: &Method, path: &str) -> GatewayError {
    GatewayError::UnknownUrl(format!("{method} {path}"))
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

/// A model as `GET /v1/models` lists it. `created` is when the route was loaded.
#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl<'a> ModelObject<'a> {
    fn of(rt: &'a Runtime, model: &'a str) -> Self {
        ModelObject {
            id: model,
            object: "model",
            created: rt.loaded_at_unix,
            owned_by: rt
                .routes
                .get(model)
                .map_or("", |r| r.upstream.name.as_str()),
        }
    }
}

/// The first of `route`'s fallbacks from index `from` on that `key` may use and whose upstream
/// serves `endpoint`, with the index to continue from.
fn next_fallback(
    rt: &Runtime,
    route: &Route,
    key: &KeyRecord,
    endpoint: &str,
    from: usize,
) -> Option<(usize, Arc<Route>)> {
    route.fallbacks[from..]
        .iter()
        .enumerate()
        .find_map(|(j, model)| {
            let r = rt.routes.get(model)?;
            (key.models.matches(&r.model) && r.upstream.serves(endpoint))
                .then(|| (from + j + 1, Arc::clone(r)))
        })
}
