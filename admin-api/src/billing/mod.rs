//! Billing over HTTP. Developers: `GET /developer/billing` (the current period so far and a
//! projection), `PUT /developer/billing/plan` (self-service plan change, prorated),
//! `GET /developer/invoices[/{id}]` (JSON, or a printable HTML page). Operators: list and read
//! invoices (drafts too), generate, finalize, void, record payments, the revenue report.
//!
//! Every amount is a USD decimal string (`"29.30"`, exact line amounts like `"0.000150001"`),
//! every instant RFC 3339. A developer only ever sees their own finalized invoices: another
//! developer's invoice, or a draft, is a 404. The rules behind the figures are in
//! `docs/billing.md`.
//!
//! - this file: the views and the developer endpoints;
//! - [`html`]: the printable invoice and content negotiation;
//! - [`admin`]: the operator endpoints (invoices, generation, finalize, void, payments,
//!   revenue).

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_billing::payments::{self as providers, PaymentRequest, ProviderError};
use aihub_billing::{BillingError, CurrentBilling, GenerateReport};
use aihub_control::billing::sentence;
use aihub_control::journal::Entry;
use aihub_control::Actor;
use aihub_plans::Period;
use aihub_store::developers::{self, Developer};
use aihub_store::invoices::{self, Invoice, InvoiceFilter, InvoiceLine, SaveMode};
use aihub_store::outbox::rfc3339_ms;
use aihub_store::payments::{self, Payment};
use aihub_store::{now_ms, StoreError};

use crate::auth::{Caller, ClientMeta, Operator};
use crate::error::{AppError, FieldError, Json, Query};
use crate::plans::usd_string;
use crate::state::AppState;

pub mod admin;
pub mod html;

use html::{render_html, wants_html};

// ---------------------------------------------------------------------------------------------
// Views

/// A plan as the billing view shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingPlan {
    pub name: String,
    pub display_name: String,
    /// Base fee per month, USD; `null` = custom pricing (invoiced under contract).
    pub monthly_price_usd: Option<String>,
    /// Tokens per month covered by the base fee; `null` = unlimited.
    pub included_tokens: Option<u64>,
    /// Usage beyond the included tokens is billed (`true`) or refused (`false`).
    pub overage: bool,
}

/// A billing period: a calendar month in UTC.
#[derive(Debug, Serialize, ToSchema)]
pub struct PeriodView {
    /// `YYYY-MM`.
    pub name: String,
    /// RFC 3339, first instant of the month.
    pub starts_at: String,
    /// RFC 3339, first instant after the month.
    pub ends_at: String,
}

impl PeriodView {
    fn of(p: Period) -> PeriodView {
        PeriodView {
            name: p.to_string(),
            starts_at: rfc3339_ms(p.start_ms()),
            ends_at: rfc3339_ms(p.end_ms()),
        }
    }
}

/// Tokens used in the current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageSoFar {
    pub requests: i64,
    pub tokens_used: u64,
    /// Included tokens for the period (prorated over the plans held); `null` = unlimited.
    pub included_tokens: Option<u64>,
    /// Included tokens left; `null` = unlimited.
    pub remaining_tokens: Option<u64>,
    /// Tokens beyond the included ones, billed as overage.
    pub overage_tokens: i64,
    /// Tokens beyond the included ones on a plan without overage (not billed).
    pub waived_tokens: i64,
}

/// The period's invoice as if it closed now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostSoFar {
    pub lines: Vec<LineView>,
    /// Sum of the lines, exact.
    pub subtotal_usd: String,
    /// The subtotal rounded once to cents.
    pub total_usd: String,
    /// The overage lines' sum, exact (what the spend cap limits).
    pub overage_usd: String,
}

/// Where the period is heading at the average rate so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct Projection {
    pub tokens: u64,
    pub subtotal_usd: String,
    pub total_usd: String,
}

/// `GET /developer/billing`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingView {
    /// The plan held now.
    pub plan: BillingPlan,
    pub period: PeriodView,
    pub usage: UsageSoFar,
    pub cost_so_far: CostSoFar,
    pub projected: Projection,
    /// The developer's monthly overage spend cap (USD); `null` = none.
    pub monthly_spend_cap_usd: Option<String>,
    /// RFC 3339: when the figures were computed.
    pub as_of: String,
}

/// One invoice line.
#[derive(Debug, Serialize, ToSchema)]
pub struct LineView {
    pub line_no: i64,
    /// `base` (a plan's base fee, prorated when held part of the period) or `overage`.
    pub kind: String,
    pub plan: String,
    /// The model (overage lines); `null` for base fees.
    pub model: Option<String>,
    pub description: String,
    /// RFC 3339: the part of the period the line covers (end exclusive).
    pub starts_at: String,
    pub ends_at: String,
    /// Tokens (overage lines) or 1 (base fees).
    pub quantity: i64,
    /// Requests whose tokens the line bills (overage lines).
    pub requests: i64,
    /// Exact amount, USD.
    pub amount_usd: String,
}

impl From<&InvoiceLine> for LineView {
    fn from(l: &InvoiceLine) -> Self {
        LineView {
            line_no: l.line_no,
            kind: l.kind.clone(),
            plan: l.plan.clone(),
            model: (!l.model.is_empty()).then(|| l.model.clone()),
            description: l.description.clone(),
            starts_at: rfc3339_ms(l.starts_at),
            ends_at: rfc3339_ms(l.ends_at),
            quantity: l.quantity,
            requests: l.requests,
            amount_usd: usd_string(l.amount),
        }
    }
}

/// An invoice without its lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceView {
    pub id: String,
    pub developer_id: String,
    /// `YYYY-MM`.
    pub period: String,
    /// `draft`, `open`, `paid` or `void`.
    pub status: String,
    pub currency: String,
    /// Sum of the lines, exact.
    pub subtotal_usd: String,
    /// The subtotal rounded once to cents (half away from zero): the amount invoiced.
    pub total_usd: String,
    pub amount_paid_usd: String,
    /// What is left to pay (`0.00` once paid or void).
    pub amount_due_usd: String,
    pub requests: i64,
    pub total_tokens: i64,
    /// Tokens covered by the plans' included tokens.
    pub included_tokens: i64,
    /// Tokens billed as overage.
    pub overage_tokens: i64,
    /// Tokens beyond the included ones on plans without overage (not billed).
    pub waived_tokens: i64,
    /// The period's usage at list prices, exact.
    pub usage_cost_usd: String,
    /// RFC 3339 instants.
    pub computed_at: String,
    pub created_at: String,
    pub finalized_at: Option<String>,
    pub paid_at: Option<String>,
    pub voided_at: Option<String>,
    pub void_reason: Option<String>,
}

fn amount_due(i: &Invoice) -> Decimal {
    if i.status == invoices::VOID {
        Decimal::ZERO
    } else {
        (i.total - i.amount_paid).max(Decimal::ZERO)
    }
}

impl From<&Invoice> for InvoiceView {
    fn from(i: &Invoice) -> Self {
        InvoiceView {
            id: i.id.clone(),
            developer_id: i.developer_id.clone(),
            period: i.period.clone(),
            status: i.status.clone(),
            currency: i.currency.clone(),
            subtotal_usd: usd_string(i.subtotal),
            total_usd: usd_string(i.total),
            amount_paid_usd: usd_string(i.amount_paid),
            amount_due_usd: usd_string(amount_due(i)),
            requests: i.requests,
            total_tokens: i.total_tokens,
            included_tokens: i.included_tokens,
            overage_tokens: i.overage_tokens,
            waived_tokens: i.waived_tokens,
            usage_cost_usd: usd_string(i.usage_cost),
            computed_at: rfc3339_ms(i.computed_at),
            created_at: rfc3339_ms(i.created_at),
            finalized_at: i.finalized_at.map(rfc3339_ms),
            paid_at: i.paid_at.map(rfc3339_ms),
            voided_at: i.voided_at.map(rfc3339_ms),
            void_reason: i.void_reason.clone(),
        }
    }
}

/// A payment received.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentView {
    pub id: String,
    pub invoice_id: String,
    /// `manual` (recorded by an operator).
    pub provider: String,
    /// The provider's reference (bank transfer reference, charge id).
    pub reference: String,
    pub amount_usd: String,
    pub currency: String,
    /// RFC 3339: when the money was received.
    pub received_at: String,
    /// RFC 3339: when it was recorded.
    pub created_at: String,
    /// Who recorded it (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

impl PaymentView {
    fn new(p: &Payment, operator: bool) -> PaymentView {
        PaymentView {
            id: p.id.clone(),
            invoice_id: p.invoice_id.clone(),
            provider: p.provider.clone(),
            reference: p.reference.clone(),
            amount_usd: usd_string(p.amount),
            currency: p.currency.clone(),
            received_at: rfc3339_ms(p.received_at),
            created_at: rfc3339_ms(p.created_at),
            recorded_by: p.recorded_by.clone().filter(|_| operator),
        }
    }
}

/// An invoice with its lines and payments.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceDetail {
    #[serde(flatten)]
    pub invoice: InvoiceView,
    pub lines: Vec<LineView>,
    pub payments: Vec<PaymentView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceList {
    /// Newest period first.
    pub data: Vec<InvoiceView>,
    /// More invoices match than `limit` (narrow the filters).
    pub has_more: bool,
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A store conflict as a 409 carrying its message (the store's messages are written for
/// people); anything else as usual.
fn conflict(e: StoreError) -> AppError {
    match e {
        StoreError::Conflict(m) => AppError::Conflict(sentence(&m)),
        e => e.into(),
    }
}

fn billing_error(e: BillingError) -> AppError {
    match e {
        BillingError::Store(e) => conflict(e),
        e => e.into(),
    }
}

fn plan_view(s: &AppState, name: &str) -> BillingPlan {
    let p = s.plans.plan(name);
    BillingPlan {
        name: name.to_owned(),
        display_name: if p.display_name.is_empty() {
            name.to_owned()
        } else {
            p.display_name.clone()
        },
        monthly_price_usd: p.monthly_price_usd.map(usd_string),
        included_tokens: p.included_tokens,
        overage: p.overage,
    }
}

fn billing_view(s: &AppState, dev: &Developer, c: &CurrentBilling) -> BillingView {
    let overage: Decimal = c
        .so_far
        .lines
        .iter()
        .filter(|l| l.kind == "overage")
        .map(|l| l.amount)
        .sum();
    BillingView {
        plan: plan_view(s, &c.plan),
        period: PeriodView::of(c.period),
        usage: UsageSoFar {
            requests: c.so_far.requests,
            tokens_used: c.tokens_used,
            included_tokens: c.included_tokens,
            remaining_tokens: c.included_tokens.map(|i| i.saturating_sub(c.tokens_used)),
            overage_tokens: c.so_far.overage_tokens,
            waived_tokens: c.so_far.waived_tokens,
        },
        cost_so_far: CostSoFar {
            lines: c.so_far.lines.iter().map(LineView::from).collect(),
            subtotal_usd: usd_string(c.so_far.subtotal),
            total_usd: usd_string(c.so_far.total),
            overage_usd: usd_string(overage),
        },
        projected: Projection {
            tokens: c.projected_tokens,
            subtotal_usd: usd_string(c.projected_subtotal),
            total_usd: usd_string(c.projected_total),
        },
        monthly_spend_cap_usd: dev
            .monthly_spend_cap_nanos
            .map(crate::plans::usd_from_nanos),
        as_of: rfc3339_ms(c.as_of),
    }
}

async fn detail(s: &AppState, inv: &Invoice, operator: bool) -> Result<InvoiceDetail, AppError> {
    let lines = invoices::lines(&s.store, &inv.id).await?;
    let paid = payments::payments_for(&s.store, &inv.id).await?;
    Ok(detail_of(inv, &lines, &paid, operator))
}

fn detail_of(
    inv: &Invoice,
    lines: &[InvoiceLine],
    paid: &[Payment],
    operator: bool,
) -> InvoiceDetail {
    InvoiceDetail {
        invoice: inv.into(),
        lines: lines.iter().map(LineView::from).collect(),
        payments: paid.iter().map(|p| PaymentView::new(p, operator)).collect(),
    }
}

fn check_period(field: &str, text: &str, errors: &mut Vec<FieldError>) -> Option<Period> {
    let p = Period::parse(text);
    if p.is_none() {
        errors.push(FieldError::new(field, "must be a month, `YYYY-MM`"));
    }
    p
}

fn check_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, AppError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(AppError::validation("limit", format!("must be 1 to {max}")));
    }
    Ok(limit)
}

// ---------------------------------------------------------------------------------------------
// Developer endpoints

/// The caller's current billing period so far: plan, usage against the included tokens, the
/// invoice as if the period closed now (lines, exact subtotal, total rounded to cents), and a
/// projection to the month's end at the average rate so far. Needs the usage database (503
/// `usage_unavailable` otherwise).
#[utoipa::path(get, path = "/developer/billing", tag = "billing",
    responses((status = 200, body = BillingView), (status = 401, body = crate::openapi::ErrorBody),
              (status = 503, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn developer_billing(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<BillingView>, AppError> {
    billing_of(&s, &caller.developer).await.map(Json)
}

/// A developer's month so far and its projection (the API's answer, the portal's pages).
pub(crate) async fn billing_of(s: &AppState, dev: &Developer) -> Result<BillingView, AppError> {
    let billing = s.billing()?;
    let current = billing.current(&dev.id, now_ms()).await?;
    Ok(billing_view(s, dev, &current))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlan {
    /// A plan with a monthly price (`GET /plans`); custom-priced plans are arranged with an
    /// operator.
    pub plan: String,
}

/// Change the caller's plan, effective now. The month is **prorated**: it is split at the
/// change, and each plan's base fee and included tokens count for the share of the month's
/// milliseconds it was held (fee exact, tokens rounded down). Usage before the change is
/// measured against the old plan's share, usage after against the new plan's; the invoice has a
/// base-fee line per plan held and overage lines per plan and model. Gateways apply the new
/// plan's limits within a second. Only plans with a monthly price can be chosen here. Returns
/// the billing view after the change.
#[utoipa::path(put, path = "/developer/billing/plan", tag = "billing",
    request_body = ChangePlan,
    responses((status = 200, body = BillingView), (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn change_plan(
    State(s): State<AppState>,
    caller: Caller,
    meta: ClientMeta,
    Json(r): Json<ChangePlan>,
) -> Result<Json<BillingView>, AppError> {
    switch_plan(&s, &caller.developer, &meta, &r.plan)
        .await
        .map(Json)
}

/// A plan change as the API and the portal run it: the service's rule check, the usage
/// database required before any write, the service's change, the billing view after it.
pub(crate) async fn switch_plan(
    s: &AppState,
    developer: &Developer,
    meta: &ClientMeta,
    plan: &str,
) -> Result<BillingView, AppError> {
    let plan = plan.trim();
    s.control.check_plan_choice(plan)?;
    // Before any write: without the usage database the answer could not be given.
    let billing = s.billing()?;
    let ip = meta.ip.map(|i| i.to_string());
    let dev = s
        .control
        .change_plan(developer, ip.as_deref(), plan)
        .await?;
    let current = billing.current(&dev.id, now_ms()).await?;
    Ok(billing_view(s, &dev, &current))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeveloperInvoicesQuery {
    /// 1 to 100. Default 24.
    pub limit: Option<i64>,
}

/// The caller's invoices (finalized ones: drafts are not shown), newest period first.
#[utoipa::path(get, path = "/developer/invoices", tag = "billing", params(DeveloperInvoicesQuery),
    responses((status = 200, body = InvoiceList), (status = 401, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn developer_invoices(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<DeveloperInvoicesQuery>,
) -> Result<Json<InvoiceList>, AppError> {
    invoices_of(&s, &caller.developer.id, q.limit)
        .await
        .map(Json)
}

/// A developer's issued invoices, newest first (`limit` 1 to 100, default 24).
pub(crate) async fn invoices_of(
    s: &AppState,
    developer_id: &str,
    limit: Option<i64>,
) -> Result<InvoiceList, AppError> {
    let limit = check_limit(limit, 24, 100)?;
    let mut rows = invoices::issued_for(&s.store, developer_id, limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(InvoiceList {
        data: rows.iter().map(InvoiceView::from).collect(),
        has_more,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FormatQuery {
    /// `json` or `html` (a printable page). Default: `html` when the `Accept` header prefers
    /// `text/html`, else `json`.
    pub format: Option<String>,
}

/// One of the caller's invoices with its lines and payments, as JSON or as a printable HTML
/// page (`format=html`, or an `Accept` header preferring `text/html`). Another developer's
/// invoice, or a draft, is a 404.
#[utoipa::path(get, path = "/developer/invoices/{id}", tag = "billing",
    params(("id" = String, Path, description = "Invoice id"), FormatQuery),
    responses((status = 200, description = "The invoice",
                content((InvoiceDetail = "application/json"), (String = "text/html"))),
              (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn developer_invoice(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FormatQuery>,
) -> Result<Response, AppError> {
    let html = wants_html(q.format.as_deref(), &headers)?;
    invoice_of(&s, &caller.developer, &id, html).await
}

/// One of `dev`'s issued invoices as JSON or the printable page (another developer's, or a
/// draft, is a 404).
pub(crate) async fn invoice_of(
    s: &AppState,
    dev: &Developer,
    id: &str,
    html: bool,
) -> Result<Response, AppError> {
    let inv = invoices::by_id(&s.store, id).await?;
    if inv.developer_id != dev.id || inv.finalized_at.is_none() {
        return Err(AppError::NotFound);
    }
    respond(s, &inv, html, false, Some(dev)).await
}

async fn respond(
    s: &AppState,
    inv: &Invoice,
    html: bool,
    operator: bool,
    dev: Option<&Developer>,
) -> Result<Response, AppError> {
    let lines = invoices::lines(&s.store, &inv.id).await?;
    let paid = payments::payments_for(&s.store, &inv.id).await?;
    if !html {
        return Ok(Json(detail_of(inv, &lines, &paid, operator)).into_response());
    }
    let dev = match dev {
        Some(d) => d.clone(),
        None => developers::by_id(&s.store, &inv.developer_id).await?,
    };
    let page = render_html(inv, &lines, &paid, &dev);
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "private, no-store"),
        ],
        page,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_messages_become_sentences() {
        assert_eq!(sentence("the invoice is void"), "The invoice is void.");
    }
}
