//! The billing page: the plan, this period's invoice so far (lines, subtotal, total), the
//! projection, the plan change (prorated; `billing::switch_plan`, as the JSON API), the
//! invoices, and each invoice's printable page (the JSON API's HTML rendering).

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Form;
use serde::Deserialize;

use crate::auth::ClientMeta;
use crate::billing::{self, BillingView};
use crate::error::{AppError, Query};
use crate::state::AppState;

use super::session::{see_other, Member};
use super::{form_errors, render_status, view, Chrome, FieldErrors, PageResult};

pub struct Line {
    pub description: String,
    pub quantity: String,
    pub amount: String,
}

pub struct PlanChoice {
    pub name: String,
    pub label: String,
    pub current: bool,
}

pub struct InvoiceRow {
    pub id: String,
    pub period: String,
    pub status: String,
    pub total: String,
    pub due: String,
}

pub struct Current {
    pub plan_name: String,
    pub plan_price: String,
    pub plan_included: String,
    pub overage: bool,
    pub period: String,
    pub tokens_used: String,
    pub lines: Vec<Line>,
    pub subtotal: String,
    pub total: String,
    pub projected: String,
    pub projected_tokens: String,
}

#[derive(Template)]
#[template(path = "portal/billing.html")]
struct BillingPage {
    page: Chrome,
    current: Option<Current>,
    plans: Vec<PlanChoice>,
    invoices: Vec<InvoiceRow>,
    errors: FieldErrors,
    unavailable: bool,
}

fn current_of(b: &BillingView, t: &'static super::i18n::Texts) -> Current {
    Current {
        plan_name: b.plan.display_name.clone(),
        plan_price: b
            .plan
            .monthly_price_usd
            .as_deref()
            .map_or(t.billing_custom.into(), |p| {
                format!("{} {}", view::usd(p), t.billing_per_month)
            }),
        plan_included: b
            .plan
            .included_tokens
            .map_or(t.dash_unlimited.into(), view::int),
        overage: b.plan.overage,
        period: b.period.name.clone(),
        tokens_used: view::int(b.usage.tokens_used),
        lines: b
            .cost_so_far
            .lines
            .iter()
            .map(|l| Line {
                description: l.description.clone(),
                quantity: view::int(l.quantity),
                amount: view::usd_exact(&l.amount_usd),
            })
            .collect(),
        subtotal: view::usd_exact(&b.cost_so_far.subtotal_usd),
        total: view::usd(&b.cost_so_far.total_usd),
        projected: view::usd(&b.projected.total_usd),
        projected_tokens: view::int(b.projected.tokens),
    }
}

async fn billing_page(
    s: &AppState,
    member: &Member,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<(StatusCode, BillingPage), super::Failure> {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let (bill, invoices) = tokio::join!(
        billing::billing_of(s, dev),
        billing::invoices_of(s, &dev.id, Some(24)),
    );
    let (current, unavailable) = match bill {
        Ok(b) => (Some(current_of(&b, t)), false),
        Err(e @ AppError::UsageUnavailable(_)) => {
            e.describe();
            (None, true)
        }
        Err(e) => return Err(e.into()),
    };
    let invoices = invoices?;
    let mut plans: Vec<(&String, &aihub_plans::Plan)> = s
        .plans
        .plans
        .iter()
        .filter(|(_, p)| p.monthly_price_usd.is_some())
        .collect();
    plans.sort_by_key(|(_, p)| p.monthly_price_usd);
    let page = BillingPage {
        page: Chrome::new(&member.visit, Some(dev), "billing", t.billing_title).with_notice(notice),
        current,
        plans: plans
            .into_iter()
            .map(|(name, p)| PlanChoice {
                name: name.clone(),
                label: format!(
                    "{} — {} {}",
                    p.display_name,
                    view::usd_of(p.monthly_price_usd.unwrap_or_default()),
                    t.billing_per_month
                ),
                current: *name == dev.plan,
            })
            .collect(),
        invoices: invoices
            .data
            .iter()
            .map(|i| InvoiceRow {
                id: i.id.clone(),
                period: i.period.clone(),
                status: i.status.clone(),
                total: view::usd(&i.total_usd),
                due: view::usd(&i.amount_due_usd),
            })
            .collect(),
        errors,
        unavailable,
    };
    let status = if unavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok((status, page))
}

#[derive(Deserialize)]
pub struct DoneQuery {
    done: Option<String>,
}

pub async fn page(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let notice = (q.done.as_deref() == Some("plan")).then_some(t.billing_plan_changed);
    let (status, p) = billing_page(&s, &member, FieldErrors::default(), notice).await?;
    render_status(status, &p)
}

#[derive(Deserialize)]
pub struct PlanForm {
    #[serde(default)]
    plan: String,
}

pub async fn change_plan(
    State(s): State<AppState>,
    member: Member,
    meta: ClientMeta,
    Form(f): Form<PlanForm>,
) -> PageResult {
    let changed = billing::switch_plan(&s, &member.caller.developer, &meta, &f.plan).await;
    match form_errors(changed)? {
        Ok(_) => Ok(see_other("/portal/billing?done=plan")),
        Err(errors) => {
            let (_, p) = billing_page(&s, &member, errors, None).await?;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

/// The printable invoice: the JSON API's HTML page, with its own policy (inline styles, no
/// script), which the guard leaves in place.
pub async fn invoice(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    Ok(billing::invoice_of(&s, &member.caller.developer, &id, true).await?)
}
