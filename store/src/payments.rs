//! Payments received against invoices. A payment is recorded in one write transaction with
//! everything it changes: the payment row, the invoice's `amount_paid` (and `paid` status once
//! the total is covered), a [`BILLING_PAYMENT`] event in the outbox and, when a person recorded
//! it, an audit entry. So the event exists exactly when the money was booked.
//!
//! Rules:
//! - Only `open` invoices accept payments: a draft must be finalized first, a void or paid one
//!   refuses them ([`StoreError::Conflict`] with a readable message).
//! - The amount is positive, in the invoice's currency (USD), and at most the amount still due:
//!   overpayments are refused ([`PaymentError::Invalid`]) rather than kept as credit.
//! - `(provider, reference)` identifies a payment (a bank transfer's reference, a card
//!   provider's charge id): recording the same one again returns the payment already recorded
//!   and writes nothing, so retries and repeated webhooks are harmless. The same reference for
//!   another invoice or another amount is a conflict.

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::invoices::{self, Invoice, DRAFT, OPEN, PAID, VOID};
use crate::{audit, new_id, now_ms, outbox, Result, Store, StoreError};

/// Outbox event written when a payment is recorded.
pub const BILLING_PAYMENT: &str = "billing.payment";

/// One payment received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    pub id: String,
    pub invoice_id: String,
    pub developer_id: String,
    /// The provider that received the money (`manual`, later e.g. `stripe`).
    pub provider: String,
    /// The provider's reference: a bank transfer's reference, a charge id.
    pub reference: String,
    /// Exact amount.
    pub amount: Decimal,
    pub currency: String,
    /// When the money was received (unix ms), as the provider or operator says.
    pub received_at: i64,
    /// Who recorded it (an operator id, `cli`); `None` when the provider confirmed it itself.
    pub recorded_by: Option<String>,
    pub created_at: i64,
}

/// A payment to record.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub invoice_id: String,
    pub provider: String,
    pub reference: String,
    pub amount: Decimal,
    pub currency: String,
    pub received_at: i64,
    /// Who records it. When set, an `invoice.payment` audit entry is written in the same
    /// transaction (`ip` goes with it).
    pub recorded_by: Option<String>,
    pub ip: Option<String>,
}

/// Why a payment was refused.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// A value of the payment is unacceptable (`amount`, `currency`, `reference`).
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The invoice does not exist ([`StoreError::NotFound`]), its state refuses payments or
    /// the reference belongs to another payment ([`StoreError::Conflict`]), or the database
    /// failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PaymentError {
    fn from(e: sqlx::Error) -> Self {
        PaymentError::Store(e.into())
    }
}

/// What recording did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub payment: Payment,
    /// The invoice after the payment.
    pub invoice: Invoice,
    /// `false`: the `(provider, reference)` was recorded before; nothing changed.
    pub created: bool,
}

const COLUMNS: &str = "id, invoice_id, developer_id, provider, reference, amount, currency, \
    received_at, recorded_by, created_at";

fn from_row(r: &AnyRow) -> Result<Payment> {
    Ok(Payment {
        id: r.try_get("id")?,
        invoice_id: r.try_get("invoice_id")?,
        developer_id: r.try_get("developer_id")?,
        provider: r.try_get("provider")?,
        reference: r.try_get("reference")?,
        amount: invoices::decimal(r, "amount")?,
        currency: r.try_get("currency")?,
        received_at: r.try_get("received_at")?,
        recorded_by: r.try_get("recorded_by")?,
        created_at: r.try_get("created_at")?,
    })
}

fn conflict(message: impl Into<String>) -> PaymentError {
    PaymentError::Store(StoreError::Conflict(message.into()))
}

fn invalid(field: &'static str, message: impl Into<String>) -> PaymentError {
    PaymentError::Invalid {
        field,
        message: message.into(),
    }
}

/// Records a payment (see the module's rules) in one write transaction.
pub async fn record_payment(
    store: &Store,
    p: &NewPayment,
) -> std::result::Result<Recorded, PaymentError> {
    let mut tx = store.begin_write().await?;
    let recorded = record_on(&mut tx, p).await?;
    tx.commit().await?;
    Ok(recorded)
}

async fn record_on(
    conn: &mut AnyConnection,
    p: &NewPayment,
) -> std::result::Result<Recorded, PaymentError> {
    let reference = p.reference.trim();
    if reference.is_empty() || reference.chars().count() > 200 {
        return Err(invalid("reference", "must be 1 to 200 characters"));
    }
    if p.provider.is_empty() {
        return Err(invalid("provider", "must not be empty"));
    }
    // The invoice's row first: concurrent payments of one invoice queue here, so the
    // reference check below sees a payment committed a moment ago.
    let inv = invoices::lock_on(conn, &p.invoice_id).await?;
    let existing = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM payments WHERE provider = $1 AND reference = $2"
    ))
    .bind(&p.provider)
    .bind(reference)
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| from_row(&r))
    .transpose()?;
    if let Some(payment) = existing {
        if payment.invoice_id != p.invoice_id || payment.amount != p.amount {
            return Err(conflict(format!(
                "the {} reference `{reference}` was recorded for another payment ({} {} on invoice {})",
                p.provider, payment.amount, payment.currency, payment.invoice_id
            )));
        }
        return Ok(Recorded {
            payment,
            invoice: inv,
            created: false,
        });
    }
    match inv.status.as_str() {
        OPEN => {}
        DRAFT => {
            return Err(conflict(
                "the invoice is a draft: finalize it first, then record the payment",
            ))
        }
        VOID => return Err(conflict("the invoice is void: it accepts no payments")),
        PAID => return Err(conflict("the invoice is already paid")),
        other => return Err(conflict(format!("the invoice is {other}"))),
    }
    if p.currency != inv.currency {
        return Err(invalid(
            "currency",
            format!("must be the invoice's currency, {}", inv.currency),
        ));
    }
    if p.amount <= Decimal::ZERO {
        return Err(invalid("amount", "must be more than zero"));
    }
    if p.amount.normalize().scale() > 2 {
        return Err(invalid("amount", "must be in cents (at most 2 decimals)"));
    }
    let due = inv.total - inv.amount_paid;
    if p.amount > due {
        return Err(invalid(
            "amount",
            format!(
                "is more than the amount due ({due} {}): overpayments are not accepted",
                inv.currency
            ),
        ));
    }
    let now = now_ms();
    let id = new_id("pay_");
    let inserted = sqlx::query(
        "INSERT INTO payments (id, invoice_id, developer_id, provider, reference, amount, \
         currency, received_at, recorded_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&id)
    .bind(&inv.id)
    .bind(&inv.developer_id)
    .bind(&p.provider)
    .bind(reference)
    .bind(p.amount.to_string())
    .bind(&inv.currency)
    .bind(p.received_at)
    .bind(&p.recorded_by)
    .bind(now)
    .execute(&mut *conn)
    .await;
    match inserted {
        Ok(_) => {}
        // The same reference recorded for another invoice at the same moment.
        Err(e) => {
            return Err(match StoreError::from(e) {
                StoreError::Conflict(_) => conflict(format!(
                    "the {} reference `{reference}` was recorded for another payment",
                    p.provider
                )),
                e => e.into(),
            })
        }
    }
    let paid = inv.amount_paid + p.amount;
    let settled = paid >= inv.total;
    let invoice = invoices::apply_payment(conn, &inv.id, paid, settled.then_some(now)).await?;
    let payment = sqlx::query(&format!("SELECT {COLUMNS} FROM payments WHERE id = $1"))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::from)
        .and_then(|r| from_row(&r))?;
    let amount_due = invoice.total - invoice.amount_paid;
    outbox::enqueue(
        conn,
        BILLING_PAYMENT,
        Some(&invoice.developer_id),
        serde_json::json!({
            "invoice_id": invoice.id,
            "payment_id": payment.id,
            "amount": payment.amount.to_string(),
            "currency": payment.currency,
            "provider": payment.provider,
            "reference": payment.reference,
            "invoice_status": invoice.status,
            "amount_due": amount_due.to_string(),
        }),
    )
    .await?;
    if let Some(actor) = &p.recorded_by {
        let entry = audit::Audit {
            actor_id: actor,
            action: "invoice.payment",
            target_type: "invoice",
            target_id: &invoice.id,
            details: serde_json::json!({
                "payment_id": payment.id,
                "amount": payment.amount.to_string(),
                "currency": payment.currency,
                "provider": payment.provider,
                "reference": payment.reference,
                "invoice_status": invoice.status,
            }),
            ip: p.ip.as_deref(),
        };
        audit::record(conn, &entry).await?;
    }
    Ok(Recorded {
        payment,
        invoice,
        created: true,
    })
}

/// An invoice's payments, oldest first.
pub async fn payments_for(store: &Store, invoice_id: &str) -> Result<Vec<Payment>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM payments WHERE invoice_id = $1 ORDER BY received_at, created_at, id"
    ))
    .bind(invoice_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}
