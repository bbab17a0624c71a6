//! Where the schema lives ([`Layout`]: one server, or a cluster) and how the migrations'
//! statements read there.
//!
//! On one server every statement runs as written in [`super::MIGRATIONS`]: that text *is* the
//! single-server schema, byte for byte. On a cluster the same text is rewritten:
//! - `CREATE TABLE IF NOT EXISTS t (…) ENGINE = XMergeTree …` becomes `t_local`, engine
//!   `ReplicatedXMergeTree('/clickhouse/tables/{shard}/<db>/t_local', '{replica}')` with the
//!   rest of the definition unchanged, followed by `t` itself as a `Distributed` table over
//!   `t_local`, so readers keep their table names;
//! - `CREATE MATERIALIZED VIEW IF NOT EXISTS v TO t AS SELECT … FROM usage_events …` reads
//!   `usage_events_local` and writes `t_local` (a view fires on the server that took the
//!   insert; the replicated target carries its rows to the others);
//! - every statement runs `ON CLUSTER` and names its tables with the database (a statement
//!   run `ON CLUSTER` resolves bare names in each server's default database).
//!
//! The ZooKeeper path is spelled out with the database's name instead of the `{database}` and
//! `{table}` macros: a table's stored definition keeps macros unexpanded, so a renamed table
//! (a backfill's staging table becomes the history) would move to another path at the next
//! restart. The statements are parsed in the narrow shapes the migrations use; a statement of
//! another shape is an error (every migration's cluster rendering is tested below).

use crate::sink::ClickHouseConfig;

/// The usage database, and the cluster it is spread over (`None`: one server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub database: String,
    pub cluster: Option<String>,
}

/// Appended to a table's name for the table that stores its rows on a cluster.
pub const LOCAL_SUFFIX: &str = "_local";

impl Layout {
    /// Where `config` puts the schema.
    pub fn of(config: &ClickHouseConfig) -> Layout {
        Layout {
            database: config.database.clone(),
            cluster: config.cluster.clone(),
        }
    }

    /// The database on one server.
    pub fn single(database: impl Into<String>) -> Layout {
        Layout {
            database: database.into(),
            cluster: None,
        }
    }

    /// ` ON CLUSTER `name`` on a cluster, else nothing.
    pub fn on_cluster(&self) -> String {
        self.cluster
            .as_deref()
            .map(|c| format!(" ON CLUSTER `{c}`"))
            .unwrap_or_default()
    }

    /// How a statement names `table` of the usage database: bare on one server (the client's
    /// database), with the database on a cluster.
    pub fn name(&self, table: &str) -> String {
        match self.cluster {
            None => table.to_owned(),
            Some(_) => format!("`{}`.{table}", self.database),
        }
    }

    /// The table holding the rows of `table`: itself on one server, `{table}_local` on a
    /// cluster (where `table` is the `Distributed` table in front of it).
    pub fn stored(&self, table: &str) -> String {
        match self.cluster {
            None => table.to_owned(),
            Some(_) => format!("{table}{LOCAL_SUFFIX}"),
        }
    }

    /// The ZooKeeper path of the replicated table `physical`.
    pub fn zookeeper_path(&self, physical: &str) -> String {
        format!("/clickhouse/tables/{{shard}}/{}/{physical}", self.database)
    }
}

/// The statements of a migration's `sql` (separated by `;\n`) as they run in `layout`.
pub fn statements(sql: &str, layout: &Layout) -> Result<Vec<String>, String> {
    let parts = sql.split(";\n").filter(|s| !s.trim().is_empty());
    if layout.cluster.is_none() {
        return Ok(parts.map(str::to_owned).collect());
    }
    let mut out = Vec::new();
    for statement in parts {
        if let Some(table) = Table::parse(statement) {
            out.push(table.replicated(layout, &layout.stored(table.name), true)?);
            out.push(distributed(layout, table.name, sharding_key(table.name)));
        } else if let Some(view) = View::parse(statement) {
            out.push(format!(
                "{VIEW_HEAD}{}{} TO {} AS\n{}",
                layout.name(view.name),
                layout.on_cluster(),
                layout.name(&layout.stored(view.target)),
                from_events(view.select, layout)?
            ));
        } else {
            return Err(format!(
                "no cluster form for: {}",
                statement.lines().next().unwrap_or_default()
            ));
        }
    }
    Ok(out)
}

/// `Distributed` inserts need a sharding key once there are several shards: a developer's rows
/// go to one shard, and a replayed row to the shard that has it.
pub(crate) fn sharding_key(table: &str) -> Option<&'static str> {
    (table == "usage_events").then_some("cityHash64(developer_id)")
}

/// `front`, a `Distributed` table over `{front}_local` on every server of the cluster.
pub(crate) fn distributed(layout: &Layout, front: &str, key: Option<&str>) -> String {
    let cluster = layout.cluster.as_deref().unwrap_or_default();
    let key = key.map(|k| format!(", {k}")).unwrap_or_default();
    format!(
        "CREATE TABLE IF NOT EXISTS {}{} AS {} ENGINE = Distributed('{cluster}', '{}', '{}'{key})",
        layout.name(front),
        layout.on_cluster(),
        layout.name(&layout.stored(front)),
        layout.database,
        layout.stored(front),
    )
}

/// A rollup's `SELECT … FROM usage_events …` reading the table that stores the rows.
pub(crate) fn from_events(select: &str, layout: &Layout) -> Result<String, String> {
    if layout.cluster.is_none() {
        return Ok(select.to_owned());
    }
    const FROM: &str = "\nFROM usage_events";
    let at: Vec<usize> = select
        .match_indices(FROM)
        .map(|(i, _)| i)
        .filter(|&i| matches!(select.as_bytes().get(i + FROM.len()), None | Some(b'\n')))
        .collect();
    let [i] = at[..] else {
        return Err(format!(
            "a rollup's SELECT must read `usage_events` once, on a line of its own; found {}",
            at.len()
        ));
    };
    Ok(format!(
        "{}\nFROM {}{}",
        &select[..i],
        layout.name(&layout.stored("usage_events")),
        &select[i + FROM.len()..]
    ))
}

const TABLE_HEAD: &str = "CREATE TABLE IF NOT EXISTS ";
const VIEW_HEAD: &str = "CREATE MATERIALIZED VIEW IF NOT EXISTS ";
const ENGINE: &str = "\n) ENGINE = ";

/// `CREATE TABLE IF NOT EXISTS {name} ({columns}\n) ENGINE = {engine}{tail}`, the engine one of
/// the `MergeTree` family without arguments, the tail its clauses (`PARTITION BY`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Table<'a> {
    pub(crate) name: &'a str,
    columns: &'a str,
    engine: &'a str,
    tail: &'a str,
}

impl<'a> Table<'a> {
    pub(crate) fn parse(statement: &'a str) -> Option<Table<'a>> {
        let rest = statement.strip_prefix(TABLE_HEAD)?;
        let (name, rest) = rest.split_once(" (")?;
        let (columns, rest) = rest.split_once(ENGINE)?;
        let (engine, tail) = rest.find('\n').map_or((rest, ""), |i| rest.split_at(i));
        let plain =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        (plain(name)
            && matches!(
                engine,
                "MergeTree" | "SummingMergeTree" | "AggregatingMergeTree"
            ))
        .then_some(Table {
            name,
            columns,
            engine,
            tail,
        })
    }

    /// This table's definition as the replicated table `physical` of the cluster.
    pub(crate) fn replicated(
        &self,
        layout: &Layout,
        physical: &str,
        if_not_exists: bool,
    ) -> Result<String, String> {
        if layout.cluster.is_none() {
            return Err(format!("{physical}: replicated tables need a cluster"));
        }
        let head = if if_not_exists {
            TABLE_HEAD
        } else {
            "CREATE TABLE "
        };
        Ok(format!(
            "{head}{}{} ({}{ENGINE}Replicated{}('{}', '{{replica}}'){}",
            layout.name(physical),
            layout.on_cluster(),
            self.columns,
            self.engine,
            layout.zookeeper_path(physical),
            self.tail
        ))
    }
}

/// `CREATE MATERIALIZED VIEW IF NOT EXISTS {name} TO {target} AS\n{select}`.
struct View<'a> {
    name: &'a str,
    target: &'a str,
    select: &'a str,
}

impl<'a> View<'a> {
    fn parse(statement: &'a str) -> Option<View<'a>> {
        let rest = statement.strip_prefix(VIEW_HEAD)?;
        let (name, rest) = rest.split_once(" TO ")?;
        let (target, select) = rest.split_once(" AS\n")?;
        Some(View {
            name,
            target,
            select,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::MIGRATIONS;
    use super::*;

    fn cluster() -> Layout {
        Layout {
            database: "aihub".into(),
            cluster: Some("aihub_c".into()),
        }
    }

    #[test]
    fn one_server_runs_the_migrations_as_written() {
        let layout = Layout::single("aihub");
        for m in MIGRATIONS {
            let rendered = statements(m.sql, &layout).unwrap();
            let written: Vec<&str> = m
                .sql
                .split(";\n")
                .filter(|s| !s.trim().is_empty())
                .collect();
            assert_eq!(rendered, written, "migration {}", m.version);
        }
    }

    #[test]
    fn every_migration_has_a_cluster_form() {
        let layout = cluster();
        let mut all = Vec::new();
        for m in MIGRATIONS {
            all.extend(statements(m.sql, &layout).unwrap());
        }
        // 5 tables (each stored + Distributed) and 4 views.
        assert_eq!(all.len(), 5 * 2 + 4);
        for s in &all {
            assert!(s.contains(" ON CLUSTER `aihub_c`"), "{s}");
            assert!(!s.contains(" FROM usage_events\n") && !s.ends_with(" FROM usage_events"));
        }
        let events = &all[0];
        assert!(events.starts_with(
            "CREATE TABLE IF NOT EXISTS `aihub`.usage_events_local ON CLUSTER `aihub_c` (\n    request_id UUID,"
        ));
        assert!(events.contains(
            "\n) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/aihub/usage_events_local', '{replica}')\nPARTITION BY toYYYYMM(ts)\nORDER BY (developer_id, ts, request_id)"
        ));
        assert_eq!(
            all[1],
            "CREATE TABLE IF NOT EXISTS `aihub`.usage_events ON CLUSTER `aihub_c` AS \
             `aihub`.usage_events_local ENGINE = Distributed('aihub_c', 'aihub', \
             'usage_events_local', cityHash64(developer_id))"
        );
        assert_eq!(
            all[3],
            "CREATE TABLE IF NOT EXISTS `aihub`.usage_hourly ON CLUSTER `aihub_c` AS \
             `aihub`.usage_hourly_local ENGINE = Distributed('aihub_c', 'aihub', 'usage_hourly_local')"
        );
        let view = &all[4];
        assert!(view.starts_with(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS `aihub`.usage_hourly_mv ON CLUSTER `aihub_c` TO `aihub`.usage_hourly_local AS\nSELECT\n"
        ));
        assert!(
            view.ends_with("\nFROM `aihub`.usage_events_local\nGROUP BY developer_id, model, hour")
        );
        assert!(all[5].contains(
            "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/aihub/usage_daily_live_local', '{replica}')\nPARTITION BY toYYYYMM(day)\nORDER BY (developer_id, day, key_id, model, status)\nSETTINGS index_granularity = 256"
        ));
        assert!(all
            .iter()
            .any(|s| s.contains("ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/aihub/usage_model_daily_live_local'")));
    }

    #[test]
    fn statements_of_another_shape_have_no_cluster_form() {
        let layout = cluster();
        for bad in [
            "CREATE TABLE IF NOT EXISTS t (\n    a UInt8\n) ENGINE = Log",
            "CREATE TABLE t (\n    a UInt8\n) ENGINE = MergeTree ORDER BY a",
            "ALTER TABLE usage_events ADD COLUMN x UInt8",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS v TO t AS\nSELECT a FROM other",
        ] {
            assert!(statements(bad, &layout).is_err(), "{bad}");
        }
        assert!(from_events("SELECT 1\nFROM usage_events_x", &layout).is_err());
        assert!(from_events(
            "SELECT 1\nFROM usage_events\nUNION ALL SELECT 1\nFROM usage_events",
            &layout
        )
        .is_err());
    }

    #[test]
    fn names() {
        let c = cluster();
        assert_eq!(c.on_cluster(), " ON CLUSTER `aihub_c`");
        assert_eq!(c.name("usage_events"), "`aihub`.usage_events");
        assert_eq!(c.stored("usage_events"), "usage_events_local");
        let s = Layout::single("aihub");
        assert_eq!(
            (s.on_cluster(), s.name("t"), s.stored("t")),
            (String::new(), "t".into(), "t".into())
        );
    }
}
