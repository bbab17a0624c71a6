//! Usage over real HTTP with a real store (SQLite and PostgreSQL) and a real ClickHouse: the
//! usage report and per-key usage against independent `Decimal` sums over the inserted records,
//! range validation, isolation (every usage and analytics endpoint with another developer's id
//! and key), the CSV export row by row and a million rows in flat memory, 503 without
//! ClickHouse, and the rollups' migrations (3: `usage_daily`; 4: `usage_developer_daily` and
//! `usage_model_daily`): backfill of existing rows, re-runs, interrupted and concurrent runs.

mod common;
mod usage_data;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aihub_store::now_ms;
use aihub_store::testing::{Backend, BACKENDS};
use aihub_usage::testing::TestClickHouse;
use aihub_usage::UsageRecord;
use common::{error_of, TestApi, ADMIN_EMAIL, PASSWORD};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use usage_data::{day_of, fixture, me, new_key, periods, records, Sums, DAY};

/// The export's header line: its columns, in order (docs/analytics.md).
const EXPORT_HEADER: &str = "request_id,timestamp,key_id,endpoint,model,status,error_type,\
streamed,usage_estimated,prompt_tokens,cached_tokens,completion_tokens,total_tokens,cost_usd,\
total_latency_ms,upstream_latency_ms,gateway_overhead_us,client_ip,user_agent\r\n";

/// The million-row export measures the whole process's memory: it runs alone.
static MEMORY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Asserts a usage report against the records it covers.
fn assert_report(report: &Value, rows: &[&UsageRecord], what: &str) {
    Sums::of(rows.iter().copied()).assert_usage(&report["totals"], what);
    let group = |key: &dyn Fn(&UsageRecord) -> String| {
        let mut m: BTreeMap<String, Vec<&UsageRecord>> = BTreeMap::new();
        for r in rows {
            m.entry(key(r)).or_default().push(r);
        }
        m
    };
    for (list, field, key) in [
        (
            "by_model",
            "model",
            &(|r: &UsageRecord| r.model.clone()) as &dyn Fn(&UsageRecord) -> String,
        ),
        ("by_key", "key_id", &|r: &UsageRecord| r.key_id.clone()),
        ("by_day", "date", &|r: &UsageRecord| day_of(r.ts_ms as i64)),
    ] {
        let expected = group(key);
        let got = report[list].as_array().unwrap();
        assert_eq!(got.len(), expected.len(), "{what}: {list} in {report}");
        for entry in got {
            let name = entry[field].as_str().unwrap();
            Sums::of(expected[name].iter().copied())
                .assert_usage(entry, &format!("{what} {list} {name}"));
        }
        if list != "by_day" {
            let costs: Vec<Decimal> = got
                .iter()
                .map(|e| e["cost_usd"].as_str().unwrap().parse().unwrap())
                .collect();
            assert!(
                costs.windows(2).all(|w| w[0] >= w[1]),
                "{what}: {list} by cost"
            );
        }
    }
    let days: Vec<&str> = report["by_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["date"].as_str().unwrap())
        .collect();
    assert!(
        days.windows(2).all(|w| w[0] < w[1]),
        "{what}: days in order"
    );
}

#[tokio::test]
async fn usage_report_matches_independent_sums() {
    let _shared = MEMORY.read().await;
    for backend in BACKENDS {
        let f = fixture(backend).await;
        let api = &f.api;
        let now = now_ms();
        let (prev, cur) = periods(now);
        let in_period = |p: aihub_plans::Period| -> Vec<&UsageRecord> {
            f.ada_rows
                .iter()
                .filter(|r| (p.start_ms()..p.end_ms()).contains(&(r.ts_ms as i64)))
                .collect()
        };

        let (s, report) = api
            .call(
                "GET",
                &format!("/developer/usage?period={prev}"),
                Some(&f.ada),
                None,
            )
            .await;
        assert_eq!(s, 200, "{report}");
        assert_eq!(report["developer_id"], f.ada_id.as_str());
        assert_eq!(report["period"], prev.to_string());
        assert_eq!(report["from"], day_of(prev.start_ms()));
        assert_eq!(report["to"], day_of(prev.end_ms() - 1));
        assert!(report.get("key_id").is_none());
        assert_report(&report, &in_period(prev), "previous period");
        // Key names, revoked keys included.
        let names: BTreeSet<&str> = report["by_key"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key_name"].as_str().unwrap())
            .collect();
        assert_eq!(names, BTreeSet::from(["prod", "staging", "old"]));

        // The default is the current period.
        let (s, report) = api
            .call("GET", "/developer/usage", Some(&f.ada), None)
            .await;
        assert_eq!(s, 200);
        assert_eq!(report["period"], cur.to_string());
        assert_report(&report, &in_period(cur), "current period");

        // A from/to range across both periods (inclusive days).
        let (from, to) = (day_of(prev.start_ms() + 9 * DAY), day_of(now));
        let (s, report) = api
            .call(
                "GET",
                &format!("/developer/usage?from={from}&to={to}"),
                Some(&f.ada),
                None,
            )
            .await;
        assert_eq!(s, 200, "{report}");
        assert!(report["period"].is_null());
        let rows: Vec<&UsageRecord> = f
            .ada_rows
            .iter()
            .filter(|r| r.ts_ms as i64 >= prev.start_ms() + 9 * DAY)
            .collect();
        assert_report(&report, &rows, "range");

        // One key, for the developer and for an operator.
        let key = &f.ada_keys[0];
        let rows: Vec<&UsageRecord> = in_period(prev)
            .into_iter()
            .filter(|r| &r.key_id == key)
            .collect();
        let path = format!("/developer/keys/{key}/usage?period={prev}");
        let (s, report) = api.call("GET", &path, Some(&f.ada), None).await;
        assert_eq!(s, 200, "{report}");
        assert_eq!(report["key_id"], key.as_str());
        assert_report(&report, &rows, "one key");
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let (s, by_op) = api.call("GET", &path, Some(&op), None).await;
        assert_eq!(s, 200);
        assert_eq!(by_op, report);
        let (s, by_op) = api
            .call(
                "GET",
                &format!("{path}&developer_id={}", f.ada_id),
                Some(&op),
                None,
            )
            .await;
        assert_eq!((s, &by_op), (200, &report));

        // The export of one key, by its owner and by an operator naming the key alone.
        let export = |token: String, path: String| async move {
            let resp = api
                .http
                .get(api.url(&path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            resp.text().await.unwrap()
        };
        let path = format!("/developer/usage/export?period={prev}&key_id={key}");
        let own = export(f.ada.clone(), path.clone()).await;
        assert_eq!(own.matches("\r\n").count(), rows.len() + 1);
        assert_eq!(export(op.clone(), path).await, own);

        // An operator reads anyone's usage; the data is theirs.
        let (s, report) = api
            .call(
                "GET",
                &format!("/developer/usage?period={prev}&developer_id={}", f.ada_id),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(report["developer_id"], f.ada_id.as_str());
        assert_report(&report, &in_period(prev), "operator");

        // A period without usage.
        let (s, report) = api
            .call("GET", "/developer/usage?period=2001-01", Some(&f.ada), None)
            .await;
        assert_eq!(s, 200);
        Sums::default().assert_usage(&report["totals"], "empty");
        assert_eq!(report["by_model"], json!([]));
        assert_eq!(report["totals"]["cost_usd"], "0.00");
    }
}

#[tokio::test]
async fn nobody_reads_anothers_usage() {
    let _shared = MEMORY.read().await;
    for backend in BACKENDS {
        let f = fixture(backend).await;
        let api = &f.api;
        let ada_key = &f.ada_keys[0];
        let endpoints = [
            "/developer/usage",
            "/developer/usage/export",
            "/developer/analytics/overview",
            "/developer/analytics/trends",
            "/developer/analytics/costs",
            "/developer/analytics/performance",
        ];
        for path in endpoints {
            // Another developer's id, or an unknown one: the same 404.
            for id in [f.ada_id.as_str(), "dev_nobody"] {
                let (s, b) = api
                    .call(
                        "GET",
                        &format!("{path}?developer_id={id}"),
                        Some(&f.bob),
                        None,
                    )
                    .await;
                assert_eq!(s, 404, "{path} {id}: {b}");
                assert_eq!(error_of(&b).1, "not_found");
            }
            // Their own id works.
            let (s, b) = api
                .call(
                    "GET",
                    &format!("{path}?developer_id={}", f.bob_id),
                    Some(&f.bob),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{path}: {b}");
        }
        // Another developer's key, by path and by filter.
        for path in [
            format!("/developer/keys/{ada_key}/usage"),
            format!("/developer/keys/{ada_key}/usage?developer_id={}", f.bob_id),
            format!("/developer/keys/{ada_key}/usage?developer_id={}", f.ada_id),
            format!("/developer/usage/export?key_id={ada_key}"),
            "/developer/keys/key_nothing/usage".to_owned(),
        ] {
            let (s, b) = api.call("GET", &path, Some(&f.bob), None).await;
            assert_eq!(s, 404, "{path}: {b}");
        }
        // A key of one developer named with another developer, by an operator: 404 too.
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let (s, _) = api
            .call(
                "GET",
                &format!(
                    "/developer/keys/{}/usage?developer_id={}",
                    f.bob_key, f.ada_id
                ),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(s, 404);
        // Bob's own figures never include Ada's rows.
        let (_, mine) = api
            .call(
                "GET",
                "/developer/usage?from=2000-01-01&to=2000-12-31",
                Some(&f.bob),
                None,
            )
            .await;
        assert_eq!(mine["totals"]["requests"], 0);
        let (_, mine) = api
            .call("GET", "/developer/analytics/costs", Some(&f.bob), None)
            .await;
        assert!(mine["by_key"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["key_id"] == f.bob_key.as_str()));
        // Operators read anyone's; unknown developers are 404 for them too.
        for path in endpoints {
            let (s, b) = api
                .call(
                    "GET",
                    &format!("{path}?developer_id={}", f.ada_id),
                    Some(&op),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{path}: {b}");
            if !path.ends_with("export") {
                assert_eq!(b["developer_id"], f.ada_id.as_str(), "{path}");
            }
            let (s, _) = api
                .call(
                    "GET",
                    &format!("{path}?developer_id=dev_nobody"),
                    Some(&op),
                    None,
                )
                .await;
            assert_eq!(s, 404, "{path}");
        }
        // The platform view is for operators only; signing in is needed everywhere.
        let (s, b) = api
            .call("GET", "/admin/analytics/overview", Some(&f.ada), None)
            .await;
        assert_eq!((s, error_of(&b).1.as_str()), (403, "operator_only"));
        for path in endpoints.iter().chain(&["/admin/analytics/overview"]) {
            let (s, _) = api.call("GET", path, None, None).await;
            assert_eq!(s, 401, "{path}");
        }
    }
}

#[tokio::test]
async fn ranges_are_validated() {
    let _shared = MEMORY.read().await;
    for backend in BACKENDS {
        let api = TestApi::start_with_usage(backend, |_| {}).await;
        let ada = api.signed_up("ada@example.com").await;
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let cases: &[(&str, &str)] = &[
            ("/developer/usage?period=2026-13", "period"),
            ("/developer/usage?period=2026-1", "period"),
            ("/developer/usage?period=1969-12", "period"),
            (
                "/developer/usage?period=2026-11&from=2026-11-01&to=2026-11-02",
                "period",
            ),
            ("/developer/usage?from=2026-11-01", "to"),
            ("/developer/usage?to=2026-11-01", "from"),
            ("/developer/usage?from=2026-02-30&to=2026-03-01", "from"),
            ("/developer/usage?from=2026-11-02&to=2026-11-01", "to"),
            ("/developer/usage?from=2025-01-01&to=2026-02-05", "to"),
            ("/developer/usage?foo=1", "query"),
            ("/developer/keys/key_x/usage?period=x", "period"),
            (
                "/developer/usage/export?from=2026-11-01&to=2026-10-01",
                "to",
            ),
            ("/developer/usage/export?period=26-11", "period"),
            (
                "/developer/analytics/overview?from=20261101&to=2026-11-02",
                "from",
            ),
            (
                "/developer/analytics/trends?granularity=week",
                "granularity",
            ),
            (
                "/developer/analytics/trends?granularity=hour&from=2026-01-01&to=2026-02-01",
                "to",
            ),
            ("/developer/analytics/costs?period=2026-00", "period"),
            (
                "/developer/analytics/performance?from=2026-01-01&to=2027-02-05",
                "to",
            ),
            ("/admin/analytics/overview?limit=0", "limit"),
            ("/admin/analytics/overview?limit=101", "limit"),
            ("/admin/analytics/overview?period=x", "period"),
        ];
        for (path, param) in cases {
            let token = if path.starts_with("/admin") {
                &op
            } else {
                &ada
            };
            let (s, b) = api.call("GET", path, Some(token), None).await;
            assert_eq!(s, 422, "{path}: {b}");
            assert_eq!(
                error_of(&b),
                ("invalid_request_error".into(), "validation_failed".into()),
                "{path}"
            );
            assert_eq!(b["error"]["param"], *param, "{path}: {b}");
        }
        // Accepted: 400 days, 31 days of hours, and an export of any length.
        for path in [
            "/developer/usage?from=2025-01-01&to=2026-02-04",
            "/developer/analytics/trends?granularity=hour&from=2026-01-01&to=2026-01-31",
            "/developer/usage/export?from=2001-01-01&to=2030-12-31",
            "/admin/analytics/overview?limit=100&period=2026-02",
        ] {
            let token = if path.starts_with("/admin") {
                &op
            } else {
                &ada
            };
            let (s, b) = api.call("GET", path, Some(token), None).await;
            assert_eq!(s, 200, "{path}: {b}");
        }
    }
}

#[tokio::test]
async fn usage_unavailable_without_clickhouse() {
    let _shared = MEMORY.read().await;
    let api = TestApi::start(Backend::Sqlite).await;
    let ada = api.signed_up("ada@example.com").await;
    let op = api.login(ADMIN_EMAIL, PASSWORD).await;
    for (path, token) in [
        ("/developer/usage", &ada),
        ("/developer/keys/key_x/usage", &ada),
        ("/developer/usage/export", &ada),
        ("/developer/analytics/overview", &ada),
        ("/developer/analytics/trends", &ada),
        ("/developer/analytics/costs", &ada),
        ("/developer/analytics/performance", &ada),
        ("/admin/analytics/overview", &op),
    ] {
        let (s, b) = api.call("GET", path, Some(token), None).await;
        assert_eq!(s, 503, "{path}: {b}");
        assert_eq!(
            error_of(&b),
            ("server_error".into(), "usage_unavailable".into()),
            "{path}"
        );
    }
}

/// Splits one CSV record (RFC 4180) into fields.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) => quoted = true,
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            ('"', true) => quoted = false,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

/// Splits a CSV body into records (line breaks inside quotes belong to the field).
fn csv_records(body: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quotes = 0;
    for piece in body.split_inclusive("\r\n") {
        current.push_str(piece);
        quotes += piece.matches('"').count();
        if quotes % 2 == 0 {
            out.push(csv_fields(current.strip_suffix("\r\n").unwrap()));
            current.clear();
        }
    }
    assert!(current.is_empty(), "unterminated record: {current:?}");
    out
}

#[tokio::test]
async fn export_is_csv_row_by_row() {
    let _shared = MEMORY.read().await;
    for backend in BACKENDS {
        let api = TestApi::start_with_usage(backend, |_| {}).await;
        let ada = api.signed_up("ada@example.com").await;
        let ada_id = me(&api, &ada).await;
        let keys = vec![
            new_key(&api, &ada, "a").await,
            new_key(&api, &ada, "b").await,
        ];
        // Two days across a month boundary, some awkward strings.
        let start = aihub_plans::Period::parse("2026-03").unwrap().start_ms() - DAY;
        let mut rows = records(&ada_id, &keys, 40, start, start + 2 * DAY, 7);
        rows[0].user_agent = "curl, \"quoted\"\r\nand a new line".into();
        rows[1].user_agent = "Ünïcödé ✓".into();
        rows[2].cost_nanos = 1;
        rows[3].cost_nanos = 12_500_000_000;
        let other = records("dev_other", &keys, 10, start, start + 2 * DAY, 8);
        api.ch().insert(&rows).await;
        api.ch().insert(&other).await;
        rows.sort_by_key(|r| (r.ts_ms, r.request_id.to_string()));

        let (from, to) = (day_of(start), day_of(start + DAY));
        let resp = api
            .http
            .get(api.url(&format!("/developer/usage/export?from={from}&to={to}")))
            .bearer_auth(&ada)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/csv; charset=utf-8");
        assert_eq!(
            h["content-disposition"],
            format!("attachment; filename=\"usage-{ada_id}-{from}-to-{to}.csv\"").as_str()
        );
        let body = resp.text().await.unwrap();
        let records = csv_records(&body);
        assert_eq!(records[0].join(","), EXPORT_HEADER.trim_end());
        assert_eq!(records.len(), rows.len() + 1);
        for (r, f) in rows.iter().zip(&records[1..]) {
            let expected = [
                r.request_id.to_string(),
                aihub_store::outbox::rfc3339_ms(r.ts_ms as i64),
                r.key_id.clone(),
                r.endpoint.clone(),
                r.model.clone(),
                r.status.to_string(),
                r.error_type.clone(),
                r.streamed.to_string(),
                r.usage_estimated.to_string(),
                r.prompt_tokens.to_string(),
                r.cached_tokens.to_string(),
                r.completion_tokens.to_string(),
                r.total_tokens.to_string(),
                aihub_plans::money::usd_string(Decimal::new(r.cost_nanos, 9)),
                r.total_latency_ms.to_string(),
                r.upstream_latency_ms.to_string(),
                r.gateway_overhead_us.to_string(),
                r.client_ip.clone(),
                r.user_agent.clone(),
            ];
            assert_eq!(f, &expected);
        }
        assert!(body.contains(",0.000000001,") && body.contains(",12.50,"));

        // One key, a period, and a range without rows (the header alone).
        let resp = api
            .http
            .get(api.url(&format!(
                "/developer/usage/export?period=2026-03&key_id={}",
                keys[1]
            )))
            .bearer_auth(&ada)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()["content-disposition"],
            format!("attachment; filename=\"usage-{ada_id}-2026-03.csv\"").as_str()
        );
        let body = resp.text().await.unwrap();
        let got: Vec<String> = csv_records(&body)[1..]
            .iter()
            .map(|f| f[0].clone())
            .collect();
        let expected: Vec<String> = rows
            .iter()
            .filter(|r| r.key_id == keys[1] && r.ts_ms as i64 >= start + DAY)
            .map(|r| r.request_id.to_string())
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);
        let (s, _) = api
            .call(
                "GET",
                "/developer/usage/export?period=2001-01",
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 200);
        let body = api
            .http
            .get(api.url("/developer/usage/export?period=2001-01"))
            .bearer_auth(&ada)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, EXPORT_HEADER);
    }
}

/// `VmRSS` or `VmHWM` of this process, KiB.
fn proc_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn export_of_a_million_rows_keeps_memory_flat() {
    const ROWS: u64 = 1_000_000;
    const BOUND_MIB: u64 = 64;
    let _alone = MEMORY.write().await;
    let api = TestApi::start_with_usage(Backend::Sqlite, |_| {}).await;
    let ada = api.signed_up("ada@example.com").await;
    let ada_id = me(&api, &ada).await;
    // A million rows made by ClickHouse itself, two a second from 2026-02-01 (the views fill
    // the rollups as usual).
    let start_s = aihub_plans::Period::parse("2026-02").unwrap().start_ms() / 1000;
    api.ch()
        .execute(&format!(
            "INSERT INTO usage_events SELECT generateUUIDv4(), toDateTime({start_s} + intDiv(number, 2)), \
             ({start_s} + intDiv(number, 2)) * 1000 + (number % 2) * 500, '{ada_id}', \
             concat('key_', toString(number % 3)), 'chat/completions', 'POST', 'gpt-4o-mini', \
             'gpt-4o-mini', 'mock', 'http://127.0.0.1:1/v1', toUInt32(number % 1000), 0, \
             toUInt32(number % 300), toUInt32(number % 1000 + number % 300), \
             toInt64(number % 7919 * 1013 + 1), 120, 340, 345, 200, '', 0, 0, '10.1.2.3', \
             'OpenAI/Python 1.54.0 (a, b)', '', 1 FROM system.numbers LIMIT {ROWS}"
        ))
        .await;
    let expected_nanos: i128 = (0..ROWS).map(|n| i128::from(n % 7919 * 1013 + 1)).sum();

    let before = proc_kib("VmRSS:");
    // Reset the peak, so VmHWM is this export's (Linux ≥ 4.0); sampling covers the rest.
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let mut resp = api
        .http
        .get(api.url("/developer/usage/export?period=2026-02"))
        .bearer_auth(&ada)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (mut lines, mut bytes, mut nanos, mut peak) = (0u64, 0u64, 0i128, before);
    let mut carry: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
        carry.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(end) = carry[consumed..].windows(2).position(|w| w == b"\r\n") {
            let line = &carry[consumed..consumed + end];
            if lines > 0 {
                // cost_usd is the 14th field; no field before it holds a comma.
                let cost = line.split(|&b| b == b',').nth(13).unwrap();
                let (units, frac) = std::str::from_utf8(cost).unwrap().split_once('.').unwrap();
                nanos += units.parse::<i128>().unwrap() * 1_000_000_000
                    + format!("{frac:0<9}").parse::<i128>().unwrap();
            }
            lines += 1;
            consumed += end + 2;
        }
        carry.drain(..consumed);
        if lines % 50_000 < 300 {
            peak = peak.max(proc_kib("VmRSS:"));
        }
    }
    assert!(carry.is_empty());
    if peak_reset {
        peak = peak.max(proc_kib("VmHWM:"));
    }
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "export: {lines} lines, {} MiB of CSV; RSS before {} MiB, peak {} MiB (+{growth_mib} MiB)",
        bytes >> 20,
        before / 1024,
        peak / 1024
    );
    assert_eq!(lines, ROWS + 1, "header + one line per row");
    assert_eq!(nanos, expected_nanos, "the costs add up exactly");
    assert!(bytes > 100 << 20, "{bytes} bytes");
    assert!(
        growth_mib < BOUND_MIB,
        "memory grew by {growth_mib} MiB while {} MiB streamed",
        bytes >> 20
    );
}

// ---------------------------------------------------------------------------------------------
// The rollups' migrations

/// A database as before migrations 3 and 4 (an existing deployment), with `rows` in it.
async fn version_2_database(rows: &[UsageRecord]) -> TestClickHouse {
    let ch = TestClickHouse::new().await;
    for rollup in ["usage_daily", "usage_developer_daily", "usage_model_daily"] {
        for suffix in ["_mv", "", "_live", "_history"] {
            ch.execute(&format!("DROP TABLE {rollup}{suffix}")).await;
        }
    }
    for sql in [
        "DROP TABLE schema_migrations",
        "CREATE TABLE schema_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version",
        "INSERT INTO schema_migrations (version, name) VALUES (1, 'usage_events'), (2, 'usage_hourly')",
    ] {
        ch.execute(sql).await;
    }
    for chunk in rows.chunks(300) {
        ch.insert(chunk).await;
    }
    ch
}

/// Groups where `usage_daily` and `usage_events` disagree (docs/clickhouse.md, query (h)).
async fn daily_mismatches(ch: &TestClickHouse) -> Vec<String> {
    #[derive(clickhouse::Row, serde::Deserialize, Debug)]
    #[allow(dead_code)] // read through Debug
    struct Diff {
        developer_id: String,
        day: String,
        key_id: String,
        model: String,
        status: u16,
    }
    let sql = "SELECT developer_id, toString(day) AS d, key_id, model, status
FROM
(
    SELECT developer_id, toDate(ts) AS day, key_id, model, status,
        count() AS requests, sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS nanos,
        sum(toUInt64(total_latency_ms)) AS latency, sum(toUInt64(gateway_overhead_us)) AS overhead
    FROM usage_events
    GROUP BY developer_id, day, key_id, model, status
)
ALL FULL OUTER JOIN
(
    SELECT developer_id, day, key_id, model, status,
        countMerge(requests) AS d_requests, sumMerge(total_tokens) AS d_tokens,
        sumMerge(cost_nanos) AS d_nanos, sumMerge(total_latency_sum_ms) AS d_latency,
        sumMerge(gateway_overhead_sum_us) AS d_overhead
    FROM usage_daily
    GROUP BY developer_id, day, key_id, model, status
) USING (developer_id, day, key_id, model, status)
WHERE requests != d_requests OR tokens != d_tokens OR nanos != d_nanos
   OR latency != d_latency OR overhead != d_overhead
ORDER BY developer_id, d, key_id, model, status";
    ch.client()
        .query(sql)
        .fetch_all::<Diff>()
        .await
        .unwrap()
        .into_iter()
        .map(|d| format!("{d:?}"))
        .collect()
}

/// Days × developers and days × models where `usage_developer_daily` and `usage_model_daily`
/// disagree with `usage_events` (docs/clickhouse.md, query (j)).
async fn platform_mismatches(ch: &TestClickHouse) -> Vec<String> {
    let mut diffs = Vec::new();
    for (table, dim) in [
        ("usage_developer_daily", "developer_id"),
        ("usage_model_daily", "model"),
    ] {
        let sql = format!(
            "SELECT toString(day) AS d, {dim}
FROM
(
    SELECT toDate(ts) AS day, {dim},
        count() AS requests, countIf(status >= 400) AS errs,
        sum(toUInt64(prompt_tokens)) AS prompt, sum(toUInt64(cached_tokens)) AS cached,
        sum(toUInt64(completion_tokens)) AS completion, sum(toUInt64(total_tokens)) AS tokens,
        sum(cost_nanos) AS nanos
    FROM usage_events
    GROUP BY day, {dim}
)
ALL FULL OUTER JOIN
(
    SELECT day, {dim},
        sum(requests) AS r_requests, sum(errors) AS r_errs,
        sum(prompt_tokens) AS r_prompt, sum(cached_tokens) AS r_cached,
        sum(completion_tokens) AS r_completion, sum(total_tokens) AS r_tokens,
        sum(cost_nanos) AS r_nanos
    FROM {table}
    GROUP BY day, {dim}
) USING (day, {dim})
WHERE requests != r_requests OR errs != r_errs OR prompt != r_prompt OR cached != r_cached
   OR completion != r_completion OR tokens != r_tokens OR nanos != r_nanos
ORDER BY d, {dim}"
        );
        let rows: Vec<(String, String)> = ch.client().query(&sql).fetch_all().await.unwrap();
        diffs.extend(rows.into_iter().map(|(d, v)| format!("{table}: {d} {v:?}")));
    }
    diffs
}

async fn tables(ch: &TestClickHouse) -> Vec<String> {
    ch.client()
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn daily_rollup_backfills_existing_rows_once() {
    let _shared = MEMORY.read().await;
    let now = now_ms();
    let keys = vec!["key_a".to_owned(), "key_b".to_owned()];
    let old = records("dev_a", &keys, 900, now - 70 * DAY, now - 1_000, 11);
    let ch = version_2_database(&old).await;
    let report = aihub_usage::schema::migrate(&ch.config).await.unwrap();
    assert_eq!(report.applied, [3, 4, 5, 6]);
    assert!(daily_mismatches(&ch).await.is_empty());
    assert_eq!(platform_mismatches(&ch).await, Vec::<String>::new());
    assert_eq!(
        tables(&ch).await,
        [
            "schema_migrations",
            "usage_daily",
            "usage_daily_history",
            "usage_daily_live",
            "usage_daily_mv",
            "usage_developer_daily",
            "usage_developer_daily_history",
            "usage_developer_daily_live",
            "usage_developer_daily_mv",
            "usage_events",
            "usage_hourly",
            "usage_hourly_mv",
            "usage_model_daily",
            "usage_model_daily_history",
            "usage_model_daily_live",
            "usage_model_daily_mv",
        ]
    );
    // New rows (late ones too) go through the view, once.
    ch.insert(&records("dev_a", &keys, 200, now - 3 * DAY, now, 12))
        .await;
    ch.insert(&records("dev_b", &keys, 100, now - 80 * DAY, now, 13))
        .await;
    assert!(daily_mismatches(&ch).await.is_empty());
    assert_eq!(platform_mismatches(&ch).await, Vec::<String>::new());
    // Running again changes nothing.
    assert_eq!(
        aihub_usage::schema::migrate(&ch.config)
            .await
            .unwrap()
            .applied,
        Vec::<u32>::new()
    );
    use aihub_usage::schema::{backfill, USAGE_DAILY, USAGE_DEVELOPER_DAILY, USAGE_MODEL_DAILY};
    for rollup in [&USAGE_DAILY, &USAGE_DEVELOPER_DAILY, &USAGE_MODEL_DAILY] {
        backfill(&ch.client(), &ch.config.database, rollup)
            .await
            .unwrap();
    }
    assert!(daily_mismatches(&ch).await.is_empty());
    assert_eq!(platform_mismatches(&ch).await, Vec::<String>::new());
    let n: u64 = ch
        .client()
        .query("SELECT countMerge(requests) FROM usage_daily")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(n, 1_200);
    for table in ["usage_developer_daily", "usage_model_daily"] {
        let n: u64 = ch
            .client()
            .query(&format!("SELECT sum(requests) FROM {table}"))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(n, 1_200, "{table}");
    }
}

#[tokio::test]
async fn daily_backfill_survives_interruption_and_concurrency() {
    let _shared = MEMORY.read().await;
    let now = now_ms();
    let keys = vec!["key_a".to_owned()];
    let old = records("dev_a", &keys, 600, now - 100 * DAY, now - 1_000, 21);
    let ch = version_2_database(&old).await;
    // Interrupted runs of migrations 3 and 4: the views and the live tables exist, half-filled
    // staging tables are left over, the migrations are not recorded.
    for m in &aihub_usage::schema::MIGRATIONS[2..4] {
        for statement in m.sql.split(";\n") {
            ch.execute(statement).await;
        }
    }
    ch.execute(
        "CREATE TABLE usage_developer_daily_backfill_0123abcd AS usage_developer_daily_live",
    )
    .await;
    ch.execute(&format!(
        "INSERT INTO usage_developer_daily_backfill_0123abcd SELECT toDate(ts) AS day, \
         developer_id, count(), countIf(status >= 400), sum(toUInt64(prompt_tokens)), \
         sum(toUInt64(cached_tokens)), sum(toUInt64(completion_tokens)), \
         sum(toUInt64(total_tokens)), sum(cost_nanos) FROM usage_events WHERE ts_ms < {} \
         GROUP BY day, developer_id",
        now - 50 * DAY
    ))
    .await;
    ch.execute("CREATE TABLE usage_daily_backfill_0123abcd AS usage_daily_live")
        .await;
    ch.execute(&format!(
        "INSERT INTO usage_daily_backfill_0123abcd SELECT developer_id, toDate(ts) AS day, key_id, \
         model, status, countState(), sumState(toUInt64(prompt_tokens)), \
         sumState(toUInt64(cached_tokens)), sumState(toUInt64(completion_tokens)), \
         sumState(toUInt64(total_tokens)), sumState(cost_nanos), \
         sumState(toUInt64(total_latency_ms)), sumState(toUInt64(upstream_latency_ms)), \
         sumState(toUInt64(gateway_overhead_us)), \
         quantilesTDigestState(0.5, 0.95, 0.99)(total_latency_ms), \
         quantilesTDigestState(0.5, 0.95, 0.99)(upstream_latency_ms), \
         quantilesTDigestState(0.5, 0.95, 0.99)(gateway_overhead_us) FROM usage_events \
         WHERE ts_ms < {} GROUP BY developer_id, day, key_id, model, status",
        now - 50 * DAY
    ))
    .await;
    // Requests that start while the migration is pending (after the view's second) go through
    // the view only.
    ch.insert(&records("dev_a", &keys, 50, now + 5_000, now + 60_000, 22))
        .await;
    // Three nodes start at once.
    let (a, b, c) = tokio::join!(
        aihub_usage::schema::migrate(&ch.config),
        aihub_usage::schema::migrate(&ch.config),
        aihub_usage::schema::migrate(&ch.config),
    );
    // A node may lose a race on a statement; it would retry, and then find nothing to do.
    for r in [a, b, c] {
        if let Err(e) = r {
            eprintln!("a concurrent migration failed (retried below): {e}");
        }
    }
    aihub_usage::schema::migrate(&ch.config).await.unwrap();
    assert!(daily_mismatches(&ch).await.is_empty());
    assert_eq!(platform_mismatches(&ch).await, Vec::<String>::new());
    let left = tables(&ch).await;
    assert!(left.iter().all(|t| !t.contains("_backfill_")), "{left:?}");
    let versions: Vec<u32> = ch
        .client()
        .query("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
}
