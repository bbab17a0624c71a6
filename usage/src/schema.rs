//! The ClickHouse schema: numbered, idempotent migrations recorded in `schema_migrations`, run
//! at gateway start and by `aihub migrate`.
//!
//! Every statement works on Debian's ClickHouse 18.16 and on current releases: plain `String`
//! (no `LowCardinality`), `DateTime` plus a `ts_ms` column (no `DateTime64`), no TTL, and no
//! `ADD COLUMN IF NOT EXISTS` (18.16 refuses the syntax): a column is added by [`add_column`],
//! which looks in `system.columns` first. The server version is read first and logged; features
//! of newer servers are not needed yet.
//!
//! Tables (documented column by column in `docs/clickhouse.md`):
//! - `usage_events`: one row per metered request, `MergeTree`, partitioned by month, ordered by
//!   developer, time, request id. `batch_id` (migration 5) is the OpenAI batch id (`batch_…`)
//!   or the task id (`task_…`) the request ran for; '' for live requests. The rollups below
//!   do not carry it: batch usage is summed with the rest, and filtered in the raw table.
//! - `usage_hourly`: per developer × model × hour sums, `SummingMergeTree`, filled by the
//!   materialized view `usage_hourly_mv` at insert time.
//! - `usage_daily`: per developer × UTC day × key × model × status aggregate states (counts,
//!   sums, t-digests of the latencies): a `Merge` table over `usage_daily_live`
//!   (`AggregatingMergeTree`, filled by `usage_daily_mv`) and `usage_daily_history` (the same
//!   rollup of the rows that existed before the view, built once by [`backfill`]).
//! - `usage_developer_daily` and `usage_model_daily`: per UTC day × developer and per UTC day ×
//!   model sums for the operator's platform view, built the same way (live table filled by a
//!   view, history built once, a `Merge` table over both).

use std::future::Future;
use std::pin::Pin;

use clickhouse::Client;

use crate::sink::ClickHouseConfig;

/// One schema step. `sql` may hold several statements separated by `;\n`; each must be
/// idempotent (`IF NOT EXISTS`), so a migration interrupted halfway can simply run again.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
    /// Work that needs values only known at run time (the database name, the time a view was
    /// created), run after `sql` and before the migration is recorded. Like `sql`, it must be
    /// safe to run again after an interruption at any point, and on several nodes at once.
    pub then: Option<Step>,
}

/// A migration's run-time step: given the client (bound to the usage database) and the
/// database's name.
pub type Step = for<'a> fn(&'a Client, &'a str) -> StepFuture<'a>;
pub type StepFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), clickhouse::error::Error>> + Send + 'a>>;

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
        then: None,
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
        then: None,
    },
    Migration {
        version: 3,
        name: "usage_daily",
        sql: USAGE_DAILY_SQL,
        then: Some(|db, database| Box::pin(backfill(db, database, &USAGE_DAILY))),
    },
    Migration {
        version: 4,
        name: "platform_daily",
        sql: PLATFORM_DAILY_SQL,
        then: Some(|db, database| {
            Box::pin(async move {
                backfill(db, database, &USAGE_DEVELOPER_DAILY).await?;
                backfill(db, database, &USAGE_MODEL_DAILY).await
            })
        }),
    },
    Migration {
        version: 5,
        name: "usage_events_batch_id",
        sql: "",
        then: Some(|db, _| {
            Box::pin(add_column(
                db,
                "usage_events",
                "batch_id",
                "String DEFAULT ''",
            ))
        }),
    },
    Migration {
        version: 6,
        name: "usage_events_attempts",
        sql: "",
        then: Some(|db, _| {
            Box::pin(add_column(
                db,
                "usage_events",
                "attempts",
                "UInt8 DEFAULT 1",
            ))
        }),
    },
];

/// Adds `column` to `table` unless it is there: the `ADD COLUMN IF NOT EXISTS` that 18.16 lacks.
/// Safe on several nodes at once: an `ALTER` that fails because another node added the column
/// meanwhile counts as done.
pub async fn add_column(
    db: &Client,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), clickhouse::error::Error> {
    if column_exists(db, table, column).await? {
        return Ok(());
    }
    let added = db
        .query(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {definition}"
        ))
        .execute()
        .await;
    match added {
        Err(_) if column_exists(db, table, column).await? => Ok(()),
        other => other,
    }
}

async fn column_exists(
    db: &Client,
    table: &str,
    column: &str,
) -> Result<bool, clickhouse::error::Error> {
    let n: u64 = db
        .query(
            "SELECT count() FROM system.columns \
             WHERE database = currentDatabase() AND table = ? AND name = ?",
        )
        .bind(table)
        .bind(column)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// The rollup of `usage_events` rows into `usage_daily` states, shared by the view and the
/// backfill (which adds a time filter).
macro_rules! usage_daily_select {
    () => {
        "SELECT
    developer_id,
    toDate(ts) AS day,
    key_id,
    model,
    status,
    countState() AS requests,
    sumState(toUInt64(prompt_tokens)) AS prompt_tokens,
    sumState(toUInt64(cached_tokens)) AS cached_tokens,
    sumState(toUInt64(completion_tokens)) AS completion_tokens,
    sumState(toUInt64(total_tokens)) AS total_tokens,
    sumState(cost_nanos) AS cost_nanos,
    sumState(toUInt64(total_latency_ms)) AS total_latency_sum_ms,
    sumState(toUInt64(upstream_latency_ms)) AS upstream_latency_sum_ms,
    sumState(toUInt64(gateway_overhead_us)) AS gateway_overhead_sum_us,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(total_latency_ms, status < 400) AS total_latency_q,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(upstream_latency_ms, status < 400) AS upstream_latency_q,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(gateway_overhead_us, status < 400) AS gateway_overhead_q
FROM usage_events"
    };
}

macro_rules! usage_daily_group_by {
    () => {
        "GROUP BY developer_id, day, key_id, model, status"
    };
}

/// Migration 3's statements: the live table and its view. The `Merge` table `usage_daily` and
/// the history are made by [`backfill`] (the `Merge` engine needs the database's
/// name).
const USAGE_DAILY_SQL: &str = concat!(
    "CREATE TABLE IF NOT EXISTS usage_daily_live (
    developer_id String,
    day Date,
    key_id String,
    model String,
    status UInt16,
    requests AggregateFunction(count),
    prompt_tokens AggregateFunction(sum, UInt64),
    cached_tokens AggregateFunction(sum, UInt64),
    completion_tokens AggregateFunction(sum, UInt64),
    total_tokens AggregateFunction(sum, UInt64),
    cost_nanos AggregateFunction(sum, Int64),
    total_latency_sum_ms AggregateFunction(sum, UInt64),
    upstream_latency_sum_ms AggregateFunction(sum, UInt64),
    gateway_overhead_sum_us AggregateFunction(sum, UInt64),
    total_latency_q AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32),
    upstream_latency_q AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32),
    gateway_overhead_q AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (developer_id, day, key_id, model, status)
SETTINGS index_granularity = 256;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily_live AS
",
    usage_daily_select!(),
    "\n",
    usage_daily_group_by!()
);

/// The rollup of `usage_events` rows into `usage_developer_daily` sums, shared by the view and
/// the backfill. The columns are in `usage_developer_daily_live`'s order.
macro_rules! developer_daily_select {
    () => {
        "SELECT
    toDate(ts) AS day,
    developer_id,
    count() AS requests,
    countIf(status >= 400) AS errors,
    sum(toUInt64(prompt_tokens)) AS prompt_tokens,
    sum(toUInt64(cached_tokens)) AS cached_tokens,
    sum(toUInt64(completion_tokens)) AS completion_tokens,
    sum(toUInt64(total_tokens)) AS total_tokens,
    sum(cost_nanos) AS cost_nanos
FROM usage_events"
    };
}

macro_rules! developer_daily_group_by {
    () => {
        "GROUP BY day, developer_id"
    };
}

/// The same per model (`usage_model_daily`).
macro_rules! model_daily_select {
    () => {
        "SELECT
    toDate(ts) AS day,
    model,
    count() AS requests,
    countIf(status >= 400) AS errors,
    sum(toUInt64(prompt_tokens)) AS prompt_tokens,
    sum(toUInt64(cached_tokens)) AS cached_tokens,
    sum(toUInt64(completion_tokens)) AS completion_tokens,
    sum(toUInt64(total_tokens)) AS total_tokens,
    sum(cost_nanos) AS cost_nanos
FROM usage_events"
    };
}

macro_rules! model_daily_group_by {
    () => {
        "GROUP BY day, model"
    };
}

/// Migration 4's statements: the two live tables and their views (the `Merge` tables and the
/// histories are made by [`backfill`]). `SummingMergeTree` sorted by day first, so a range of
/// days reads only those days' rows: at most one per active developer (model) and day.
const PLATFORM_DAILY_SQL: &str = concat!(
    "CREATE TABLE IF NOT EXISTS usage_developer_daily_live (
    day Date,
    developer_id String,
    requests UInt64,
    errors UInt64,
    prompt_tokens UInt64,
    cached_tokens UInt64,
    completion_tokens UInt64,
    total_tokens UInt64,
    cost_nanos Int64
) ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, developer_id);
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_developer_daily_mv TO usage_developer_daily_live AS
",
    developer_daily_select!(),
    "\n",
    developer_daily_group_by!(),
    ";
CREATE TABLE IF NOT EXISTS usage_model_daily_live (
    day Date,
    model String,
    requests UInt64,
    errors UInt64,
    prompt_tokens UInt64,
    cached_tokens UInt64,
    completion_tokens UInt64,
    total_tokens UInt64,
    cost_nanos Int64
) ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, model);
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_model_daily_mv TO usage_model_daily_live AS
",
    model_daily_select!(),
    "\n",
    model_daily_group_by!()
);

/// A rollup of `usage_events` as migrations 3 and 4 build them: `{name}_live`, filled by the
/// materialized view `{name}_mv` from every insert; `{name}_history`, the same rollup of the
/// rows older than the view, built once by [`backfill`]; and `{name}`, a `Merge` table reading
/// both as one, which is what queries read.
pub struct Rollup {
    /// The `Merge` table's name; the prefix of the others.
    pub name: &'static str,
    /// The view's `SELECT … FROM usage_events`, its columns in the live table's order (the
    /// backfill inserts by position).
    pub select: &'static str,
    /// The view's `GROUP BY` clause.
    pub group_by: &'static str,
}

/// Migration 3's rollup: states per developer × day × key × model × status.
pub const USAGE_DAILY: Rollup = Rollup {
    name: "usage_daily",
    select: usage_daily_select!(),
    group_by: usage_daily_group_by!(),
};

/// Migration 4's rollups: sums per day × developer and per day × model (the operator view).
pub const USAGE_DEVELOPER_DAILY: Rollup = Rollup {
    name: "usage_developer_daily",
    select: developer_daily_select!(),
    group_by: developer_daily_group_by!(),
};

pub const USAGE_MODEL_DAILY: Rollup = Rollup {
    name: "usage_model_daily",
    select: model_daily_select!(),
    group_by: model_daily_group_by!(),
};

/// A rollup's step (migrations 3 and 4): creates the `Merge` table `{name}` over the live
/// rollup and the history, and builds `{name}_history`, the rollup of the rows older than the
/// view `{name}_mv`.
///
/// The cutoff is derived from the view's creation time as ClickHouse recorded it
/// (`system.tables.metadata_modification_time`, whole seconds), rounded up to the next second:
/// every row whose `ts_ms` is at or after the cutoff started after the view existed, so the view
/// saw it; the history takes the rows before it. Every run derives the same cutoff, however
/// late or often it runs. (Rows that started before the cutoff but were inserted after the
/// view was created and before the backfill read their month are counted by both: the window
/// `docs/clickhouse.md` describes.)
///
/// Each run fills a staging table of its own (`{name}_backfill_<random>`), month by month
/// (newest first, so the current month's snapshot is taken closest to the view's creation),
/// then publishes it with one `RENAME` to `{name}_history`: atomic, and refused when another
/// run published first (this run's copy is then dropped). An interrupted run leaves only its
/// staging table behind, which a later run drops; the history is never half there, nor there
/// twice.
pub async fn backfill(
    db: &Client,
    database: &str,
    rollup: &Rollup,
) -> Result<(), clickhouse::error::Error> {
    let name = rollup.name;
    let history = format!("{name}_history");
    db.query(&format!(
        "CREATE TABLE IF NOT EXISTS {name} AS {name}_live \
         ENGINE = Merge('{database}', '^{name}_(live|history)$')"
    ))
    .execute()
    .await?;
    if !table_exists(db, &history).await? {
        let created: u32 = db
            .query(
                "SELECT toUInt32(metadata_modification_time) FROM system.tables \
                 WHERE database = currentDatabase() AND name = ?",
            )
            .bind(format!("{name}_mv"))
            .fetch_one()
            .await?;
        let cutoff_ms = (u64::from(created) + 1) * 1000;
        let staging = format!("{name}{STAGING_INFIX}{}", uuid::Uuid::now_v7().simple());
        db.query(&format!("CREATE TABLE {staging} AS {name}_live"))
            .execute()
            .await?;
        let mut months: Vec<u32> = db
            .query(
                "SELECT DISTINCT toUInt32(partition) FROM system.parts \
                 WHERE database = currentDatabase() AND table = 'usage_events' AND active",
            )
            .fetch_all()
            .await?;
        months.retain(|&m| m <= yyyymm_of_ms(cutoff_ms));
        months.sort_unstable_by(|a, b| b.cmp(a));
        for &month in &months {
            let (start, end) = month_bounds(month);
            db.query(&format!(
                "INSERT INTO {staging} {} WHERE ts >= toDateTime('{start}') AND ts < toDateTime('{end}') \
                 AND ts_ms < {cutoff_ms} {}",
                rollup.select, rollup.group_by
            ))
            .with_setting("query_id", format!("{staging}_{month}"))
            // A month's groups fit in memory at 10M rows (~700 MiB for `usage_daily`); bigger
            // months spill.
            .with_setting("max_bytes_before_external_group_by", "2000000000")
            .execute()
            .await?;
        }
        match db
            .query(&format!("RENAME TABLE {staging} TO {history}"))
            .execute()
            .await
        {
            Ok(()) => tracing::info!(rollup = name, cutoff_ms, ?months, "history built"),
            // Another node published its history first: ours is a copy.
            Err(_) if table_exists(db, &history).await? => {
                db.query(&format!("DROP TABLE IF EXISTS {staging}"))
                    .execute()
                    .await?;
            }
            Err(e) => return Err(e),
        }
    }
    drop_abandoned_staging(db, name).await;
    Ok(())
}

/// Between a rollup's name and a backfill run's id in its staging table's name.
const STAGING_INFIX: &str = "_backfill_";

async fn table_exists(db: &Client, name: &str) -> Result<bool, clickhouse::error::Error> {
    let n: u64 = db
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(name)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// Drops the staging tables of interrupted backfill runs of `rollup` (best effort). A table
/// some query is still writing is left alone; a run whose table is dropped under it fails and,
/// run again, finds the history built.
async fn drop_abandoned_staging(db: &Client, rollup: &str) {
    let prefix = format!("{rollup}{STAGING_INFIX}");
    let result = async {
        let names: Vec<String> = db
            .query("SELECT name FROM system.tables WHERE database = currentDatabase()")
            .fetch_all()
            .await?;
        let running: Vec<String> = db
            .query("SELECT query_id FROM system.processes")
            .fetch_all()
            .await?;
        for name in names.iter().filter(|n| n.starts_with(&prefix)) {
            if !running.iter().any(|q| q.starts_with(name.as_str())) {
                db.query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute()
                    .await?;
            }
        }
        Ok::<(), clickhouse::error::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(rollup, error = %e, "leftover backfill tables not dropped");
    }
}

/// `YYYYMM` (UTC) of a unix-milliseconds instant.
fn yyyymm_of_ms(ms: u64) -> u32 {
    let p = aihub_plans::Period::of_unix_ms(ms as i64);
    p.year as u32 * 100 + p.month
}

/// The first instants of month `YYYYMM` and of the month after, as ClickHouse `DateTime` text.
fn month_bounds(yyyymm: u32) -> (String, String) {
    let (y, m) = (yyyymm / 100, yyyymm % 100);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        format!("{y:04}-{m:02}-01 00:00:00"),
        format!("{ny:04}-{nm:02}-01 00:00:00"),
    )
}

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
        if let Some(step) = m.then {
            step(&db, &config.database).await.map_err(fail)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        // 2026-11-25T12:00:00Z
        assert_eq!(yyyymm_of_ms(1_795_608_000_000), 202611);
        assert_eq!(yyyymm_of_ms(0), 197001);
        assert_eq!(
            month_bounds(202612),
            ("2026-12-01 00:00:00".into(), "2027-01-01 00:00:00".into())
        );
        assert_eq!(month_bounds(202402).1, "2024-03-01 00:00:00");
    }
}
