//! Billing from metered usage. Every amount is a `rust_decimal::Decimal` computed from the
//! ClickHouse usage records (integer nano-USD per request), rounded once, at the end, to cents.
//!
//! # Layout
//! - [`config`]: the `billing:` section (grace window, background schedule).
//! - [`ledger`]: the pure arithmetic from plans and usage to invoice lines (the billing rules).
//! - [`engine`]: [`Billing`]: computing, generating and finalizing invoices; the background pass.
//! - [`payments`]: the payment-provider trait and the manual provider (an operator records money
//!   received); the booking rules are the store's (`aihub_store::payments`).
//! - [`reconcile`]: re-computes every invoice of a period from the raw rows and reports a diff.
//!
//! Usage is read through `aihub_usage::read` (hourly groups, raw rows of split hours, every
//! raw row of a period).
pub mod config;
pub mod engine;
pub mod ledger;
pub mod payments;
pub mod reconcile;

pub use engine::{Billing, BillingError, CurrentBilling, GenerateReport, RunReport};

pub use config::BillingConfig;
