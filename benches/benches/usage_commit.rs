//! The request path's usage write: `UsageSink::commit` (a record into the WAL before the
//! response's last byte, by group commit).
//!
//! `cargo bench -p aihub-benches --bench usage_commit` measures the cost per record: committed
//! alone from one thread (`commit_now`: a `write` each), from 4 threads at once, and as the
//! gateway does, from 64 concurrent tasks on one runtime thread (`commit`, which yields once so
//! that the records of a scheduler round share one `write`), with the
//! pipeline running (its writer closes and `fsync`s segments every second) and ClickHouse
//! unreachable, so that no insert competes for the CPU: records stay in the WAL, a temporary
//! folder removed at the end (a few hundred MB).

use std::time::{Duration, Instant};

use aihub_usage::pipeline::{self, PipelineConfig, PipelineMetrics};
use aihub_usage::UsageRecord;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn record(n: u64) -> UsageRecord {
    UsageRecord {
        request_id: uuid::Uuid::now_v7(),
        ts: 1_700_000_000,
        ts_ms: 1_700_000_000_000 + n,
        developer_id: "dev_0123456789abcdef".into(),
        key_id: "key_0123456789abcdef".into(),
        endpoint: "chat/completions".into(),
        method: "POST".into(),
        model: "gpt-4o-mini".into(),
        upstream_model: "gpt-4o-mini".into(),
        upstream: "openai".into(),
        upstream_endpoint: "https://api.openai.com/v1".into(),
        prompt_tokens: 120,
        cached_tokens: 0,
        completion_tokens: 80,
        total_tokens: 200,
        cost_nanos: 66_000,
        gateway_overhead_us: 45,
        upstream_latency_ms: 350,
        total_latency_ms: 420,
        status: 200,
        error_type: String::new(),
        streamed: 1,
        usage_estimated: 0,
        client_ip: "203.0.113.7".into(),
        user_agent: "OpenAI/Python 2.8.1".into(),
        batch_id: String::new(),
        attempts: 1,
    }
}

fn config(wal: &std::path::Path) -> PipelineConfig {
    serde_json::from_value(serde_json::json!({
        "clickhouse": {"url": "http://127.0.0.1:9", "database": "bench"},
        "wal_dir": wal,
        "wal_max_bytes": 1u64 << 40,
        "retry_backoff_max": "10s",
    }))
    .expect("valid pipeline config")
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let wal = tempfile::tempdir().unwrap();
    let metrics = PipelineMetrics::new(&prometheus::Registry::new());
    let (sink, pipeline) = rt
        .block_on(async { pipeline::open(config(wal.path()), metrics) })
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = rt.spawn(pipeline.run(stopped));

    let mut group = c.benchmark_group("usage_commit");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("1 thread", |b| {
        let mut n = 0;
        b.iter_custom(|iters| {
            let records: Vec<_> = (0..iters)
                .map(|_| {
                    n += 1;
                    record(n)
                })
                .collect();
            let started = Instant::now();
            for r in records {
                sink.commit_now(r);
            }
            started.elapsed()
        })
    });
    // 4 threads commit at once (on 2 cores here); the time reported is wall time per record,
    // the WAL's throughput with 4 committers: below the single thread's cost when records
    // share system calls and cores.
    group.bench_function("4 threads", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(4);
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let sink = sink.clone();
                    let records: Vec<_> = (0..per).map(|i| record(t * per + i)).collect();
                    std::thread::spawn(move || {
                        let started = Instant::now();
                        for r in records {
                            sink.commit_now(r);
                        }
                        started.elapsed()
                    })
                })
                .collect();
            // The slowest thread's time: the wall time of the whole round.
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .max()
                .unwrap_or_default()
        })
    });
    // 64 requests on one worker thread (the gateway's `threads: 1`), each committing in turn:
    // the time is per record.
    let one = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    group.bench_function("64 tasks on one thread", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(64);
            let batches: Vec<Vec<_>> = (0..64)
                .map(|t| (0..per).map(|i| record(t * per + i)).collect())
                .collect();
            one.block_on(async {
                let started = Instant::now();
                let tasks: Vec<_> = batches
                    .into_iter()
                    .map(|records| {
                        let sink = sink.clone();
                        tokio::spawn(async move {
                            for r in records {
                                sink.commit(r).await;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                started.elapsed().mul_f64(iters as f64 / (per * 64) as f64)
            })
        })
    });
    group.finish();
    let _ = stop.send(true);
    drop(sink);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    });
}

criterion_group!(benches, commit);
criterion_main!(benches);
