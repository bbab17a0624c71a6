//! Payment providers: how money received for an invoice gets booked. Every provider ends in
//! the store's [`payments::record_payment`], which holds the rules (open invoices only, no
//! overpayment, idempotent by `(provider, reference)`, `billing.payment` event in the same
//! transaction), so providers differ only in how they learn that money arrived.
//!
//! - [`ManualProvider`] (`manual`): an operator records a bank transfer, a cheque, a payment
//!   made outside the platform, with its reference.
//! - A card provider (Stripe, later) fits the same trait: [`PaymentProvider::collect`] creates
//!   the charge (a PaymentIntent for the amount due, its id the reference), the provider's
//!   webhook is checked by [`PaymentProvider::verify_webhook`] and turned into a
//!   [`PaymentRequest`], and [`PaymentProvider::record`] books it. Webhooks are delivered at
//!   least once; recording the same reference twice returns the first payment, so repeats are
//!   harmless.

use aihub_store::invoices::Invoice;
use aihub_store::payments::{self, NewPayment, Payment, PaymentError};
use aihub_store::{Store, StoreError};
use async_trait::async_trait;
use rust_decimal::Decimal;

/// Why a provider could not book or collect a payment.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// A value is unacceptable (`amount`, `currency`, `reference`): the caller's mistake.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// From the store: no such invoice (`NotFound`), its state refuses the payment or the
    /// reference belongs to another payment (`Conflict`, with a readable message), or a
    /// database failure.
    #[error(transparent)]
    Store(StoreError),
    /// The provider's service could not be reached or failed (card providers).
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    /// The provider does not do this (e.g. `collect` on the manual provider).
    #[error("not supported by the {0} provider")]
    Unsupported(&'static str),
}

impl From<PaymentError> for ProviderError {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::Invalid { field, message } => ProviderError::Invalid { field, message },
            PaymentError::Store(e) => ProviderError::Store(e),
        }
    }
}

impl From<StoreError> for ProviderError {
    fn from(e: StoreError) -> Self {
        ProviderError::Store(e)
    }
}

/// Money received for an invoice, to book.
#[derive(Debug, Clone)]
pub struct PaymentRequest {
    pub invoice_id: String,
    /// Exact amount, in `currency` (USD).
    pub amount: Decimal,
    pub currency: String,
    /// The provider's reference (transfer reference, charge id): makes recording idempotent.
    pub reference: String,
    /// When the money arrived (unix ms); `None`: now.
    pub received_at: Option<i64>,
    /// Who records it (an operator id, `cli`); `None` when the provider confirmed it itself.
    pub recorded_by: Option<String>,
    /// The recorder's address, for the audit entry.
    pub ip: Option<String>,
}

/// What booking a payment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentOutcome {
    pub payment: Payment,
    /// The invoice afterwards (`paid` once payments cover the total).
    pub invoice: Invoice,
    /// `false`: this reference was recorded before and nothing changed.
    pub created: bool,
}

/// How a provider asks for the money of an invoice ([`PaymentProvider::collect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collection {
    /// The charge was created; its payment is booked when the provider confirms it (webhook).
    Pending {
        reference: String,
        /// Where the developer completes the payment, if anywhere.
        redirect_url: Option<String>,
    },
}

/// A verified webhook delivery.
#[derive(Debug, Clone)]
pub enum WebhookEvent {
    /// Money arrived: book it with [`PaymentProvider::record`].
    Paid(PaymentRequest),
    /// An event the provider sends that billing does not act on.
    Ignored,
}

/// A way of receiving money. Implementations must be cheap to share (`Arc`).
#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// The name stored with each payment (`manual`, `stripe`); with the reference it
    /// identifies a payment.
    fn name(&self) -> &'static str;

    /// Books money received (see the store's rules in [`payments`]). A card provider may check
    /// the charge with its API first.
    async fn record(
        &self,
        store: &Store,
        req: PaymentRequest,
    ) -> Result<PaymentOutcome, ProviderError>;

    /// Asks the developer's payment method for the amount due on an open invoice.
    async fn collect(
        &self,
        _store: &Store,
        _invoice: &Invoice,
    ) -> Result<Collection, ProviderError> {
        Err(ProviderError::Unsupported(self.name()))
    }

    /// Checks a webhook's signature and reads it (`headers` as `(name, value)` pairs, the raw
    /// body). Only a verified delivery may be recorded.
    fn verify_webhook(
        &self,
        _headers: &[(String, String)],
        _body: &[u8],
    ) -> Result<WebhookEvent, ProviderError> {
        Err(ProviderError::Unsupported(self.name()))
    }
}

/// Books what the store accepts, for any provider name.
pub async fn book(
    store: &Store,
    provider: &str,
    req: PaymentRequest,
) -> Result<PaymentOutcome, ProviderError> {
    let recorded = payments::record_payment(
        store,
        &NewPayment {
            invoice_id: req.invoice_id,
            provider: provider.to_owned(),
            reference: req.reference,
            amount: req.amount,
            currency: req.currency,
            received_at: req.received_at.unwrap_or_else(aihub_store::now_ms),
            recorded_by: req.recorded_by,
            ip: req.ip,
        },
    )
    .await?;
    Ok(PaymentOutcome {
        payment: recorded.payment,
        invoice: recorded.invoice,
        created: recorded.created,
    })
}

/// Payments an operator records by hand (bank transfer, cheque, …), on their word and with
/// the transfer's reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManualProvider;

impl ManualProvider {
    pub const NAME: &'static str = "manual";
}

#[async_trait]
impl PaymentProvider for ManualProvider {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    async fn record(
        &self,
        store: &Store,
        req: PaymentRequest,
    ) -> Result<PaymentOutcome, ProviderError> {
        if req.recorded_by.is_none() {
            return Err(ProviderError::Invalid {
                field: "recorded_by",
                message: "a manual payment is recorded by someone".into(),
            });
        }
        book(store, Self::NAME, req).await
    }
}

/// The provider named `name`, among those available (only `manual` today).
pub fn provider(name: &str) -> Option<&'static dyn PaymentProvider> {
    match name {
        ManualProvider::NAME => Some(&ManualProvider),
        _ => None,
    }
}

/// The names [`provider`] knows.
pub const PROVIDERS: &[&str] = &[ManualProvider::NAME];
