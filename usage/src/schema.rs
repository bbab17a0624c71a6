//! The ClickHouse schema: numbered, idempotent migrations recorded in `schema_migrations`, run
//! at gateway start and by `aihub migrate`.
//!
//! Every statement works on Debian's ClickHouse 18.16 and on current releases: plain `String`
//! (no `LowCardinality`), `DateTime` plus a `ts_ms` column (no `DateTime64`), no TTL. The server
//! version is read first and logged; features of newer servers are not needed yet.
//!
//! Tables (documented column by column in `docs/clickhouse.md`):
//! - `usage_events`: one row per metered request, `MergeTree`, partitioned by month, ordered by
//!   developer, time, request id.
//! - `usage_hourly`: per developer × model × hour sums, `SummingMergeTree`, filled by the
//!   materialized view `usage_hourly_mv` at insert time.

use crate::sink::ClickHouseConfig;

/// One schema step. `sql` may hold several statements separated by `;\n`; each must be
/// idempotent (`IF NOT EXISTS`), so a migration interrupted halfway can simply run again.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage_events",
        sql: "CREATE TABLE IF NOT EXISTS usage_events (
    request_id UUID,
    ts DateTime,
    ts_ms UInt64,
    developer_id String,
    key_id String,
    endpoint String,
    method String,
    model String,
    upstream_model String,
    upstream String,
    upstream_endpoint String,
    prompt_tokens UInt32,
    cached_tokens UInt32,
    completion_tokens UInt32,
    total_tokens UInt32,
    cost_nanos Int64,
    gateway_overhead_us UInt32,
    upstream_latency_ms UInt32,
    total_latency_ms UInt32,
    status UInt16,
    error_type String,
    streamed UInt8,
    usage_estimated UInt8,
    client_ip String,
    user_agent String
) ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (developer_id, ts, request_id)",
    },
    Migration {
        version: 2,
        name: "usage_hourly",
        sql: "CREATE TABLE IF NOT EXISTS usage_hourly (
    developer_id String,
    model String,
    hour DateTime,
    requests UInt64,
    errors UInt64,
    estimated UInt64,
    prompt_tokens UInt64,
    cached_tokens UInt64,
    completion_tokens UInt64,
    total_tokens UInt64,
    cost_nanos Int64,
    total_latency_ms UInt64
) ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (developer_id, model, hour);
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    developer_id,
    model,
    toStartOfHour(ts) AS hour,
    count() AS requests,
    countIf(status >= 400) AS errors,
    countIf(usage_estimated = 1) AS estimated,
    sum(toUInt64(prompt_tokens)) AS prompt_tokens,
    sum(toUInt64(cached_tokens)) AS cached_tokens,
    sum(toUInt64(completion_tokens)) AS completion_tokens,
    sum(toUInt64(total_tokens)) AS total_tokens,
    sum(cost_nanos) AS cost_nanos,
    sum(toUInt64(total_latency_ms)) AS total_latency_ms
FROM usage_events
GROUP BY developer_id, model, hour",
    },
];

/// Errors from running migrations.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("ClickHouse at {url}: {source}")]
    ClickHouse {
        url: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub server_version: String,
    pub applied: Vec<u32>,
}

/// Creates the database and applies the missing migrations, in order.
pub async fn migrate(config: &ClickHouseConfig) -> Result<MigrationReport, SchemaError> {
    let ch = |source| SchemaError::ClickHouse {
        url: config.url.clone(),
        source,
    };
    let server = config.client_without_database();
    let server_version = server
        .query("SELECT version()")
        .fetch_one::<String>()
        .await
        .map_err(ch)?;
    server
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS `{}`",
            config.database
        ))
        .execute()
        .await
        .map_err(ch)?;
    let db = config.client();
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32, name String, applied_at DateTime DEFAULT now()
        ) ENGINE = MergeTree ORDER BY version",
    )
    .execute()
    .await
    .map_err(ch)?;
    let done: Vec<u32> = db
        .query("SELECT version FROM schema_migrations")
        .fetch_all::<u32>()
        .await
        .map_err(ch)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        let fail = |source| SchemaError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        for statement in m.sql.split(";\n").filter(|s| !s.trim().is_empty()) {
            db.query(statement).execute().await.map_err(fail)?;
        }
        db.query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)")
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(fail)?;
        applied.push(m.version);
    }
    tracing::info!(%server_version, database = %config.database, ?applied, "ClickHouse schema up to date");
    Ok(MigrationReport {
        server_version,
        applied,
    })
}
