//! Usage statistics from the ClickHouse rollups (`docs/analytics.md`): `GET /developer/usage`
//! (totals and breakdowns by model, key and day), `GET /developer/keys/{id}/usage` (the same
//! for one key) and `GET /developer/usage/export` (the raw rows as CSV, [`export`]).
//!
//! A developer reads their own data; an operator may name anyone with `developer_id=`
//! ([`whose`]). Money is summed in ClickHouse as integer nano-USD and shown as exact decimal
//! strings. Time ranges are whole UTC days ([`range`]).

pub mod export;

use std::collections::HashMap;

use axum::extract::{Path, State};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_store::{developers, keys as store_keys, now_ms};
use aihub_usage::read::daily::{self, FigureRow};

use crate::auth::Caller;
use crate::error::{AppError, Json, Query};
use crate::range::{DayRange, RangeParams, MAX_RANGE_DAYS};
use crate::state::AppState;

/// The developer whose data a request reads: the caller's own, or — for operators — the one
/// named by `developer_id` (which must exist). A developer naming anyone else gets 404, as for
/// an unknown id.
pub async fn whose(
    s: &AppState,
    caller: &Caller,
    requested: Option<&str>,
) -> Result<String, AppError> {
    match requested {
        None => Ok(caller.developer.id.clone()),
        Some(id) if id == caller.developer.id => Ok(id.to_owned()),
        Some(id) if caller.developer.is_admin() => Ok(developers::by_id(&s.store, id).await?.id),
        Some(_) => Err(AppError::NotFound),
    }
}

pub use crate::plans::usd_from_nanos as usd;

/// `part / whole` in percent with exactly two decimals (rounded half to even), as a string
/// (`"12.50"`, `"-20.00"`); `None` when `whole` is 0.
pub fn percent(part: Decimal, whole: Decimal) -> Option<String> {
    (!whole.is_zero()).then(|| {
        let mut p = (part * Decimal::ONE_HUNDRED / whole)
            .round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
        p.rescale(2);
        p.to_string()
    })
}

/// The query parameters of the usage endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Billing period, `YYYY-MM` (a UTC calendar month). Default: the current one. Not with
    /// `from`/`to`.
    pub period: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), with `to`.
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC, inclusive), with `from`. At most 400 days after `from`.
    pub to: Option<String>,
    /// Operators only: whose usage (default: their own).
    pub developer_id: Option<String>,
}

impl UsageQuery {
    pub fn range(&self, max_days: Option<i64>) -> Result<DayRange, AppError> {
        RangeParams {
            period: self.period.as_deref(),
            from: self.from.as_deref(),
            to: self.to.as_deref(),
        }
        .resolve(max_days, now_ms())
    }
}

/// Usage figures over a set of requests.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub requests: u64,
    /// Requests answered with an HTTP status of 400 or more.
    pub errors: u64,
    /// Input tokens (including cached ones).
    pub prompt_tokens: u64,
    /// The part of the prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Exact USD, a decimal string (e.g. `"12.345678901"`).
    pub cost_usd: String,
    /// Mean total latency (arrival to last byte) of the successful requests (status < 400), ms;
    /// `null` when there were none.
    pub avg_latency_ms: Option<f64>,
    /// 95th percentile of the same latencies, ms (a t-digest estimate); `null` when there were
    /// none.
    pub p95_latency_ms: Option<u32>,
}

impl From<&FigureRow> for Usage {
    fn from(r: &FigureRow) -> Usage {
        let ok = r.ok_n > 0;
        Usage {
            requests: r.n,
            errors: r.errors,
            prompt_tokens: r.prompt,
            cached_tokens: r.cached,
            completion_tokens: r.completion,
            total_tokens: r.tokens,
            cost_usd: usd(r.nanos),
            avg_latency_ms: ok.then(|| mean_ms(r.ok_latency, r.ok_n)),
            p95_latency_ms: r.p95.first().copied().filter(|_| ok),
        }
    }
}

/// `sum / n`, rounded to 0.1 ms.
pub fn mean_ms(sum: u64, n: u64) -> f64 {
    (sum as f64 / n as f64 * 10.0).round() / 10.0
}

/// A usage report: totals and breakdowns over a range.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub developer_id: String,
    /// The key reported on (`/developer/keys/{id}/usage` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The period asked for (`YYYY-MM`), or `null` for a `from`/`to` range.
    pub period: Option<String>,
    /// First day (UTC).
    pub from: String,
    /// Last day (UTC, inclusive).
    pub to: String,
    pub totals: Usage,
    /// By model, most expensive first. `""` is requests refused before a model was resolved.
    pub by_model: Vec<ModelUsage>,
    /// By API key, most expensive first.
    pub by_key: Vec<KeyUsage>,
    /// By UTC day, days with requests only, oldest first.
    pub by_day: Vec<DayUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyUsage {
    pub key_id: String,
    /// The key's name (`null` if the key is not in the store).
    pub key_name: Option<String>,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayUsage {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    #[serde(flatten)]
    pub usage: Usage,
}

/// A developer's key names, revoked keys included.
pub async fn key_names(
    s: &AppState,
    developer_id: &str,
) -> Result<HashMap<String, String>, AppError> {
    Ok(
        store_keys::list(&s.store, developer_id, true, 100_000, None)
            .await?
            .into_iter()
            .map(|k| (k.id, k.name))
            .collect(),
    )
}

/// Sorts most expensive first (then most requests, then by name).
fn by_cost(rows: &mut [&FigureRow]) {
    rows.sort_by(|a, b| {
        b.nanos
            .cmp(&a.nanos)
            .then(b.n.cmp(&a.n))
            .then(a.name.cmp(&b.name))
    });
}

/// Runs the report's one query (totals and the three breakdowns, `UNION ALL`) and shapes it.
async fn report(
    s: &AppState,
    developer_id: String,
    key_id: Option<String>,
    r: DayRange,
) -> Result<UsageReport, AppError> {
    let db = s.usage_db()?;
    let (rows, names) = tokio::try_join!(
        async {
            Ok::<_, AppError>(
                daily::report(&db.client, &developer_id, key_id.as_deref(), r.window()).await?,
            )
        },
        key_names(s, &developer_id)
    )?;
    let dim = |d: &str| rows.iter().filter(|r| r.dim == d).collect::<Vec<_>>();
    let totals = dim("total")
        .first()
        .map(|r| Usage::from(*r))
        .ok_or_else(|| AppError::Internal("usage query without a total".into()))?;
    let mut models = dim("model");
    by_cost(&mut models);
    let mut keys = dim("key");
    by_cost(&mut keys);
    let mut days = dim("day");
    days.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(UsageReport {
        developer_id,
        key_id,
        period: r.period.map(|p| p.to_string()),
        from: r.first_date(),
        to: r.last_date(),
        totals,
        by_model: models
            .into_iter()
            .map(|m| ModelUsage {
                model: m.name.clone(),
                usage: Usage::from(m),
            })
            .collect(),
        by_key: keys
            .into_iter()
            .map(|k| KeyUsage {
                key_id: k.name.clone(),
                key_name: names.get(&k.name).cloned(),
                usage: Usage::from(k),
            })
            .collect(),
        by_day: days
            .into_iter()
            .map(|d| DayUsage {
                date: d.name.clone(),
                usage: Usage::from(d),
            })
            .collect(),
    })
}

/// Usage over a period or range: totals, and by model, by key and by day.
#[utoipa::path(get, path = "/developer/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = UsageReport),
              (status = 404, description = "No such developer (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn usage(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsageReport>, AppError> {
    usage_of(&s, &caller, q).await.map(Json)
}

/// What `usage` answers (the caller's, or the developer an operator names), for the portal too.
pub(crate) async fn usage_of(
    s: &AppState,
    caller: &Caller,
    q: UsageQuery,
) -> Result<UsageReport, AppError> {
    s.usage_db()?;
    let r = q.range(Some(MAX_RANGE_DAYS))?;
    let developer_id = whose(s, caller, q.developer_id.as_deref()).await?;
    report(s, developer_id, None, r).await
}

/// Usage of one API key over a period or range: totals, and by model and by day (`by_key`
/// holds the key alone). Revoked keys included. An operator may read any key.
#[utoipa::path(get, path = "/developer/keys/{id}/usage", tag = "usage",
    params(("id" = String, Path, description = "Key id"), UsageQuery),
    responses((status = 200, body = UsageReport),
              (status = 404, description = "No such key (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn key_usage(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsageReport>, AppError> {
    s.usage_db()?;
    let r = q.range(Some(MAX_RANGE_DAYS))?;
    let key = match q.developer_id.as_deref() {
        // An operator without a developer: any key, its owner's data.
        None if caller.developer.is_admin() => store_keys::get(&s.store, None, &id).await?,
        requested => {
            let owner = whose(&s, &caller, requested).await?;
            store_keys::get(&s.store, Some(&owner), &id).await?
        }
    };
    Ok(Json(report(&s, key.developer_id, Some(key.id), r).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_have_two_decimals() {
        let p = |a: i64, b: i64| percent(Decimal::from(a), Decimal::from(b));
        assert_eq!(p(1, 8).as_deref(), Some("12.50")); // 12.5
        assert_eq!(p(-1, 5).as_deref(), Some("-20.00"));
        assert_eq!(p(1, 3).as_deref(), Some("33.33"));
        assert_eq!(p(1, 40_000).as_deref(), Some("0.00")); // 0.0025, half to even
        assert_eq!(p(3, 40_000).as_deref(), Some("0.01")); // 0.0075
        assert_eq!(p(1, 0), None);
        assert_eq!(usd(1), "0.000000001");
        assert_eq!(usd(1_500_000_000), "1.50");
    }
}
