//! Usage records and everything that keeps them exact: prices, the ClickHouse schema, and the
//! loss-free pipeline from the gateway's request path into ClickHouse.
//!
//! Shared by the gateway (which prices and records every request), the admin API (which reads
//! usage for analytics) and billing (which invoices it).
//!
//! # Layout
//! - [`record`]: [`UsageRecord`], one row per metered request.
//! - [`pricing`]: YAML prices → [`pricing::Pricing`]; exact `Decimal` cost, rounded once to nano-USD.
//! - [`schema`]: numbered ClickHouse migrations and [`schema::migrate`].
//! - [`read`]: every query against the usage tables (reports, analytics, export, billing
//!   sources, the quota seed), one function per question.
//! - [`wal`]: write-ahead log segment files.
//! - `commit`: group commit of the request path's records into the open WAL segment.
//! - [`sink`]: ClickHouse connection settings, batch insert, replay dedup, error classes.
//! - [`pipeline`]: commit (WAL) → writer (segment rotation) → sender (ClickHouse), with its
//!   metrics and policies.
//! - `testing` (feature `testing`): a fresh, migrated ClickHouse database per test.

mod commit;
pub mod pipeline;
pub mod pricing;
pub mod read;
pub mod record;
pub mod schema;
pub mod sink;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wal;

pub use pipeline::{PipelineConfig, PipelineMetrics, UsagePipeline, UsageSink};
pub use record::UsageRecord;
