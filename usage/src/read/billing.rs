//! Usage as billing reads it: hourly groups (`usage_hourly`) for whole periods, raw rows
//! (`usage_events`) for the hours the ledger must split, and every raw row of a period for
//! reconciliation. Rows come ordered the way the ledger consumes them: developer, then time
//! (`ts_ms`, then request id).
//!
//! The period-long queries stream (the clickhouse crate's row cursor), so memory does not grow
//! with the number of rows.

use clickhouse::query::RowCursor;
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::{developer_filter, quote, MS_PER_HOUR};

/// One `usage_hourly` group: a developer's usage of one model in one hour.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct HourRow {
    pub developer_id: String,
    /// Unix seconds of the hour's start.
    pub hour: u32,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

impl HourRow {
    pub fn hour_ms(&self) -> i64 {
        self.hour as i64 * 1000
    }
}

/// One raw usage row, as the ledger needs it.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct RawRow {
    pub developer_id: String,
    pub ts_ms: u64,
    pub model: String,
    pub total_tokens: u32,
    pub cost_nanos: i64,
}

/// The hourly rollup of `[from, to)` (hour-aligned unix ms), by developer, hour and model.
pub fn hours(
    client: &Client,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> clickhouse::error::Result<RowCursor<HourRow>> {
    client
        .query(&format!(
            "SELECT developer_id, toUInt32(hour) AS hour, model, sum(requests) AS requests, \
             sum(total_tokens) AS tokens, sum(cost_nanos) AS cost_nanos \
             FROM usage_hourly WHERE hour >= toDateTime({}) AND hour < toDateTime({}) {} \
             GROUP BY developer_id, hour, model ORDER BY developer_id, hour, model",
            from / 1000,
            to / 1000,
            developer_filter(only)
        ))
        .fetch::<HourRow>()
}

/// The raw rows of the given (developer, hour start in unix ms) pairs, in ledger order.
pub async fn raw_hours(
    client: &Client,
    pairs: &[(String, i64)],
) -> clickhouse::error::Result<Vec<RawRow>> {
    let mut out = Vec::new();
    for chunk in pairs.chunks(1_000) {
        let mut devs: Vec<&str> = chunk.iter().map(|(d, _)| d.as_str()).collect();
        devs.sort_unstable();
        devs.dedup();
        let first = chunk.iter().map(|p| p.1).min().unwrap_or(0);
        let last = chunk.iter().map(|p| p.1).max().unwrap_or(0) + MS_PER_HOUR;
        let tuples: Vec<String> = chunk
            .iter()
            .map(|(d, h)| format!("({}, {})", quote(d), h / 1000))
            .collect();
        let sql = format!(
            "SELECT developer_id, ts_ms, model, total_tokens, cost_nanos FROM usage_events \
             WHERE developer_id IN ({}) AND ts >= toDateTime({}) AND ts < toDateTime({}) \
             AND (developer_id, toUInt32(toStartOfHour(ts))) IN ({}) \
             ORDER BY developer_id, ts_ms, request_id",
            devs.iter().map(|d| quote(d)).collect::<Vec<_>>().join(", "),
            first / 1000,
            last / 1000,
            tuples.join(", ")
        );
        out.extend(client.query(&sql).fetch_all::<RawRow>().await?);
    }
    Ok(out)
}

/// Every raw row of `[from, to)` in ledger order (reconciliation).
pub fn all_rows(
    client: &Client,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> clickhouse::error::Result<RowCursor<RawRow>> {
    client
        .query(&format!(
            "SELECT developer_id, ts_ms, model, total_tokens, cost_nanos FROM usage_events \
             WHERE ts >= toDateTime({}) AND ts < toDateTime({}) {} \
             ORDER BY developer_id, ts_ms, request_id",
            from / 1000,
            to / 1000,
            developer_filter(only)
        ))
        .fetch::<RawRow>()
}
