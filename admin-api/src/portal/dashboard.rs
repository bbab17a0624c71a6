//! The dashboard: this period's requests, tokens, cost (with the change from the previous
//! period), average latency and error rate, the quota bar, the projected month total,
//! requests per day, and the most recent failed requests. Its four reads (two rollup queries,
//! the billing view, one bounded scan of the raw rows) run concurrently; each part degrades
//! to "unavailable" on its own when ClickHouse is, so the page always renders.

use askama::Template;
use axum::extract::State;

use aihub_store::now_ms;
use aihub_usage::read::events;

use crate::analytics::{self, Overview, Trends, TrendsQuery};
use crate::billing::{self, BillingView};
use crate::error::AppError;
use crate::range::MS_PER_DAY;
use crate::state::AppState;
use crate::usage::UsageQuery;

use super::session::Member;
use super::{charts, render, view, Chrome, PageResult};

/// How far back "recent errors" looks, and how many it shows.
const RECENT_ERRORS_DAYS: i64 = 7;
const RECENT_ERRORS: u32 = 5;

pub struct Stat {
    pub label: &'static str,
    pub value: String,
    pub change: Option<(String, &'static str)>,
}

pub struct ErrorRow {
    pub when: String,
    pub model: String,
    pub endpoint: String,
    pub status: u16,
    pub error_type: String,
}

pub struct Quota {
    pub svg: String,
    pub text: String,
    pub percent: String,
}

#[derive(Template)]
#[template(path = "portal/dashboard.html")]
struct DashboardPage {
    page: Chrome,
    verified: bool,
    period: String,
    stats: Vec<Stat>,
    quota: Option<Quota>,
    unlimited: bool,
    projected: Option<String>,
    chart: Option<String>,
    errors: Option<Vec<ErrorRow>>,
    gateway_url: String,
    example_model: String,
    has_usage: bool,
    /// This period's highest usage alert (80 %, 100 % of the quota), as a banner.
    alert: Option<String>,
}

async fn recent_errors(s: &AppState, developer_id: &str) -> Result<Vec<ErrorRow>, AppError> {
    let db = s.usage_db()?;
    let since = now_ms() - RECENT_ERRORS_DAYS * MS_PER_DAY;
    let rows = events::recent_errors(&db.client, developer_id, since, RECENT_ERRORS).await?;
    Ok(rows
        .into_iter()
        .map(|r| ErrorRow {
            when: view::when(&aihub_store::outbox::rfc3339_ms(r.ts_ms as i64)),
            model: r.model,
            endpoint: r.endpoint,
            status: r.status,
            error_type: r.error_type,
        })
        .collect())
}

/// `Some` on success; `None` (logged once by `describe`) when the usage data is unavailable;
/// other errors are the page's.
fn optional<T>(r: Result<T, AppError>) -> Result<Option<T>, AppError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e @ AppError::UsageUnavailable(_)) => {
            e.describe();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub async fn page(State(s): State<AppState>, member: Member) -> PageResult {
    let t = member.visit.lang.texts();
    let caller = member.caller;
    let dev = caller.developer.clone();
    let no_range = || UsageQuery {
        period: None,
        from: None,
        to: None,
        developer_id: None,
    };
    let trends_query = TrendsQuery {
        granularity: Some("day".into()),
        period: None,
        from: None,
        to: None,
        developer_id: None,
    };
    let (overview, bill, trends, errors) = tokio::join!(
        analytics::overview_of(&s, &caller, no_range()),
        billing::billing_of(&s, &dev),
        analytics::trends_of(&s, &caller, trends_query),
        recent_errors(&s, &dev.id),
    );
    let overview: Option<Overview> = optional(overview)?;
    let bill: Option<BillingView> = optional(bill)?;
    let trends: Option<Trends> = optional(trends)?;
    let errors = optional(errors)?;

    let mut stats = Vec::new();
    if let Some(o) = &overview {
        let c = &o.current;
        let ch = &o.change_pct;
        stats.push(Stat {
            label: t.dash_requests,
            value: view::int(c.requests),
            change: view::change(ch.requests.as_deref()),
        });
        stats.push(Stat {
            label: t.dash_tokens,
            value: view::int(c.total_tokens),
            change: view::change(ch.total_tokens.as_deref()),
        });
        stats.push(Stat {
            label: t.dash_cost,
            value: view::usd(&c.cost_usd),
            change: view::change(ch.cost_usd.as_deref()),
        });
        stats.push(Stat {
            label: t.dash_latency,
            value: view::ms(c.avg_latency_ms),
            change: view::change(ch.avg_latency_ms.as_deref()),
        });
        stats.push(Stat {
            label: t.error_rate,
            value: c
                .error_rate_pct
                .as_deref()
                .map_or("—".into(), |p| format!("{p} %")),
            change: None,
        });
    }
    let (quota, unlimited, projected) = match &bill {
        Some(b) => {
            let used = b.usage.tokens_used;
            let quota = b.usage.included_tokens.map(|total| Quota {
                svg: charts::quota(used, total, t.dash_quota),
                text: format!(
                    "{} {} {}",
                    view::int(used),
                    t.dash_quota_used,
                    view::int(total)
                ),
                percent: match (used.min(total) * 100).checked_div(total) {
                    Some(p) => format!("{p} %"),
                    None => "100 %".into(),
                },
            });
            let unlimited = b.usage.included_tokens.is_none();
            (quota, unlimited, Some(view::usd(&b.projected.total_usd)))
        }
        None => (None, false, None),
    };
    let has_usage = overview.as_ref().is_some_and(|o| o.current.requests > 0);
    let chart = trends.filter(|_| has_usage).map(|tr| {
        let labels: Vec<String> = tr.data.iter().map(|b| view::day(&b.start)).collect();
        let values: Vec<Vec<u64>> = tr.data.iter().map(|b| vec![b.requests]).collect();
        charts::stacked_bars(
            t.dash_daily,
            &labels,
            &[t.dash_requests.to_owned()],
            &values,
        )
    });
    let period = bill
        .as_ref()
        .map(|b| b.period.name.clone())
        .or_else(|| overview.as_ref().and_then(|o| o.period.clone()))
        .unwrap_or_default();
    let this_period = aihub_plans::Period::of_unix_ms(now_ms()).to_string();
    let alert = aihub_store::usage_alerts::for_developer(&s.store, &dev.id)
        .await
        .map_err(AppError::from)?
        .into_iter()
        .filter(|a| a.period == this_period)
        .max_by_key(|a| a.threshold_pct)
        .map(|a| {
            format!(
                "{} % {} ({} / {})",
                a.threshold_pct,
                t.alert_used,
                view::int(a.used_tokens),
                view::int(a.quota_tokens)
            )
        });
    let notice = match member.visit.here.contains("done=resent") {
        true => Some(t.resend_done),
        false => None,
    };
    render(&DashboardPage {
        page: Chrome::new(&member.visit, Some(&dev), "dashboard", t.dash_title).with_notice(notice),
        verified: dev.is_verified(),
        period,
        stats,
        quota,
        unlimited,
        projected,
        chart,
        errors,
        alert,
        gateway_url: s.config.portal.gateway_url.clone(),
        example_model: s.config.portal.example_model.clone(),
        has_usage,
    })
}
