//! Fills ClickHouse with realistic usage records for benchmarks and demos.
//!
//! `usage-gen --clickhouse http://127.0.0.1:8123 --database aihub_bench --developers 10000
//! --rows 10000000 --days 90` writes `--rows` records through the same RowBinary insert and
//! schema as the gateway (the `usage_hourly` rollup fills itself), deterministic for a `--seed`:
//! - developers `dev_gen_00000…` with Zipf-like traffic (weight ∝ 1/rank^1.1: a few developers
//!   make most requests), 1–5 keys each;
//! - models from the default price table, weighted (cheap models most used), priced exactly as
//!   the gateway prices them (`aihub_usage::pricing`, nano-USD);
//! - timestamps over the last `--days` days with a day/night cycle;
//! - token counts spread over two orders of magnitude; about 2 % refused (429, zero tokens) and
//!   0.5 % upstream errors (502/504, zero tokens); a third of the requests streamed.
//!
//! Memory stays flat: batches of `--batch` rows are generated, inserted and dropped.
//!
//! `--store URL` (SQLite or PostgreSQL, migrated if needed) also registers the generated
//! developers in the control-plane store, with exactly the ids above (`dev_gen_00000` is the
//! heaviest), emails `dev-gen-NNNNN@aihub.test`, no usable password, plans by traffic rank
//! (the top 50 `enterprise`, the next 450 `pro`, the next 2,500 `developer`, the rest `free`)
//! and creation times before the generated range, each with its keys (`key_gen_NNNNN_K`, the
//! ids in the rows; their secrets are never known). Developers already there are left alone,
//! so it can run again (`--rows 0 --store URL` registers only).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aihub_usage::pricing::{to_nanos, Pricing, Tokens};
use aihub_usage::sink::ClickHouseConfig;
use aihub_usage::UsageRecord;
use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Args {
    clickhouse: String,
    database: String,
    developers: usize,
    rows: u64,
    days: u64,
    batch: usize,
    seed: u64,
    store: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        clickhouse: "http://127.0.0.1:8123".into(),
        database: "aihub_bench".into(),
        developers: 10_000,
        rows: 10_000_000,
        days: 90,
        batch: 200_000,
        seed: 42,
        store: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--clickhouse" => a.clickhouse = value()?,
            "--database" => a.database = value()?,
            "--developers" => a.developers = value()?.parse()?,
            "--rows" => a.rows = value()?.parse()?,
            "--days" => a.days = value()?.parse()?,
            "--batch" => a.batch = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            "--store" => a.store = Some(value()?),
            other => anyhow::bail!("unknown flag {other} (see the file's doc comment)"),
        }
    }
    anyhow::ensure!(
        a.developers > 0 && a.days > 0 && a.batch > 0,
        "counts must be positive"
    );
    Ok(a)
}

/// Cumulative weights for drawing an index with probability ∝ `weight(i)`.
fn cdf(n: usize, weight: impl Fn(usize) -> f64) -> Vec<f64> {
    let mut total = 0.0;
    (0..n)
        .map(|i| {
            total += weight(i);
            total
        })
        .collect()
}

fn draw(rng: &mut StdRng, cdf: &[f64]) -> usize {
    let x = rng.random::<f64>() * cdf[cdf.len() - 1];
    cdf.partition_point(|&c| c < x).min(cdf.len() - 1)
}

/// Models and their popularity.
const MODELS: &[(&str, f64)] = &[
    ("gpt-4o-mini", 40.0),
    ("gpt-4o", 15.0),
    ("claude-3.5-sonnet", 12.0),
    ("llama-3.1-70b", 10.0),
    ("gemini-1.5-pro", 8.0),
    ("text-embedding-3-small", 10.0),
    ("demo", 5.0),
];

struct Generator {
    rng: StdRng,
    developers: Vec<(String, Vec<String>)>,
    dev_cdf: Vec<f64>,
    model_cdf: Vec<f64>,
    pricing: Pricing,
    start_s: u64,
    span_s: u64,
}

impl Generator {
    fn new(a: &Args, now_s: u64) -> Generator {
        let mut rng = StdRng::seed_from_u64(a.seed);
        let developers = (0..a.developers)
            .map(|i| {
                let keys = (0..rng.random_range(1..=5))
                    .map(|k| format!("key_gen_{i:05}_{k}"))
                    .collect();
                (format!("dev_gen_{i:05}"), keys)
            })
            .collect();
        Generator {
            rng,
            developers,
            dev_cdf: cdf(a.developers, |i| 1.0 / ((i + 1) as f64).powf(1.1)),
            model_cdf: cdf(MODELS.len(), |i| MODELS[i].1),
            pricing: Pricing::default(),
            start_s: now_s - a.days * 86_400,
            span_s: a.days * 86_400,
        }
    }

    /// A time in the window, denser by day (UTC 08–20) than by night.
    fn timestamp_ms(&mut self) -> u64 {
        loop {
            let t = self.start_s * 1000 + self.rng.random_range(0..self.span_s * 1000);
            let hour = (t / 3_600_000) % 24;
            let keep = if (8..20).contains(&hour) { 1.0 } else { 0.35 };
            if self.rng.random::<f64>() < keep {
                return t;
            }
        }
    }

    fn record(&mut self) -> UsageRecord {
        let d = draw(&mut self.rng, &self.dev_cdf);
        let k = self.rng.random_range(0..self.developers[d].1.len());
        let (dev, key) = (
            self.developers[d].0.clone(),
            self.developers[d].1[k].clone(),
        );
        let (model, _) = MODELS[draw(&mut self.rng, &self.model_cdf)];
        let embeddings = model.starts_with("text-embedding");
        let ts_ms = self.timestamp_ms();
        let roll = self.rng.random::<f64>();
        let (status, error_type) = match roll {
            r if r < 0.02 => (429, "rate_limit_exceeded"),
            r if r < 0.025 => (if r < 0.0225 { 502 } else { 504 }, "upstream_error"),
            _ => (200, ""),
        };
        let ok = status == 200;
        // Two orders of magnitude: 10^(1..3.3) prompt tokens, fewer completion tokens.
        let prompt = if ok {
            10f64.powf(self.rng.random_range(1.0..3.3)) as u32
        } else {
            0
        };
        let completion = if ok && !embeddings {
            10f64.powf(self.rng.random_range(0.5..2.8)) as u32
        } else {
            0
        };
        let cached = if ok && self.rng.random::<f64>() < 0.2 {
            prompt / 2
        } else {
            0
        };
        let tokens = Tokens {
            prompt,
            cached,
            completion,
        };
        let cost_nanos = to_nanos(self.pricing.price(model, model).cost(tokens));
        let upstream_ms = if status == 429 {
            0
        } else {
            self.rng.random_range(150..4_000)
        };
        let streamed = u8::from(!embeddings && self.rng.random::<f64>() < 0.33);
        UsageRecord {
            request_id: uuid::Uuid::from_u128(self.rng.random()),
            ts: (ts_ms / 1000) as u32,
            ts_ms,
            developer_id: dev,
            key_id: key,
            endpoint: if embeddings {
                "embeddings"
            } else {
                "chat/completions"
            }
            .into(),
            method: "POST".into(),
            model: model.into(),
            upstream_model: model.into(),
            upstream: "openai".into(),
            upstream_endpoint: "https://api.openai.com/v1".into(),
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cost_nanos,
            gateway_overhead_us: self.rng.random_range(150..900),
            upstream_latency_ms: upstream_ms,
            total_latency_ms: upstream_ms + 1,
            status,
            error_type: error_type.into(),
            streamed,
            usage_estimated: 0,
            client_ip: format!("10.{}.{}.{}", self.rng.random::<u8>(), 0, 1),
            user_agent: "OpenAI/Python 1.54.0".into(),
            batch_id: String::new(),
            attempts: 1,
        }
    }
}

/// The plan of the developer at traffic rank `i` (0 = heaviest).
fn plan_of(i: usize) -> &'static str {
    match i {
        0..50 => "enterprise",
        50..500 => "pro",
        500..3000 => "developer",
        _ => "free",
    }
}

/// Registers the generated developers and their keys in the control-plane store (missing ones
/// only), created a year (and a second per rank) before `range_start_ms`.
async fn register(
    url: &str,
    generated: &[(String, Vec<String>)],
    range_start_ms: i64,
) -> anyhow::Result<usize> {
    use aihub_store::developers::{self, NewDeveloper, ROLE_DEVELOPER};
    use aihub_store::keys::{self, NewKey};
    let developers = generated.len();
    let store = aihub_store::Store::connect(&aihub_store::StoreOptions::new(url)).await?;
    aihub_store::migrations::migrate(&store).await?;
    let existing: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT id FROM developers WHERE id LIKE 'dev_gen_%'")
            .fetch_all(store.pool())
            .await?
            .into_iter()
            .collect();
    let missing: Vec<usize> = (0..developers)
        .filter(|&i| !existing.contains(&generated[i].0))
        .collect();
    for chunk in missing.chunks(500) {
        let mut tx = store.begin_write().await?;
        for &i in chunk {
            let new = NewDeveloper {
                email: format!("dev-gen-{i:05}@aihub.test"),
                // Not a PHC string: no password signs in.
                password_hash: "!generated".into(),
                full_name: format!("Generated Developer {i}"),
                company_name: (i % 3 == 0).then(|| format!("Company {}", i / 3)),
                developer_type: if i % 3 == 0 {
                    "enterprise"
                } else {
                    "individual"
                }
                .into(),
                role: ROLE_DEVELOPER.into(),
                plan: plan_of(i).into(),
                verified: true,
            };
            let created = range_start_ms - 365 * 86_400_000 - (developers - i) as i64 * 1000;
            let (id, key_ids) = &generated[i];
            developers::import(&mut tx, id, created, &new).await?;
            for (k, key_id) in key_ids.iter().enumerate() {
                let key = NewKey {
                    id: key_id.clone(),
                    developer_id: id.clone(),
                    name: format!("generated key {k}"),
                    key_hash: aihub_apikey::KeyHash::of(&format!("generated:{key_id}")).to_hex(),
                    key_prefix: "ahub_gen…".into(),
                    models: vec!["*".into()],
                    endpoints: vec!["*".into()],
                    ip_allowlist: Vec::new(),
                    rate_limit_rpm: None,
                    rate_limit_tpm: None,
                    expires_at: None,
                };
                keys::insert(&mut tx, &key).await?;
            }
        }
        tx.commit().await?;
    }
    Ok(missing.len())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let config = ClickHouseConfig {
        url: a.clickhouse.clone(),
        database: a.database.clone(),
        ..ClickHouseConfig::default()
    };
    aihub_usage::schema::migrate(&config)
        .await
        .context("ClickHouse schema")?;
    let client = config.client();
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut generator = Generator::new(&a, now_s);
    if let Some(url) = &a.store {
        let range_start_ms = (now_s - a.days * 86_400) as i64 * 1000;
        let added = register(url, &generator.developers, range_start_ms)
            .await
            .context("registering developers in the store")?;
        eprintln!("store: {added} developers registered");
    }
    let started = Instant::now();
    let mut written = 0u64;
    let mut batch = Vec::with_capacity(a.batch);
    while written < a.rows {
        let n = (a.rows - written).min(a.batch as u64) as usize;
        batch.extend((0..n).map(|_| generator.record()));
        aihub_usage::sink::insert(&client, Duration::from_secs(300), &batch)
            .await
            .map_err(|e| anyhow::anyhow!("insert: {e:?}"))?;
        written += n as u64;
        batch.clear();
        eprintln!(
            "{written} rows ({:.0} rows/s)",
            written as f64 / started.elapsed().as_secs_f64()
        );
    }
    println!(
        "{{\"rows\":{written},\"developers\":{},\"days\":{},\"seconds\":{:.1},\"rows_per_s\":{:.0}}}",
        a.developers,
        a.days,
        started.elapsed().as_secs_f64(),
        written as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
