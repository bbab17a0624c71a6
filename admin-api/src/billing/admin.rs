//! The operator's billing endpoints: invoices (drafts included), generation, finalization,
//! voiding, payments (through the payment provider) and the revenue report.

use super::*;

// Operator endpoints

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AdminInvoicesQuery {
    /// `YYYY-MM`.
    pub period: Option<String>,
    /// `draft`, `open`, `paid` or `void`.
    pub status: Option<String>,
    pub developer_id: Option<String>,
    /// 1 to 500. Default 100.
    pub limit: Option<i64>,
}

const STATUSES: [&str; 4] = [
    invoices::DRAFT,
    invoices::OPEN,
    invoices::PAID,
    invoices::VOID,
];

/// Invoices of every developer (drafts included), newest period first, filtered by period,
/// status or developer.
#[utoipa::path(get, path = "/admin/invoices", tag = "billing", params(AdminInvoicesQuery),
    responses((status = 200, body = InvoiceList), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_invoices(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<AdminInvoicesQuery>,
) -> Result<Json<InvoiceList>, AppError> {
    let mut errors = Vec::new();
    if let Some(p) = &q.period {
        check_period("period", p, &mut errors);
    }
    if q.status
        .as_deref()
        .is_some_and(|st| !STATUSES.contains(&st))
    {
        errors.push(FieldError::new(
            "status",
            "must be `draft`, `open`, `paid` or `void`",
        ));
    }
    AppError::check(errors)?;
    let limit = check_limit(q.limit, 100, 500)?;
    let filter = InvoiceFilter {
        developer_id: q.developer_id,
        period: q.period,
        status: q.status,
    };
    let mut rows = invoices::list(&s.store, &filter, limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(InvoiceList {
        data: rows.iter().map(InvoiceView::from).collect(),
        has_more,
    }))
}

/// Any invoice (drafts included) with its lines and payments, as JSON or as the printable HTML
/// page the developer sees (`format=html` or `Accept: text/html`).
#[utoipa::path(get, path = "/admin/invoices/{id}", tag = "billing",
    params(("id" = String, Path, description = "Invoice id"), FormatQuery),
    responses((status = 200, description = "The invoice",
                content((InvoiceDetail = "application/json"), (String = "text/html"))),
              (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_invoice(
    State(s): State<AppState>,
    _op: Operator,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FormatQuery>,
) -> Result<Response, AppError> {
    let html = wants_html(q.format.as_deref(), &headers)?;
    let inv = invoices::by_id(&s.store, &id).await?;
    respond(&s, &inv, html, true, None).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// A closed period, `YYYY-MM` (before the current month).
    pub period: String,
    /// Only this developer's invoice. Default: every developer with a subscription in the
    /// period.
    pub developer_id: Option<String>,
    /// Also create a new draft where the period's invoice was voided (an operator's decision
    /// to invoice again). Default false: voided invoices are left alone.
    #[serde(default)]
    pub reissue: bool,
}

/// What generating did.
#[derive(Debug, Serialize, ToSchema)]
pub struct GenerateView {
    pub period: String,
    /// Developers with a subscription in the period (invoices computed).
    pub developers: usize,
    /// Drafts created.
    pub created: usize,
    /// Drafts recomputed from usage.
    pub refreshed: usize,
    /// Invoices past draft (or voided, without `reissue`), left as they were.
    pub kept: usize,
    /// Developer ids with usage but no subscription in the period (keys declared only in a
    /// gateway's YAML, or usage before the account existed): not invoiced.
    pub skipped_without_subscription: usize,
    /// With `developer_id`: the period's invoice now (if any).
    pub invoice: Option<InvoiceView>,
}

/// Create or refresh the drafts of a **closed** period from the usage recorded (the current
/// month cannot be invoiced: `GET /developer/billing` shows it so far). Generating again is
/// harmless: drafts are recomputed, finalized invoices kept, and there is never more than one
/// invoice per developer and period. Drafts are finalized by the background job once the
/// grace window for late usage is over, or by `POST /admin/invoices/{id}/finalize`.
#[utoipa::path(post, path = "/admin/invoices/generate", tag = "billing",
    request_body = GenerateRequest,
    responses((status = 200, body = GenerateView), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn generate(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Json(r): Json<GenerateRequest>,
) -> Result<Json<GenerateView>, AppError> {
    let mut errors = Vec::new();
    let period = check_period("period", &r.period, &mut errors);
    let current = Period::of_unix_ms(now_ms());
    if period.is_some_and(|p| p >= current) {
        errors.push(FieldError::new(
            "period",
            format!("must be a closed period (before {current})"),
        ));
    }
    if let Some(id) = &r.developer_id {
        match developers::by_id(&s.store, id).await {
            Ok(_) => {}
            Err(StoreError::NotFound) => {
                errors.push(FieldError::new("developer_id", "no such developer"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    AppError::check(errors)?;
    let period = period.expect("checked");
    let billing = s.billing()?;
    let mode = if r.reissue {
        SaveMode::Reissue
    } else {
        SaveMode::Automatic
    };
    let report: GenerateReport = billing
        .generate(period, r.developer_id.as_deref(), mode)
        .await
        .map_err(billing_error)?;
    let invoice = match &r.developer_id {
        Some(id) => {
            let filter = InvoiceFilter {
                developer_id: Some(id.clone()),
                period: Some(period.to_string()),
                ..Default::default()
            };
            invoices::list(&s.store, &filter, 10)
                .await?
                .iter()
                .find(|i| i.status != invoices::VOID)
                .map(InvoiceView::from)
        }
        None => None,
    };
    let ip = meta.ip.map(|i| i.to_string());
    let period_text = period.to_string();
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    let entry = Entry {
        action: "invoice.generate",
        target_type: "period",
        target_id: &period_text,
        details: serde_json::json!({
            "developer_id": r.developer_id,
            "reissue": r.reissue,
            "developers": report.developers,
            "created": report.created,
            "refreshed": report.refreshed,
            "kept": report.kept,
        }),
    };
    s.control.audit(&by, entry).await?;
    Ok(Json(GenerateView {
        period: period_text,
        developers: report.developers,
        created: report.created,
        refreshed: report.refreshed,
        kept: report.kept,
        skipped_without_subscription: report.skipped_without_subscription,
        invoice,
    }))
}

/// Finalize a draft now (without waiting for the grace window): it is recomputed from usage
/// one last time, then becomes `open` (or `paid` when nothing is due) and the developer sees
/// it; an `invoice.finalized` event is written. An invoice past draft is returned unchanged; a
/// void one is a 409.
#[utoipa::path(post, path = "/admin/invoices/{id}/finalize", tag = "billing",
    params(("id" = String, Path, description = "Invoice id")),
    responses((status = 200, body = InvoiceDetail), (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, body = crate::openapi::ErrorBody),
              (status = 503, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn finalize(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
) -> Result<Json<InvoiceDetail>, AppError> {
    s.billing()?
        .refresh_draft(&id)
        .await
        .map_err(billing_error)?;
    let ip = meta.ip.map(|i| i.to_string());
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    let inv = s.control.finalize_invoice(&by, &id).await?;
    Ok(Json(detail(&s, &inv, true).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// Why (1 to 500 characters); shown on the invoice.
    pub reason: String,
}

/// Void a draft or open invoice that has no payments (a paid invoice, or one with payments,
/// is a 409). An invoice the developer has seen gets an `invoice.voided` event. Voiding twice
/// returns the invoice unchanged. The period can then be invoiced again with
/// `POST /admin/invoices/generate` and `reissue: true`.
#[utoipa::path(post, path = "/admin/invoices/{id}/void", tag = "billing",
    params(("id" = String, Path, description = "Invoice id")),
    request_body = VoidRequest,
    responses((status = 200, body = InvoiceDetail), (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn void(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
    Json(r): Json<VoidRequest>,
) -> Result<Json<InvoiceDetail>, AppError> {
    let ip = meta.ip.map(|i| i.to_string());
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    let inv = s.control.void_invoice(&by, &id, &r.reason).await?;
    Ok(Json(detail(&s, &inv, true).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequestBody {
    /// USD as a decimal string, at most 2 decimals (`"12.50"`); more than zero and at most the
    /// amount due.
    pub amount_usd: String,
    /// The transfer's reference (1 to 200 characters). Recording the same reference again
    /// returns the payment already recorded (200) instead of booking it twice.
    pub reference: String,
    /// `manual` (default): money received outside the platform (bank transfer, cheque, …).
    pub provider: Option<String>,
    /// RFC 3339: when the money arrived. Default: now.
    pub received_at: Option<String>,
}

/// A payment and the invoice after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentRecorded {
    pub payment: PaymentView,
    pub invoice: InvoiceDetail,
}

/// Parses a payment amount: a plain decimal string, at most 2 decimals.
fn parse_amount(text: &str) -> Result<Decimal, String> {
    const SHAPE: &str = "must be a USD amount as a decimal string, e.g. \"12.50\"";
    let t = text.trim();
    let ok = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !t.starts_with('.')
        && !t.ends_with('.')
        && t.len() <= 20;
    if !ok {
        return Err(SHAPE.into());
    }
    let d = Decimal::from_str(t).map_err(|_| SHAPE.to_owned())?;
    if d.normalize().scale() > 2 {
        return Err("must have at most 2 decimals (cents)".into());
    }
    if d <= Decimal::ZERO {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Record money received for an open invoice (provider `manual`: an operator's record of a
/// bank transfer or similar). The invoice becomes `paid` once payments cover its total;
/// overpayments are refused (422). Writes a `billing.payment` event with the payment in one
/// transaction. 201 with the payment; 200 when the reference was recorded already (nothing
/// changes); 409 for a draft (finalize it first), a void or paid invoice, or a reference used
/// for another payment.
#[utoipa::path(post, path = "/admin/invoices/{id}/payments", tag = "billing",
    params(("id" = String, Path, description = "Invoice id")),
    request_body = PaymentRequestBody,
    responses((status = 201, body = PaymentRecorded), (status = 200, body = PaymentRecorded),
              (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn record_payment(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
    Json(r): Json<PaymentRequestBody>,
) -> Result<(StatusCode, Json<PaymentRecorded>), AppError> {
    let mut errors = Vec::new();
    let amount = match parse_amount(&r.amount_usd) {
        Ok(a) => Some(a),
        Err(m) => {
            errors.push(FieldError::new("amount_usd", m));
            None
        }
    };
    let reference = r.reference.trim().to_owned();
    if reference.is_empty() || reference.chars().count() > 200 {
        errors.push(FieldError::new("reference", "must be 1 to 200 characters"));
    }
    let provider_name = r
        .provider
        .as_deref()
        .unwrap_or(providers::ManualProvider::NAME);
    let provider = providers::provider(provider_name);
    if provider.is_none() {
        errors.push(FieldError::new(
            "provider",
            format!("must be one of: {}", providers::PROVIDERS.join(", ")),
        ));
    }
    let received_at = match &r.received_at {
        None => None,
        Some(t) => match humantime::parse_rfc3339_weak(t) {
            Ok(at) => {
                let ms = at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                // A little clock skew is fine; a payment from the future is a typo.
                if ms > now_ms() + 300_000 {
                    errors.push(FieldError::new("received_at", "must not be in the future"));
                }
                Some(ms)
            }
            Err(_) => {
                errors.push(FieldError::new(
                    "received_at",
                    "must be an RFC 3339 instant",
                ));
                None
            }
        },
    };
    AppError::check(errors)?;
    let (Some(amount), Some(provider)) = (amount, provider) else {
        unreachable!("checked above");
    };
    let req = PaymentRequest {
        invoice_id: id,
        amount,
        currency: "USD".into(),
        reference,
        received_at,
        recorded_by: Some(op.id.clone()),
        ip: meta.ip.map(|i| i.to_string()),
    };
    let outcome = provider.record(&s.store, req).await.map_err(|e| match e {
        ProviderError::Invalid { field, message } => {
            let field = if field == "amount" {
                "amount_usd"
            } else {
                field
            };
            AppError::validation(field, message)
        }
        ProviderError::Store(e) => conflict(e),
        ProviderError::Unavailable(m) => AppError::Unavailable(m),
        ProviderError::Unsupported(p) => AppError::validation(
            "provider",
            format!("the {p} provider cannot record payments"),
        ),
    })?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(PaymentRecorded {
            payment: PaymentView::new(&outcome.payment, true),
            invoice: detail(&s, &outcome.invoice, true).await?,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RevenueQuery {
    /// `YYYY-MM`. Default: the last closed period (the previous month).
    pub period: Option<String>,
}

/// One status's invoices.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusRevenueView {
    pub status: String,
    pub invoices: i64,
    pub total_usd: String,
    pub amount_paid_usd: String,
}

/// One plan's revenue (exact line sums).
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanRevenueView {
    pub plan: String,
    pub display_name: String,
    /// Base-fee lines, prorated where the plan was held part of the period.
    pub base_fees_usd: String,
    /// Overage lines billed on this plan.
    pub overage_usd: String,
    pub overage_tokens: i64,
    /// Invoices with a line of this plan.
    pub invoices: i64,
}

/// One model's overage revenue (exact line sums).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelRevenueView {
    pub model: String,
    pub overage_usd: String,
    pub overage_tokens: i64,
    pub requests: i64,
}

/// A period's revenue from its invoices (void ones left out; drafts included, see
/// `by_status`).
#[derive(Debug, Serialize, ToSchema)]
pub struct RevenueView {
    pub period: PeriodView,
    pub invoices: i64,
    /// Sum of the invoices' exact subtotals (= the sum of `by_plan`).
    pub subtotal_usd: String,
    /// Sum of the invoices' totals (each rounded once to cents).
    pub total_usd: String,
    pub amount_paid_usd: String,
    /// Still due on open invoices.
    pub outstanding_usd: String,
    /// Per status, `void` included (not counted in the sums above).
    pub by_status: Vec<StatusRevenueView>,
    /// Largest first.
    pub by_plan: Vec<PlanRevenueView>,
    /// Overage by model, largest first.
    pub by_model: Vec<ModelRevenueView>,
}

/// Revenue of a period: invoiced totals by plan (base fees and overage) and overage by model,
/// with amounts paid and outstanding. Exact decimal sums over the invoices and their lines.
#[utoipa::path(get, path = "/admin/billing/revenue", tag = "billing", params(RevenueQuery),
    responses((status = 200, body = RevenueView), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn revenue(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<RevenueQuery>,
) -> Result<Json<RevenueView>, AppError> {
    revenue_of(&s, q).await.map(Json)
}

/// What `revenue` answers, for the portal too (operators only: the handler or page checks).
pub(crate) async fn revenue_of(s: &AppState, q: RevenueQuery) -> Result<RevenueView, AppError> {
    let period = match &q.period {
        Some(p) => {
            let mut errors = Vec::new();
            let period = check_period("period", p, &mut errors);
            AppError::check(errors)?;
            period.expect("checked")
        }
        None => Period::of_unix_ms(now_ms()).prev(),
    };
    let r = invoices::revenue(&s.store, &period.to_string()).await?;
    Ok(RevenueView {
        period: PeriodView::of(period),
        invoices: r.invoices,
        subtotal_usd: usd_string(r.subtotal),
        total_usd: usd_string(r.total),
        amount_paid_usd: usd_string(r.amount_paid),
        outstanding_usd: usd_string(r.outstanding),
        by_status: r
            .by_status
            .iter()
            .map(|x| StatusRevenueView {
                status: x.status.clone(),
                invoices: x.invoices,
                total_usd: usd_string(x.total),
                amount_paid_usd: usd_string(x.amount_paid),
            })
            .collect(),
        by_plan: r
            .by_plan
            .iter()
            .map(|p| PlanRevenueView {
                display_name: plan_view(s, &p.plan).display_name,
                plan: p.plan.clone(),
                base_fees_usd: usd_string(p.base_fees),
                overage_usd: usd_string(p.overage),
                overage_tokens: p.overage_tokens,
                invoices: p.invoices,
            })
            .collect(),
        by_model: r
            .by_model
            .iter()
            .map(|m| ModelRevenueView {
                model: m.model.clone(),
                overage_usd: usd_string(m.overage),
                overage_tokens: m.overage_tokens,
                requests: m.requests,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(parse_amount("12.50"), Ok(Decimal::new(1250, 2)));
        assert_eq!(parse_amount("7"), Ok(Decimal::from(7)));
        assert!(parse_amount("1.005").unwrap_err().contains("2 decimals"));
        assert!(parse_amount("0").unwrap_err().contains("more than zero"));
        for bad in ["", "-1", "1e3", ".5", "5.", "1,5", "+5", "abc"] {
            assert!(parse_amount(bad).unwrap_err().contains("decimal"), "{bad}");
        }
    }
}
