//! Usage pipeline throughput, alone: synthetic records → channel → WAL → ClickHouse.
//!
//! `cargo run --release -p aihub-benches --bin pipeline-bench [RECORDS]` (default 1,000,000)
//! against `AIHUB_BENCH_CLICKHOUSE_URL` (default `http://127.0.0.1:8123`), in a scratch database
//! dropped at the end; `BATCH_ROWS` overrides `metering.batch_max_rows` (default 50,000). Phase 1 measures records/s until every row is confirmed in ClickHouse.
//! Phase 2 points the pipeline at a closed port (ClickHouse down) and shows that memory stays
//! flat while records pile up on disk.

use std::time::{Duration, Instant};

use aihub_usage::pipeline::{self, PipelineConfig, PipelineMetrics};
use aihub_usage::sink::ClickHouseConfig;
use aihub_usage::UsageRecord;

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn record(i: u64) -> UsageRecord {
    let now_ms = 1_795_000_000_000 + i;
    UsageRecord {
        request_id: uuid::Uuid::now_v7(),
        ts: (now_ms / 1000) as u32,
        ts_ms: now_ms,
        developer_id: format!("dev_{:05}", i % 10_000),
        key_id: format!("key_{:06}", i % 30_000),
        endpoint: "chat/completions".into(),
        method: "POST".into(),
        model: ["gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"][(i % 3) as usize].into(),
        upstream_model: "gpt-4o".into(),
        upstream: "openai".into(),
        upstream_endpoint: "https://api.openai.com/v1".into(),
        prompt_tokens: (i % 900) as u32,
        cached_tokens: 0,
        completion_tokens: (i % 300) as u32,
        total_tokens: (i % 900 + i % 300) as u32,
        cost_nanos: (i % 1200) as i64 * 15_000,
        gateway_overhead_us: 40,
        upstream_latency_ms: 350,
        total_latency_ms: 420,
        status: 200,
        error_type: String::new(),
        streamed: (i % 2) as u8,
        usage_estimated: 0,
        client_ip: "203.0.113.7".into(),
        user_agent: "OpenAI/Python 1.54.0".into(),
        batch_id: String::new(),
        attempts: 1,
    }
}

/// The pipeline's defaults, except a WAL cap large enough for phase 2; `BATCH_ROWS` overrides
/// the batch size.
fn config(url: &str, database: &str, wal: &std::path::Path) -> PipelineConfig {
    let mut c = serde_json::json!({
        "clickhouse": {"url": url, "database": database},
        "wal_dir": wal,
        "wal_max_bytes": 64u64 << 30,
    });
    if let Some(rows) = std::env::var("BATCH_ROWS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        c["batch_max_rows"] = rows.into();
    }
    serde_json::from_value::<PipelineConfig>(c).expect("valid config")
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let url = std::env::var("AIHUB_BENCH_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    let database = format!("aihub_bench_{}", std::process::id());
    let wal = tempfile::tempdir().unwrap();
    let ch = ClickHouseConfig {
        url: url.clone(),
        database: database.clone(),
        ..ClickHouseConfig::default()
    };
    aihub_usage::schema::migrate(&ch)
        .await
        .expect("ClickHouse reachable");

    // Phase 1: throughput to a live ClickHouse.
    let registry = prometheus::Registry::new();
    let metrics = PipelineMetrics::new(&registry);
    let (sink, pipe) =
        pipeline::open(config(&url, &database, wal.path()), metrics.clone()).unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(pipe.run(stop_rx));
    let started = Instant::now();
    for i in 0..n {
        sink.commit(record(i)).await;
    }
    let produced = started.elapsed();
    while metrics.rows_written.get() < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    let count = ch
        .client()
        .query("SELECT count() FROM usage_events")
        .fetch_one::<u64>()
        .await
        .unwrap();
    println!(
        "phase 1: {n} records produced in {:.2} s, all {count} confirmed in ClickHouse after {:.2} s: {:.0} records/s end to end; {} inserts, {:.1} ms each on average; RSS {} MiB",
        produced.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        metrics.insert_latency.get_sample_count(),
        metrics.insert_latency.get_sample_sum() * 1e3 / metrics.insert_latency.get_sample_count().max(1) as f64,
        rss_mib()
    );
    assert_eq!(count, n);
    drop(sink);

    // Phase 2: ClickHouse down (nothing listens on port 9).
    let wal2 = tempfile::tempdir().unwrap();
    let metrics2 = PipelineMetrics::new(&prometheus::Registry::new());
    let (sink, pipe) = pipeline::open(
        config("http://127.0.0.1:9", &database, wal2.path()),
        metrics2.clone(),
    )
    .unwrap();
    let (_stop_tx2, stop_rx2) = tokio::sync::watch::channel(false);
    tokio::spawn(pipe.run(stop_rx2));
    let before = rss_mib();
    let started = Instant::now();
    for i in 0..n {
        sink.commit(record(i)).await;
        if i % (n / 4).max(1) == 0 {
            println!(
                "phase 2: {i} records queued while ClickHouse is down: RSS {} MiB, WAL {} MiB",
                rss_mib(),
                metrics2.wal_bytes.get() >> 20
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "phase 2: {n} records in {:.2} s with ClickHouse down: RSS {} MiB (was {before} MiB), WAL {} MiB in {} segments",
        started.elapsed().as_secs_f64(),
        rss_mib(),
        metrics2.wal_bytes.get() >> 20,
        metrics2.wal_segments.get()
    );
    let _ = ch
        .client_without_database()
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await;
}
