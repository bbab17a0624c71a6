//! Usage per developer over a window of time: the one definition of "a developer's usage"
//! that the gateway's quota seed and billing share ([`window`]), and the two halves
//! reconciliation compares (the hourly rollup's totals and the raw rows' count).

use clickhouse::{Client, Row};
use serde::Deserialize;

use super::{developer_filter, MS_PER_HOUR};

/// A developer's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Row, Deserialize)]
pub struct Totals {
    pub developer_id: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

/// Every developer's (or one's) usage in `[from_ms, to_ms)`: the hourly rollup for the whole
/// hours, the raw rows after the last whole hour. Ordered by developer.
pub async fn window(
    client: &Client,
    from_ms: i64,
    to_ms: i64,
    only: Option<&str>,
) -> clickhouse::error::Result<Vec<Totals>> {
    let hour_ms = to_ms - to_ms.rem_euclid(MS_PER_HOUR);
    let filter = developer_filter(only);
    client
        .query(&format!(
            "SELECT developer_id, toUInt64(sum(n)) AS requests, toUInt64(sum(t)) AS tokens, \
             toInt64(sum(c)) AS cost_nanos FROM ( \
               SELECT developer_id, requests AS n, total_tokens AS t, cost_nanos AS c \
               FROM usage_hourly WHERE hour >= toDateTime(?) AND hour < toDateTime(?) {filter} \
               UNION ALL \
               SELECT developer_id, toUInt64(1) AS n, toUInt64(total_tokens) AS t, \
               cost_nanos AS c FROM usage_events \
               WHERE ts >= toDateTime(?) AND ts_ms >= ? AND ts_ms < ? {filter} \
             ) GROUP BY developer_id ORDER BY developer_id"
        ))
        .bind(from_ms.max(0) / 1000)
        .bind(hour_ms.max(0) / 1000)
        .bind(hour_ms.max(0) / 1000)
        .bind(hour_ms.max(from_ms).max(0) as u64)
        .bind(to_ms.max(0) as u64)
        .fetch_all::<Totals>()
        .await
}

/// Per-developer totals of `[from, to)` (whole hours, unix ms) from the hourly rollup alone.
pub async fn hourly_rollup(
    client: &Client,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> clickhouse::error::Result<Vec<Totals>> {
    client
        .query(&format!(
            "SELECT developer_id, sum(requests) AS requests, sum(total_tokens) AS tokens, \
             sum(cost_nanos) AS cost_nanos FROM usage_hourly \
             WHERE hour >= toDateTime({}) AND hour < toDateTime({}) {} \
             GROUP BY developer_id ORDER BY developer_id",
            from / 1000,
            to / 1000,
            developer_filter(only)
        ))
        .fetch_all::<Totals>()
        .await
}

/// The number of raw rows in `[from, to)` (whole seconds, unix ms), with the bounds
/// [`super::billing::all_rows`] reads.
pub async fn raw_count(client: &Client, from: i64, to: i64) -> clickhouse::error::Result<u64> {
    client
        .query(&format!(
            "SELECT count() FROM usage_events WHERE ts >= toDateTime({}) AND ts < toDateTime({})",
            from / 1000,
            to / 1000
        ))
        .fetch_one::<u64>()
        .await
}
