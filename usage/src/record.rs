//! The usage record: one row per metered request, as written to the WAL (JSON lines) and to
//! ClickHouse (`usage_events`, RowBinary). Field order is the column order of the insert; a
//! field added later goes last, with `#[serde(default)]` so WAL lines of older binaries still
//! read.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One metered request. Money is integer nano-USD (`cost_nanos`); durations are integers.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The gateway's request id (UUIDv7, also the `x-request-id` header). Unique per request,
    /// except for a batch item: its id is fixed by the item (UUIDv5 of task and line, the same
    /// on every attempt), and only one answered attempt (status < 400) is kept
    /// ([`crate::sink::drop_batch_duplicates`]).
    #[serde(with = "clickhouse::serde::uuid")]
    pub request_id: Uuid,
    /// Request start, unix seconds (`DateTime`, the partition and sort key).
    pub ts: u32,
    /// Request start, unix milliseconds.
    pub ts_ms: u64,
    pub developer_id: String,
    pub key_id: String,
    /// Path after `/v1/`, e.g. `chat/completions`.
    pub endpoint: String,
    pub method: String,
    /// The model the client asked for (the route's name).
    pub model: String,
    /// The model name sent upstream (differs when the route renames it).
    pub upstream_model: String,
    pub upstream: String,
    pub upstream_endpoint: String,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Price of the request in nano-USD (1e-9 USD), rounded once, half to even.
    pub cost_nanos: i64,
    pub gateway_overhead_us: u32,
    pub upstream_latency_ms: u32,
    pub total_latency_ms: u32,
    pub status: u16,
    /// Empty on success; otherwise the gateway's error code (`model_not_found`, `aborted`, …),
    /// or `upstream_error` when the upstream answered with an error status.
    pub error_type: String,
    pub streamed: u8,
    /// 1 when the token counts are the gateway's estimate (no usage from the upstream, or the
    /// client left mid-stream).
    pub usage_estimated: u8,
    pub client_ip: String,
    pub user_agent: String,
    /// The OpenAI batch id (`batch_…`) or the task id (`task_…`) the request ran for; empty
    /// for live requests. (Migration 5; absent from WAL lines of older binaries.)
    #[serde(default)]
    pub batch_id: String,
    /// Times the request was sent upstream: 0 when refused before any upstream, 1 normally,
    /// more when the gateway retried it (`retry:`), the last attempt's endpoint being
    /// `upstream_endpoint`. (Migration 6; WAL lines of older binaries read 1.)
    #[serde(default = "one")]
    pub attempts: u8,
}

fn one() -> u8 {
    1
}
