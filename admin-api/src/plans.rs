//! Plans as the API shows them: the public `GET /plans` (every plan's price, included tokens,
//! overage policy and limits, and the usage-alert thresholds), a developer's effective limits
//! (key-independent: their overrides, else their plan's) for `/developer/me`, and USD amounts
//! (decimal strings on the wire, integer nano-USD in the store).

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use aihub_plans::{Plan, PlanCatalog};
use aihub_store::developers::Developer;

use crate::error::Json;
use crate::state::AppState;

/// Every plan, and when usage alerts are raised.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    /// The plan new accounts get.
    pub default_plan: String,
    /// Percentages of the monthly quota at which an `api.usage_alert` event is raised (once
    /// per threshold per month).
    pub alert_thresholds: Vec<u32>,
    /// Cheapest first; custom-priced plans last.
    pub data: Vec<PlanView>,
}

/// One plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    /// The plan's id (what `/developer/me` shows as `plan`).
    pub name: String,
    pub display_name: String,
    /// Base fee per month in USD, a decimal string (e.g. `"29.00"`); `null` = custom pricing.
    pub monthly_price_usd: Option<String>,
    /// Tokens per month covered by the base fee; `null` = unlimited.
    pub included_tokens: Option<u64>,
    /// Usage beyond the included tokens is billed (`true`) or refused (`false`).
    pub overage: bool,
    pub limits: PlanLimits,
}

/// A plan's rate limits; `null` = not limited.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanLimits {
    /// Requests per minute, per developer (all keys together) and by default per key.
    pub requests_per_minute: Option<u32>,
    /// Requests that may arrive at once.
    pub request_burst: Option<u32>,
    /// Tokens (prompt + completion) per minute, per developer and by default per key.
    pub tokens_per_minute: Option<u32>,
    /// Requests in flight per key (per gateway node).
    pub max_concurrent_requests: Option<u32>,
}

impl PlanView {
    fn new(name: &str, p: &Plan) -> PlanView {
        PlanView {
            name: name.to_owned(),
            display_name: p.display_name.clone(),
            monthly_price_usd: p.monthly_price_usd.map(usd_string),
            included_tokens: p.included_tokens,
            overage: p.overage,
            limits: PlanLimits {
                requests_per_minute: p.requests_per_minute,
                request_burst: p.request_burst.or(p.requests_per_minute),
                tokens_per_minute: p.tokens_per_minute,
                max_concurrent_requests: p.max_concurrent_requests,
            },
        }
    }
}

/// The plans on offer, their prices and limits (public: no sign-in needed).
#[utoipa::path(get, path = "/plans", tag = "plans",
    responses((status = 200, body = PlanList)))]
pub(crate) async fn list(State(s): State<AppState>) -> Json<PlanList> {
    Json(plan_list(&s.plans))
}

/// The plan list the API answers and the operators' plans page shows.
pub(crate) fn plan_list(catalog: &PlanCatalog) -> PlanList {
    let mut plans: Vec<(&String, &Plan)> = catalog.plans.iter().collect();
    // Priced plans by price (then name), custom-priced ones after them.
    plans.sort_by(|(an, a), (bn, b)| {
        let key = |p: &Plan| (p.monthly_price_usd.is_none(), p.monthly_price_usd);
        key(a).cmp(&key(b)).then(an.cmp(bn))
    });
    PlanList {
        default_plan: catalog.default_plan.clone(),
        alert_thresholds: catalog.alert_thresholds.clone(),
        data: plans
            .into_iter()
            .map(|(n, p)| PlanView::new(n, p))
            .collect(),
    }
}

/// The limits that apply to a developer as a whole (a key may have lower limits of its own):
/// their overrides, else their plan's. `null` = not limited.
#[derive(Debug, Serialize, ToSchema)]
pub struct EffectiveLimits {
    /// The plan applied: the developer's, or the default plan when theirs is not offered.
    pub plan: String,
    /// Requests per minute over all the developer's keys.
    pub requests_per_minute: Option<i64>,
    /// Tokens (prompt + completion) per minute over all the developer's keys.
    pub tokens_per_minute: Option<i64>,
    /// Requests in flight per key (per gateway node).
    pub max_concurrent_requests: Option<i64>,
    /// Tokens per month covered by the plan's base fee.
    pub monthly_included_tokens: Option<i64>,
    /// Tokens per month the quota (and usage alerts) count against: an operator's quota, else
    /// the plan's included tokens.
    pub monthly_quota_tokens: Option<i64>,
    /// Usage beyond the quota is billed (`true`) or refused (`false`).
    pub overage: bool,
    /// The developer's monthly overage spend cap, when their plan bills overage (USD, decimal
    /// string); beyond it requests are refused until the month ends.
    pub monthly_spend_cap_usd: Option<String>,
}

impl EffectiveLimits {
    /// Resolves like the gateway: developer override, else plan.
    pub fn of(d: &Developer, plans: &PlanCatalog) -> EffectiveLimits {
        let name = if plans.plans.contains_key(&d.plan) {
            d.plan.clone()
        } else {
            plans.default_plan.clone()
        };
        let p = plans.plan(&name);
        let included = p
            .included_tokens
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        EffectiveLimits {
            plan: name,
            requests_per_minute: positive(d.api_rate_limit)
                .or(p.requests_per_minute.map(i64::from)),
            tokens_per_minute: positive(d.api_token_rate_limit)
                .or(p.tokens_per_minute.map(i64::from)),
            max_concurrent_requests: p.max_concurrent_requests.map(i64::from),
            monthly_included_tokens: included,
            monthly_quota_tokens: d.api_quota_limit.map(|q| q.max(0)).or(included),
            overage: p.overage,
            monthly_spend_cap_usd: d
                .monthly_spend_cap_nanos
                .filter(|_| p.overage)
                .map(usd_from_nanos),
        }
    }
}

/// A stored per-minute override as the gateway applies it (non-positive = the plan's).
fn positive(v: Option<i64>) -> Option<i64> {
    v.filter(|&n| n > 0)
}

pub use aihub_plans::money::{usd_from_nanos, usd_string};
