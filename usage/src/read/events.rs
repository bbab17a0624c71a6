//! Raw rows of one developer from `usage_events`: the CSV export's cursor (every column a
//! client sees, borrowed from the cursor's buffer) and the recent errors the portal lists.

use clickhouse::query::RowCursor;
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::datetime_sql;

/// One exported row, borrowed from the cursor's buffer (no allocation per row).
#[derive(Debug, Row, Deserialize)]
pub struct ExportRow<'a> {
    pub rid: &'a str,
    pub ts_ms: u64,
    pub key_id: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub error_type: &'a str,
    pub streamed: u8,
    pub usage_estimated: u8,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cost_nanos: i64,
    pub total_latency_ms: u32,
    pub upstream_latency_ms: u32,
    pub gateway_overhead_us: u32,
    pub client_ip: &'a str,
    pub user_agent: &'a str,
}

/// A developer's (or one key's) rows of `[start_ms, end_ms)` (whole seconds), oldest first.
pub fn export(
    client: &Client,
    developer_id: &str,
    key_id: Option<&str>,
    start_ms: i64,
    end_ms: i64,
) -> clickhouse::error::Result<RowCursor<ExportRow<'static>>> {
    let key_filter = if key_id.is_some() {
        " AND key_id = ?"
    } else {
        ""
    };
    let sql = format!(
        "SELECT toString(request_id) AS rid, ts_ms, key_id, endpoint, model, status, \
         error_type, streamed, usage_estimated, prompt_tokens, cached_tokens, \
         completion_tokens, total_tokens, cost_nanos, total_latency_ms, \
         upstream_latency_ms, gateway_overhead_us, client_ip, user_agent \
         FROM usage_events \
         WHERE developer_id = ? AND ts >= toDateTime('{}') AND ts < toDateTime('{}'){key_filter} \
         ORDER BY ts_ms, rid",
        datetime_sql(start_ms),
        datetime_sql(end_ms)
    );
    let mut q = client.query(&sql).bind(developer_id);
    if let Some(k) = key_id {
        q = q.bind(k);
    }
    q.fetch::<ExportRow<'static>>()
}

/// A request that failed.
#[derive(Debug, Row, Deserialize)]
pub struct ErrorRow {
    pub ts_ms: u64,
    pub model: String,
    pub endpoint: String,
    pub status: u16,
    pub error_type: String,
}

/// A developer's latest `limit` failed requests (status ≥ 400) since `since_ms`, newest first.
pub async fn recent_errors(
    client: &Client,
    developer_id: &str,
    since_ms: i64,
    limit: u32,
) -> clickhouse::error::Result<Vec<ErrorRow>> {
    let sql = format!(
        "SELECT ts_ms, model, endpoint, status, error_type FROM usage_events \
         WHERE developer_id = ? AND ts >= toDateTime('{}') AND status >= 400 \
         ORDER BY ts DESC, ts_ms DESC LIMIT {limit}",
        datetime_sql(since_ms)
    );
    client.query(&sql).bind(developer_id).fetch_all().await
}
