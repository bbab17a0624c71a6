//! Usage records for the usage and analytics tests — seeded, varied (several keys, models,
//! days, statuses, odd nano-USD costs) — and the expected figures computed independently in
//! Rust (`Decimal` sums over the records).

#![allow(dead_code)]

use aihub_plans::money::usd_string;
use aihub_store::now_ms;
use aihub_store::testing::Backend;
use serde_json::json;

use crate::common::TestApi;
use aihub_plans::period::civil_from_days;
use aihub_plans::Period;
use aihub_usage::UsageRecord;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::Value;

pub const DAY: i64 = 86_400_000;
pub const HOUR: i64 = 3_600_000;

pub const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet", ""];

/// `n` records of `dev` over `[start, end)` (unix ms), spread over `keys`.
pub fn records(
    dev: &str,
    keys: &[String],
    n: usize,
    start: i64,
    end: i64,
    seed: u64,
) -> Vec<UsageRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let model = MODELS[rng.random_range(0..MODELS.len())];
            let ts_ms = rng.random_range(start..end);
            let roll = rng.random_range(0..100);
            let (status, error_type) = match (model, roll) {
                ("", _) => (404, "model_not_found"),
                (_, 0..=74) => (200, ""),
                (_, 75..=79) => (200, "aborted"),
                (_, 80..=87) => (429, "upstream_error"),
                (_, 88..=93) => (500, "upstream_error"),
                _ => (502, "upstream_unreachable"),
            };
            let ok = status == 200;
            let prompt = if ok { rng.random_range(1..5_000) } else { 0 };
            let completion = if ok { rng.random_range(0..2_000) } else { 0 };
            let cached = if ok && rng.random_bool(0.3) {
                prompt / 2
            } else {
                0
            };
            let total_latency = rng.random_range(20..8_000);
            UsageRecord {
                request_id: uuid::Uuid::now_v7(),
                ts: (ts_ms / 1000) as u32,
                ts_ms: ts_ms as u64,
                developer_id: dev.into(),
                key_id: keys[rng.random_range(0..keys.len())].clone(),
                endpoint: "chat/completions".into(),
                method: "POST".into(),
                model: model.into(),
                upstream_model: model.into(),
                upstream: "mock".into(),
                upstream_endpoint: "http://127.0.0.1:1/v1".into(),
                prompt_tokens: prompt,
                cached_tokens: cached,
                completion_tokens: completion,
                total_tokens: prompt + completion,
                // Odd nano amounts: any rounding or float on the way shows.
                cost_nanos: if ok {
                    rng.random_range(0..25_000_000_000i64) | 1
                } else {
                    0
                },
                gateway_overhead_us: rng.random_range(50..2_000),
                upstream_latency_ms: rng.random_range(0..total_latency),
                total_latency_ms: total_latency,
                status,
                error_type: error_type.into(),
                streamed: rng.random_range(0..2),
                usage_estimated: u8::from(error_type == "aborted"),
                client_ip: "10.0.0.7".into(),
                user_agent: "OpenAI/Python 1.54.0".into(),
                batch_id: String::new(),
                attempts: 1,
            }
        })
        .collect()
}

/// `YYYY-MM-DD` (UTC) of a unix-ms instant.
pub fn day_of(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The period before the current one, and the current one.
pub fn periods(now_ms: i64) -> (Period, Period) {
    let cur = Period::of_unix_ms(now_ms);
    (Period::of_unix_ms(cur.start_ms() - 1), cur)
}

/// Figures over a set of records, computed independently of the API.
#[derive(Debug, Default, Clone)]
pub struct Sums {
    pub requests: u64,
    pub errors: u64,
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    pub tokens: u64,
    pub cost: Decimal,
    pub ok_latencies: Vec<u32>,
}

impl Sums {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Sums {
        let mut s = Sums::default();
        for r in records {
            s.requests += 1;
            s.errors += u64::from(r.status >= 400);
            s.prompt += u64::from(r.prompt_tokens);
            s.cached += u64::from(r.cached_tokens);
            s.completion += u64::from(r.completion_tokens);
            s.tokens += u64::from(r.total_tokens);
            s.cost += Decimal::new(r.cost_nanos, 9);
            if r.status < 400 {
                s.ok_latencies.push(r.total_latency_ms);
            }
        }
        s.ok_latencies.sort_unstable();
        s
    }

    pub fn cost_usd(&self) -> String {
        usd_string(self.cost)
    }

    pub fn avg_latency(&self) -> Option<f64> {
        let n = self.ok_latencies.len();
        (n > 0).then(|| {
            let sum: u64 = self.ok_latencies.iter().map(|&l| u64::from(l)).sum();
            (sum as f64 / n as f64 * 10.0).round() / 10.0
        })
    }

    /// The exact `q` quantile (nearest rank) of the successful requests' latencies.
    pub fn quantile(&self, q: f64) -> u32 {
        let l = &self.ok_latencies;
        l[((q * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1]
    }

    /// Asserts an API `Usage` object (see `aihub_admin::usage::Usage`).
    pub fn assert_usage(&self, v: &Value, what: &str) {
        assert_eq!(v["requests"], self.requests, "{what}: requests in {v}");
        assert_eq!(v["errors"], self.errors, "{what}: errors");
        assert_eq!(v["prompt_tokens"], self.prompt, "{what}: prompt_tokens");
        assert_eq!(v["cached_tokens"], self.cached, "{what}: cached_tokens");
        assert_eq!(
            v["completion_tokens"], self.completion,
            "{what}: completion_tokens"
        );
        assert_eq!(v["total_tokens"], self.tokens, "{what}: total_tokens");
        assert_eq!(v["cost_usd"], self.cost_usd().as_str(), "{what}: cost_usd");
        match self.avg_latency() {
            None => {
                assert!(v["avg_latency_ms"].is_null(), "{what}: avg latency");
                assert!(v["p95_latency_ms"].is_null(), "{what}: p95");
            }
            Some(avg) => {
                let got = v["avg_latency_ms"].as_f64().unwrap();
                assert!((got - avg).abs() < 0.051, "{what}: avg {got} ≠ {avg}");
                self.assert_close(v["p95_latency_ms"].as_u64().unwrap(), 0.95, what);
            }
        }
    }

    /// A t-digest estimate of quantile `q`: within the observed latencies and near the exact
    /// value (a tenth of the spread).
    pub fn assert_close(&self, got: u64, q: f64, what: &str) {
        let (min, max) = (
            u64::from(self.ok_latencies[0]),
            u64::from(*self.ok_latencies.last().unwrap()),
        );
        let exact = u64::from(self.quantile(q));
        assert!(
            (min..=max).contains(&got) && got.abs_diff(exact) <= (max - min) / 10 + 1,
            "{what}: p{} = {got}, exact {exact} in {min}..={max}",
            q * 100.0
        );
    }
}

pub async fn me(api: &TestApi, token: &str) -> String {
    let (s, b) = api.call("GET", "/developer/me", Some(token), None).await;
    assert_eq!(s, 200, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

pub async fn new_key(api: &TestApi, token: &str, name: &str) -> String {
    let (s, b) = api
        .call(
            "POST",
            "/developer/keys",
            Some(token),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b["api_key"]["id"].as_str().unwrap().to_owned()
}

/// A developer with three keys (one revoked) and usage in the previous and current periods;
/// another developer with usage of their own.
pub struct Fixture {
    pub api: TestApi,
    pub ada: String,
    pub ada_id: String,
    pub ada_keys: Vec<String>,
    pub bob: String,
    pub bob_id: String,
    pub bob_key: String,
    pub ada_rows: Vec<UsageRecord>,
    pub bob_rows: Vec<UsageRecord>,
}

pub async fn fixture(backend: Backend) -> Fixture {
    let api = TestApi::start_with_usage(backend, |_| {}).await;
    let ada = api.signed_up("ada@example.com").await;
    let bob = api.signed_up("bob@example.com").await;
    let (ada_id, bob_id) = (me(&api, &ada).await, me(&api, &bob).await);
    let mut ada_keys = Vec::new();
    for name in ["prod", "staging", "old"] {
        ada_keys.push(new_key(&api, &ada, name).await);
    }
    let (s, _) = api
        .call(
            "DELETE",
            &format!("/developer/keys/{}", ada_keys[2]),
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let bob_key = new_key(&api, &bob, "bob's").await;

    let now = now_ms();
    let (prev, cur) = periods(now);
    let mut ada_rows = records(&ada_id, &ada_keys, 700, prev.start_ms(), prev.end_ms(), 1);
    ada_rows.extend(records(
        &ada_id,
        &ada_keys,
        300,
        cur.start_ms(),
        now - 1_000,
        2,
    ));
    let bob_rows = records(
        &bob_id,
        std::slice::from_ref(&bob_key),
        400,
        prev.start_ms(),
        now - 1_000,
        3,
    );
    // Several inserts: several parts whose states ClickHouse merges at read time.
    for chunk in ada_rows.chunks(250) {
        api.ch().insert(chunk).await;
    }
    api.ch().insert(&bob_rows).await;
    Fixture {
        api,
        ada,
        ada_id,
        ada_keys,
        bob,
        bob_id,
        bob_key,
        ada_rows,
        bob_rows,
    }
}
