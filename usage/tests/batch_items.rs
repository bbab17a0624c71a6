//! Batch items against a real ClickHouse (a fresh database per test): `batch_id` (migration 5)
//! reads '' for rows of older binaries, and an item answered twice (a worker takeover sends it
//! again, with the same request id) is one row, whether the second answer comes in the same
//! insert, in a later one, or through the pipeline; refused attempts never hide the answer.

use std::time::{Duration, Instant};

use aihub_usage::pipeline::{self, PipelineConfig, PipelineMetrics};
use aihub_usage::sink;
use aihub_usage::testing::{usage_row, TestClickHouse};
use aihub_usage::UsageRecord;

/// 2026-03-02T10:00:00Z.
const T0: i64 = 1_772_445_600_000;

/// An answered attempt of item `line` of `batch`, started at `ts_ms`.
fn item(batch: &str, line: u64, ts_ms: i64, status: u16) -> UsageRecord {
    let tokens = if status < 400 { 30 } else { 0 };
    UsageRecord {
        request_id: uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{batch}/{line}").as_bytes(),
        ),
        batch_id: batch.into(),
        status,
        ..usage_row("dev_a", ts_ms, "gpt-4o", tokens, i64::from(tokens) * 7)
    }
}

async fn count(ch: &TestClickHouse, filter: &str) -> u64 {
    ch.client()
        .query(&format!("SELECT count() FROM usage_events WHERE {filter}"))
        .fetch_one()
        .await
        .unwrap()
}

/// What the pipeline's sender does before an insert (without the replay step).
async fn insert_deduplicated(ch: &TestClickHouse, mut rows: Vec<UsageRecord>) -> usize {
    let dropped = sink::drop_batch_duplicates(&ch.client(), &mut rows)
        .await
        .unwrap();
    ch.insert(&rows).await;
    dropped
}

#[tokio::test]
async fn an_item_answered_twice_is_one_row() {
    let ch = TestClickHouse::new().await;
    let live = usage_row("dev_a", T0, "gpt-4o", 10, 70);
    let refused = item("batch_1", 1, T0, 429);
    let answer = item("batch_1", 1, T0 + 5_000, 200);
    let other = item("batch_1", 2, T0 + 6_000, 200);
    // A refused attempt, then the answer, then the answer again in the same insert.
    let dropped = insert_deduplicated(
        &ch,
        vec![
            live.clone(),
            refused.clone(),
            answer.clone(),
            other.clone(),
            answer.clone(),
        ],
    )
    .await;
    assert_eq!(dropped, 1);
    // Sent again later (a worker takeover): a later insert, another node, another start time.
    let again = item("batch_1", 1, T0 + 60_000, 200);
    let refused_again = item("batch_1", 2, T0 + 61_000, 429);
    let dropped = insert_deduplicated(
        &ch,
        vec![
            again,
            refused_again,
            usage_row("dev_a", T0 + 62_000, "gpt-4o", 1, 1),
        ],
    )
    .await;
    assert_eq!(dropped, 1);

    let id = answer.request_id;
    assert_eq!(
        count(
            &ch,
            &format!("request_id = toUUID('{id}') AND status = 200")
        )
        .await,
        1
    );
    // The refusals stay (zero tokens): they were real requests.
    assert_eq!(count(&ch, "batch_id = 'batch_1' AND status = 429").await, 2);
    assert_eq!(count(&ch, "batch_id = 'batch_1' AND status = 200").await, 2);
    assert_eq!(count(&ch, "batch_id = ''").await, 2);
    let cost: i64 = ch
        .client()
        .query("SELECT sum(cost_nanos) FROM usage_events WHERE batch_id = 'batch_1'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(cost, 2 * 30 * 7);
}

#[tokio::test]
async fn inserts_without_batch_items_make_no_query() {
    // Nothing listens on this port: any query would fail.
    let nowhere = aihub_usage::sink::ClickHouseConfig {
        url: "http://127.0.0.1:9".into(),
        ..Default::default()
    }
    .client();
    let mut rows = vec![
        usage_row("dev_a", T0, "gpt-4o", 10, 70),
        // A refused batch attempt is not an answer: no query for it either.
        item("batch_1", 1, T0, 429),
    ];
    assert_eq!(
        sink::drop_batch_duplicates(&nowhere, &mut rows)
            .await
            .unwrap(),
        0
    );
    assert_eq!(rows.len(), 2);
    rows.push(item("batch_1", 1, T0, 200));
    assert!(sink::drop_batch_duplicates(&nowhere, &mut rows)
        .await
        .is_err());
}

#[tokio::test]
async fn replays_skip_what_landed_without_hiding_a_later_answer() {
    let ch = TestClickHouse::new().await;
    let refused = item("batch_r", 1, T0, 429);
    ch.insert(std::slice::from_ref(&refused)).await;
    // A replayed segment holding the refusal (landed) and the item's answer (did not land):
    // the replay check matches request id and start time, so the answer is kept.
    let answer = item("batch_r", 1, T0 + 300, 200);
    let mut rows = vec![refused, answer];
    assert_eq!(
        sink::drop_present(&ch.client(), &mut rows).await.unwrap(),
        1
    );
    assert_eq!(rows.len(), 1);
    insert_deduplicated(&ch, rows).await;
    assert_eq!(count(&ch, "batch_id = 'batch_r' AND status = 200").await, 1);
}

#[tokio::test]
async fn batch_id_is_empty_for_rows_of_older_binaries_and_migration_5_repeats() {
    let ch = TestClickHouse::new().await;
    // An insert naming only the columns older binaries know.
    ch.execute(
        "INSERT INTO usage_events (request_id, ts, ts_ms, developer_id, status) \
         VALUES (toUUID('00000000-0000-4000-8000-000000000001'), toDateTime(1772445600), 1772445600000, 'dev_old', 200)",
    )
    .await;
    assert_eq!(
        count(
            &ch,
            "developer_id = 'dev_old' AND batch_id = '' AND attempts = 1"
        )
        .await,
        1,
        "older rows read no batch and one attempt"
    );
    // Adding the column again (another node, an interrupted migration) is a no-op.
    let db = ch.client();
    aihub_usage::schema::add_column(&db, "usage_events", "batch_id", "String DEFAULT ''")
        .await
        .unwrap();
    let report = aihub_usage::schema::migrate(&ch.config).await.unwrap();
    assert!(report.applied.is_empty());
    let versions: Vec<u32> = db
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    let latest = aihub_usage::schema::MIGRATIONS.last().map(|m| m.version);
    assert_eq!(versions.last().copied(), latest);
}

#[tokio::test]
async fn the_pipeline_writes_one_row_per_answered_item() {
    let ch = TestClickHouse::new().await;
    let wal = tempfile::tempdir().unwrap();
    let config: PipelineConfig = serde_json::from_value(serde_json::json!({
        "clickhouse": {"url": ch.config.url, "database": ch.config.database},
        "wal_dir": wal.path(),
        "batch_max_age": "100ms",
        "flush_interval": "10ms",
    }))
    .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = PipelineMetrics::new(&registry);
    let skipped = metrics.batch_duplicates_skipped.clone();
    let (sink, pipeline) = pipeline::open(config, metrics).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pipeline.run(stopped));

    // Two answers of the same item in one segment, a third in a later segment.
    sink.commit(item("batch_p", 7, T0, 200)).await;
    sink.commit(item("batch_p", 7, T0 + 10, 200)).await;
    sink.commit(usage_row("dev_a", T0 + 20, "gpt-4o", 5, 5))
        .await;
    wait_for(&ch, "batch_id = 'batch_p'", 1).await;
    sink.commit(item("batch_p", 7, T0 + 30_000, 200)).await;
    sink.commit(item("batch_p", 8, T0 + 30_001, 200)).await;
    wait_for(&ch, "batch_id = 'batch_p'", 2).await;
    assert_eq!(count(&ch, "batch_id = ''").await, 1);
    // Counted once the insert has returned, which may be just after the rows are visible.
    for _ in 0..100 {
        if skipped.get() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(skipped.get(), 2);

    drop(sink);
    let _ = stop.send(true);
    run.await.unwrap();
}

async fn wait_for(ch: &TestClickHouse, filter: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = count(ch, filter).await;
        if got == n {
            return;
        }
        assert!(got < n && Instant::now() < deadline, "{filter}: {got} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
