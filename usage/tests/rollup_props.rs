//! Property test against a real ClickHouse: for generated usage rows (developers, keys,
//! models, statuses, token counts and costs, times over several days and hours, inserted in
//! several batches), every rollup (`usage_hourly`, `usage_daily`, `usage_developer_daily`,
//! `usage_model_daily`) equals the same sums over the raw rows (`usage_events`), and what
//! billing and the usage pages read (`read::billing::hours`, `read::billing::all_rows`,
//! `read::totals::window` ending at any millisecond) equals the sums over the generated rows
//! computed here. One fresh database; each case uses its own developer ids.

use std::collections::BTreeMap;

use aihub_usage::read::{billing, totals, MS_PER_DAY, MS_PER_HOUR};
use aihub_usage::testing::{usage_row, TestClickHouse};
use aihub_usage::UsageRecord;
use clickhouse::Row;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde::Deserialize;

/// 2026-03-01T00:00:00Z.
const MARCH: i64 = 1_772_323_200_000;

/// One group of a rollup or of the raw rows: its key (the group-by columns as text) and sums.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
struct Group {
    k: String,
    requests: u64,
    errors: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
    total: u64,
    cost: i64,
}

/// A generated row: developer, key, model, offset from `MARCH`, tokens, cost, status.
type Gen = (u8, u8, u8, i64, u32, i64, u16);

fn rows() -> impl Strategy<Value = Vec<Vec<Gen>>> {
    let row = (
        0u8..3,
        0u8..2,
        0u8..3,
        0i64..3 * MS_PER_DAY,
        0u32..2_000_000,
        -1_000i64..50_000_000_000,
        prop::sample::select(vec![200u16, 200, 400, 429, 500]),
    );
    prop::collection::vec(prop::collection::vec(row, 0..40), 1..4)
}

fn record(case: &str, g: &Gen) -> UsageRecord {
    let &(dev, key, model, offset, tokens, cost, status) = g;
    let developer = format!("{case}_d{dev}");
    let mut r = usage_row(
        &developer,
        MARCH + offset,
        &format!("m{model}"),
        tokens,
        cost,
    );
    r.key_id = format!("{developer}_k{key}");
    r.cached_tokens = r.prompt_tokens / 3;
    r.status = status;
    r
}

async fn groups(ch: &TestClickHouse, sql: &str) -> Vec<Group> {
    ch.client()
        .query(sql)
        .fetch_all::<Group>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The sums over `usage_events` grouped by `key`, of the rows `filter` selects (SQL text).
async fn raw(ch: &TestClickHouse, key: &str, filter: &str) -> Vec<Group> {
    groups(
        ch,
        &format!(
            "SELECT {key} AS k, count() AS requests, countIf(status >= 400) AS errors, \
             sum(toUInt64(prompt_tokens)) AS prompt, sum(toUInt64(cached_tokens)) AS cached, \
             sum(toUInt64(completion_tokens)) AS completion, sum(toUInt64(total_tokens)) AS total, \
             sum(cost_nanos) AS cost FROM usage_events WHERE {filter} \
             GROUP BY k ORDER BY k"
        ),
    )
    .await
}

async fn check(ch: &TestClickHouse, batches: Vec<Vec<Gen>>) -> Result<(), TestCaseError> {
    let case = format!("c{}", uuid::Uuid::now_v7().simple());
    let mut all = Vec::new();
    for batch in &batches {
        let records: Vec<UsageRecord> = batch.iter().map(|g| record(&case, g)).collect();
        ch.insert(&records).await;
        all.extend(records);
    }
    let only = format!("developer_id LIKE '{case}%'");

    // usage_hourly: requests, tokens and cost by developer, hour and model.
    let key = "concat(developer_id, '|', toString(toStartOfHour(ts)), '|', model)";
    let mut want = raw(ch, key, &only).await;
    for g in &mut want {
        (g.errors, g.prompt, g.cached, g.completion) = (0, 0, 0, 0);
    }
    let hourly = groups(
        ch,
        &format!(
            "SELECT concat(developer_id, '|', toString(hour), '|', model) AS k, \
             sum(requests) AS requests, toUInt64(0) AS errors, toUInt64(0) AS prompt, \
             toUInt64(0) AS cached, toUInt64(0) AS completion, sum(total_tokens) AS total, \
             sum(cost_nanos) AS cost FROM usage_hourly WHERE {only} GROUP BY k ORDER BY k"
        ),
    )
    .await;
    prop_assert_eq!(&hourly, &want, "usage_hourly");

    // usage_daily: every sum by developer, day, key, model and status.
    let key = "concat(developer_id, '|', toString(toDate(ts)), '|', key_id, '|', model, '|', \
               toString(status))";
    let mut want = raw(ch, key, &only).await;
    for g in &mut want {
        g.errors = 0;
    }
    let daily = groups(
        ch,
        &format!(
            "SELECT concat(developer_id, '|', toString(day), '|', key_id, '|', model, '|', \
             toString(status)) AS k, countMerge(requests) AS requests, toUInt64(0) AS errors, \
             sumMerge(prompt_tokens) AS prompt, sumMerge(cached_tokens) AS cached, \
             sumMerge(completion_tokens) AS completion, sumMerge(total_tokens) AS total, \
             sumMerge(cost_nanos) AS cost FROM usage_daily WHERE {only} GROUP BY k ORDER BY k"
        ),
    )
    .await;
    prop_assert_eq!(&daily, &want, "usage_daily");

    // The platform rollups, by day and developer, and by day and model.
    for (table, key, raw_key) in [
        (
            "usage_developer_daily",
            "concat(toString(day), '|', developer_id)",
            "concat(toString(toDate(ts)), '|', developer_id)",
        ),
        (
            "usage_model_daily",
            "concat(toString(day), '|', model)",
            "concat(toString(toDate(ts)), '|', model)",
        ),
    ] {
        // The model rollup has no developer: both sides are read whole (every case so far, in
        // a database no other test writes).
        let filter = if table == "usage_developer_daily" {
            only.clone()
        } else {
            "1".to_owned()
        };
        let got = groups(
            ch,
            &format!(
                "SELECT {key} AS k, sum(requests) AS requests, sum(errors) AS errors, \
                 sum(prompt_tokens) AS prompt, sum(cached_tokens) AS cached, \
                 sum(completion_tokens) AS completion, sum(total_tokens) AS total, \
                 sum(cost_nanos) AS cost FROM {table} WHERE {filter} GROUP BY k ORDER BY k"
            ),
        )
        .await;
        let want = raw(ch, raw_key, &filter).await;
        prop_assert_eq!(&got, &want, "{}", table);
    }

    // What billing reads: the hourly groups and every raw row.
    let client = ch.client();
    let (from, to) = (MARCH, MARCH + 4 * MS_PER_DAY);
    let mut cursor = billing::hours(&client, from, to, None).unwrap();
    let mut by_dev_hours: BTreeMap<String, (u64, u64, i64)> = BTreeMap::new();
    while let Some(h) = cursor.next().await.unwrap() {
        if h.developer_id.starts_with(&format!("{case}_")) {
            let e = by_dev_hours.entry(h.developer_id).or_default();
            (e.0, e.1, e.2) = (e.0 + h.requests, e.1 + h.tokens, e.2 + h.cost_nanos);
        }
    }
    let mut by_dev: BTreeMap<String, (u64, u64, i64)> = BTreeMap::new();
    for r in &all {
        let e = by_dev.entry(r.developer_id.clone()).or_default();
        (e.0, e.1, e.2) = (e.0 + 1, e.1 + u64::from(r.total_tokens), e.2 + r.cost_nanos);
    }
    prop_assert_eq!(&by_dev_hours, &by_dev, "billing::hours");
    let mut cursor = billing::all_rows(&client, from, to, None).unwrap();
    let mut raw_rows = 0;
    while let Some(r) = cursor.next().await.unwrap() {
        raw_rows += usize::from(r.developer_id.starts_with(&format!("{case}_")));
    }
    prop_assert_eq!(raw_rows, all.len(), "billing::all_rows");

    // A window from the first hour to any millisecond: hourly rollup plus the last hour's raw
    // rows, equal to the generated rows before that millisecond.
    for end in [MARCH + 37 * MS_PER_HOUR + 1_234_567, MARCH + MS_PER_DAY, to] {
        let got = totals::window(&client, MARCH, end, None).await.unwrap();
        let got: BTreeMap<String, (u64, u64, i64)> = got
            .into_iter()
            .filter(|t| t.developer_id.starts_with(&format!("{case}_")))
            .map(|t| (t.developer_id, (t.requests, t.tokens, t.cost_nanos)))
            .collect();
        let mut want: BTreeMap<String, (u64, u64, i64)> = BTreeMap::new();
        for r in all.iter().filter(|r| (r.ts_ms as i64) < end) {
            let e = want.entry(r.developer_id.clone()).or_default();
            (e.0, e.1, e.2) = (e.0 + 1, e.1 + u64::from(r.total_tokens), e.2 + r.cost_nanos);
        }
        prop_assert_eq!(&got, &want, "totals::window to {}", end);
    }
    Ok(())
}

#[test]
fn rollups_and_billing_reads_equal_the_raw_row_sums() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each case's rows are in their own developers; the model rollup is compared whole, so the
    // database is fresh for this test alone.
    let ch = rt.block_on(TestClickHouse::new());
    let mut runner = TestRunner::new(Config {
        cases: 16,
        // A shrinking step costs a few queries: a failure still shrinks, within bounds.
        max_shrink_iters: 64,
        ..Config::default()
    });
    let result = runner.run(&rows(), |batches| rt.block_on(check(&ch, batches)));
    if let Err(e) = result {
        panic!("{e}");
    }
}
