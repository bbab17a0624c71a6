//! One developer's figures over whole UTC days, from `usage_daily` (per developer × day × key
//! × model × status aggregate states): the usage report's totals and breakdowns, the
//! overview's two windows, costs by model and key, latency percentiles and statuses by model,
//! the daily series and tokens per day and model. The hourly series reads `usage_hourly`.

use clickhouse::{Client, Row};
use serde::Deserialize;

use super::{date_string, datetime_sql, Days};

/// The aggregate columns every figures query reads (aliases differ from the column names,
/// which ClickHouse would otherwise substitute).
const FIGURES_SQL: &str = "countMerge(requests) AS n, \
    countMergeIf(requests, status >= 400) AS errors, \
    sumMerge(prompt_tokens) AS prompt, \
    sumMerge(cached_tokens) AS cached, \
    sumMerge(completion_tokens) AS completion, \
    sumMerge(total_tokens) AS tokens, \
    sumMerge(cost_nanos) AS nanos, \
    countMergeIf(requests, status < 400) AS ok_n, \
    sumMergeIf(total_latency_sum_ms, status < 400) AS ok_latency, \
    quantilesTDigestMergeIf(0.95)(total_latency_q, status < 400) AS p95";

/// The figures of one group: a dimension (`dim`, e.g. `model`), its value, the sums.
#[derive(Debug, Row, Deserialize)]
pub struct FigureRow {
    pub dim: String,
    pub name: String,
    /// Requests.
    pub n: u64,
    /// Requests answered with status ≥ 400.
    pub errors: u64,
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    pub tokens: u64,
    pub nanos: i64,
    /// Requests answered with status < 400, and the sum of their latencies (ms).
    pub ok_n: u64,
    pub ok_latency: u64,
    /// The 95th percentile of those latencies (one value; empty without any).
    pub p95: Vec<u32>,
}

/// A developer's (or one key's) figures over `days`: one row `dim = "total"`, and one per
/// `model`, `key` and `day` (`name` is `YYYY-MM-DD`) with requests.
pub async fn report(
    client: &Client,
    developer_id: &str,
    key_id: Option<&str>,
    days: Days,
) -> clickhouse::error::Result<Vec<FigureRow>> {
    let mut filter = days.of_developer();
    if key_id.is_some() {
        filter.push_str(" AND key_id = ?");
    }
    let sql = format!(
        "SELECT 'total' AS dim, '' AS name, {FIGURES_SQL} FROM usage_daily WHERE {filter} \
         UNION ALL SELECT 'model', model, {FIGURES_SQL} FROM usage_daily WHERE {filter} GROUP BY model \
         UNION ALL SELECT 'key', key_id, {FIGURES_SQL} FROM usage_daily WHERE {filter} GROUP BY key_id \
         UNION ALL SELECT 'day', toString(day), {FIGURES_SQL} FROM usage_daily WHERE {filter} GROUP BY day"
    );
    let mut q = client.query(&sql);
    for _ in 0..4 {
        q = q.bind(developer_id);
        if let Some(k) = key_id {
            q = q.bind(k);
        }
    }
    q.fetch_all().await
}

/// A developer's figures over two windows: rows `dim = "current"` and `"previous"` (a window
/// without requests has no row). `previous` lies wholly before `current`.
pub async fn compare(
    client: &Client,
    developer_id: &str,
    current: Days,
    previous: Days,
) -> clickhouse::error::Result<Vec<FigureRow>> {
    let sql = format!(
        "SELECT if(day >= toDate('{cur_from}'), 'current', 'previous') AS dim, '' AS name, \
         {FIGURES_SQL} FROM usage_daily \
         WHERE developer_id = ? AND (({cur}) OR ({prev})) \
         GROUP BY dim",
        cur_from = date_string(current.first),
        cur = current.condition(),
        prev = previous.condition(),
    );
    client.query(&sql).bind(developer_id).fetch_all().await
}

/// Requests, tokens and cost of one group.
#[derive(Debug, Row, Deserialize)]
pub struct CostRow {
    pub dim: String,
    pub name: String,
    pub n: u64,
    pub tokens: u64,
    pub nanos: i64,
}

/// A developer's cost over `days`, one row per `model` and per `key` (`dim`).
pub async fn costs(
    client: &Client,
    developer_id: &str,
    days: Days,
) -> clickhouse::error::Result<Vec<CostRow>> {
    let filter = days.of_developer();
    let aggs = "countMerge(requests) AS n, sumMerge(total_tokens) AS tokens, sumMerge(cost_nanos) AS nanos";
    let sql = format!(
        "SELECT 'model' AS dim, model AS name, {aggs} FROM usage_daily WHERE {filter} GROUP BY model \
         UNION ALL SELECT 'key', key_id, {aggs} FROM usage_daily WHERE {filter} GROUP BY key_id"
    );
    client
        .query(&sql)
        .bind(developer_id)
        .bind(developer_id)
        .fetch_all()
        .await
}

/// One model's latency percentiles (p50, p95, p99; t-digest estimates) over its successful
/// requests.
#[derive(Debug, Row, Deserialize)]
pub struct LatencyRow {
    pub model: String,
    pub ok_n: u64,
    /// Arrival to last byte, ms.
    pub total: Vec<u32>,
    /// Sending upstream to the upstream's response header, ms.
    pub upstream: Vec<u32>,
    /// The gateway's own time, µs.
    pub overhead: Vec<u32>,
}

/// Requests of one model with one status.
#[derive(Debug, Row, Deserialize)]
pub struct StatusRow {
    pub model: String,
    pub status: u16,
    pub n: u64,
}

/// A developer's latencies by model and requests by model and status over `days`.
pub async fn performance(
    client: &Client,
    developer_id: &str,
    days: Days,
) -> clickhouse::error::Result<(Vec<LatencyRow>, Vec<StatusRow>)> {
    let filter = days.of_developer();
    let latencies = client
        .query(&format!(
            "SELECT model, countMergeIf(requests, status < 400) AS ok_n, \
             quantilesTDigestMergeIf(0.5, 0.95, 0.99)(total_latency_q, status < 400) AS total, \
             quantilesTDigestMergeIf(0.5, 0.95, 0.99)(upstream_latency_q, status < 400) AS upstream, \
             quantilesTDigestMergeIf(0.5, 0.95, 0.99)(gateway_overhead_q, status < 400) AS overhead \
             FROM usage_daily WHERE {filter} GROUP BY model"
        ))
        .bind(developer_id)
        .fetch_all::<LatencyRow>();
    let statuses = client
        .query(&format!(
            "SELECT model, status, countMerge(requests) AS n FROM usage_daily \
             WHERE {filter} GROUP BY model, status"
        ))
        .bind(developer_id)
        .fetch_all::<StatusRow>();
    tokio::try_join!(latencies, statuses)
}

/// One bucket of a series: its start (unix seconds) and sums.
#[derive(Debug, Row, Deserialize)]
pub struct BucketRow {
    pub t: u32,
    pub n: u64,
    pub tokens: u64,
    pub nanos: i64,
    pub errs: u64,
}

/// A developer's requests, tokens, cost and errors per UTC day over `days` (days with
/// requests only).
pub async fn daily_series(
    client: &Client,
    developer_id: &str,
    days: Days,
) -> clickhouse::error::Result<Vec<BucketRow>> {
    let sql = format!(
        "SELECT toUInt32(toDateTime(day)) AS t, countMerge(requests) AS n, \
         sumMerge(total_tokens) AS tokens, sumMerge(cost_nanos) AS nanos, \
         countMergeIf(requests, status >= 400) AS errs FROM usage_daily \
         WHERE {} GROUP BY t",
        days.of_developer()
    );
    client.query(&sql).bind(developer_id).fetch_all().await
}

/// The same per hour of `[from_ms, to_ms)` (whole hours), from `usage_hourly`.
pub async fn hourly_series(
    client: &Client,
    developer_id: &str,
    from_ms: i64,
    to_ms: i64,
) -> clickhouse::error::Result<Vec<BucketRow>> {
    let sql = format!(
        "SELECT toUInt32(hour) AS t, sum(requests) AS n, sum(total_tokens) AS tokens, \
         sum(cost_nanos) AS nanos, sum(errors) AS errs FROM usage_hourly \
         WHERE developer_id = ? AND hour >= toDateTime('{}') AND hour < toDateTime('{}') \
         GROUP BY t",
        datetime_sql(from_ms),
        datetime_sql(to_ms)
    );
    client.query(&sql).bind(developer_id).fetch_all().await
}

/// Tokens of one model on one day.
#[derive(Debug, Row, Deserialize)]
pub struct DayModelRow {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub model: String,
    pub tokens: u64,
}

/// A developer's tokens per day and model over `days`, oldest day first.
pub async fn tokens_by_day_and_model(
    client: &Client,
    developer_id: &str,
    days: Days,
) -> clickhouse::error::Result<Vec<DayModelRow>> {
    let sql = format!(
        "SELECT toString(day) AS date, model, sumMerge(total_tokens) AS tokens FROM usage_daily \
         WHERE {} GROUP BY day, model ORDER BY day",
        days.of_developer()
    );
    client.query(&sql).bind(developer_id).fetch_all().await
}
