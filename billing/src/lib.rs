//! Billing from metered usage. Every amount is a `rust_decimal::Decimal` computed from the
//! ClickHouse usage records (integer nano-USD per request), rounded once, at the end, to cents.
//!
//! # Layout
//! - [`config`]: the `billing:` section (grace window, background schedule).
//! - [`ledger`]: the pure arithmetic from plans and usage to invoice lines (the billing rules).
pub mod config;
pub mod ledger;

pub use config::BillingConfig;
