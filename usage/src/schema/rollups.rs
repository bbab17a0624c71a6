//! The rollups of `usage_events` (migrations 3 and 4): their statements, the queries their
//! views and backfills share ([`Rollup`]), and [`backfill`], which builds a rollup's history
//! of the rows older than its view, on one server or on a cluster ([`Layout`]).

use clickhouse::Client;

use super::render::{self, Layout, Table};
use super::{table_exists, MIGRATIONS};

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
pub(super) const USAGE_DAILY_SQL: &str = concat!(
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
pub(super) const PLATFORM_DAILY_SQL: &str = concat!(
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
    backfill_in(db, &Layout::single(database), rollup).await
}

/// [`backfill`] in `layout`. On a cluster the `Merge` table reads the `Distributed` tables
/// `{name}_live` and `{name}_history`; the staging table is a replicated copy of
/// `{name}_live_local` with a ZooKeeper path of its own (a copy made with `AS` would share the
/// live table's), created, renamed to `{name}_history_local` and dropped `ON CLUSTER`, and
/// filled from this server's `usage_events_local` (with one shard, every row); then
/// `{name}_history` is created in front of it.
pub async fn backfill_in(
    db: &Client,
    layout: &Layout,
    rollup: &Rollup,
) -> Result<(), clickhouse::error::Error> {
    let name = rollup.name;
    let on = layout.on_cluster();
    let history = format!("{name}_history");
    let stored_history = layout.stored(&history);
    db.query(&format!(
        "CREATE TABLE IF NOT EXISTS {}{on} AS {} \
         ENGINE = Merge('{database}', '^{name}_(live|history)$')",
        layout.name(name),
        layout.name(&format!("{name}_live")),
        database = layout.database,
    ))
    .execute()
    .await?;
    if !table_exists(db, &stored_history).await? {
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
        let create = match layout.cluster {
            None => format!("CREATE TABLE {staging} AS {name}_live"),
            Some(_) => live_table(name)
                .and_then(|live| live.replicated(layout, &staging, false))
                .map_err(unrenderable)?,
        };
        db.query(&create).execute().await?;
        let mut months: Vec<u32> = db
            .query(&format!(
                "SELECT DISTINCT toUInt32(partition) FROM system.parts \
                 WHERE database = currentDatabase() AND table = '{}' AND active",
                layout.stored("usage_events")
            ))
            .fetch_all()
            .await?;
        months.retain(|&m| m <= yyyymm_of_ms(cutoff_ms));
        months.sort_unstable_by(|a, b| b.cmp(a));
        let select = render::from_events(rollup.select, layout).map_err(unrenderable)?;
        for &month in &months {
            let (start, end) = month_bounds(month);
            db.query(&format!(
                "INSERT INTO {} {select} WHERE ts >= toDateTime('{start}') AND ts < toDateTime('{end}') \
                 AND ts_ms < {cutoff_ms} {}",
                layout.name(&staging),
                rollup.group_by
            ))
            .with_setting("query_id", format!("{staging}_{month}"))
            // A month's groups fit in memory at 10M rows (~700 MiB for `usage_daily`); bigger
            // months spill.
            .with_setting("max_bytes_before_external_group_by", "2000000000")
            .execute()
            .await?;
        }
        match db
            .query(&format!(
                "RENAME TABLE {} TO {}{on}",
                layout.name(&staging),
                layout.name(&stored_history)
            ))
            .execute()
            .await
        {
            Ok(()) => tracing::info!(rollup = name, cutoff_ms, ?months, "history built"),
            // Another node published its history first: ours is a copy.
            Err(_) if table_exists(db, &stored_history).await? => {
                db.query(&format!(
                    "DROP TABLE IF EXISTS {}{on}",
                    layout.name(&staging)
                ))
                .execute()
                .await?;
            }
            Err(e) => return Err(e),
        }
    }
    if layout.cluster.is_some() {
        db.query(&render::distributed(layout, &history, None))
            .execute()
            .await?;
    }
    drop_abandoned_staging(db, layout, name).await;
    Ok(())
}

/// The statement creating `{rollup}_live`, in the migration that does.
fn live_table(rollup: &str) -> Result<Table<'static>, String> {
    let live = format!("{rollup}_live");
    MIGRATIONS
        .iter()
        .flat_map(|m| m.sql.split(";\n"))
        .filter_map(Table::parse)
        .find(|t| t.name == live)
        .ok_or_else(|| format!("no migration creates {live}"))
}

fn unrenderable(reason: String) -> clickhouse::error::Error {
    clickhouse::error::Error::Other(reason.into())
}

/// Between a rollup's name and a backfill run's id in its staging table's name.
const STAGING_INFIX: &str = "_backfill_";

/// Drops the staging tables of interrupted backfill runs of `rollup` (best effort). A table
/// some query is still writing is left alone; a run whose table is dropped under it fails and,
/// run again, finds the history built. (On a cluster only this server's queries are seen; as
/// this runs once the history is published, a run elsewhere that loses its staging table
/// finds the history when run again.)
async fn drop_abandoned_staging(db: &Client, layout: &Layout, rollup: &str) {
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
                db.query(&format!(
                    "DROP TABLE IF EXISTS {}{}",
                    layout.name(name),
                    layout.on_cluster()
                ))
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

    #[test]
    fn every_rollup_has_a_live_table_with_a_cluster_form() {
        let layout = Layout {
            database: "db".into(),
            cluster: Some("c".into()),
        };
        for rollup in [&USAGE_DAILY, &USAGE_DEVELOPER_DAILY, &USAGE_MODEL_DAILY] {
            let staging = format!("{}_backfill_x", rollup.name);
            let sql = live_table(rollup.name)
                .unwrap()
                .replicated(&layout, &staging, false)
                .unwrap();
            assert!(sql.starts_with(&format!("CREATE TABLE `db`.{staging} ON CLUSTER `c` (\n")));
            assert!(sql.contains(&format!(
                "('/clickhouse/tables/{{shard}}/db/{staging}', '{{replica}}')"
            )));
            assert!(render::from_events(rollup.select, &layout)
                .unwrap()
                .ends_with("\nFROM `db`.usage_events_local"));
        }
    }
}
