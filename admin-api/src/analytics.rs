//! Analytics from the ClickHouse rollups (`docs/analytics.md`): a developer's overview (this
//! period against the previous one), trends (hourly from `usage_hourly`, daily from
//! `usage_daily`, empty buckets as zeros), costs (by model and key, with a linear month-end
//! projection for the current period) and performance (t-digest latency percentiles by model,
//! requests by status); and the operator's platform overview (totals, top developers by cost,
//! models).
//!
//! Same rules as [`crate::usage`]: a developer reads their own data, an operator anyone's
//! (`developer_id=`); exact money as decimal strings; whole UTC days.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_plans::Period;
use aihub_store::{developers, now_ms};
use aihub_usage::read::daily::{self, FigureRow};
use aihub_usage::read::platform;

use crate::auth::{Caller, Operator};
use crate::error::{AppError, FieldError, Json, Query};
use crate::range::{
    rfc3339_s, DayRange, RangeParams, MAX_HOURLY_DAYS, MAX_RANGE_DAYS, MS_PER_DAY, MS_PER_HOUR,
};
use crate::state::AppState;
use crate::usage::{key_names, mean_ms, percent, usd, whose, UsageQuery};

/// Change from `prev` to `cur` in percent (two decimals), `None` when `prev` is 0.
fn change(cur: Decimal, prev: Decimal) -> Option<String> {
    percent(cur - prev, prev)
}

// ---------------------------------------------------------------------------------------------
// Overview

/// Figures of one window of the overview.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowFigures {
    /// First day (UTC).
    pub from: String,
    /// Last day (UTC, inclusive).
    pub to: String,
    pub requests: u64,
    pub total_tokens: u64,
    /// Exact USD, a decimal string.
    pub cost_usd: String,
    /// Requests answered with status ≥ 400.
    pub errors: u64,
    /// `errors / requests` in percent, a decimal string; `null` without requests.
    pub error_rate_pct: Option<String>,
    /// Mean total latency of successful requests, ms; `null` without any.
    pub avg_latency_ms: Option<f64>,
}

/// Relative change from the previous window to the current one, in percent (decimal strings,
/// two decimals); `null` where the previous value is zero or missing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Changes {
    pub requests: Option<String>,
    pub total_tokens: Option<String>,
    pub cost_usd: Option<String>,
    pub errors: Option<String>,
    pub error_rate: Option<String>,
    pub avg_latency_ms: Option<String>,
}

/// This period (or range) against the one before it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    pub developer_id: String,
    /// The period asked for, or `null` for a `from`/`to` range.
    pub period: Option<String>,
    /// The period or range, cut at today.
    pub current: WindowFigures,
    /// The same number of days from the start of the previous period (for a range: the days
    /// just before it).
    pub previous: WindowFigures,
    pub change_pct: Changes,
}

/// The window an overview compares with: as many days from the start of the previous period
/// (cut at its end), or the same number of days just before a `from`/`to` range.
fn previous_window(cur: &DayRange) -> DayRange {
    match cur.period {
        Some(p) => {
            let prev = DayRange::of_period(Period::of_unix_ms(p.start_ms() - 1));
            DayRange {
                to: (prev.from + cur.days() - 1).min(prev.to),
                ..prev
            }
        }
        None => DayRange {
            from: cur.from - cur.days(),
            to: cur.from - 1,
            period: None,
        },
    }
}

struct Window<'a> {
    range: DayRange,
    row: Option<&'a FigureRow>,
}

impl Window<'_> {
    fn figures(&self) -> WindowFigures {
        let (n, tokens, nanos, errors, ok_n, ok_latency) =
            self.row.map_or((0, 0, 0, 0, 0, 0), |r| {
                (r.n, r.tokens, r.nanos, r.errors, r.ok_n, r.ok_latency)
            });
        WindowFigures {
            from: self.range.first_date(),
            to: self.range.last_date(),
            requests: n,
            total_tokens: tokens,
            cost_usd: usd(nanos),
            errors,
            error_rate_pct: percent(errors.into(), n.into()),
            avg_latency_ms: (ok_n > 0).then(|| mean_ms(ok_latency, ok_n)),
        }
    }

    fn get(&self, f: impl Fn(&FigureRow) -> Decimal) -> Decimal {
        self.row.map_or(Decimal::ZERO, f)
    }

    fn ratio(&self, num: impl Fn(&FigureRow) -> u64, den: impl Fn(&FigureRow) -> u64) -> Decimal {
        match self.row {
            Some(r) if den(r) > 0 => Decimal::from(num(r)) / Decimal::from(den(r)),
            _ => Decimal::ZERO,
        }
    }
}

/// This period against the previous one: requests, tokens, cost, errors, error rate and
/// average latency, with the change in percent. For the current period both windows hold the
/// same number of days (today counts as a day).
#[utoipa::path(get, path = "/developer/analytics/overview", tag = "analytics", params(UsageQuery),
    responses((status = 200, body = Overview),
              (status = 404, description = "No such developer (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn overview(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Overview>, AppError> {
    overview_of(&s, &caller, q).await.map(Json)
}

/// What `overview` answers (the caller's, or the developer an operator names), for the portal too.
pub(crate) async fn overview_of(
    s: &AppState,
    caller: &Caller,
    q: UsageQuery,
) -> Result<Overview, AppError> {
    let db = s.usage_db()?;
    let cur = q.range(Some(MAX_RANGE_DAYS))?.until(now_ms());
    let developer_id = whose(s, caller, q.developer_id.as_deref()).await?;
    let prev = previous_window(&cur);
    let rows = daily::compare(&db.client, &developer_id, cur.window(), prev.window()).await?;
    let window = |dim: &str, range| Window {
        range,
        row: rows.iter().find(|r| r.dim == dim),
    };
    let (c, p) = (window("current", cur), window("previous", prev));
    let count = |f: fn(&FigureRow) -> u64| move |r: &FigureRow| Decimal::from(f(r));
    Ok(Overview {
        developer_id,
        period: cur.period.map(|p| p.to_string()),
        current: c.figures(),
        previous: p.figures(),
        change_pct: Changes {
            requests: change(c.get(count(|r| r.n)), p.get(count(|r| r.n))),
            total_tokens: change(c.get(count(|r| r.tokens)), p.get(count(|r| r.tokens))),
            cost_usd: change(
                c.get(|r| Decimal::from(r.nanos)),
                p.get(|r| Decimal::from(r.nanos)),
            ),
            errors: change(c.get(count(|r| r.errors)), p.get(count(|r| r.errors))),
            error_rate: change(
                c.ratio(|r| r.errors, |r| r.n),
                p.ratio(|r| r.errors, |r| r.n),
            ),
            avg_latency_ms: change(
                c.ratio(|r| r.ok_latency, |r| r.ok_n),
                p.ratio(|r| r.ok_latency, |r| r.ok_n),
            ),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Trends

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TrendsQuery {
    /// `hour` (from `usage_hourly`, at most 31 days) or `day`. Default `day`.
    pub granularity: Option<String>,
    /// Billing period, `YYYY-MM` (UTC). Default: the current one. Not with `from`/`to`.
    pub period: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), with `to`.
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC, inclusive), with `from`. At most 400 days after `from`
    /// (31 for hourly series).
    pub to: Option<String>,
    /// Operators only: whose usage (default: their own).
    pub developer_id: Option<String>,
}

/// One bucket of a series.
#[derive(Debug, Serialize, ToSchema)]
pub struct Bucket {
    /// Start of the hour or day, RFC 3339 UTC.
    pub start: String,
    pub requests: u64,
    /// Total tokens.
    pub tokens: u64,
    /// Exact USD, a decimal string.
    pub cost_usd: String,
    /// Requests answered with status ≥ 400.
    pub errors: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Trends {
    pub developer_id: String,
    /// `hour` or `day`.
    pub granularity: String,
    pub period: Option<String>,
    pub from: String,
    pub to: String,
    /// Every bucket from the start of the range up to the current one (none in the future),
    /// oldest first; buckets without requests are zeros.
    pub data: Vec<Bucket>,
}

/// A series of requests, tokens, cost and errors per hour or per day.
#[utoipa::path(get, path = "/developer/analytics/trends", tag = "analytics", params(TrendsQuery),
    responses((status = 200, body = Trends),
              (status = 404, description = "No such developer (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn trends(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<TrendsQuery>,
) -> Result<Json<Trends>, AppError> {
    trends_of(&s, &caller, q).await.map(Json)
}

/// What `trends` answers (the caller's, or the developer an operator names), for the portal too.
pub(crate) async fn trends_of(
    s: &AppState,
    caller: &Caller,
    q: TrendsQuery,
) -> Result<Trends, AppError> {
    let db = s.usage_db()?;
    let hourly = match q.granularity.as_deref() {
        None | Some("day") => false,
        Some("hour") => true,
        Some(_) => return Err(AppError::validation("granularity", "must be hour or day")),
    };
    let r = RangeParams {
        period: q.period.as_deref(),
        from: q.from.as_deref(),
        to: q.to.as_deref(),
    }
    .resolve(Some(MAX_RANGE_DAYS), now_ms())?;
    if hourly && r.days() > MAX_HOURLY_DAYS {
        return Err(AppError::Validation(vec![FieldError::new(
            "to",
            format!("an hourly series may span at most {MAX_HOURLY_DAYS} days"),
        )]));
    }
    let developer_id = whose(s, caller, q.developer_id.as_deref()).await?;
    let now = now_ms();
    let (step, rows) = if hourly {
        let rows = daily::hourly_series(&db.client, &developer_id, r.start_ms(), r.end_ms());
        (MS_PER_HOUR, rows.await?)
    } else {
        let rows = daily::daily_series(&db.client, &developer_id, r.window());
        (MS_PER_DAY, rows.await?)
    };
    let by_start: HashMap<i64, &daily::BucketRow> =
        rows.iter().map(|b| (i64::from(b.t) * 1000, b)).collect();
    // Up to the bucket holding now (a range in the future: its first bucket only).
    let last = r
        .end_ms()
        .min(now - now.rem_euclid(step) + step)
        .max(r.start_ms() + step);
    let data = (r.start_ms()..last)
        .step_by(step as usize)
        .map(|start| {
            let b = by_start.get(&start);
            Bucket {
                start: rfc3339_s(start),
                requests: b.map_or(0, |b| b.n),
                tokens: b.map_or(0, |b| b.tokens),
                cost_usd: usd(b.map_or(0, |b| b.nanos)),
                errors: b.map_or(0, |b| b.errs),
            }
        })
        .collect();
    Ok(Trends {
        developer_id,
        granularity: if hourly { "hour" } else { "day" }.into(),
        period: r.period.map(|p| p.to_string()),
        from: r.first_date(),
        to: r.last_date(),
        data,
    })
}

// ---------------------------------------------------------------------------------------------
// Costs

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCost {
    pub model: String,
    pub requests: u64,
    pub total_tokens: u64,
    /// Exact USD, a decimal string.
    pub cost_usd: String,
    /// Share of the total cost in percent (two decimals); `null` when the total is zero.
    pub share_pct: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCost {
    pub key_id: String,
    /// The key's name (`null` if the key is not in the store).
    pub key_name: Option<String>,
    pub requests: u64,
    pub total_tokens: u64,
    /// Exact USD, a decimal string.
    pub cost_usd: String,
    /// Share of the total cost in percent (two decimals); `null` when the total is zero.
    pub share_pct: Option<String>,
}

/// The linear month-end projection of the current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct Projection {
    /// `YYYY-MM`.
    pub period: String,
    /// Cost from the period's start until now, exact USD.
    pub cost_so_far_usd: String,
    /// Share of the period elapsed, in percent (two decimals).
    pub elapsed_pct: String,
    /// `cost_so_far × period length / elapsed time` (milliseconds), rounded half to even to 9
    /// decimals (nano-USD).
    pub projected_cost_usd: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Costs {
    pub developer_id: String,
    pub period: Option<String>,
    pub from: String,
    pub to: String,
    pub requests: u64,
    /// Exact USD, a decimal string.
    pub total_cost_usd: String,
    /// Most expensive first.
    pub by_model: Vec<ModelCost>,
    /// Most expensive first.
    pub by_key: Vec<KeyCost>,
    /// Only when the request is for the current period; `null` otherwise.
    pub projection: Option<Projection>,
}

/// `so_far × (period length / elapsed)`, rounded half to even to nano-USD.
pub fn project(so_far: Decimal, elapsed_ms: i64, period_ms: i64) -> Decimal {
    if elapsed_ms <= 0 {
        return so_far;
    }
    (so_far * Decimal::from(period_ms) / Decimal::from(elapsed_ms))
        .round_dp_with_strategy(9, RoundingStrategy::MidpointNearestEven)
}

/// Cost by model and by key, and for the current period a projected month-end cost.
#[utoipa::path(get, path = "/developer/analytics/costs", tag = "analytics", params(UsageQuery),
    responses((status = 200, body = Costs),
              (status = 404, description = "No such developer (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn costs(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Costs>, AppError> {
    let db = s.usage_db()?;
    let r = q.range(Some(MAX_RANGE_DAYS))?;
    let developer_id = whose(&s, &caller, q.developer_id.as_deref()).await?;
    let (rows, names) = tokio::try_join!(
        async { Ok::<_, AppError>(daily::costs(&db.client, &developer_id, r.window()).await?) },
        key_names(&s, &developer_id)
    )?;
    let mut models: Vec<&daily::CostRow> = rows.iter().filter(|r| r.dim == "model").collect();
    let mut keys: Vec<&daily::CostRow> = rows.iter().filter(|r| r.dim == "key").collect();
    for list in [&mut models, &mut keys] {
        list.sort_by(|a, b| b.nanos.cmp(&a.nanos).then(a.name.cmp(&b.name)));
    }
    let total: i128 = models.iter().map(|m| i128::from(m.nanos)).sum();
    let requests = models.iter().map(|m| m.n).sum();
    let total_usd = aihub_billing::ledger::usd_from_nanos(total);
    let share = |nanos: i64| {
        percent(
            Decimal::from(nanos),
            Decimal::from_i128_with_scale(total, 0),
        )
    };
    let now = now_ms();
    let current = Period::of_unix_ms(now);
    let projection = (r.period == Some(current)).then(|| {
        let (elapsed, length) = (
            now - current.start_ms(),
            current.end_ms() - current.start_ms(),
        );
        Projection {
            period: current.to_string(),
            cost_so_far_usd: crate::plans::usd_string(total_usd),
            elapsed_pct: percent(elapsed.into(), length.into()).unwrap_or_default(),
            projected_cost_usd: crate::plans::usd_string(project(total_usd, elapsed, length)),
        }
    });
    Ok(Json(Costs {
        developer_id,
        period: r.period.map(|p| p.to_string()),
        from: r.first_date(),
        to: r.last_date(),
        requests,
        total_cost_usd: crate::plans::usd_string(total_usd),
        by_model: models
            .iter()
            .map(|m| ModelCost {
                model: m.name.clone(),
                requests: m.n,
                total_tokens: m.tokens,
                cost_usd: usd(m.nanos),
                share_pct: share(m.nanos),
            })
            .collect(),
        by_key: keys
            .iter()
            .map(|k| KeyCost {
                key_id: k.name.clone(),
                key_name: names.get(&k.name).cloned(),
                requests: k.n,
                total_tokens: k.tokens,
                cost_usd: usd(k.nanos),
                share_pct: share(k.nanos),
            })
            .collect(),
        projection,
    }))
}

// ---------------------------------------------------------------------------------------------
// Performance

/// Percentiles (t-digest estimates); `null` without successful requests.
#[derive(Debug, Serialize, ToSchema)]
pub struct Percentiles {
    pub p50: Option<u32>,
    pub p95: Option<u32>,
    pub p99: Option<u32>,
}

impl Percentiles {
    fn of(q: &[u32], any: bool) -> Percentiles {
        let at = |i: usize| q.get(i).copied().filter(|_| any);
        Percentiles {
            p50: at(0),
            p95: at(1),
            p99: at(2),
        }
    }
}

/// Requests with one HTTP status.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusCount {
    pub status: u16,
    pub requests: u64,
    /// Share of the requests in percent (two decimals).
    pub share_pct: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelPerformance {
    /// `""`: requests refused before a model was resolved.
    pub model: String,
    pub requests: u64,
    /// Requests answered with status ≥ 400.
    pub errors: u64,
    /// `errors / requests` in percent (two decimals).
    pub error_rate_pct: Option<String>,
    /// Requests with status < 400: the ones the latencies describe.
    pub successful: u64,
    /// Arrival to last byte, ms.
    pub total_latency_ms: Percentiles,
    /// Sending upstream to the upstream's response header, ms.
    pub upstream_latency_ms: Percentiles,
    /// The gateway's own time, µs.
    pub gateway_overhead_us: Percentiles,
    /// Most frequent first.
    pub by_status: Vec<StatusCount>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Performance {
    pub developer_id: String,
    pub period: Option<String>,
    pub from: String,
    pub to: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate_pct: Option<String>,
    /// Most requests first.
    pub by_model: Vec<ModelPerformance>,
    /// All models, most frequent first.
    pub by_status: Vec<StatusCount>,
}

fn status_list(counts: &BTreeMap<u16, u64>, total: u64) -> Vec<StatusCount> {
    let mut list: Vec<StatusCount> = counts
        .iter()
        .map(|(&status, &n)| StatusCount {
            status,
            requests: n,
            share_pct: percent(n.into(), total.into()),
        })
        .collect();
    list.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.status.cmp(&b.status)));
    list
}

/// Latency percentiles by model (total, upstream, gateway overhead; successful requests) and
/// requests and error rates by status.
#[utoipa::path(get, path = "/developer/analytics/performance", tag = "analytics", params(UsageQuery),
    responses((status = 200, body = Performance),
              (status = 404, description = "No such developer (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn performance(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Performance>, AppError> {
    let db = s.usage_db()?;
    let r = q.range(Some(MAX_RANGE_DAYS))?;
    let developer_id = whose(&s, &caller, q.developer_id.as_deref()).await?;
    let (latencies, statuses) = daily::performance(&db.client, &developer_id, r.window()).await?;
    let mut all: BTreeMap<u16, u64> = BTreeMap::new();
    let mut per_model: HashMap<&str, BTreeMap<u16, u64>> = HashMap::new();
    for row in &statuses {
        *all.entry(row.status).or_default() += row.n;
        *per_model
            .entry(row.model.as_str())
            .or_default()
            .entry(row.status)
            .or_default() += row.n;
    }
    let errors_of = |m: &BTreeMap<u16, u64>| m.range(400..).map(|(_, n)| n).sum::<u64>();
    let requests: u64 = all.values().sum();
    let errors = errors_of(&all);
    let mut by_model: Vec<ModelPerformance> = latencies
        .iter()
        .map(|l| {
            let counts = per_model.remove(l.model.as_str()).unwrap_or_default();
            let n: u64 = counts.values().sum();
            let e = errors_of(&counts);
            let ok = l.ok_n > 0;
            ModelPerformance {
                model: l.model.clone(),
                requests: n,
                errors: e,
                error_rate_pct: percent(e.into(), n.into()),
                successful: l.ok_n,
                total_latency_ms: Percentiles::of(&l.total, ok),
                upstream_latency_ms: Percentiles::of(&l.upstream, ok),
                gateway_overhead_us: Percentiles::of(&l.overhead, ok),
                by_status: status_list(&counts, n),
            }
        })
        .collect();
    by_model.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.model.cmp(&b.model)));
    Ok(Json(Performance {
        developer_id,
        period: r.period.map(|p| p.to_string()),
        from: r.first_date(),
        to: r.last_date(),
        requests,
        errors,
        error_rate_pct: percent(errors.into(), requests.into()),
        by_model,
        by_status: status_list(&all, requests),
    }))
}

// ---------------------------------------------------------------------------------------------
// Operator overview

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PlatformQuery {
    /// Billing period, `YYYY-MM` (UTC). Default: the current one. Not with `from`/`to`.
    pub period: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), with `to`.
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC, inclusive), with `from`. At most 400 days after `from`.
    pub to: Option<String>,
    /// How many top developers, 1 to 100. Default 10.
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlatformTotals {
    pub requests: u64,
    pub errors: u64,
    pub error_rate_pct: Option<String>,
    pub total_tokens: u64,
    /// Exact USD, a decimal string: what the metered usage cost at list prices.
    pub cost_usd: String,
    /// Developers with at least one request in the range.
    pub active_developers: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeveloperCost {
    pub developer_id: String,
    /// `null` if the developer is not in the store.
    pub email: Option<String>,
    pub plan: Option<String>,
    pub requests: u64,
    pub total_tokens: u64,
    pub cost_usd: String,
    /// Share of the platform's cost in percent (two decimals).
    pub share_pct: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlatformModel {
    /// `""`: requests refused before a model was resolved.
    pub model: String,
    pub requests: u64,
    pub errors: u64,
    pub total_tokens: u64,
    pub cost_usd: String,
    /// Share of the platform's cost in percent (two decimals).
    pub share_pct: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlatformOverview {
    pub period: Option<String>,
    pub from: String,
    pub to: String,
    pub totals: PlatformTotals,
    /// By cost, most expensive first (`limit` of them).
    pub top_developers: Vec<DeveloperCost>,
    /// By cost, most expensive first.
    pub by_model: Vec<PlatformModel>,
}

/// Platform totals over a period or range, the top developers by cost and the models (from
/// the day × developer and day × model rollups `usage_developer_daily` and `usage_model_daily`:
/// at most one row per active developer, or model, and day).
#[utoipa::path(get, path = "/admin/analytics/overview", tag = "analytics", params(PlatformQuery),
    responses((status = 200, body = PlatformOverview),
              (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn platform_overview(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<PlatformQuery>,
) -> Result<Json<PlatformOverview>, AppError> {
    platform_overview_of(&s, q).await.map(Json)
}

/// What `platform_overview` answers, for the portal too (operators only: the handler or page checks).
pub(crate) async fn platform_overview_of(
    s: &AppState,
    q: PlatformQuery,
) -> Result<PlatformOverview, AppError> {
    let db = s.usage_db()?;
    let r = RangeParams {
        period: q.period.as_deref(),
        from: q.from.as_deref(),
        to: q.to.as_deref(),
    }
    .resolve(Some(MAX_RANGE_DAYS), now_ms())?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(AppError::validation("limit", "must be 1 to 100"));
    }
    let (d, mut models) = platform::overview(&db.client, r.window(), limit).await?;
    models.sort_by(|a, b| b.nanos.cmp(&a.nanos).then(a.model.cmp(&b.model)));
    let total = Decimal::from(d.nanos);
    let share = |n: i64| percent(Decimal::from(n), total);
    let mut top_developers = Vec::with_capacity(d.top.len());
    for (id, nanos, requests, tokens) in &d.top {
        let account = match developers::by_id(&s.store, id).await {
            Ok(a) => Some(a),
            Err(aihub_store::StoreError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        top_developers.push(DeveloperCost {
            developer_id: id.clone(),
            email: account.as_ref().map(|a| a.email.clone()),
            plan: account.map(|a| a.plan),
            requests: *requests,
            total_tokens: *tokens,
            cost_usd: usd(*nanos),
            share_pct: share(*nanos),
        });
    }
    Ok(PlatformOverview {
        period: r.period.map(|p| p.to_string()),
        from: r.first_date(),
        to: r.last_date(),
        totals: PlatformTotals {
            requests: d.requests,
            errors: d.errors,
            error_rate_pct: percent(d.errors.into(), d.requests.into()),
            total_tokens: d.tokens,
            cost_usd: usd(d.nanos),
            active_developers: d.active,
        },
        top_developers,
        by_model: models
            .iter()
            .map(|m| PlatformModel {
                model: m.model.clone(),
                requests: m.n,
                errors: m.errs,
                total_tokens: m.tokens,
                cost_usd: usd(m.nanos),
                share_pct: share(m.nanos),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_is_linear_and_exact() {
        // A third of the period gone, 1.000000001 USD so far: 3.000000003.
        let so_far = Decimal::new(1_000_000_001, 9);
        assert_eq!(project(so_far, 10, 30).to_string(), "3.000000003");
        // Rounded half to even at 9 decimals.
        assert_eq!(project(Decimal::new(1, 9), 2, 3).to_string(), "0.000000002");
        assert_eq!(
            project(Decimal::new(1, 9), 4, 10).to_string(),
            "0.000000002"
        );
        assert_eq!(
            project(Decimal::new(3, 9), 4, 10).to_string(),
            "0.000000008"
        );
        assert_eq!(project(so_far, 0, 30), so_far);
    }

    #[test]
    fn previous_windows() {
        let d = |s: &str| crate::range::parse_date(s).unwrap();
        let nov = DayRange::of_period(Period::parse("2026-11").unwrap());
        let cur = DayRange {
            to: d("2026-11-25"),
            ..nov
        };
        let prev = previous_window(&cur);
        assert_eq!(
            (prev.first_date(), prev.last_date()),
            ("2026-10-01".into(), "2026-10-25".into())
        );
        // A 31-day month against a 28-day one: cut at the end of February.
        let mar = DayRange::of_period(Period::parse("2026-03").unwrap());
        assert_eq!(previous_window(&mar).last_date(), "2026-02-28");
        let range = DayRange {
            from: d("2026-11-10"),
            to: d("2026-11-19"),
            period: None,
        };
        let prev = previous_window(&range);
        assert_eq!(
            (prev.first_date(), prev.last_date()),
            ("2026-10-31".into(), "2026-11-09".into())
        );
        assert_eq!(crate::range::date_string(prev.from), "2026-10-31");
    }
}
