//! Turns a finished request into its usage record: tokens (reported or estimated), cost (a batch
//! item's discounted), timings, outcome, batch, and commits it into the usage WAL ([`commit`]),
//! settling the request's limit reservation with its price: once per request, before the
//! response's last byte leaves, or from `logging` for a request that ended otherwise (refused
//! before a response, client gone).

use std::time::Duration;

use aihub_usage::pricing::{to_nanos, Pricing, Tokens};
use aihub_usage::UsageRecord;
use http::header;
use pingora_proxy::Session;
use rust_decimal::Decimal;

use crate::context::{Charge, RequestCtx, ResponseMeter, Shared};
use crate::metering::{self, Usage};

/// Longest user agent kept in a record.
const USER_AGENT_MAX: usize = 512;

/// What a finished request's tokens come from.
#[derive(Debug)]
pub enum Metered {
    /// Nothing was consumed (refused before the upstream, or an error status): zero, exactly.
    Nothing,
    /// The upstream reported its usage.
    Exact(Usage),
    /// No readable usage: estimated from the request and the text delivered.
    Estimate {
        request: bytes::Bytes,
        delivered: metering::Delivered,
    },
}

/// Prices the exchange and commits its usage record into the WAL (the page cache: a `kill -9`
/// after this loses nothing), once per request, and settles the request's limit reservation
/// with the price (kept in `ctx.charge`). Callers put it before the response's last byte: a
/// client that sends its next request on that byte finds this one settled (a quota's edge is
/// exact for sequential requests).
pub async fn commit(shared: &Shared, session: &Session, ctx: &mut RequestCtx) {
    if ctx.charge.is_some() {
        return;
    }
    let sink = shared.usage.as_ref().filter(|_| ctx.metering.record);
    if sink.is_none() && ctx.admission.is_none() {
        return; // nobody needs the price
    }
    let runtime = shared.runtime.load();
    let tokens = tokens(metered(ctx)).await;
    let priced = priced(ctx, tokens, &runtime.pricing, runtime.batch_discount);
    let charge = Charge {
        tokens: u64::from(priced.usage.total),
        cost_nanos: priced.cost_nanos,
    };
    ctx.charge = Some(charge);
    if let (Some(admission), Some(limits)) = (ctx.admission.take(), &shared.limits) {
        limits.settle(admission, charge.tokens, charge.cost_nanos, &runtime.plans);
    }
    if let Some(sink) = sink {
        let record = record(session, ctx, &priced, ctx.start.elapsed());
        if record.usage_estimated == 1 {
            shared.metrics.usage_estimated.inc();
        }
        sink.commit(record).await;
    }
}

/// How a finished request is metered: the response meter's reading, taken out of `ctx`.
pub fn metered(ctx: &mut RequestCtx) -> Metered {
    let api = ctx.api;
    let estimate = |delivered| Metered::Estimate {
        request: ctx.request_body.clone().unwrap_or_default(),
        delivered,
    };
    match std::mem::take(&mut ctx.meter) {
        ResponseMeter::None => Metered::Nothing,
        ResponseMeter::Opaque => estimate(metering::Delivered::default()),
        ResponseMeter::Json(json) => match json.usage(api) {
            // A body cut short may still hold an early usage object, but not the whole answer.
            Some(u) if ctx.error.is_none() => Metered::Exact(u),
            _ => estimate(json.delivered()),
        },
        ResponseMeter::Sse(sse) => match sse.usage() {
            Some(u) => Metered::Exact(u),
            None => estimate(sse.delivered),
        },
    }
}

/// The tokens of a finished request and whether they are estimated. Estimating tokenizes text,
/// so it runs on the blocking pool, never on a proxy worker thread.
pub async fn tokens(metered: Metered) -> (Usage, bool) {
    match metered {
        Metered::Nothing => (Usage::default(), false),
        Metered::Exact(u) => (u, false),
        Metered::Estimate { request, delivered } => {
            let work = move || metering::estimate::estimate(&request, &delivered);
            match tokio::task::spawn_blocking(work).await {
                Ok(u) => (u, true),
                Err(_) => (Usage::default(), true), // the blocking pool is shutting down
            }
        }
    }
}

/// A finished request's tokens and their price.
#[derive(Debug, Clone, Copy)]
pub struct Priced {
    pub usage: Usage,
    /// The tokens are the gateway's estimate.
    pub estimated: bool,
    pub cost_nanos: i64,
}

/// The cost of a finished request's tokens (for its usage record and its limits): a batch
/// item's with `batch_discount` taken off, exactly, before the one rounding to nano-USD.
pub fn priced(
    ctx: &RequestCtx,
    (usage, estimated): (Usage, bool),
    pricing: &Pricing,
    batch_discount: Decimal,
) -> Priced {
    let route = ctx.route.as_deref();
    let model = route.map_or("", |r| r.model.as_str());
    let upstream_model = route.map_or("", |r| r.upstream_model.as_deref().unwrap_or(&r.model));
    let tokens = Tokens {
        prompt: usage.prompt,
        cached: usage.cached,
        completion: usage.completion,
    };
    let mut cost = pricing.price(model, upstream_model).cost(tokens);
    if ctx.batch.is_some() {
        cost *= Decimal::ONE - batch_discount;
    }
    Priced {
        usage,
        estimated,
        cost_nanos: to_nanos(cost),
    }
}

/// Builds the usage record of a finished request.
pub fn record(
    session: &Session,
    ctx: &RequestCtx,
    priced: &Priced,
    elapsed: Duration,
) -> UsageRecord {
    let req = session.req_header();
    let Priced {
        usage,
        estimated,
        cost_nanos: cost,
    } = *priced;
    let route = ctx.route.as_deref();
    // The model the client asked for; the upstream model is the serving route's (a fallback's).
    let model = ctx
        .requested
        .as_deref()
        .or(route)
        .map_or("", |r| r.model.as_str());
    let upstream_model = route.map_or("", |r| r.sent_model());
    let error_type = match ctx.error {
        Some(code) => code.to_owned(),
        None if ctx.status >= 400 => "upstream_error".to_owned(),
        None => String::new(),
    };
    let upstream = route.map(|r| &r.upstream);
    let ms =
        |d: Option<Duration>| d.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
    UsageRecord {
        request_id: ctx.request_id,
        ts: (ctx.started_at_ms / 1000) as u32,
        ts_ms: ctx.started_at_ms,
        developer_id: ctx
            .key
            .as_deref()
            .map_or_else(String::new, |k| k.developer_id.to_string()),
        key_id: ctx
            .key
            .as_deref()
            .map_or_else(String::new, |k| k.key_id.to_string()),
        endpoint: req.uri.path().strip_prefix("/v1/").unwrap_or("").to_owned(),
        method: req.method.as_str().to_owned(),
        model: model.to_owned(),
        upstream_model: upstream_model.to_owned(),
        upstream: upstream.map_or_else(String::new, |u| u.name.clone()),
        upstream_endpoint: upstream
            .zip(ctx.endpoint)
            .map_or_else(String::new, |(u, i)| u.endpoints[i].url.clone()),
        prompt_tokens: usage.prompt,
        cached_tokens: usage.cached,
        completion_tokens: usage.completion,
        total_tokens: usage.total,
        cost_nanos: cost,
        gateway_overhead_us: ctx
            .overhead
            .map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
        upstream_latency_ms: ms(ctx.upstream_latency),
        total_latency_ms: ms(Some(elapsed)),
        status: ctx.status,
        error_type,
        streamed: u8::from(ctx.stream),
        usage_estimated: u8::from(estimated),
        client_ip: ctx.client_ip.map_or_else(String::new, |ip| ip.to_string()),
        user_agent: session
            .get_header(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map_or_else(String::new, |ua| truncate(ua, USER_AGENT_MAX).to_owned()),
        batch_id: ctx
            .batch
            .as_ref()
            .map_or_else(String::new, |b| b.task_id.to_string()),
        attempts: ctx.attempts,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
