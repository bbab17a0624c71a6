//! Control-plane benchmarks, driven by `loadtests/controlplane-bench.sh`:
//!
//! - `seed DATABASE_URL DEVELOPERS KEYS_PER_DEVELOPER`: fills a migrated control-plane database
//!   with verified developers (`bench-N@aihub.test`, password `bench password 0000`) and keys, in
//!   multi-row batches.
//! - `api ADMIN_URL CLIENTS SECONDS MODE [RATE]`: CLIENTS developers sign in, then each sends
//!   MODE requests (`list`: `GET /developer/keys`; `create`: `POST /developer/keys`): back to
//!   back (closed loop), or, with RATE, at RATE requests/s in total on a fixed schedule, latency
//!   counted from each request's scheduled time (no coordinated omission); prints throughput and
//!   latency percentiles.
//! - `propagation ADMIN_URL GATEWAY_URL TRIALS`: per trial, creates a key and waits until the
//!   gateway accepts it, then revokes it and waits until the gateway refuses it (polling every
//!   2 ms); prints median and max of both delays.

use std::time::{Duration, Instant};

use aihub_store::{migrations, Store, StoreOptions};
use serde_json::{json, Value};

use aihub_benches::{login, PASSWORD};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn seed(url: &str, developers: usize, keys_per: usize) -> anyhow::Result<()> {
    let store = Store::connect(&StoreOptions::new(url)).await?;
    migrations::migrate(&store).await?;
    let hash = {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt =
            SaltString::encode_b64(b"aihub-bench-salt").map_err(|e| anyhow::anyhow!("{e}"))?;
        let params =
            argon2::Params::new(19 * 1024, 2, 1, None).map_err(|e| anyhow::anyhow!("{e}"))?;
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(PASSWORD.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_string()
    };
    let start = Instant::now();
    let now = aihub_store::now_ms();
    let mut seq: i64 = 0;
    for chunk_start in (0..developers).step_by(500) {
        let chunk: Vec<usize> = (chunk_start..(chunk_start + 500).min(developers)).collect();
        let mut tx = store.begin_write().await?;
        let mut sql = String::from(
            "INSERT INTO developers (id, email, password_hash, full_name, developer_type, role, \
             plan, email_verified_at, created_at, updated_at) VALUES ",
        );
        for (j, _) in chunk.iter().enumerate() {
            let b = j * 4;
            if j > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, 'Bench Dev', 'individual', 'developer', 'free', ${}, ${b4}, ${b4})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b4 = b + 4
            ));
        }
        let mut q = sqlx::query(&sql);
        for i in &chunk {
            q = q
                .bind(format!("dev_bench{i:08}"))
                .bind(format!("bench-{i}@aihub.test"))
                .bind(&hash)
                .bind(now);
        }
        q.execute(&mut *tx).await?;
        // Keys of these developers, 500 rows a statement.
        let keys: Vec<(usize, usize)> = chunk
            .iter()
            .flat_map(|d| (0..keys_per).map(move |k| (*d, k)))
            .collect();
        for part in keys.chunks(500) {
            let mut sql = String::from(
                "INSERT INTO api_keys (id, developer_id, name, key_hash, key_prefix, models, \
                 endpoints, ip_allowlist, expires_at, created_at, updated_at, change_seq) VALUES ",
            );
            for (j, _) in part.iter().enumerate() {
                let b = j * 5;
                if j > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, 'seeded', ${}, 'ahub_dev_xxxx…', '[\"*\"]', '[\"*\"]', '[]', NULL, ${}, ${}, ${})",
                    b + 1, b + 2, b + 3, b + 4, b + 4, b + 5
                ));
            }
            let mut q = sqlx::query(&sql);
            for (d, k) in part {
                seq += 1;
                let hash = aihub_apikey::KeyHash::of(&format!("bench-key-{d}-{k}")).to_hex();
                q = q
                    .bind(format!("key_bench{d:08}_{k:03}"))
                    .bind(format!("dev_bench{d:08}"))
                    .bind(hash)
                    .bind(now)
                    .bind(seq);
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE change_counters SET value = $1 WHERE name = 'keys' AND value < $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    println!(
        "seeded {developers} developers and {} keys in {:.1} s",
        developers * keys_per,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn api(
    admin: &str,
    clients: usize,
    seconds: u64,
    mode: &str,
    rate: f64,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let mut tokens = Vec::new();
    for i in 0..clients {
        // Spread over the seeded accounts; each client is its own developer.
        tokens.push(login(&http, admin, i * 37).await?);
    }
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs(seconds);
    // Open loop: client i sends at begin + offset_i + n * interval.
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / rate));
    let mut tasks = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let offset = interval.map(|iv| iv.mul_f64(i as f64 / clients as f64));
        let http = http.clone();
        let admin = admin.to_owned();
        let mode = mode.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u32;
            while Instant::now() < deadline {
                let t = match (interval, offset) {
                    (Some(iv), Some(off)) => {
                        let due = begin + off + iv * n;
                        n += 1;
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => Instant::now(),
                };
                if mode == "list" {
                    let r = http
                        .get(format!("{admin}/developer/keys"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.push(t.elapsed());
                        }
                        _ => errors += 1,
                    }
                } else {
                    let r = http
                        .post(format!("{admin}/developer/keys"))
                        .bearer_auth(&token)
                        .json(&json!({"name": "bench"}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.push(t.elapsed());
                        }
                        _ => errors += 1,
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    all.sort();
    let shape = if rate > 0.0 {
        format!("open loop at {rate:.0}/s")
    } else {
        "closed loop".into()
    };
    println!(
        "{mode}: {clients} clients, {shape}, {seconds} s: {} requests ({:.0}/s), {errors} errors; p50 {} p95 {} p99 {} max {}",
        all.len(),
        all.len() as f64 / seconds as f64,
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.95)),
        ms(percentile(&all, 0.99)),
        ms(all.last().copied().unwrap_or_default()),
    );
    Ok(())
}

async fn gateway_status(http: &reqwest::Client, gateway: &str, key: &str) -> u16 {
    http.get(format!("{gateway}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_for(http: &reqwest::Client, gateway: &str, key: &str, status: u16) -> Duration {
    let t = Instant::now();
    while gateway_status(http, gateway, key).await != status {
        if t.elapsed() > Duration::from_secs(30) {
            panic!("gateway never answered {status}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t.elapsed()
}

async fn propagation(admin: &str, gateway: &str, trials: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let token = login(&http, admin, 1).await?;
    let (mut appear, mut revoke) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let created: Value = http
            .post(format!("{admin}/developer/keys"))
            .bearer_auth(&token)
            .json(&json!({"name": "propagation"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let key = created["key"].as_str().unwrap_or_default().to_owned();
        let id = created["api_key"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        appear.push(wait_for(&http, gateway, &key, 200).await);
        http.delete(format!("{admin}/developer/keys/{id}"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        // Timed from the moment the revocation was acknowledged.
        revoke.push(wait_for(&http, gateway, &key, 401).await);
    }
    appear.sort();
    revoke.sort();
    println!(
        "propagation over {trials} trials: new key usable after median {} max {}; revoked key refused after median {} p95 {} max {}",
        ms(percentile(&appear, 0.5)),
        ms(*appear.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&revoke, 0.5)),
        ms(percentile(&revoke, 0.95)),
        ms(*revoke.last().unwrap_or(&Duration::ZERO)),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    match arg(0).as_str() {
        "seed" => seed(&arg(1), num(2, 10_000), num(3, 10)).await,
        "api" => {
            let rate = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            api(&arg(1), num(2, 50), num(3, 20) as u64, &arg(4), rate).await
        }
        "propagation" => propagation(&arg(1), &arg(2), num(3, 100)).await,
        _ => {
            anyhow::bail!("usage: controlplane-bench seed|api|propagation … (see the source's doc)")
        }
    }
}
