//! Analytics over real HTTP with a real store (SQLite and PostgreSQL) and a real ClickHouse,
//! every figure against independent sums over the inserted records: the overview (this period
//! against the same days of the previous one), daily and hourly trends with empty buckets,
//! costs with the month-end projection, performance (t-digest percentiles, statuses) and the
//! operator's platform overview. Isolation and validation are in `tests/usage.rs`.

mod common;
mod usage_data;

use std::collections::BTreeMap;

use aihub_store::now_ms;
use aihub_store::testing::BACKENDS;
use aihub_usage::UsageRecord;
use common::{ADMIN_EMAIL, PASSWORD};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::Value;
use usage_data::{day_of, fixture, periods, Sums, DAY, HOUR};

async fn get(api: &common::TestApi, token: &str, path: impl AsRef<str>) -> Value {
    let path = path.as_ref();
    let (s, b) = api.call("GET", path, Some(token), None).await;
    assert_eq!(s, 200, "{path}: {b}");
    b
}

fn pct(part: Decimal, whole: Decimal) -> Value {
    if whole.is_zero() {
        return Value::Null;
    }
    let mut p = (part * Decimal::ONE_HUNDRED / whole)
        .round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    p.rescale(2);
    Value::String(p.to_string())
}

fn in_days(rows: &[UsageRecord], from_ms: i64, to_ms: i64) -> Vec<&UsageRecord> {
    rows.iter()
        .filter(|r| (from_ms..to_ms).contains(&(r.ts_ms as i64)))
        .collect()
}

fn assert_window(v: &Value, s: &Sums, what: &str) {
    assert_eq!(v["requests"], s.requests, "{what}: {v}");
    assert_eq!(v["total_tokens"], s.tokens, "{what}");
    assert_eq!(v["cost_usd"], s.cost_usd().as_str(), "{what}");
    assert_eq!(v["errors"], s.errors, "{what}");
    assert_eq!(
        v["error_rate_pct"],
        pct(s.errors.into(), s.requests.into()),
        "{what}"
    );
    match s.avg_latency() {
        Some(avg) => assert!((v["avg_latency_ms"].as_f64().unwrap() - avg).abs() < 0.051),
        None => assert!(v["avg_latency_ms"].is_null()),
    }
}

/// Asserts the operator's platform view against the records of each developer: totals, active
/// developers, the top developers by cost (ties by id) and every model, all exact `Decimal`
/// sums over the records.
fn assert_platform(v: &Value, devs: &[(&str, &str, Vec<&UsageRecord>)]) {
    let all: Vec<&UsageRecord> = devs.iter().flat_map(|d| d.2.iter().copied()).collect();
    let both = Sums::of(all.iter().copied());
    let t = &v["totals"];
    assert_eq!(t["requests"], both.requests, "{v}");
    assert_eq!(t["errors"], both.errors);
    assert_eq!(
        t["error_rate_pct"],
        pct(both.errors.into(), both.requests.into())
    );
    assert_eq!(t["total_tokens"], both.tokens);
    assert_eq!(t["cost_usd"], both.cost_usd().as_str());
    let active = devs.iter().filter(|d| !d.2.is_empty()).count();
    assert_eq!(t["active_developers"], active as u64);
    let mut expected: Vec<(Sums, &str, &str)> = devs
        .iter()
        .filter(|d| !d.2.is_empty())
        .map(|(id, email, rows)| (Sums::of(rows.iter().copied()), *id, *email))
        .collect();
    expected.sort_by(|a, b| b.0.cost.cmp(&a.0.cost).then(a.1.cmp(b.1)));
    let tops = v["top_developers"].as_array().unwrap();
    assert_eq!(tops.len(), expected.len());
    for (top, (sums, id, email)) in tops.iter().zip(&expected) {
        assert_eq!(top["developer_id"], *id);
        assert_eq!(top["email"], *email);
        assert_eq!(top["requests"], sums.requests, "{id}");
        assert_eq!(top["total_tokens"], sums.tokens, "{id}");
        assert_eq!(top["cost_usd"], sums.cost_usd().as_str(), "{id}");
        assert_eq!(top["share_pct"], pct(sums.cost, both.cost));
    }
    let mut by_model: BTreeMap<&str, Vec<&UsageRecord>> = BTreeMap::new();
    for r in &all {
        by_model.entry(r.model.as_str()).or_default().push(r);
    }
    let mut expected: Vec<(&str, Sums)> = by_model
        .into_iter()
        .map(|(m, rows)| (m, Sums::of(rows)))
        .collect();
    expected.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(b.0)));
    let models = v["by_model"].as_array().unwrap();
    assert_eq!(models.len(), expected.len(), "{v}");
    for (m, (name, sums)) in models.iter().zip(&expected) {
        assert_eq!(m["model"], *name);
        assert_eq!(m["requests"], sums.requests, "{name}");
        assert_eq!(m["errors"], sums.errors, "{name}");
        assert_eq!(m["total_tokens"], sums.tokens, "{name}");
        assert_eq!(m["cost_usd"], sums.cost_usd().as_str(), "{name}");
        assert_eq!(m["share_pct"], pct(sums.cost, both.cost), "{name}");
    }
}

fn mean(s: &Sums) -> Decimal {
    let sum: u64 = s.ok_latencies.iter().map(|&l| u64::from(l)).sum();
    if s.ok_latencies.is_empty() {
        Decimal::ZERO
    } else {
        Decimal::from(sum) / Decimal::from(s.ok_latencies.len() as u64)
    }
}

fn ratio(a: u64, b: u64) -> Decimal {
    if b == 0 {
        Decimal::ZERO
    } else {
        Decimal::from(a) / Decimal::from(b)
    }
}

#[tokio::test]
async fn analytics_match_independent_sums() {
    for backend in BACKENDS {
        let f = fixture(backend).await;
        let api = &f.api;
        let now = now_ms();
        let (prev, cur) = periods(now);
        let today = now.div_euclid(DAY);

        // Overview of the current period: the days so far against as many days of the last.
        let v = get(api, &f.ada, "/developer/analytics/overview").await;
        let elapsed_days = today - cur.start_ms() / DAY + 1;
        let prev_end = (prev.start_ms() + elapsed_days * DAY).min(prev.end_ms());
        let c = Sums::of(in_days(&f.ada_rows, cur.start_ms(), (today + 1) * DAY));
        let p = Sums::of(in_days(&f.ada_rows, prev.start_ms(), prev_end));
        assert_eq!(v["period"], cur.to_string());
        assert_eq!(v["current"]["from"], day_of(cur.start_ms()));
        assert_eq!(v["current"]["to"], day_of(now));
        assert_eq!(v["previous"]["from"], day_of(prev.start_ms()));
        assert_eq!(v["previous"]["to"], day_of(prev_end - 1));
        assert_window(&v["current"], &c, "current");
        assert_window(&v["previous"], &p, "previous");
        let ch = &v["change_pct"];
        let change = |a: Decimal, b: Decimal| pct(a - b, b);
        assert_eq!(ch["requests"], change(c.requests.into(), p.requests.into()));
        assert_eq!(ch["total_tokens"], change(c.tokens.into(), p.tokens.into()));
        assert_eq!(ch["cost_usd"], change(c.cost, p.cost));
        assert_eq!(ch["errors"], change(c.errors.into(), p.errors.into()));
        assert_eq!(
            ch["error_rate"],
            change(ratio(c.errors, c.requests), ratio(p.errors, p.requests))
        );
        assert_eq!(ch["avg_latency_ms"], change(mean(&c), mean(&p)));
        // A closed period against an empty one: no change to speak of.
        let v = get(
            api,
            &f.ada,
            format!("/developer/analytics/overview?period={prev}"),
        )
        .await;
        assert_window(
            &v["current"],
            &Sums::of(in_days(&f.ada_rows, prev.start_ms(), prev.end_ms())),
            "closed",
        );
        assert_window(&v["previous"], &Sums::default(), "empty");
        assert!(v["change_pct"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_null));

        // Daily trends: every day of the period, empty ones as zeros.
        let v = get(
            api,
            &f.ada,
            format!("/developer/analytics/trends?period={prev}"),
        )
        .await;
        assert_eq!(v["granularity"], "day");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len() as i64, (prev.end_ms() - prev.start_ms()) / DAY);
        for (i, b) in data.iter().enumerate() {
            let start = prev.start_ms() + i as i64 * DAY;
            let s = Sums::of(in_days(&f.ada_rows, start, start + DAY));
            assert_eq!(b["start"], format!("{}T00:00:00Z", day_of(start)));
            assert_eq!(
                (&b["requests"], &b["tokens"], &b["errors"]),
                (&s.requests.into(), &s.tokens.into(), &s.errors.into()),
                "{b}"
            );
            assert_eq!(b["cost_usd"], s.cost_usd().as_str());
        }
        // The current period's series stops today.
        let v = get(api, &f.ada, "/developer/analytics/trends?granularity=day").await;
        assert_eq!(v["data"].as_array().unwrap().len() as i64, elapsed_days);
        // Hourly, two days: 48 buckets.
        let day2 = prev.start_ms() + 2 * DAY;
        let v = get(
            api,
            &f.ada,
            format!(
                "/developer/analytics/trends?granularity=hour&from={}&to={}",
                day_of(day2),
                day_of(day2 + DAY)
            ),
        )
        .await;
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 48);
        let mut nonzero = 0;
        for (i, b) in data.iter().enumerate() {
            let start = day2 + i as i64 * HOUR;
            let s = Sums::of(in_days(&f.ada_rows, start, start + HOUR));
            nonzero += usize::from(s.requests > 0);
            assert_eq!(b["requests"], s.requests, "{b}");
            assert_eq!(b["tokens"], s.tokens);
            assert_eq!(b["errors"], s.errors);
            assert_eq!(b["cost_usd"], s.cost_usd().as_str());
        }
        assert!(nonzero > 5 && nonzero < 48, "{nonzero} hours with requests");

        // Costs of a closed period: by model and key, no projection.
        let rows = in_days(&f.ada_rows, prev.start_ms(), prev.end_ms());
        let total = Sums::of(rows.iter().copied());
        let v = get(
            api,
            &f.ada,
            format!("/developer/analytics/costs?period={prev}"),
        )
        .await;
        assert_eq!(v["total_cost_usd"], total.cost_usd().as_str());
        assert_eq!(v["requests"], total.requests);
        assert!(v["projection"].is_null());
        for (list, field, key) in [
            (
                "by_model",
                "model",
                (|r: &UsageRecord| r.model.clone()) as fn(&UsageRecord) -> String,
            ),
            ("by_key", "key_id", |r: &UsageRecord| r.key_id.clone()),
        ] {
            let mut groups: BTreeMap<String, Vec<&UsageRecord>> = BTreeMap::new();
            for r in &rows {
                groups.entry(key(r)).or_default().push(r);
            }
            let got = v[list].as_array().unwrap();
            assert_eq!(got.len(), groups.len());
            for g in got {
                let s = Sums::of(groups[g[field].as_str().unwrap()].iter().copied());
                assert_eq!(g["cost_usd"], s.cost_usd().as_str(), "{g}");
                assert_eq!(g["requests"], s.requests);
                assert_eq!(g["total_tokens"], s.tokens);
                assert_eq!(g["share_pct"], pct(s.cost, total.cost));
            }
        }
        // The current period: a linear projection from the cost so far.
        let before = now_ms();
        let v = get(api, &f.ada, "/developer/analytics/costs").await;
        let after = now_ms();
        let so_far = Sums::of(in_days(&f.ada_rows, cur.start_ms(), cur.end_ms())).cost;
        let proj = &v["projection"];
        assert_eq!(proj["period"], cur.to_string());
        assert_eq!(proj["cost_so_far_usd"], v["total_cost_usd"]);
        assert_eq!(
            proj["cost_so_far_usd"],
            aihub_plans::money::usd_string(so_far).as_str()
        );
        let projected: Decimal = proj["projected_cost_usd"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let length = Decimal::from(cur.end_ms() - cur.start_ms());
        let at = |t: i64| so_far * length / Decimal::from(t - cur.start_ms());
        assert!(
            at(after).round_dp(9) <= projected && projected <= at(before).round_dp(9),
            "{proj}"
        );
        assert!(projected.scale() <= 9);

        // Performance of a closed period.
        let v = get(
            api,
            &f.ada,
            format!("/developer/analytics/performance?period={prev}"),
        )
        .await;
        assert_eq!(v["requests"], total.requests);
        assert_eq!(v["errors"], total.errors);
        let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
        for r in &rows {
            *statuses.entry(r.status).or_default() += 1;
        }
        let got: BTreeMap<u16, u64> = v["by_status"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["status"].as_u64().unwrap() as u16,
                    s["requests"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, statuses);
        for m in v["by_model"].as_array().unwrap() {
            let name = m["model"].as_str().unwrap();
            let mine: Vec<&UsageRecord> =
                rows.iter().copied().filter(|r| r.model == name).collect();
            let s = Sums::of(mine.iter().copied());
            assert_eq!(m["requests"], s.requests, "{name}");
            assert_eq!(m["errors"], s.errors);
            assert_eq!(m["error_rate_pct"], pct(s.errors.into(), s.requests.into()));
            assert_eq!(m["successful"], s.ok_latencies.len() as u64);
            let by_status: u64 = m["by_status"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["requests"].as_u64().unwrap())
                .sum();
            assert_eq!(by_status, s.requests);
            if s.ok_latencies.is_empty() {
                // Only refusals (the `""` model): no latencies to speak of.
                assert!(m["total_latency_ms"]["p95"].is_null(), "{m}");
                continue;
            }
            let t = &m["total_latency_ms"];
            for (q, field) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
                s.assert_close(t[field].as_u64().unwrap(), q, &format!("{name} total"));
            }
            for (field, of) in [
                (
                    "upstream_latency_ms",
                    (|r: &UsageRecord| r.upstream_latency_ms) as fn(&UsageRecord) -> u32,
                ),
                ("gateway_overhead_us", |r: &UsageRecord| {
                    r.gateway_overhead_us
                }),
            ] {
                let values: Vec<u32> = mine
                    .iter()
                    .filter(|r| r.status < 400)
                    .map(|r| of(r))
                    .collect();
                let (lo, hi) = (
                    u64::from(*values.iter().min().unwrap()),
                    u64::from(*values.iter().max().unwrap()),
                );
                let q: Vec<u64> = ["p50", "p95", "p99"]
                    .iter()
                    .map(|p| m[field][p].as_u64().unwrap())
                    .collect();
                assert!(
                    q.windows(2).all(|w| w[0] <= w[1]) && lo <= q[0] && q[2] <= hi,
                    "{name} {field}: {q:?} in {lo}..={hi}"
                );
            }
        }

        // The operator's platform view: both developers.
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let (s, v) = api
            .call(
                "GET",
                &format!("/admin/analytics/overview?period={prev}"),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let bob = in_days(&f.bob_rows, prev.start_ms(), prev.end_ms());
        assert_eq!(v["totals"]["active_developers"], 2);
        assert_platform(
            &v,
            &[
                (f.ada_id.as_str(), "ada@example.com", rows),
                (f.bob_id.as_str(), "bob@example.com", bob),
            ],
        );
        // A `from`/`to` range across both periods: whole UTC days, both inclusive.
        let from_day = prev.start_ms() / DAY + 9;
        let (s, v) = api
            .call(
                "GET",
                &format!(
                    "/admin/analytics/overview?from={}&to={}",
                    day_of(from_day * DAY),
                    day_of(now)
                ),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let (lo, hi) = (from_day * DAY, (today + 1) * DAY);
        assert_platform(
            &v,
            &[
                (
                    f.ada_id.as_str(),
                    "ada@example.com",
                    in_days(&f.ada_rows, lo, hi),
                ),
                (
                    f.bob_id.as_str(),
                    "bob@example.com",
                    in_days(&f.bob_rows, lo, hi),
                ),
            ],
        );
        let (_, v) = api
            .call(
                "GET",
                &format!("/admin/analytics/overview?period={prev}&limit=1"),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(v["top_developers"].as_array().unwrap().len(), 1);
    }
}
