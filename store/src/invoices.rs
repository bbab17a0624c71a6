//! Invoices, their lines and payments. Billing (`aihub-billing`) computes an invoice from
//! metered usage and saves it here as a **draft**; drafts are refreshed until the period's grace
//! window ends, then **finalized** (`open`, or `paid` when nothing is due). An `open` invoice
//! becomes `paid` once payments cover its total; `draft` and `open` invoices may be **voided**.
//! Only drafts ever change their amounts.
//!
//! **Invariant:** at most one invoice that is not void exists per developer and period (a
//! partial unique index), so generating twice, or on two nodes at once, never creates two.
//!
//! Amounts are exact decimals stored as text (`subtotal` exact, `total` rounded to cents once).

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{new_id, now_ms, outbox, Result, Store, StoreError};

pub const DRAFT: &str = "draft";
pub const OPEN: &str = "open";
pub const PAID: &str = "paid";
pub const VOID: &str = "void";

/// Outbox event written when a period's draft invoice is created (its amounts may change
/// until it is finalized).
pub const INVOICE_CREATED: &str = "invoice.created";
/// Outbox event written when an invoice is finalized.
pub const INVOICE_FINALIZED: &str = "invoice.finalized";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub id: String,
    pub developer_id: String,
    /// `YYYY-MM`.
    pub period: String,
    pub status: String,
    pub currency: String,
    /// Sum of the lines, exact.
    pub subtotal: Decimal,
    /// The subtotal rounded once to cents (half away from zero): the amount due.
    pub total: Decimal,
    pub amount_paid: Decimal,
    pub total_tokens: i64,
    /// Tokens covered by the plans' included tokens.
    pub included_tokens: i64,
    /// Tokens billed as overage.
    pub overage_tokens: i64,
    /// Tokens beyond the included ones on plans without overage (not billed).
    pub waived_tokens: i64,
    pub requests: i64,
    /// The period's usage at list prices (what the gateway metered), exact.
    pub usage_cost: Decimal,
    /// When the amounts were last computed from usage.
    pub computed_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finalized_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub voided_at: Option<i64>,
    pub void_reason: Option<String>,
}

/// One line: a plan's (prorated) base fee, or its overage for one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub line_no: i64,
    /// `base` or `overage`.
    pub kind: String,
    pub plan: String,
    /// The model (overage lines); empty for base fees.
    pub model: String,
    pub description: String,
    /// The span of the period the line covers (unix ms, end exclusive).
    pub starts_at: i64,
    pub ends_at: i64,
    /// Tokens (overage lines) or 1 (base fees).
    pub quantity: i64,
    /// Requests whose tokens the line bills (overage lines).
    pub requests: i64,
    /// Exact amount in USD.
    pub amount: Decimal,
}

/// What billing computed for a developer and period (saved as a draft, or compared against
/// the saved invoice by reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Computed {
    pub developer_id: String,
    pub period: String,
    pub subtotal: Decimal,
    pub total: Decimal,
    pub total_tokens: i64,
    pub included_tokens: i64,
    pub overage_tokens: i64,
    pub waived_tokens: i64,
    pub requests: i64,
    pub usage_cost: Decimal,
    pub lines: Vec<InvoiceLine>,
}

/// Whether saving may create an invoice for a period whose invoice was voided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Background generation: a voided invoice means an operator decided; leave it alone.
    Automatic,
    /// An operator asked for this period again: a new draft replaces the voided invoice.
    Reissue,
}

/// What saving a computed invoice did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    Created(String),
    /// The draft existed; its amounts and lines were replaced.
    Refreshed(String),
    /// An invoice past draft exists (or was voided, in automatic mode): nothing changed.
    Kept(String),
}

const COLUMNS: &str = "id, developer_id, period, status, currency, subtotal, total, amount_paid, \
    total_tokens, included_tokens, overage_tokens, waived_tokens, requests, usage_cost, \
    computed_at, created_at, updated_at, finalized_at, paid_at, voided_at, void_reason";

pub(crate) fn decimal(r: &AnyRow, column: &str) -> Result<Decimal> {
    let text: String = r.try_get(column)?;
    Decimal::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{column} `{text}`: {e}")))
}

fn from_row(r: &AnyRow) -> Result<Invoice> {
    Ok(Invoice {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        period: r.try_get("period")?,
        status: r.try_get("status")?,
        currency: r.try_get("currency")?,
        subtotal: decimal(r, "subtotal")?,
        total: decimal(r, "total")?,
        amount_paid: decimal(r, "amount_paid")?,
        total_tokens: r.try_get("total_tokens")?,
        included_tokens: r.try_get("included_tokens")?,
        overage_tokens: r.try_get("overage_tokens")?,
        waived_tokens: r.try_get("waived_tokens")?,
        requests: r.try_get("requests")?,
        usage_cost: decimal(r, "usage_cost")?,
        computed_at: r.try_get("computed_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        finalized_at: r.try_get("finalized_at")?,
        paid_at: r.try_get("paid_at")?,
        voided_at: r.try_get("voided_at")?,
        void_reason: r.try_get("void_reason")?,
    })
}

fn line_from_row(r: &AnyRow) -> Result<InvoiceLine> {
    Ok(InvoiceLine {
        line_no: r.try_get("line_no")?,
        kind: r.try_get("kind")?,
        plan: r.try_get("plan")?,
        model: r.try_get("model")?,
        description: r.try_get("description")?,
        starts_at: r.try_get("starts_at")?,
        ends_at: r.try_get("ends_at")?,
        quantity: r.try_get("quantity")?,
        requests: r.try_get("requests")?,
        amount: decimal(r, "amount")?,
    })
}

/// Saves computed invoices as drafts, in one transaction: creates the missing ones, refreshes
/// existing drafts, keeps anything past draft. Two generators racing on PostgreSQL may collide
/// on the unique index; the loser's batch is retried once and then sees the winner's rows.
pub async fn save_drafts(
    store: &Store,
    computed: &[Computed],
    mode: SaveMode,
) -> Result<Vec<Saved>> {
    let mut attempt = 0;
    loop {
        let mut tx = store.begin_write().await?;
        let mut saved = Vec::with_capacity(computed.len());
        let mut failed = None;
        for c in computed {
            match save_one(&mut tx, c, mode).await {
                Ok(s) => saved.push(s),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => {
                tx.commit().await?;
                return Ok(saved);
            }
            Some(StoreError::Conflict(_)) if attempt == 0 => {
                attempt += 1;
                drop(tx);
            }
            Some(e) => return Err(e),
        }
    }
}

async fn save_one(conn: &mut AnyConnection, c: &Computed, mode: SaveMode) -> Result<Saved> {
    let now = now_ms();
    // Locked (PostgreSQL) so a concurrent finalize or void waits for this transaction, and
    // this one then sees its result: a draft's lines are never replaced once it is final.
    let existing = sqlx::query(&format!(
        "SELECT id, status FROM invoices WHERE developer_id = $1 AND period = $2 \
         ORDER BY created_at DESC{}",
        for_update(conn)
    ))
    .bind(&c.developer_id)
    .bind(&c.period)
    .fetch_all(&mut *conn)
    .await?;
    let mut voided = None;
    for r in &existing {
        let id: String = r.try_get("id")?;
        let status: String = r.try_get("status")?;
        if status == VOID {
            voided.get_or_insert(id);
            continue;
        }
        if status != DRAFT {
            return Ok(Saved::Kept(id));
        }
        // The row is locked and a draft: its amounts are replaced.
        let update = sqlx::query(
            "UPDATE invoices SET subtotal = $2, total = $3, total_tokens = $4, \
             included_tokens = $5, overage_tokens = $6, waived_tokens = $7, requests = $8, \
             usage_cost = $9, computed_at = $10, updated_at = $10 WHERE id = $1",
        )
        .bind(&id);
        bind_amounts(update, c)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        insert_lines(conn, &id, &c.lines).await?;
        return Ok(Saved::Refreshed(id));
    }
    if let (Some(id), SaveMode::Automatic) = (voided, mode) {
        return Ok(Saved::Kept(id));
    }
    let id = new_id("inv_");
    let insert = sqlx::query(
        "INSERT INTO invoices (id, developer_id, period, status, currency, subtotal, total, \
         amount_paid, total_tokens, included_tokens, overage_tokens, waived_tokens, requests, \
         usage_cost, computed_at, created_at, updated_at) \
         VALUES ($1, $2, $3, 'draft', 'USD', $4, $5, '0', $6, $7, $8, $9, $10, $11, $12, $12, $12)",
    )
    .bind(&id)
    .bind(&c.developer_id)
    .bind(&c.period);
    bind_amounts(insert, c)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    insert_lines(conn, &id, &c.lines).await?;
    outbox::enqueue(
        conn,
        INVOICE_CREATED,
        Some(&c.developer_id),
        serde_json::json!({
            "invoice_id": id,
            "period": c.period,
            "status": DRAFT,
            "total": c.total.to_string(),
            "currency": "USD",
        }),
    )
    .await?;
    Ok(Saved::Created(id))
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a computed invoice's amounts and counts, in column order: subtotal, total, then
/// total, included, overage and waived tokens, requests, usage cost.
fn bind_amounts<'q>(q: AnyQuery<'q>, c: &'q Computed) -> AnyQuery<'q> {
    q.bind(c.subtotal.to_string())
        .bind(c.total.to_string())
        .bind(c.total_tokens)
        .bind(c.included_tokens)
        .bind(c.overage_tokens)
        .bind(c.waived_tokens)
        .bind(c.requests)
        .bind(c.usage_cost.to_string())
}

async fn insert_lines(conn: &mut AnyConnection, id: &str, lines: &[InvoiceLine]) -> Result<()> {
    for l in lines {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, line_no, kind, plan, model, description, \
             starts_at, ends_at, quantity, requests, amount) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id)
        .bind(l.line_no)
        .bind(&l.kind)
        .bind(&l.plan)
        .bind(&l.model)
        .bind(&l.description)
        .bind(l.starts_at)
        .bind(l.ends_at)
        .bind(l.quantity)
        .bind(l.requests)
        .bind(l.amount.to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Finalizes a draft: `open`, or `paid` at once when nothing is due; writes
/// [`INVOICE_FINALIZED`] to the outbox. An invoice past draft is returned unchanged
/// (finalizing twice is harmless); a voided one, or one whose period has not ended yet (its
/// usage is not complete), is a [`StoreError::Conflict`].
pub async fn finalize(conn: &mut AnyConnection, id: &str) -> Result<Invoice> {
    Ok(finalize_changed(conn, id).await?.0)
}

/// [`finalize`], and whether this call finalized the draft (`false`: it was final already).
pub async fn finalize_changed(conn: &mut AnyConnection, id: &str) -> Result<(Invoice, bool)> {
    let now = now_ms();
    // Locked: a refresh of the draft racing this finalize either commits first (and this
    // reads its total) or waits and then keeps the final invoice.
    let inv = lock_on(conn, id).await?;
    match inv.status.as_str() {
        DRAFT => {}
        VOID => return Err(StoreError::Conflict("the invoice is void".into())),
        _ => return Ok((inv, false)),
    }
    let period_end = aihub_plans::Period::parse(&inv.period)
        .ok_or_else(|| StoreError::Corrupt(format!("invoice period `{}`", inv.period)))?
        .end_ms();
    if now < period_end {
        return Err(StoreError::Conflict(
            "the invoice's period has not ended: it can be finalized once the month is over".into(),
        ));
    }
    let nothing_due = inv.total <= Decimal::ZERO;
    let row = sqlx::query(&format!(
        "UPDATE invoices SET status = $2, finalized_at = $3, paid_at = $4, updated_at = $3 \
         WHERE id = $1 AND status = 'draft' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(if nothing_due { PAID } else { OPEN })
    .bind(now)
    .bind(nothing_due.then_some(now))
    .fetch_one(&mut *conn)
    .await?;
    let inv = from_row(&row)?;
    outbox::enqueue(
        conn,
        INVOICE_FINALIZED,
        Some(&inv.developer_id),
        serde_json::json!({
            "invoice_id": inv.id,
            "period": inv.period,
            "status": inv.status,
            "total": inv.total.to_string(),
            "currency": inv.currency,
        }),
    )
    .await?;
    Ok((inv, true))
}

pub async fn by_id(store: &Store, id: &str) -> Result<Invoice> {
    let mut conn = store.pool().acquire().await?;
    by_id_on(&mut conn, id).await
}

pub(crate) async fn by_id_on(conn: &mut AnyConnection, id: &str) -> Result<Invoice> {
    let sql = format!("SELECT {COLUMNS} FROM invoices WHERE id = $1");
    from_row(&sqlx::query(&sql).bind(id).fetch_one(conn).await?)
}

/// An invoice's lines in order.
pub async fn lines(store: &Store, invoice_id: &str) -> Result<Vec<InvoiceLine>> {
    let rows = sqlx::query(
        "SELECT line_no, kind, plan, model, description, starts_at, ends_at, quantity, requests, \
         amount FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no",
    )
    .bind(invoice_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(line_from_row).collect()
}

/// Filters for listing invoices (all optional).
#[derive(Debug, Clone, Default)]
pub struct InvoiceFilter {
    pub developer_id: Option<String>,
    pub period: Option<String>,
    pub status: Option<String>,
}

/// Invoices, newest period first, at most `limit`.
pub async fn list(store: &Store, f: &InvoiceFilter, limit: i64) -> Result<Vec<Invoice>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices WHERE ($1 IS NULL OR developer_id = $1) \
         AND ($2 IS NULL OR period = $2) AND ($3 IS NULL OR status = $3) \
         ORDER BY period DESC, developer_id, created_at DESC LIMIT $4"
    );
    let rows = sqlx::query(&sql)
        .bind(&f.developer_id)
        .bind(&f.period)
        .bind(&f.status)
        .bind(limit)
        .fetch_all(store.pool())
        .await?;
    rows.iter().map(from_row).collect()
}

/// Every invoice of a period that is not void, with its lines, by developer: what
/// reconciliation checks.
pub async fn for_period(store: &Store, period: &str) -> Result<Vec<(Invoice, Vec<InvoiceLine>)>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices WHERE period = $1 AND status <> 'void' ORDER BY developer_id"
    );
    let invoices: Vec<Invoice> = sqlx::query(&sql)
        .bind(period)
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(from_row)
        .collect::<Result<_>>()?;
    let rows = sqlx::query(
        "SELECT l.invoice_id, l.line_no, l.kind, l.plan, l.model, l.description, l.starts_at, \
         l.ends_at, l.quantity, l.requests, l.amount FROM invoice_lines l \
         JOIN invoices i ON i.id = l.invoice_id \
         WHERE i.period = $1 AND i.status <> 'void' ORDER BY l.invoice_id, l.line_no",
    )
    .bind(period)
    .fetch_all(store.pool())
    .await?;
    let mut by_invoice: std::collections::HashMap<String, Vec<InvoiceLine>> =
        std::collections::HashMap::new();
    for r in &rows {
        let id: String = r.try_get("invoice_id")?;
        by_invoice.entry(id).or_default().push(line_from_row(r)?);
    }
    Ok(invoices
        .into_iter()
        .map(|i| {
            let lines = by_invoice.remove(&i.id).unwrap_or_default();
            (i, lines)
        })
        .collect())
}

/// Ids of the drafts of a period (to finalize once its grace window is over).
pub async fn drafts(store: &Store, period: &str) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT id, developer_id FROM invoices WHERE period = $1 AND status = 'draft' \
         ORDER BY developer_id",
    )
    .bind(period)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("developer_id")?)))
        .collect()
}

/// Developers with any invoice for the period (void included): automatic generation skips
/// them once the invoice exists past draft.
pub async fn developers_invoiced(store: &Store, period: &str) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT developer_id, status FROM invoices WHERE period = $1 ORDER BY developer_id",
    )
    .bind(period)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("developer_id")?, r.try_get("status")?)))
        .collect()
}

/// Outbox event written when an invoice the developer has seen (finalized) is voided.
pub const INVOICE_VOIDED: &str = "invoice.voided";

/// Reads an invoice and, on PostgreSQL, locks its row until the transaction ends (SQLite write
/// transactions are exclusive already): payments and voiding of one invoice queue here.
pub(crate) async fn lock_on(conn: &mut AnyConnection, id: &str) -> Result<Invoice> {
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices WHERE id = $1{}",
        for_update(conn)
    );
    from_row(&sqlx::query(&sql).bind(id).fetch_one(conn).await?)
}

/// ` FOR UPDATE` on PostgreSQL; nothing on SQLite, whose write transactions hold the whole
/// database (`BEGIN IMMEDIATE`).
fn for_update(conn: &AnyConnection) -> &'static str {
    if conn.backend_name() == "PostgreSQL" {
        " FOR UPDATE"
    } else {
        ""
    }
}

/// Books a payment on a locked open invoice: the new amount paid and, when it covers the
/// total, `paid` at `paid_at` ([`crate::payments`]).
pub(crate) async fn apply_payment(
    conn: &mut AnyConnection,
    id: &str,
    amount_paid: Decimal,
    paid_at: Option<i64>,
) -> Result<Invoice> {
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE invoices SET amount_paid = $2, \
         status = CASE WHEN $3 IS NULL THEN status ELSE 'paid' END, \
         paid_at = COALESCE($3, paid_at), updated_at = $4 \
         WHERE id = $1 AND status = 'open' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(amount_paid.to_string())
    .bind(paid_at)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    from_row(&row)
}

/// Voids a `draft` or `open` invoice that has no payments, recording why; an invoice that was
/// finalized gets an [`INVOICE_VOIDED`] event (same transaction). Returns the invoice and
/// whether it changed: voiding a void invoice returns it as it is. A paid invoice, or one with
/// payments, is a [`StoreError::Conflict`] (refund first: not supported yet). The period may
/// then be invoiced again (`SaveMode::Reissue`).
pub async fn void(conn: &mut AnyConnection, id: &str, reason: &str) -> Result<(Invoice, bool)> {
    let inv = lock_on(conn, id).await?;
    match inv.status.as_str() {
        VOID => return Ok((inv, false)),
        PAID => {
            return Err(StoreError::Conflict(
                "the invoice is paid: a paid invoice cannot be voided".into(),
            ))
        }
        _ => {}
    }
    let payments: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payments WHERE invoice_id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    if payments > 0 || inv.amount_paid != Decimal::ZERO {
        return Err(StoreError::Conflict(
            "the invoice has payments recorded: it cannot be voided".into(),
        ));
    }
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE invoices SET status = 'void', voided_at = $2, void_reason = $3, updated_at = $2 \
         WHERE id = $1 AND status IN ('draft', 'open') RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(now)
    .bind(reason)
    .fetch_one(&mut *conn)
    .await?;
    let inv = from_row(&row)?;
    if inv.finalized_at.is_some() {
        outbox::enqueue(
            conn,
            INVOICE_VOIDED,
            Some(&inv.developer_id),
            serde_json::json!({
                "invoice_id": inv.id,
                "period": inv.period,
                "status": inv.status,
                "reason": reason,
            }),
        )
        .await?;
    }
    Ok((inv, true))
}

/// A developer's invoices as they see them: those that were ever finalized (drafts, and drafts
/// voided before finalization, are hidden), newest period first, at most `limit`.
pub async fn issued_for(store: &Store, developer_id: &str, limit: i64) -> Result<Vec<Invoice>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices WHERE developer_id = $1 AND finalized_at IS NOT NULL \
         ORDER BY period DESC, created_at DESC LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(developer_id)
        .bind(limit)
        .fetch_all(store.pool())
        .await?;
    rows.iter().map(from_row).collect()
}

/// One status's invoices in a [`Revenue`] report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusRevenue {
    pub status: String,
    pub invoices: i64,
    /// Sum of their totals.
    pub total: Decimal,
    pub amount_paid: Decimal,
}

/// One plan's share of a [`Revenue`] report (exact line sums).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanRevenue {
    pub plan: String,
    /// Base-fee lines (prorated where the plan was held part of the period).
    pub base_fees: Decimal,
    /// Overage lines billed on this plan.
    pub overage: Decimal,
    pub overage_tokens: i64,
    /// Invoices with a line of this plan.
    pub invoices: i64,
}

/// One model's overage in a [`Revenue`] report (exact line sums).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRevenue {
    pub model: String,
    pub overage: Decimal,
    pub overage_tokens: i64,
    pub requests: i64,
}

/// A period's revenue from its invoices and their lines, void invoices left out; every sum
/// exact ([`Decimal`], added in Rust: amounts are stored as text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revenue {
    pub period: String,
    /// Invoices that are not void (drafts included).
    pub invoices: i64,
    /// Sum of their subtotals (exact): equals the sum of every line below.
    pub subtotal: Decimal,
    /// Sum of their totals (each rounded once to cents).
    pub total: Decimal,
    /// Received on them.
    pub amount_paid: Decimal,
    /// Still due on `open` invoices.
    pub outstanding: Decimal,
    /// Per status, `void` included (its figures are not in the sums above).
    pub by_status: Vec<StatusRevenue>,
    /// Largest first.
    pub by_plan: Vec<PlanRevenue>,
    /// Largest first.
    pub by_model: Vec<ModelRevenue>,
}

/// The revenue report of `period` (`YYYY-MM`).
pub async fn revenue(store: &Store, period: &str) -> Result<Revenue> {
    use std::collections::BTreeMap;
    let rows =
        sqlx::query("SELECT status, subtotal, total, amount_paid FROM invoices WHERE period = $1")
            .bind(period)
            .fetch_all(store.pool())
            .await?;
    let mut r = Revenue {
        period: period.to_owned(),
        invoices: 0,
        subtotal: Decimal::ZERO,
        total: Decimal::ZERO,
        amount_paid: Decimal::ZERO,
        outstanding: Decimal::ZERO,
        by_status: Vec::new(),
        by_plan: Vec::new(),
        by_model: Vec::new(),
    };
    let mut by_status: BTreeMap<String, StatusRevenue> = BTreeMap::new();
    for row in &rows {
        let status: String = row.try_get("status")?;
        let total = decimal(row, "total")?;
        let paid = decimal(row, "amount_paid")?;
        let s = by_status
            .entry(status.clone())
            .or_insert_with(|| StatusRevenue {
                status: status.clone(),
                invoices: 0,
                total: Decimal::ZERO,
                amount_paid: Decimal::ZERO,
            });
        s.invoices += 1;
        s.total += total;
        s.amount_paid += paid;
        if status == VOID {
            continue;
        }
        r.invoices += 1;
        r.subtotal += decimal(row, "subtotal")?;
        r.total += total;
        r.amount_paid += paid;
        if status == OPEN {
            r.outstanding += total - paid;
        }
    }
    // Lifecycle order.
    let order = |s: &str| [DRAFT, OPEN, PAID, VOID].iter().position(|x| *x == s);
    r.by_status = by_status.into_values().collect();
    r.by_status
        .sort_by_key(|s| (order(&s.status), s.status.clone()));

    let lines = sqlx::query(
        "SELECT l.invoice_id, l.kind, l.plan, l.model, l.quantity, l.requests, l.amount \
         FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id \
         WHERE i.period = $1 AND i.status <> 'void'",
    )
    .bind(period)
    .fetch_all(store.pool())
    .await?;
    let mut plans: BTreeMap<String, (PlanRevenue, std::collections::BTreeSet<String>)> =
        BTreeMap::new();
    let mut models: BTreeMap<String, ModelRevenue> = BTreeMap::new();
    for l in &lines {
        let invoice_id: String = l.try_get("invoice_id")?;
        let kind: String = l.try_get("kind")?;
        let plan: String = l.try_get("plan")?;
        let model: String = l.try_get("model")?;
        let quantity: i64 = l.try_get("quantity")?;
        let requests: i64 = l.try_get("requests")?;
        let amount = decimal(l, "amount")?;
        let (p, invoices) = plans.entry(plan.clone()).or_insert_with(|| {
            (
                PlanRevenue {
                    plan,
                    base_fees: Decimal::ZERO,
                    overage: Decimal::ZERO,
                    overage_tokens: 0,
                    invoices: 0,
                },
                Default::default(),
            )
        });
        invoices.insert(invoice_id);
        if kind == "base" {
            p.base_fees += amount;
            continue;
        }
        p.overage += amount;
        p.overage_tokens += quantity;
        let m = models.entry(model.clone()).or_insert_with(|| ModelRevenue {
            model,
            overage: Decimal::ZERO,
            overage_tokens: 0,
            requests: 0,
        });
        m.overage += amount;
        m.overage_tokens += quantity;
        m.requests += requests;
    }
    r.by_plan = plans
        .into_values()
        .map(|(mut p, invoices)| {
            p.invoices = invoices.len() as i64;
            p
        })
        .collect();
    r.by_plan.sort_by(|a, b| {
        (b.base_fees + b.overage)
            .cmp(&(a.base_fees + a.overage))
            .then_with(|| a.plan.cmp(&b.plan))
    });
    r.by_model = models.into_values().collect();
    r.by_model.sort_by(|a, b| {
        b.overage
            .cmp(&a.overage)
            .then_with(|| a.model.cmp(&b.model))
    });
    Ok(r)
}
