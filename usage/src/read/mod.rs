//! The read side of the usage schema: every query any crate runs against the ClickHouse usage
//! tables lives here, next to the migrations that create them ([`crate::schema`]). The admin
//! API (usage reports, analytics, export, portal pages), billing (ledger sources,
//! reconciliation) and the gateway (the quota seed) call these functions and shape the rows;
//! none of them writes SQL against the usage tables.
//!
//! # Which table answers what
//! - A developer's usage over a window of time (quota seed, billing totals): [`totals::window`],
//!   the one definition: `usage_hourly` for the window's whole hours, `usage_events` for the
//!   hour it ends in. Over whole UTC days the daily figures ([`daily`]) hold the same sums, as
//!   both rollups are filled from the same inserts (tested in `usage/tests/read.rs`).
//! - Reports, overviews, costs, performance, daily series and charts over whole UTC days:
//!   `usage_daily` ([`daily`]); hourly series: `usage_hourly` ([`daily::hourly_series`]).
//! - The operator's platform view: `usage_developer_daily` and `usage_model_daily`
//!   ([`platform`]).
//! - Raw rows (CSV export, recent errors): `usage_events` ([`events`]).
//! - Billing's ledger sources and reconciliation: [`billing`].
//!
//! Values that are not ours (developer and key ids) are bound (`?`) or quoted with [`quote`];
//! dates and numbers are formatted here.
//!
//! # Layout
//! - [`totals`]: usage per developer over a window; the hourly rollup's and the raw rows'
//!   totals.
//! - [`daily`]: figures from `usage_daily` (report, comparison, costs, latencies and statuses,
//!   daily series, tokens per day and model) and the hourly series.
//! - [`platform`]: every developer's and every model's totals over days.
//! - [`events`]: raw rows: the export cursor, recent errors.
//! - [`billing`]: hourly groups, raw rows of chosen hours, every raw row of a period.

pub mod billing;
pub mod daily;
pub mod events;
pub mod platform;
pub mod totals;

use aihub_plans::period::civil_from_days;

pub const MS_PER_HOUR: i64 = 3_600_000;
pub const MS_PER_DAY: i64 = 86_400_000;

/// Whole UTC days `first..=last` (days since 1970-01-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days {
    pub first: i64,
    pub last: i64,
}

impl Days {
    /// The `WHERE` condition on a `day` column.
    fn condition(&self) -> String {
        format!(
            "day >= toDate('{}') AND day <= toDate('{}')",
            date_string(self.first),
            date_string(self.last)
        )
    }

    /// The condition on a developer's rows of a daily table (the developer bound as the next
    /// `?`).
    fn of_developer(&self) -> String {
        format!("developer_id = ? AND {}", self.condition())
    }
}

/// Days since 1970-01-01 → `YYYY-MM-DD`.
pub fn date_string(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix ms → `YYYY-MM-DD HH:MM:SS`, ClickHouse `DateTime` text (the server runs in UTC).
pub fn datetime_sql(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02}",
        date_string(secs.div_euclid(86_400)),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A ClickHouse string literal, inside a query template of the clickhouse crate (which reads
/// `?` as a bind placeholder, `??` as a literal `?`).
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        match c {
            '\'' | '\\' => q.push('\\'),
            '?' => q.push('?'),
            _ => {}
        }
        q.push(c);
    }
    q.push('\'');
    q
}

/// `AND developer_id = '…'`, or nothing for every developer.
fn developer_filter(only: Option<&str>) -> String {
    only.map(|d| format!("AND developer_id = {}", quote(d)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote("dev_a"), "'dev_a'");
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(quote("dev?x"), "'dev??x'");
    }

    #[test]
    fn literals() {
        assert_eq!(date_string(0), "1970-01-01");
        assert_eq!(datetime_sql(1_795_608_000_000), "2026-11-25 12:00:00");
        let d = Days { first: 0, last: 1 };
        assert_eq!(
            d.condition(),
            "day >= toDate('1970-01-01') AND day <= toDate('1970-01-02')"
        );
    }
}
