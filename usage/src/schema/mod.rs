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
//!
//! # One server or a cluster
//! With `cluster` set in the ClickHouse section, the same migrations build the schema on every
//! server of that cluster (`ON CLUSTER`): each table above stores its rows in a replicated
//! `<name>_local` (`Replicated*MergeTree`) with a `Distributed` table `<name>` in front, so
//! every query keeps its table names; the views read `usage_events_local` and write the
//! `_local` rollups; `schema_migrations` is one replicated history. [`render`] has the rules;
//! `docs/clickhouse.md` ("Cluster") the picture.
//!
//! # Layout
//! - `mod.rs`: [`MIGRATIONS`], [`migrate`], [`add_column`].
//! - `rollups.rs`: the rollups' statements and queries, and [`backfill`].
//! - [`render`]: [`Layout`] (one server or a cluster) and the statements' cluster form.

pub mod render;
mod rollups;

use std::future::Future;
use std::pin::Pin;

use clickhouse::Client;

use crate::sink::ClickHouseConfig;
pub use render::Layout;
pub use rollups::{
    backfill, backfill_in, Rollup, USAGE_DAILY, USAGE_DEVELOPER_DAILY, USAGE_MODEL_DAILY,
};
use rollups::{PLATFORM_DAILY_SQL, USAGE_DAILY_SQL};

/// One schema step. `sql` may hold several statements separated by `;\n`; each must be
/// idempotent (`IF NOT EXISTS`), so a migration interrupted halfway can simply run again.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    /// The statements as they run on one server; [`render::statements`] gives their cluster
    /// form.
    pub sql: &'static str,
    /// Work that needs values only known at run time (the database name, the time a view was
    /// created), run after `sql` and before the migration is recorded. Like `sql`, it must be
    /// safe to run again after an interruption at any point, and on several nodes at once.
    pub then: Option<Step>,
}

/// A migration's run-time step: given the client (bound to the usage database) and where the
/// schema lives.
pub type Step = for<'a> fn(&'a Client, &'a Layout) -> StepFuture<'a>;
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
        then: Some(|db, layout| Box::pin(backfill_in(db, layout, &USAGE_DAILY))),
    },
    Migration {
        version: 4,
        name: "platform_daily",
        sql: PLATFORM_DAILY_SQL,
        then: Some(|db, layout| {
            Box::pin(async move {
                backfill_in(db, layout, &USAGE_DEVELOPER_DAILY).await?;
                backfill_in(db, layout, &USAGE_MODEL_DAILY).await
            })
        }),
    },
    Migration {
        version: 5,
        name: "usage_events_batch_id",
        sql: "",
        then: Some(|db, layout| {
            Box::pin(add_column_in(
                db,
                layout,
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
        then: Some(|db, layout| {
            Box::pin(add_column_in(
                db,
                layout,
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
    add_column_one(db, &Layout::single(""), table, column, definition).await
}

/// [`add_column`] in `layout`. On a cluster: `ALTER … ON CLUSTER` of the replicated table
/// storing the rows (a replicated `ALTER` returns once the live replicas have it), then the
/// `Distributed` table in front is made again from it, `ON CLUSTER`: ClickHouse refuses an
/// `ALTER … ON CLUSTER` of a table that is not replicated on a cluster whose shards replicate
/// (Code 371). For that moment the front table is missing: reads fail and are retried; inserts
/// go to the replicated table and do not notice.
pub async fn add_column_in(
    db: &Client,
    layout: &Layout,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), clickhouse::error::Error> {
    if layout.cluster.is_none() {
        return add_column_one(db, layout, table, column, definition).await;
    }
    add_column_one(db, layout, &layout.stored(table), column, definition).await?;
    if !column_exists(db, table, column).await? {
        db.query(&format!(
            "DROP TABLE IF EXISTS {}{}",
            layout.name(table),
            layout.on_cluster()
        ))
        .execute()
        .await?;
        db.query(&render::distributed(
            layout,
            table,
            render::sharding_key(table),
        ))
        .execute()
        .await?;
    }
    Ok(())
}

async fn add_column_one(
    db: &Client,
    layout: &Layout,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), clickhouse::error::Error> {
    if column_exists(db, table, column).await? {
        return Ok(());
    }
    let added = db
        .query(&format!(
            "ALTER TABLE {}{} ADD COLUMN {column} {definition}",
            layout.name(table),
            layout.on_cluster()
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

async fn table_exists(db: &Client, name: &str) -> Result<bool, clickhouse::error::Error> {
    let n: u64 = db
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(name)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// `schema_migrations`: on a cluster one replicated history for every server of the shard.
fn history_table(layout: &Layout) -> String {
    match layout.cluster {
        None => "CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32, name String, applied_at DateTime DEFAULT now()
        ) ENGINE = MergeTree ORDER BY version"
            .to_owned(),
        Some(_) => format!(
            "CREATE TABLE IF NOT EXISTS {}{} (
            version UInt32, name String, applied_at DateTime DEFAULT now()
        ) ENGINE = ReplicatedMergeTree('{}', '{{replica}}') ORDER BY version",
            layout.name("schema_migrations"),
            layout.on_cluster(),
            layout.zookeeper_path("schema_migrations")
        ),
    }
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
    #[error("migration {version} ({name}): {reason}")]
    Unrenderable {
        version: u32,
        name: &'static str,
        reason: String,
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

/// Creates the database and applies the missing migrations, in order. With `cluster` set,
/// on every server of the cluster: each one must be up while something is to be done (a
/// statement `ON CLUSTER` waits for all of them, up to the servers'
/// `distributed_ddl_task_timeout`, 180 s by default); once this server has the migrations'
/// history, nothing runs `ON CLUSTER` unless a migration is missing, so gateways start with a
/// replica down.
pub async fn migrate(config: &ClickHouseConfig) -> Result<MigrationReport, SchemaError> {
    let ch = |source| SchemaError::ClickHouse {
        url: config.url.clone(),
        source,
    };
    let layout = Layout::of(config);
    let on = layout.on_cluster();
    let server = config.client_without_database();
    let server_version = server
        .query("SELECT version()")
        .fetch_one::<String>()
        .await
        .map_err(ch)?;
    // A cluster's server that has the history already skips the two statements `ON CLUSTER`
    // below, which would wait for every server.
    let set_up = match layout.cluster {
        None => false,
        Some(_) => {
            server
                .query(
                    "SELECT count() FROM system.tables \
                     WHERE database = ? AND name = 'schema_migrations'",
                )
                .bind(&config.database)
                .fetch_one::<u64>()
                .await
                .map_err(ch)?
                > 0
        }
    };
    let db = config.client();
    if !set_up {
        server
            .query(&format!(
                "CREATE DATABASE IF NOT EXISTS `{}`{on}",
                config.database
            ))
            .execute()
            .await
            .map_err(ch)?;
        db.query(&history_table(&layout))
            .execute()
            .await
            .map_err(ch)?;
    }
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
        let statements =
            render::statements(m.sql, &layout).map_err(|reason| SchemaError::Unrenderable {
                version: m.version,
                name: m.name,
                reason,
            })?;
        for statement in &statements {
            db.query(statement).execute().await.map_err(fail)?;
        }
        if let Some(step) = m.then {
            step(&db, &layout).await.map_err(fail)?;
        }
        db.query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)")
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(fail)?;
        applied.push(m.version);
    }
    tracing::info!(%server_version, database = %config.database, cluster = ?layout.cluster, ?applied, "ClickHouse schema up to date");
    Ok(MigrationReport {
        server_version,
        applied,
    })
}
