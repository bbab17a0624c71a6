//! Every developer's and every model's usage over whole UTC days, for the operator's platform
//! view, from the day × developer and day × model rollups (`usage_developer_daily`,
//! `usage_model_daily`: at most one row per active developer, or model, and day).

use clickhouse::{Client, Row};
use serde::Deserialize;

use super::Days;

/// The developers' side of the platform view, in one scan: totals over all developers and
/// the top ones by cost (ties by id).
#[derive(Debug, Row, Deserialize)]
pub struct DeveloperTotals {
    /// Developers with at least one request.
    pub active: u64,
    pub requests: u64,
    pub errors: u64,
    pub tokens: u64,
    pub nanos: i64,
    /// `(developer_id, cost nano-USD, requests, tokens)`, most expensive first.
    pub top: Vec<(String, i64, u64, u64)>,
}

/// One model's sums.
#[derive(Debug, Row, Deserialize)]
pub struct ModelRow {
    pub model: String,
    pub n: u64,
    pub errs: u64,
    pub tokens: u64,
    pub nanos: i64,
}

/// Totals over `days`, the `top` most expensive developers, and every model's sums (in no
/// particular order).
pub async fn overview(
    client: &Client,
    days: Days,
    top: u32,
) -> clickhouse::error::Result<(DeveloperTotals, Vec<ModelRow>)> {
    let range = days.condition();
    let developers = client
        .query(&format!(
            "SELECT count() AS active, sum(n) AS requests, sum(errs) AS errors, \
             sum(tokens) AS total_tokens, sum(nanos) AS nanos_total, \
             arraySlice(arraySort(x -> (-x.2, x.1), \
                 groupArray((developer_id, nanos, n, tokens))), 1, {top}) AS top \
             FROM (SELECT developer_id, sum(requests) AS n, sum(errors) AS errs, \
                 sum(total_tokens) AS tokens, sum(cost_nanos) AS nanos \
                 FROM usage_developer_daily WHERE {range} GROUP BY developer_id)"
        ))
        .fetch_one::<DeveloperTotals>();
    let models = client
        .query(&format!(
            "SELECT model, sum(requests) AS n, sum(errors) AS errs, sum(total_tokens) AS tokens, \
             sum(cost_nanos) AS nanos FROM usage_model_daily WHERE {range} GROUP BY model"
        ))
        .fetch_all::<ModelRow>();
    tokio::try_join!(developers, models)
}
