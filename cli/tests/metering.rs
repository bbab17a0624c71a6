//! Black-box tests of metering against real ClickHouse: exact tokens and cost, stream usage
//! injection and stripping, estimates, error records, volume, outages, crashes and replays.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use rust_decimal::Decimal;

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _mock: Mock,
    db: TestDb,
    gw: Gateway,
    key: TestKey,
    _wal: tempfile::TempDir,
}

fn routes() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("gpt-4o", "m", None),
        ("gpt-4o-mini", "m", None),
        ("demo", "m", Some("mock-gpt")),
        ("emb", "m", None),
    ]
}

fn start_with(db: TestDb, wal: tempfile::TempDir, extra: &[&str], server: &[&str]) -> Setup {
    let mock = Mock::start(&[]);
    let key = key("k", &[]);
    let body = format!(
        "{}{}",
        config(
            &[upstream("m", &[mock.base_url()], &[])],
            &routes(),
            &[&key]
        ),
        db.metering_yaml(wal.path(), extra)
    );
    let gw = Gateway::start(&body, server);
    Setup {
        _mock: mock,
        db,
        gw,
        key,
        _wal: wal,
    }
}

fn start(extra: &[&str]) -> Setup {
    start_with(TestDb::new(), tempfile::tempdir().unwrap(), extra, &[])
}

/// USD per token of the seed table (per 1K / 1000).
fn per_token(model: &str) -> Decimal {
    let per_1k = match model {
        "gpt-4o" => "0.015",
        "gpt-4o-mini" => "0.00015",
        _ => "0.001",
    };
    Decimal::from_str(per_1k).unwrap() / Decimal::from(1000)
}

fn nanos(usd: Decimal) -> i128 {
    (usd * Decimal::from(1_000_000_000))
        .round()
        .try_into()
        .unwrap()
}

#[tokio::test]
async fn json_and_streams_are_metered_exactly() {
    let s = start(&[]);
    let (gw, db, k) = (&s.gw, &s.db, &s.key.key);

    // JSON: tokens as the upstream reported them, cost from the seed price.
    let resp = gw.chat(k, &chat("gpt-4o")).await;
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = resp.json().await.unwrap();
    let total = v["usage"]["total_tokens"].as_u64().unwrap();

    // Stream without include_usage: the gateway asks for it and strips it from the client.
    let mut body = chat("demo");
    body["stream"] = true.into();
    let resp = gw.chat(k, &body).await;
    let plain = resp.text().await.unwrap();
    assert!(
        !plain.contains("\"usage\":{"),
        "injected usage chunk leaked: {plain}"
    );
    assert!(!plain.contains("\"choices\":[]"));
    assert!(plain.ends_with("data: [DONE]\n\n"));

    // Stream with include_usage: passed through untouched.
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let resp = gw.chat(k, &body).await;
    let expected_sha = resp.headers()["x-mock-body-sha256"]
        .to_str()
        .unwrap()
        .to_owned();
    let asked = resp.bytes().await.unwrap();
    assert_eq!(sha256_hex(&asked), expected_sha);
    assert!(String::from_utf8_lossy(&asked).contains("\"usage\":{"));

    // Embeddings, an upstream error, a gateway refusal.
    let resp = gw
        .post(k, "/v1/embeddings")
        .json(&serde_json::json!({"model": "emb", "input": ["abcd", "efgh"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = gw
        .post(k, "/v1/chat/completions")
        .header("x-mock-status", "500")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(gw.chat(k, &chat("nope")).await.status(), 404);

    let n = db
        .wait_for("SELECT count() FROM usage_events", 6, WAIT)
        .await;
    assert_eq!(n, 6);
    let row = db
        .query(&format!(
            "SELECT developer_id, key_id, endpoint, method, model, upstream_model, upstream, \
             prompt_tokens, completion_tokens, total_tokens, cost_nanos, status, error_type, streamed, \
             usage_estimated, client_ip FROM usage_events WHERE request_id = toUUID('{request_id}') FORMAT TSV"
        ))
        .await;
    let cost = nanos(per_token("gpt-4o") * Decimal::from(total));
    assert_eq!(
        row.trim(),
        format!("dev_k\tk\tchat/completions\tPOST\tgpt-4o\tgpt-4o\tm\t4\t16\t{total}\t{cost}\t200\t\t0\t0\t127.0.0.1")
    );
    // Both streams: the upstream's own usage (2 + 16 tokens… "Say hello"+"user" = 13 chars → 4).
    let streams = db
        .query("SELECT model, upstream_model, prompt_tokens, completion_tokens, cost_nanos, usage_estimated FROM usage_events WHERE streamed = 1 FORMAT TSV")
        .await;
    let want = format!(
        "demo\tmock-gpt\t4\t16\t{}\t0",
        nanos(per_token("demo") * Decimal::from(20))
    );
    assert_eq!(streams.trim(), format!("{want}\n{want}"));
    let emb = db
        .query("SELECT prompt_tokens, completion_tokens, total_tokens FROM usage_events WHERE endpoint = 'embeddings' FORMAT TSV")
        .await;
    assert_eq!(emb.trim(), "2\t0\t2");
    let errors = db
        .query("SELECT status, error_type, total_tokens, cost_nanos FROM usage_events WHERE status >= 400 ORDER BY status FORMAT TSV")
        .await;
    assert_eq!(
        errors.trim(),
        "404\tmodel_not_found\t0\t0\n500\tupstream_error\t0\t0"
    );
    // The hourly rollup agrees.
    assert_eq!(
        db.wait_for("SELECT sum(requests) FROM usage_hourly", 6, WAIT)
            .await,
        6
    );
    assert_eq!(
        db.number("SELECT sum(cost_nanos) FROM usage_hourly").await,
        db.number("SELECT sum(cost_nanos) FROM usage_events").await
    );
}

#[tokio::test]
async fn client_leaving_mid_stream_leaves_an_estimated_record() {
    let s = start(&[]);
    let mut body = chat("gpt-4o");
    body["stream"] = true.into();
    let resp =
        s.gw.post(&s.key.key, "/v1/chat/completions")
            .header("x-mock-chunks", "40")
            .header("x-mock-chunk-interval-ms", "50")
            .json(&body)
            .send()
            .await
            .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    while got.iter().filter(|&&b| b == b'\n').count() < 10 {
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    drop(stream); // the client goes away after ~5 events
    let n =
        s.db.wait_for("SELECT count() FROM usage_events", 1, WAIT)
            .await;
    assert_eq!(n, 1);
    let row = s
        .db
        .query("SELECT usage_estimated, prompt_tokens, completion_tokens, status, error_type != '' FROM usage_events FORMAT TSV")
        .await;
    let f: Vec<&str> = row.trim().split('\t').collect();
    assert_eq!(f[0], "1", "{row}");
    // "user" and "Say hello" tokenized (o200k_base), plus the chat format's per-message and
    // reply-priming overhead.
    let prompt: u32 = f[1].parse().unwrap();
    assert!(
        (8..=16).contains(&prompt),
        "prompt estimated from the request: {row}"
    );
    let completion: u32 = f[2].parse().unwrap();
    assert!(
        (1..10).contains(&completion),
        "estimate of ~5 short tokens delivered: {row}"
    );
    assert_eq!((f[3], f[4]), ("200", "1"));
    assert_eq!(
        s.gw.metric_eventually("aihub_usage_estimated_total", 1.0),
        1.0
    );
}

#[tokio::test]
async fn ten_thousand_requests_make_ten_thousand_rows_and_the_exact_cost() {
    let s = start(&[]);
    let expected = Arc::new(std::sync::Mutex::new(Decimal::ZERO));
    let models = ["gpt-4o", "gpt-4o-mini", "demo"];
    let mut tasks = Vec::new();
    for w in 0..25usize {
        let (url, key, expected) = (
            s.gw.url("/v1/chat/completions"),
            s.key.key.clone(),
            expected.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0..400usize {
                let model = models[(w + i) % 3];
                let mut body = chat(model);
                body["messages"][0]["content"] = "x".repeat(i % 97).into();
                let v: serde_json::Value = c
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let tokens = v["usage"]["total_tokens"].as_u64().unwrap();
                let cost = per_token(model) * Decimal::from(tokens);
                // Each record's cost is rounded once to nano-USD; sum those.
                let rounded = Decimal::from(nanos(cost) as i64);
                *expected.lock().unwrap() += rounded;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let db = &s.db;
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", 10_000, WAIT)
            .await,
        10_000
    );
    assert_eq!(
        db.number("SELECT uniqExact(request_id) FROM usage_events")
            .await,
        10_000
    );
    // The rollup is written by the materialized view right after the raw rows: wait for it too.
    assert_eq!(
        db.wait_for("SELECT sum(requests) FROM usage_hourly", 10_000, WAIT)
            .await,
        10_000
    );
    let want = *expected.lock().unwrap();
    let got = db.number("SELECT sum(cost_nanos) FROM usage_events").await;
    assert_eq!(Decimal::from(got as i64), want);
    assert_eq!(
        db.number("SELECT sum(cost_nanos) FROM usage_hourly").await,
        got
    );
}

#[tokio::test]
async fn clickhouse_down_for_30_seconds_under_load_loses_and_duplicates_nothing() {
    let ch = PrivateClickHouse::start();
    let s = start_with(
        TestDb::on(&ch.url),
        tempfile::tempdir().unwrap(),
        &["retry_backoff_max: 1s"],
        &[],
    );
    let load = Load::start(&s.gw, &s.key.key, "gpt-4o", 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    ch.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        s.gw.metric("aihub_usage_wal_segments") > 0.0,
        "records should wait on disk"
    );
    ch.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(
        failed, 0,
        "the gateway kept serving while ClickHouse was down"
    );
    let n =
        s.db.wait_for(
            "SELECT count() FROM usage_events",
            ok as i128,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(n, ok as i128, "rows vs successful requests");
    assert_eq!(
        s.db.number("SELECT uniqExact(request_id) FROM usage_events")
            .await,
        ok as i128
    );
    assert!(s.gw.metric("aihub_usage_insert_failures_total{kind=\"transient\"}") > 0.0);
}

#[tokio::test]
async fn kill_9_then_restart_replays_the_wal_without_duplicates() {
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let wal_path = wal.path().to_owned();
    // Batches never close on their own: the records are only in the WAL when the process dies.
    let hold = ["batch_max_age: 1h", "batch_max_rows: 1000000"];
    let s = start_with(db, wal, &hold, &[]);
    // The gateway migrates in the background: the table must exist for the count below.
    assert_eq!(
        s.db.wait_for("SELECT count() FROM usage_events", 0, WAIT)
            .await,
        0
    );
    for _ in 0..300 {
        assert_eq!(s.gw.chat(&s.key.key, &chat("gpt-4o")).await.status(), 200);
    }
    // At once: a response's record is in the WAL before its last byte reached the client.
    signal(s.gw.pid(), "KILL");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.db.number("SELECT count() FROM usage_events").await, 0);
    // The segment is in the process's own folder of the WAL (`<pid>-<ms>-<n>/`).
    let saved: Vec<_> = std::fs::read_dir(&wal_path)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("LOCK").exists())
        .flat_map(|d| {
            std::fs::read_dir(d)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
        })
        .filter(|p| p.extension().is_some_and(|e| e == "open"))
        .collect();
    assert_eq!(saved.len(), 1);
    let copy = std::fs::read(&saved[0]).unwrap();

    // Restart on the same WAL: the segment is replayed.
    let Setup { db, _wal: wal, .. } = s;
    let s = start_with(db, wal, &[], &[]);
    assert_eq!(
        s.db.wait_for("SELECT count() FROM usage_events", 300, WAIT)
            .await,
        300
    );

    assert_eq!(
        s.db.wait_for("SELECT sum(requests) FROM usage_hourly", 300, WAIT)
            .await,
        300
    );
    // As if the process had died after the insert but before deleting the segment: the same
    // batch comes back. Dedup keeps every count and sum unchanged.
    let cost =
        s.db.number("SELECT sum(cost_nanos) FROM usage_hourly")
            .await;
    signal(s.gw.pid(), "KILL");
    // Put back where a version before per-process folders left its segments: adopted too.
    std::fs::write(wal_path.join("00000000000000000001.ready"), &copy).unwrap();
    let Setup { db, _wal: wal, .. } = s;
    let s = start_with(db, wal, &[], &[]);
    let skipped =
        s.gw.metric_eventually("aihub_usage_replay_duplicates_skipped_total", 300.0);
    assert_eq!(skipped, 300.0);
    assert_eq!(s.db.number("SELECT count() FROM usage_events").await, 300);
    assert_eq!(
        s.db.number("SELECT sum(requests) FROM usage_hourly").await,
        300
    );
    assert_eq!(
        s.db.number("SELECT sum(cost_nanos) FROM usage_hourly")
            .await,
        cost
    );
}

#[tokio::test]
async fn refused_batches_go_to_dead_letters() {
    let db = TestDb::new();
    // Schema drift: a `user_agent` column that cannot take our rows, so ClickHouse refuses the
    // data itself (not the connection).
    let _ = shared_sql(&db, &format!("CREATE DATABASE IF NOT EXISTS {}", db.name)).await;
    let ddl = aihub_usage::schema::MIGRATIONS[0]
        .sql
        .replace("user_agent String", "user_agent FixedString(4)");
    assert!(ddl.contains("FixedString"));
    db.query(&ddl).await;
    let wal = tempfile::tempdir().unwrap();
    let dead = wal.path().join("dead");
    let s = start_with(db, wal, &[], &[]);
    assert_eq!(s.gw.chat(&s.key.key, &chat("gpt-4o")).await.status(), 200);
    let rows =
        s.gw.metric_eventually("aihub_usage_dead_lettered_rows_total", 1.0);
    assert_eq!(rows, 1.0);
    let files: Vec<_> = std::fs::read_dir(&dead).unwrap().collect();
    assert_eq!(files.len(), 2, "the segment and its .error");
    assert_eq!(s.gw.metric("aihub_usage_wal_segments"), 0.0);
}

async fn shared_sql(db: &TestDb, sql: &str) -> String {
    client()
        .post(&db.url)
        .body(sql.to_owned())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[test]
fn migrations_run_twice_cleanly() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    write(&path, &db.metering_yaml(&dir.path().join("wal"), &[]));
    let run = || {
        let out = Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(run().contains("applied [1, 2, 3, 4, 5, 6]"));
    assert!(run().contains("applied []"));
}

use std::process::Command;

#[tokio::test]
async fn upstreams_without_stream_options_are_metered_by_estimate() {
    let mock = Mock::start(&[]);
    let k = key("k", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}",
        config(
            &[upstream(
                "m",
                &[mock.base_url()],
                &["inject_stream_usage: false"]
            )],
            &[("gpt-4o", "m", None)],
            &[&k]
        ),
        db.metering_yaml(wal.path(), &[])
    );
    let gw = Gateway::start(&body, &[]);
    let mut req = chat("gpt-4o");
    req["stream"] = true.into();
    let resp = gw.chat(&k.key, &req).await;
    // Nothing injected: the upstream's stream reaches the client byte for byte.
    let expected = resp.headers()["x-mock-body-sha256"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sha256_hex(&resp.bytes().await.unwrap()), expected);
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", 1, WAIT)
            .await,
        1
    );
    let row = db
        .query("SELECT usage_estimated, prompt_tokens > 0, completion_tokens > 0 FROM usage_events FORMAT TSV")
        .await;
    assert_eq!(row.trim(), "1\t1\t1");
}
