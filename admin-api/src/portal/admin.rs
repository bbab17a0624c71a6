//! The operators' area: platform analytics for the period (totals, top developers, models,
//! last period's revenue), the developers (search, one account with its keys, and the update
//! form: active, plan, role, quota and rate overrides), and the plans. Every write is a service
//! call (`aihub_control::operators`), every read the one the JSON API answers from
//! (`analytics::platform_overview_of`, `billing::admin::revenue_of`, `plans::plan_list`).

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Form;
use serde::Deserialize;

use crate::accounts::DeveloperView;
use crate::analytics::{self, PlatformQuery};
use crate::auth::ClientMeta;
use crate::billing::admin::{self as billing_admin, RevenueQuery};
use crate::error::{AppError, FieldError, Query};
use aihub_control::keys::ListKeys;
use aihub_control::operators::{AccountChange, Search};
use aihub_control::Actor;

use crate::keys::KeyList;
use crate::plans::{self, PlanView};
use crate::state::AppState;

use super::keys::KeyRow;
use super::session::{see_other, Staff};
use super::{form_errors, render, render_status, view, Chrome, FieldErrors, PageResult};

pub struct Row3 {
    pub cells: Vec<String>,
    pub link: Option<String>,
}

#[derive(Template)]
#[template(path = "portal/admin_overview.html")]
struct OverviewPage {
    page: Chrome,
    period: String,
    totals: Vec<(&'static str, String)>,
    top: Vec<Row3>,
    models: Vec<Row3>,
    revenue_period: String,
    revenue: Vec<(&'static str, String)>,
    unavailable: bool,
}

pub async fn overview(State(s): State<AppState>, staff: Staff) -> PageResult {
    let t = staff.visit.lang.texts();
    let (platform, revenue) = tokio::join!(
        analytics::platform_overview_of(
            &s,
            PlatformQuery {
                period: None,
                from: None,
                to: None,
                limit: Some(10),
            }
        ),
        billing_admin::revenue_of(&s, RevenueQuery { period: None }),
    );
    let mut p = OverviewPage {
        page: Chrome::new(
            &staff.visit,
            Some(&staff.caller.developer),
            "admin",
            t.admin_title,
        ),
        period: String::new(),
        totals: Vec::new(),
        top: Vec::new(),
        models: Vec::new(),
        revenue_period: String::new(),
        revenue: Vec::new(),
        unavailable: false,
    };
    match platform {
        Ok(o) => {
            p.period = o
                .period
                .clone()
                .unwrap_or_else(|| format!("{} – {}", o.from, o.to));
            p.totals = vec![
                (t.dash_requests, view::int(o.totals.requests)),
                (t.dash_tokens, view::int(o.totals.total_tokens)),
                (t.billing_amount, view::usd(&o.totals.cost_usd)),
                (t.admin_active_devs, view::int(o.totals.active_developers)),
                (
                    t.error_rate,
                    o.totals
                        .error_rate_pct
                        .as_deref()
                        .map_or("—".into(), |r| format!("{r} %")),
                ),
            ];
            p.top = o
                .top_developers
                .iter()
                .map(|d| Row3 {
                    cells: vec![
                        d.email.clone().unwrap_or_else(|| d.developer_id.clone()),
                        d.plan.clone().unwrap_or_default(),
                        view::int(d.requests),
                        view::int(d.total_tokens),
                        view::usd(&d.cost_usd),
                        d.share_pct.clone().map_or("—".into(), |s| format!("{s} %")),
                    ],
                    link: Some(format!("/portal/admin/developers/{}", d.developer_id)),
                })
                .collect();
            p.models = o
                .by_model
                .iter()
                .map(|m| Row3 {
                    cells: vec![
                        if m.model.is_empty() {
                            "—".into()
                        } else {
                            m.model.clone()
                        },
                        view::int(m.requests),
                        view::int(m.errors),
                        view::int(m.total_tokens),
                        view::usd(&m.cost_usd),
                    ],
                    link: None,
                })
                .collect();
        }
        Err(e @ AppError::UsageUnavailable(_)) => {
            e.describe();
            p.unavailable = true;
        }
        Err(e) => return Err(e.into()),
    }
    let r = revenue?;
    p.revenue_period = r.period.name.clone();
    p.revenue = vec![
        (t.billing_invoices, view::int(r.invoices)),
        (t.admin_invoiced, view::usd(&r.total_usd)),
        (t.admin_paid, view::usd(&r.amount_paid_usd)),
        (t.admin_outstanding, view::usd(&r.outstanding_usd)),
    ];
    render(&p)
}

#[derive(Template)]
#[template(path = "portal/admin_developers.html")]
struct DevelopersPage {
    page: Chrome,
    q: String,
    total: String,
    rows: Vec<DeveloperView>,
}

#[derive(Deserialize)]
pub struct SearchForm {
    #[serde(default)]
    q: String,
}

pub async fn developers(
    State(s): State<AppState>,
    staff: Staff,
    Query(f): Query<SearchForm>,
) -> PageResult {
    let t = staff.visit.lang.texts();
    let search = Search {
        q: Some(f.q.trim().to_owned()).filter(|q| !q.is_empty()),
        limit: Some(100),
        offset: None,
    };
    let (rows, total) = s.control.search_developers(search).await?;
    render(&DevelopersPage {
        page: Chrome::new(
            &staff.visit,
            Some(&staff.caller.developer),
            "admin",
            t.admin_developers,
        ),
        q: f.q,
        total: view::int(total),
        rows: rows
            .iter()
            .map(|d| DeveloperView::new(d, &s.plans))
            .collect(),
    })
}

#[derive(Template)]
#[template(path = "portal/admin_developer.html")]
struct DeveloperPage {
    page: Chrome,
    dev: DeveloperView,
    keys: Vec<KeyRow>,
    plans: Vec<String>,
    errors: FieldErrors,
}

async fn developer_page(
    s: &AppState,
    staff: &Staff,
    id: &str,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<DeveloperPage, super::Failure> {
    let t = staff.visit.lang.texts();
    let dev = DeveloperView::new(&s.control.developer(id).await?, &s.plans);
    let q = ListKeys {
        include_revoked: false,
        limit: Some(100),
        after: None,
    };
    let keys = KeyList::from(s.control.list_keys(&dev.id, q).await?);
    let mut plans: Vec<String> = s.plans.plans.keys().cloned().collect();
    plans.sort();
    Ok(DeveloperPage {
        page: Chrome::new(
            &staff.visit,
            Some(&staff.caller.developer),
            "admin",
            &dev.email,
        )
        .with_notice(notice),
        keys: keys.data.iter().map(|k| KeyRow::new(k, t)).collect(),
        dev,
        plans,
        errors,
    })
}

#[derive(Deserialize)]
pub struct DoneQuery {
    done: Option<String>,
}

pub async fn developer(
    State(s): State<AppState>,
    staff: Staff,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let t = staff.visit.lang.texts();
    let notice = q.done.is_some().then_some(t.admin_saved);
    let p = developer_page(&s, &staff, &id, FieldErrors::default(), notice).await?;
    render(&p)
}

#[derive(Deserialize)]
pub struct DeveloperForm {
    plan: String,
    role: String,
    #[serde(default)]
    active: Option<String>,
    #[serde(default)]
    api_quota_limit: String,
    #[serde(default)]
    api_rate_limit: String,
    #[serde(default)]
    api_token_rate_limit: String,
}

/// An override field: empty clears it (the plan's value applies), else a whole number.
fn override_field(field: &str, text: &str, errors: &mut Vec<FieldError>) -> Option<Option<i64>> {
    let text = text.trim().replace([',', '_', ' '], "");
    if text.is_empty() {
        return Some(None);
    }
    match text.parse() {
        Ok(n) => Some(Some(n)),
        Err(_) => {
            errors.push(FieldError::new(field, "must be a whole number"));
            None
        }
    }
}

pub async fn update_developer(
    State(s): State<AppState>,
    staff: Staff,
    meta: ClientMeta,
    Path(id): Path<String>,
    Form(f): Form<DeveloperForm>,
) -> PageResult {
    let mut errors = Vec::new();
    let update = AccountChange {
        active: Some(f.active.is_some()),
        plan: Some(f.plan),
        role: Some(f.role),
        api_quota_limit: override_field("api_quota_limit", &f.api_quota_limit, &mut errors),
        api_rate_limit: override_field("api_rate_limit", &f.api_rate_limit, &mut errors),
        api_token_rate_limit: override_field(
            "api_token_rate_limit",
            &f.api_token_rate_limit,
            &mut errors,
        ),
        ..Default::default()
    };
    let result = match AppError::check(errors) {
        Ok(()) => {
            let ip = meta.ip.map(|i| i.to_string());
            let by = Actor::Operator {
                id: &staff.caller.developer.id,
                ip: ip.as_deref(),
            };
            s.control
                .update_account(&by, &id, update)
                .await
                .map(|_| ())
                .map_err(AppError::from)
        }
        Err(e) => Err(e),
    };
    match form_errors(result)? {
        Ok(()) => Ok(see_other(&format!(
            "/portal/admin/developers/{id}?done=saved"
        ))),
        Err(errors) => {
            let p = developer_page(&s, &staff, &id, errors, None).await?;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

#[derive(Template)]
#[template(path = "portal/admin_plans.html")]
struct PlansPage {
    page: Chrome,
    default_plan: String,
    plans: Vec<PlanView>,
}

pub async fn plans(State(s): State<AppState>, staff: Staff) -> PageResult {
    let t = staff.visit.lang.texts();
    let list = plans::plan_list(&s.plans);
    render(&PlansPage {
        page: Chrome::new(
            &staff.visit,
            Some(&staff.caller.developer),
            "admin",
            t.admin_plans,
        ),
        default_plan: list.default_plan,
        plans: list.data,
    })
}

/// `Some(n)` as text, `—` for none (templates).
pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("—".into(), |v| v.to_string())
}
