//! Request limits, token limits and plan quotas: who may send what, how fast, and how much per
//! month; on one node or shared by many through Redis.
//!
//! Admission has two steps. Before the request's body is read, [`Limits::admit`] resolves the
//! key's limits (the key's own values, then the developer's overrides, then the plan's:
//! [`effective`]), caps its concurrency, checks the developer's monthly quota and spend cap,
//! checks that the token buckets have room, and takes one request from the key's and the
//! developer's request buckets: a key at a limit is refused without its body being read. Once
//! the body is read, [`Limits::reserve`] takes the token *reservation* (prompt size +
//! `max_tokens`) from the token buckets and checks that what the request declares fits what is
//! left of a hard-stop quota; a refusal there gives back the request the first step took, so a
//! refused request takes nothing from any bucket. With Redis, where each step is a round trip,
//! a request with a small announced body takes both steps at once after its body is read
//! ([`Limits::admit_whole`], one script; see [`Limits::prefers_one_step`]). When the response
//! has ended, [`Limits::settle`] replaces the reservation by the real usage and counts it
//! against the quota, raising usage alerts at the plan's thresholds. A refusal is a
//! [`Refusal`]: 429 with `Retry-After` and the rate-limit headers.
//!
//! # Layout
//! - [`gcra`]: the bucket arithmetic (strict for requests, lenient with debt for tokens).
//! - [`local`]: buckets in this process (no Redis, or Redis unreachable).
//! - [`distributed`]: the same decisions made atomically in Redis, node registry, outages;
//!   `lua` holds its scripts, `lane` batches the request path's calls to Redis.
//! - [`quota`]: monthly usage per developer, quota rules, alert thresholds.
//! - [`headers`]: `x-ratelimit-*`, `RateLimit-Policy`, `RateLimit`.
//! - [`settler`]: settles decided in Redis, summed per key and sent in batches (one pipeline
//!   per batch).
//! - [`service`]: background work: ClickHouse seed, Redis monitor, eviction, alert delivery.

pub mod distributed;
pub mod gcra;
pub mod headers;
mod lane;
pub mod local;
mod lua;
pub mod quota;
pub mod service;
pub mod settler;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use aihub_plans::{Period, PlanCatalog};

use crate::clock::now_ms;
use crate::error::Reason;
use crate::keys::{KeyLimits, KeyRecord};
use crate::metrics::LimitMetrics;
use distributed::{Distributed, QuotaArgs, ReserveArgs};
use gcra::Rate;
use headers::RateHeaders;
use local::{LocalBuckets, Rates, Refused};
use quota::{DevUsage, QuotaBook, QuotaRefusal, QuotaRule};

/// A refused request: the 429 it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    /// `Retry-After`, whole seconds (at least 1).
    pub retry_after_secs: u64,
    pub headers: RateHeaders,
}

/// The limits that apply to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effective {
    pub rates: Rates,
    pub concurrency: Option<u32>,
    /// The developer's monthly usage is counted (and maybe limited) under this rule.
    pub quota: Option<QuotaRule>,
}

/// Resolves a key's limits against the plans: key, then developer, then plan. A key without a
/// limit of its own is covered by its developer's bucket (the sum over their keys).
pub fn effective(k: &KeyLimits, plans: &PlanCatalog) -> Effective {
    let plan = k.plan.as_deref().map(|p| plans.plan(p));
    let dev_requests = match (k.dev_rpm, plan) {
        (Some(n), _) => Some(Rate::per_minute(n)),
        (None, Some(p)) => p.requests_per_minute.map(|n| Rate {
            per_minute: n,
            burst: p.request_burst.unwrap_or(n),
        }),
        (None, None) => None,
    };
    let dev_tokens = k
        .dev_tpm
        .or_else(|| plan.and_then(|p| p.tokens_per_minute))
        .map(Rate::per_minute);
    Effective {
        rates: Rates {
            key_requests: k.key_rpm.map(Rate::per_minute),
            dev_requests,
            key_tokens: k.key_tpm.map(Rate::per_minute),
            dev_tokens,
        },
        concurrency: plan.and_then(|p| p.max_concurrent_requests),
        quota: plan.map(|p| QuotaRule {
            included: k.dev_quota_tokens.or(p.included_tokens),
            hard: !p.overage,
            spend_cap_nanos: k.spend_cap_nanos.filter(|_| p.overage),
        }),
    }
}

/// An admitted request's hold on its limits, until [`Limits::settle`] (or drop) releases it.
pub struct Admission {
    pub headers: RateHeaders,
    key: Arc<KeyRecord>,
    /// Every limit that applies to the request.
    limits: Rates,
    /// The buckets holding the request and its reservation: `limits` (in Redis) or this node's
    /// share of them (decided locally).
    rates: Rates,
    /// Tokens reserved in the token buckets and the quota.
    reserved: u64,
    quota: Option<Counted>,
    /// The reservation was taken in Redis (settle there too).
    remote: bool,
    /// The request was taken from the request buckets in Redis.
    requests_remote: bool,
    /// Both steps were taken at once ([`Limits::admit_whole`] in Redis): nothing to reserve.
    whole: bool,
    holds_slot: bool,
}

impl Admission {
    /// Holds nothing (no slot, no bucket, no quota): nothing to settle.
    pub fn is_inert(&self) -> bool {
        !self.holds_slot && self.quota.is_none() && self.limits.is_empty()
    }
}

/// What a request's body says it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// The token reservation ([`Limits::estimate`]).
    pub reserve: u64,
    /// The tokens the request declares: its prompt estimate plus its own `max_tokens` × `n`
    /// (no completion part when it names none). Must fit what is left of a hard-stop quota.
    pub declared: u64,
}

/// A developer's usage entry a request counts against.
struct Counted {
    rule: QuotaRule,
    dev: Arc<DevUsage>,
    period: Period,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.holds_slot {
            self.key.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(q) = &self.quota {
            q.dev.reserved.fetch_sub(self.reserved, Ordering::Relaxed);
        }
    }
}

/// Settings of the limiter (from `limits:` in the gateway configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Completion tokens reserved when a request names no `max_tokens`.
    pub default_max_tokens: u32,
}

/// A usage alert to deliver (see [`service`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub developer_id: Arc<str>,
    pub period: Period,
    pub threshold_pct: u32,
    pub used_tokens: u64,
    pub quota_tokens: u64,
}

/// What the limiter's background work consumes: alerts to deliver, settles to send to Redis.
pub struct Queues {
    pub alerts: tokio::sync::mpsc::Receiver<Alert>,
    pub settles: tokio::sync::mpsc::Receiver<settler::SettleJob>,
}

/// The limiter: local buckets, quota book, optional Redis.
pub struct Limits {
    pub settings: Settings,
    pub local: LocalBuckets,
    pub quota: QuotaBook,
    pub redis: Option<Arc<Distributed>>,
    pub metrics: LimitMetrics,
    alerts: tokio::sync::mpsc::Sender<Alert>,
    settles: tokio::sync::mpsc::Sender<settler::SettleJob>,
    origin: Instant,
    /// The quota book holds this period's usage from before this node started (ClickHouse
    /// answered, or there is no ClickHouse). Until then this node never creates a quota
    /// counter in Redis (it would start the month from zero for every node).
    pub seeded: std::sync::atomic::AtomicBool,
}

/// The largest declared body read before its admission when decisions are made in Redis
/// ([`Limits::prefers_one_step`]).
pub const ONE_STEP_BODY_MAX: usize = 64 * 1024;

/// The most tokens one request reserves (a body may claim any `max_tokens`).
pub const MAX_RESERVATION: u64 = 1 << 32;

/// Alerts waiting for delivery; beyond this they are dropped (and counted).
pub const ALERT_QUEUE: usize = 4096;

impl Limits {
    /// A limiter and the receiving ends of its queues (for [`service::LimitsService`]).
    pub fn new(
        settings: Settings,
        redis: Option<Distributed>,
        metrics: LimitMetrics,
    ) -> (Limits, Queues) {
        let (alerts, alerts_rx) = tokio::sync::mpsc::channel(ALERT_QUEUE);
        let (settles, settles_rx) = tokio::sync::mpsc::channel(settler::SETTLE_QUEUE);
        let limits = Limits {
            settings,
            local: LocalBuckets::default(),
            quota: QuotaBook::new(now_ms() as i64),
            redis: redis.map(Arc::new),
            metrics,
            alerts,
            settles,
            origin: Instant::now(),
            seeded: true.into(),
        };
        let queues = Queues {
            alerts: alerts_rx,
            settles: settles_rx,
        };
        (limits, queues)
    }

    /// Local bucket time, µs (monotonic).
    #[inline]
    pub fn now_us(&self) -> i64 {
        self.origin.elapsed().as_micros() as i64
    }

    /// The reservation for a request: prompt tokens estimated as ⌈body bytes / 4⌉ (an upper
    /// bound for JSON-wrapped text) plus `max_tokens` × `n` (or the default).
    pub fn estimate(
        &self,
        body_len: usize,
        max_tokens: Option<u64>,
        n: u64,
        embeddings: bool,
    ) -> u64 {
        let prompt = (body_len as u64).div_ceil(4);
        let completion = if embeddings {
            0
        } else {
            max_tokens
                .unwrap_or(u64::from(self.settings.default_max_tokens))
                .saturating_mul(n.max(1))
        };
        prompt.saturating_add(completion)
    }

    /// A request's [`Cost`]: the reservation, and what it declares (for hard-stop quotas: a
    /// request naming no `max_tokens` declares its prompt only, so the default reservation
    /// alone never refuses it).
    pub fn cost(&self, body_len: usize, max_tokens: Option<u64>, n: u64, embeddings: bool) -> Cost {
        Cost {
            reserve: self.estimate(body_len, max_tokens, n, embeddings),
            declared: self.estimate(body_len, Some(max_tokens.unwrap_or(0)), n, embeddings),
        }
    }

    /// The first step of an admission, before the request's body is read: the concurrency
    /// slot, the quota and spend cap as they stand, room in the token buckets, and one request
    /// from the request buckets (all decided together; a refusal takes nothing). The token
    /// reservation follows with [`Limits::reserve`].
    pub async fn admit(
        &self,
        key: &Arc<KeyRecord>,
        plans: &PlanCatalog,
    ) -> Result<Admission, Refusal> {
        self.admit_with(key, effective(&key.limits, plans), None)
            .await
    }

    /// Whether a request whose body declares `declared` bytes (`Content-Length`) is better
    /// admitted by [`Limits::admit_whole`] once its body is read: decisions are made in Redis
    /// (there the whole admission is one script instead of two; locally two steps cost
    /// nothing) and the body is small ([`ONE_STEP_BODY_MAX`]). A large or chunked body keeps
    /// the two steps, so a key at its limit is refused without its body being read.
    #[inline]
    pub fn prefers_one_step(&self, declared: Option<usize>) -> bool {
        declared.is_some_and(|n| n <= ONE_STEP_BODY_MAX)
            && self.redis.as_ref().is_some_and(|r| r.is_up())
    }

    /// Both steps of an admission at once, for a request whose body is already read (small
    /// bodies: [`Limits::prefers_one_step`]): [`Limits::admit`] and [`Limits::reserve`] with the
    /// same result, in one Redis script (a refusal takes nothing). Decided locally (Redis down),
    /// it is the two steps.
    pub async fn admit_whole(
        &self,
        key: &Arc<KeyRecord>,
        plans: &PlanCatalog,
        cost: Cost,
    ) -> Result<Admission, Refusal> {
        let adm = self
            .admit_with(key, effective(&key.limits, plans), Some(cost))
            .await?;
        if adm.whole {
            return Ok(adm);
        }
        self.reserve(adm, cost).await
    }

    /// The admission of a call that is not a model call (Files and Batches): one request from
    /// the key's and the developer's request buckets, nothing else (no concurrency slot, no
    /// quota, no tokens): a developer whose quota is used up can still fetch a batch's results.
    pub async fn admit_request(
        &self,
        key: &Arc<KeyRecord>,
        plans: &PlanCatalog,
    ) -> Result<Admission, Refusal> {
        let eff = effective(&key.limits, plans);
        let requests_only = Effective {
            rates: Rates {
                key_requests: eff.rates.key_requests,
                dev_requests: eff.rates.dev_requests,
                ..Rates::default()
            },
            concurrency: None,
            quota: None,
        };
        self.admit_with(key, requests_only, None).await
    }

    /// The first step of an admission, or with `cost` (in Redis) both steps at once.
    async fn admit_with(
        &self,
        key: &Arc<KeyRecord>,
        eff: Effective,
        cost: Option<Cost>,
    ) -> Result<Admission, Refusal> {
        let mut adm = Admission {
            headers: RateHeaders::default(),
            key: Arc::clone(key),
            limits: eff.rates,
            rates: eff.rates,
            reserved: 0,
            quota: None,
            remote: false,
            requests_remote: false,
            whole: false,
            holds_slot: false,
        };
        if let Some(cap) = eff.concurrency {
            if key.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
                key.in_flight.fetch_sub(1, Ordering::Relaxed);
                // The buckets as this node knows them (in Redis mode they live in Redis: none).
                let headers = match &self.redis {
                    Some(_) => RateHeaders::default(),
                    None => {
                        self.local
                            .peek(&key.key_id, &key.developer_id, &eff.rates, self.now_us())
                    }
                };
                return Err(self.refuse(Reason::Concurrency, 1_000_000, headers));
            }
            adm.holds_slot = true;
        }
        if eff.rates.is_empty() && eff.quota.is_none() {
            return Ok(adm);
        }
        let now = now_ms() as i64;
        let mut others_reserved = 0;
        if let Some(rule) = eff.quota {
            let dev = self.quota.dev(&key.developer_id, now);
            others_reserved = dev.reserved.load(Ordering::Relaxed);
            adm.quota = Some(Counted {
                rule,
                dev,
                period: self.quota.period(now),
            });
        }
        if let Some(redis) = self.redis.as_ref().filter(|r| r.is_up()) {
            redis.adopt_runtime();
            // With the body's cost known the script also takes the reservation, counted
            // against this node's reservations first, as in [`Limits::reserve`].
            let tokens_limited = eff.rates.key_tokens.is_some() || eff.rates.dev_tokens.is_some();
            let mut declared = 0;
            if let Some(c) = cost.filter(|_| tokens_limited || adm.quota.is_some()) {
                adm.reserved = c.reserve.min(MAX_RESERVATION);
                declared = c.declared.min(MAX_RESERVATION);
                if let Some(q) = &adm.quota {
                    others_reserved = q.dev.reserved.fetch_add(adm.reserved, Ordering::Relaxed);
                }
            }
            let counted = adm.quota.as_ref();
            let args = QuotaArgs {
                rule: counted.map(|c| c.rule),
                reserved: others_reserved,
                seed: counted.map_or((0, 0), |c| c.dev.totals()),
                period: counted.map_or_else(|| self.quota.period(now), |c| c.period),
                period_end_ms: self.quota.period_end_ms(),
                seeded: self.seeded.load(Ordering::Relaxed),
            };
            let started = Instant::now();
            // Without a cost (first step) the token buckets are only checked for room.
            let answer = redis
                .admit(
                    (&key.key_id, &key.developer_id),
                    &eff.rates,
                    (adm.reserved, declared),
                    args,
                )
                .await;
            self.metrics
                .redis_latency
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Ok(a) => {
                    if let (Some(c), Some((tokens, cost))) = (counted, a.quota) {
                        c.dev.tokens.store(tokens, Ordering::Relaxed);
                        c.dev.cost_nanos.store(cost, Ordering::Relaxed);
                        c.dev.global.store(true, Ordering::Relaxed);
                    }
                    match a.result {
                        Ok(h) => {
                            adm.headers = h;
                            adm.requests_remote = true;
                            adm.remote = true;
                            adm.whole = cost.is_some();
                        }
                        Err(r) => return Err(self.refused(r, now)),
                    }
                }
                Err(e) => {
                    self.redis_failed(redis, &e);
                    // Decided below in two steps: the reservation is taken again by the second.
                    if let Some(q) = &adm.quota {
                        q.dev.reserved.fetch_sub(adm.reserved, Ordering::Relaxed);
                    }
                    adm.reserved = 0;
                }
            }
        }
        let counted = adm.quota.as_ref();
        if !adm.requests_remote {
            if let Some(c) = &counted {
                let (tokens, spent) = c.dev.totals();
                if let Err(why) = c.rule.check(tokens, spent, others_reserved) {
                    let reason = match why {
                        QuotaRefusal::Exhausted => Reason::Quota,
                        QuotaRefusal::SpendCap => Reason::SpendCap,
                    };
                    let rates = self.local_rates(&eff.rates);
                    let headers =
                        self.local
                            .peek(&key.key_id, &key.developer_id, &rates, self.now_us());
                    return Err(self.quota_refusal(reason, now, headers));
                }
            }
            let rates = self.local_rates(&eff.rates);
            adm.rates = rates;
            match self
                .local
                .admit(&key.key_id, &key.developer_id, &rates, 0, self.now_us())
            {
                Ok(h) => adm.headers = h,
                Err(r) => return Err(self.refused(r, now)),
            }
        }
        Ok(adm)
    }

    /// The second step of an admission, once the body is read: takes the token reservation
    /// (`cost.reserve`) from the token buckets and, on a hard-stop plan, checks that what the
    /// request declares (`cost.declared`) fits what is left of the quota after the committed
    /// tokens and the other requests' reservations. The reservation is counted against the
    /// quota before the check, so concurrent requests see each other's. Refused, the request
    /// taken by [`Limits::admit`] is given back and the admission dropped: nothing is held.
    pub async fn reserve(&self, mut adm: Admission, cost: Cost) -> Result<Admission, Refusal> {
        let tokens_limited = adm.limits.key_tokens.is_some() || adm.limits.dev_tokens.is_some();
        if !tokens_limited && adm.quota.is_none() {
            return Ok(adm);
        }
        let now = now_ms() as i64;
        adm.reserved = cost.reserve.min(MAX_RESERVATION);
        let declared = cost.declared.min(MAX_RESERVATION);
        let others = adm.quota.as_ref().map_or(0, |c| {
            c.dev.reserved.fetch_add(adm.reserved, Ordering::Relaxed)
        });
        let hard_included = adm
            .quota
            .as_ref()
            .and_then(|c| c.rule.included.filter(|_| c.rule.hard));
        let ids = (
            Arc::clone(&adm.key.key_id),
            Arc::clone(&adm.key.developer_id),
        );
        if let Some(redis) = self.redis.as_ref().filter(|r| r.is_up()) {
            let args = ReserveArgs {
                give_back: if adm.requests_remote {
                    adm.limits
                } else {
                    Rates::default()
                },
                hard_included,
                reserved: others,
                declared,
                seed: adm.quota.as_ref().map_or(0, |c| c.dev.totals().0),
                period: adm
                    .quota
                    .as_ref()
                    .map_or_else(|| self.quota.period(now), |c| c.period),
            };
            let started = Instant::now();
            let answer = redis
                .reserve((&ids.0, &ids.1), &adm.limits, adm.reserved, args)
                .await;
            self.metrics
                .redis_latency
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Ok(a) => {
                    if let (Some(c), Some(tokens)) = (&adm.quota, a.quota_tokens) {
                        c.dev.tokens.store(tokens, Ordering::Relaxed);
                        c.dev.global.store(true, Ordering::Relaxed);
                    }
                    return match a.result {
                        Ok(tokens) => {
                            adm.headers.tokens = tokens.or(adm.headers.tokens);
                            adm.rates = adm.limits;
                            adm.remote = true;
                            Ok(adm)
                        }
                        Err(r) => {
                            if !adm.requests_remote {
                                self.local.give_back_request(
                                    &ids.0,
                                    &ids.1,
                                    &adm.rates,
                                    self.now_us(),
                                );
                            }
                            Err(self.refused_after(&adm, r, now))
                        }
                    };
                }
                Err(e) => self.redis_failed(redis, &e),
            }
        }
        // Decided on this node (no Redis, or Redis unreachable: this node's share). A request
        // taken in Redis before an outage cannot be given back from here: it stays counted.
        let give_back = !adm.requests_remote;
        if let Some(c) = &adm.quota {
            if c.rule.fits(c.dev.totals().0, others, declared).is_err() {
                if give_back {
                    self.local
                        .give_back_request(&ids.0, &ids.1, &adm.rates, self.now_us());
                }
                let refused = Refused {
                    reason: Reason::Quota,
                    retry_us: 0,
                    headers: RateHeaders::default(),
                };
                return Err(self.refused_after(&adm, refused, now));
            }
        }
        let rates = if adm.requests_remote {
            self.local_rates(&adm.limits)
        } else {
            adm.rates
        };
        match self.local.reserve(
            (&ids.0, &ids.1),
            &rates,
            adm.reserved,
            give_back,
            self.now_us(),
        ) {
            Ok(tokens) => {
                adm.headers.tokens = tokens.or(adm.headers.tokens);
                adm.rates = rates;
                adm.remote = false;
                Ok(adm)
            }
            Err(r) => Err(self.refused_after(&adm, r, now)),
        }
    }

    /// The refusal of a request whose first step took a request, now given back: its headers
    /// show the request buckets with that request returned.
    fn refused_after(&self, adm: &Admission, r: Refused, now_ms: i64) -> Refusal {
        let requests = adm.headers.requests.map(|s| headers::Shown {
            remaining: s.remaining + 1,
            ..s
        });
        let headers = RateHeaders {
            requests,
            tokens: r.headers.tokens.or(adm.headers.tokens),
        };
        self.refused(Refused { headers, ..r }, now_ms)
    }

    /// The rates this node applies alone: all of them, or its share while Redis is down.
    fn local_rates(&self, rates: &Rates) -> Rates {
        match &self.redis {
            Some(r) => rates.share(r.nodes()),
            None => *rates,
        }
    }

    pub(crate) fn redis_failed(&self, redis: &Distributed, e: &distributed::RedisDown) {
        self.metrics.redis_errors.inc();
        if redis.mark_down() {
            self.metrics.redis_up.set(0);
            tracing::warn!(error = %e, nodes = redis.nodes(), "Redis unreachable: limits are decided locally with this node's share until it answers again");
        }
    }

    fn refused(&self, r: Refused, now_ms: i64) -> Refusal {
        match r.reason {
            Reason::Quota | Reason::SpendCap => self.quota_refusal(r.reason, now_ms, r.headers),
            reason => self.refuse(reason, r.retry_us, r.headers),
        }
    }

    fn quota_refusal(&self, reason: Reason, now_ms: i64, headers: RateHeaders) -> Refusal {
        let until_end = (self.quota.period_end_ms() - now_ms).max(0) * 1000;
        self.refuse(reason, until_end, headers)
    }

    fn refuse(&self, reason: Reason, retry_us: i64, headers: RateHeaders) -> Refusal {
        self.metrics
            .rate_limited
            .with_label_values(&[reason.as_str()])
            .inc();
        Refusal {
            reason,
            retry_after_secs: headers::ceil_secs(retry_us).max(1),
            headers,
        }
    }

    /// Queues an alert for each threshold of the monthly quota crossed between `before` and
    /// `after` tokens.
    pub(crate) fn alert(
        &self,
        developer_id: &Arc<str>,
        period: Period,
        rule: QuotaRule,
        before: u64,
        after: u64,
        thresholds: &[u32],
    ) {
        let Some(quota) = rule.included else { return };
        for pct in quota::crossed(thresholds, quota, before, after) {
            let alert = Alert {
                developer_id: Arc::clone(developer_id),
                period,
                threshold_pct: pct,
                used_tokens: after,
                quota_tokens: quota,
            };
            if self.alerts.try_send(alert).is_err() {
                self.metrics
                    .usage_alerts
                    .with_label_values(&["dropped"])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_key_developer_plan() {
        let plans = PlanCatalog::builtin();
        let free = KeyLimits {
            plan: Some("free".into()),
            ..KeyLimits::default()
        };
        let e = effective(&free, &plans);
        assert_eq!(e.rates.dev_requests, Some(Rate::per_minute(20)));
        assert_eq!(e.rates.key_requests, None);
        assert_eq!(e.rates.dev_tokens, Some(Rate::per_minute(10_000)));
        assert_eq!(e.concurrency, Some(5));
        assert_eq!(
            e.quota,
            Some(QuotaRule {
                included: Some(1000),
                hard: true,
                spend_cap_nanos: None
            })
        );
        let overridden = KeyLimits {
            plan: Some("pro".into()),
            key_rpm: Some(7),
            dev_rpm: Some(100),
            dev_tpm: Some(5000),
            dev_quota_tokens: Some(42),
            spend_cap_nanos: Some(9),
            ..KeyLimits::default()
        };
        let e = effective(&overridden, &plans);
        assert_eq!(e.rates.key_requests, Some(Rate::per_minute(7)));
        assert_eq!(e.rates.dev_requests, Some(Rate::per_minute(100)));
        assert_eq!(e.rates.dev_tokens, Some(Rate::per_minute(5000)));
        assert_eq!(e.quota.unwrap().included, Some(42));
        assert_eq!(e.quota.unwrap().spend_cap_nanos, Some(9));
        assert!(!e.quota.unwrap().hard);
        // A spend cap means nothing on a hard-stop plan; no plan, no plan limits.
        let capped_free = KeyLimits {
            spend_cap_nanos: Some(9),
            ..free
        };
        assert_eq!(
            effective(&capped_free, &plans)
                .quota
                .unwrap()
                .spend_cap_nanos,
            None
        );
        assert_eq!(
            effective(&KeyLimits::default(), &plans),
            Effective::default()
        );
    }
}
