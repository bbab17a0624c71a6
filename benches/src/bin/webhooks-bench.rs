//! Webhook delivery benchmark, driven by `loadtests/webhooks-bench.sh` (which seeds developers
//! with `controlplane-bench seed` and starts the release admin API):
//!
//! `webhooks-bench DATABASE_URL ADMIN_URL DEVELOPERS EVENTS RATE SECONDS`
//!
//! 1. A receiver on loopback (HTTP/1.1 keep-alive, answers 200 at once) and one endpoint per
//!    developer subscribed to `*`, written into the store.
//! 2. The admin API's own latency (`GET /developer/webhooks`, 50 requests/s on a fixed
//!    schedule) idle, as the baseline.
//! 3. Throughput: EVENTS events written into the outbox at once (round robin over the
//!    developers, 1,000 per transaction, as other nodes and gateways write them), then the time
//!    until every delivery has arrived: deliveries per minute, and the admin API's latency
//!    while the backlog drains.
//! 4. Event-to-first-attempt: RATE test events per second for SECONDS
//!    (`POST /developer/webhooks/{id}/test`), latency from the event's `created_at` to its
//!    arrival at the receiver; then the same for events written straight into the outbox (no
//!    request wakes the engine: the poll interval bounds them).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aihub_store::webhooks::{self, NewEndpoint};
use aihub_store::{outbox, Store, StoreOptions};
use serde_json::{json, Value};

use aihub_benches::PASSWORD;

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    /// Milliseconds from the event's `created_at` to its arrival, first arrivals only.
    lags: Vec<i64>,
    duplicates: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn now_ms() -> i64 {
    aihub_store::now_ms()
}

/// `2026-12-05T10:00:00.123Z` → unix ms.
fn parse_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

async fn receiver(seen: Arc<Mutex<Seen>>) -> anyhow::Result<std::net::SocketAddr> {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let at = Instant::now();
                            let now = now_ms();
                            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                                let id = v["id"].as_str().unwrap_or("").to_owned();
                                let created = v["created_at"].as_str().and_then(parse_ms);
                                let mut s = seen.lock().unwrap();
                                if s.ids.insert(id) {
                                    if let Some(c) = created {
                                        s.lags.push(now - c);
                                    }
                                    s.first.get_or_insert(at);
                                    s.last = Some(at);
                                } else {
                                    s.duplicates += 1;
                                }
                            }
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `GET /developer/webhooks` at 50 requests/s until `stop`, latency from each scheduled time.
async fn probe(
    http: reqwest::Client,
    admin: String,
    token: String,
    stop: Arc<Mutex<bool>>,
) -> Vec<Duration> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut i = 0u32;
    while !*stop.lock().unwrap() {
        let at = start + Duration::from_millis(20) * i;
        tokio::time::sleep_until(at.into()).await;
        let r = http
            .get(format!("{admin}/developer/webhooks"))
            .bearer_auth(&token)
            .send()
            .await;
        if let Ok(r) = r {
            let _ = r.bytes().await;
        }
        out.push(at.elapsed());
        i += 1;
    }
    out.sort();
    out
}

fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    let p = |q: f64| {
        if d.is_empty() {
            0.0
        } else {
            d[((d.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0
        }
    };
    format!(
        "{} requests, p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        d.len(),
        p(0.5),
        p(0.95),
        p(0.99)
    )
}

async fn wait_all(seen: &Arc<Mutex<Seen>>, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while seen.lock().unwrap().ids.len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} deliveries arrived",
            seen.lock().unwrap().ids.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 7,
        "usage: webhooks-bench DATABASE_URL ADMIN_URL DEVELOPERS EVENTS RATE SECONDS"
    );
    let (db, admin) = (&args[1], args[2].trim_end_matches('/').to_owned());
    let developers: usize = args[3].parse()?;
    let events: usize = args[4].parse()?;
    let rate: u64 = args[5].parse()?;
    let seconds: u64 = args[6].parse()?;
    let store = Store::connect(&StoreOptions::new(db)).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let addr = receiver(seen.clone()).await?;
    let url = format!("http://{addr}/hooks");
    let types = vec!["*".to_owned()];
    let mut tx = store.begin_write().await?;
    for i in 0..developers {
        let dev = format!("dev_bench{i:08}");
        let new = NewEndpoint {
            developer_id: &dev,
            url: &url,
            description: "bench",
            event_types: &types,
            max_retries: 3,
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            active: true,
        };
        webhooks::create(&mut tx, &new).await?;
    }
    tx.commit().await?;
    let http = reqwest::Client::new();
    let login: Value = http
        .post(format!("{admin}/developer/login"))
        .json(&json!({"email": "bench-0@aihub.test", "password": PASSWORD}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(!token.is_empty(), "login failed: {login}");

    // Baseline.
    let stop = Arc::new(Mutex::new(false));
    let p = tokio::spawn(probe(
        http.clone(),
        admin.clone(),
        token.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    *stop.lock().unwrap() = true;
    println!(
        "- admin API idle (`GET /developer/webhooks`, 50/s): {}",
        summary(p.await?)
    );

    // Throughput.
    let stop = Arc::new(Mutex::new(false));
    let p = tokio::spawn(probe(
        http.clone(),
        admin.clone(),
        token.clone(),
        stop.clone(),
    ));
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let mut tx = store.begin_write().await?;
        for i in chunk {
            let dev = format!("dev_bench{:08}", i % developers);
            outbox::enqueue(&mut tx, "api.usage_alert", Some(&dev), json!({"n": i})).await?;
        }
        tx.commit().await?;
    }
    let written = started.elapsed();
    wait_all(&seen, events, Duration::from_secs(600)).await?;
    let all = started.elapsed();
    *stop.lock().unwrap() = true;
    let during = p.await?;
    let (span, dups) = {
        let s = seen.lock().unwrap();
        (s.last.unwrap() - s.first.unwrap(), s.duplicates)
    };
    println!(
        "- throughput: {events} events written in {:.1} s; all {events} delivered {:.1} s after the first write: {:.0} deliveries/min overall, {:.0}/min from first to last arrival; {dups} duplicates",
        written.as_secs_f64(),
        all.as_secs_f64(),
        events as f64 / all.as_secs_f64() * 60.0,
        events as f64 / span.as_secs_f64() * 60.0,
    );
    println!("- admin API while the backlog drains: {}", summary(during));

    // Event to first attempt, events from requests.
    let hook: Value = http
        .get(format!("{admin}/developer/webhooks"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let id = hook["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    seen.lock().unwrap().lags.clear();
    let before = seen.lock().unwrap().ids.len();
    let n = (rate * seconds) as usize;
    let start = Instant::now();
    let mut sends = Vec::with_capacity(n);
    for i in 0..n as u32 {
        tokio::time::sleep_until((start + Duration::from_secs(1) * i / rate as u32).into()).await;
        let (http, url, token) = (
            http.clone(),
            format!("{admin}/developer/webhooks/{id}/test"),
            token.clone(),
        );
        sends.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for s in sends {
        anyhow::ensure!(s.await?? == 202, "a test event was refused");
    }
    wait_all(&seen, before + n, Duration::from_secs(60)).await?;
    let mut lags = std::mem::take(&mut seen.lock().unwrap().lags);
    lags.sort_unstable();
    println!(
        "- event to arrival, {rate} test events/s over the API for {seconds} s ({n} events): p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        pct(&lags, 0.5), pct(&lags, 0.95), pct(&lags, 0.99), lags.last().copied().unwrap_or(0)
    );

    // Event to first attempt, events written straight into the outbox.
    let before = seen.lock().unwrap().ids.len();
    let start = Instant::now();
    for i in 0..n as u32 {
        tokio::time::sleep_until((start + Duration::from_secs(1) * i / rate as u32).into()).await;
        let mut tx = store.begin_write().await?;
        let dev = format!("dev_bench{:08}", i as usize % developers);
        outbox::enqueue(&mut tx, "api.usage_alert", Some(&dev), json!({"n": i})).await?;
        tx.commit().await?;
    }
    wait_all(&seen, before + n, Duration::from_secs(60)).await?;
    let mut lags = std::mem::take(&mut seen.lock().unwrap().lags);
    lags.sort_unstable();
    println!(
        "- event to arrival, {rate} events/s written into the outbox by another process (found by the poll) for {seconds} s: p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        pct(&lags, 0.5), pct(&lags, 0.95), pct(&lags, 0.99), lags.last().copied().unwrap_or(0)
    );
    Ok(())
}
