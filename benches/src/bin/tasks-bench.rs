//! Tasks and batches benchmark, driven by `loadtests/tasks-bench.sh` (which seeds developers,
//! starts the release gateway, admin API and two mock upstreams, and reads CPU from /proc):
//!
//! `tasks-bench STAGE ADMIN_URL GATEWAY_URL DEVELOPERS N`
//!
//! - `create`: task creation latency: N `POST /developer/tasks` (a one-prompt
//!   `batch_generate`) one after another, then N `POST /v1/batches` through the gateway (one
//!   uploaded input file): p50, p95, p99, max.
//! - `queue`: N one-prompt tasks spread over DEVELOPERS developers, created by 16 clients at
//!   once (model `slow`: the mock answers after 2 s), then the time until all completed, the
//!   most items in flight seen on the admin's `aihub_task_items_in_flight` gauge, and tasks per
//!   second (the upstream's latency bounds it: in-flight / 2 s).
//! - `items`: one OpenAI batch of N items (model `fast`: the mock answers at once): wall time and
//!   items per second; the script turns process CPU into µs per item.
//!
//! Prints `key: value` lines (the script formats them).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use aihub_benches::login;

fn arg(i: usize) -> String {
    std::env::args().nth(i + 1).unwrap_or_default()
}

/// A session and a fresh API key for seeded developer `i`; waits until the gateway knows it.
async fn developer(
    http: &reqwest::Client,
    admin: &str,
    gateway: &str,
    i: usize,
) -> anyhow::Result<(String, String)> {
    let session = login(http, admin, i).await?;
    let k: Value = http
        .post(format!("{admin}/developer/keys"))
        .bearer_auth(&session)
        .json(&json!({"name": "tasks-bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = k["key"].as_str().unwrap_or_default().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{gateway}/v1/batches"))
        .bearer_auth(&key)
        .send()
        .await?
        .status()
        != 200
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway never accepted the key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((session, key))
}

fn percentiles(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    println!(
        "{name}: n={} p50={:.2} ms p95={:.2} ms p99={:.2} ms max={:.2} ms",
        v.len(),
        at(0.50),
        at(0.95),
        at(0.99),
        at(1.0)
    );
}

fn jsonl(n: usize, model: &str) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": format!("item {i}")}], "max_tokens": 16}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn upload(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
    body: &str,
) -> anyhow::Result<String> {
    let b = "benchboundary";
    let resp = http
        .post(format!("{gateway}/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{b}\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{body}\r\n--{b}--\r\n"
        ))
        .send()
        .await?;
    let status = resp.status();
    let r: Value = resp.json().await?;
    anyhow::ensure!(status == 200, "upload: {status} {r}");
    Ok(r["id"].as_str().unwrap_or_default().to_owned())
}

async fn create_batch(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
    file: &str,
) -> anyhow::Result<String> {
    let r: Value = http
        .post(format!("{gateway}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(r["id"].as_str().unwrap_or_default().to_owned())
}

async fn create(
    http: &reqwest::Client,
    admin: &str,
    gateway: &str,
    n: usize,
) -> anyhow::Result<()> {
    let (session, key) = developer(http, admin, gateway, 0).await?;
    let mut task_ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        http.post(format!("{admin}/developer/tasks"))
            .bearer_auth(&session)
            .json(&json!({"type": "batch_generate", "model": "fast", "prompts": [format!("p{i}")]}))
            .send()
            .await?
            .error_for_status()?;
        task_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    percentiles("create_task", task_ms);
    let file = upload(http, gateway, &key, &jsonl(10, "fast")).await?;
    let mut batch_ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        create_batch(http, gateway, &key, &file).await?;
        batch_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    percentiles("create_batch_via_gateway", batch_ms);
    Ok(())
}

/// The admin's `aihub_task_items_in_flight` gauge.
async fn in_flight(http: &reqwest::Client, admin: &str) -> i64 {
    let Ok(r) = http.get(format!("{admin}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("aihub_task_items_in_flight "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as i64
}

async fn unfinished(http: &reqwest::Client, admin: &str, session: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    for status in ["pending", "running"] {
        let r: Value = http
            .get(format!("{admin}/developer/tasks?status={status}&limit=100"))
            .bearer_auth(session)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        n += r["data"].as_array().map_or(0, |d| d.len());
    }
    Ok(n)
}

async fn queue(
    http: &reqwest::Client,
    admin: &str,
    gateway: &str,
    developers: usize,
    n: usize,
) -> anyhow::Result<()> {
    let mut sessions = Vec::new();
    for i in 0..developers {
        sessions.push(developer(http, admin, gateway, 100 + i).await?.0);
    }
    let started = Instant::now();
    let per_client = n.div_ceil(16);
    let mut clients = Vec::new();
    for c in 0..16 {
        let (http, admin, sessions) = (http.clone(), admin.to_owned(), sessions.clone());
        clients.push(tokio::spawn(async move {
            for i in c * per_client..((c + 1) * per_client).min(n) {
                let session = &sessions[i % sessions.len()];
                let r = http
                    .post(format!("{admin}/developer/tasks"))
                    .bearer_auth(session)
                    .json(&json!({"type": "batch_generate", "model": "slow", "prompts": [format!("p{i}")], "options": {"max_tokens": 16}}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 202, "create: {}", r.status());
            }
            anyhow::Ok(())
        }));
    }
    let mut peak = 0;
    let created = loop {
        peak = peak.max(in_flight(http, admin).await);
        if clients.iter().all(|c| c.is_finished()) {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for c in clients {
        c.await??;
    }
    println!(
        "queue_created: {n} tasks in {:.2} s ({:.0} tasks/s, 16 clients)",
        created.as_secs_f64(),
        n as f64 / created.as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        peak = peak.max(in_flight(http, admin).await);
        let mut open = 0;
        for s in &sessions {
            open += unfinished(http, admin, s).await?;
        }
        if open == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "tasks still open after 30 min");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    println!(
        "queue_done: {n} tasks in {:.1} s ({:.0} tasks/s), peak items in flight {peak}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}

async fn items(http: &reqwest::Client, admin: &str, gateway: &str, n: usize) -> anyhow::Result<()> {
    let (_, key) = developer(http, admin, gateway, 1).await?;
    let file = upload(http, gateway, &key, &jsonl(n, "fast")).await?;
    let started = Instant::now();
    let id = create_batch(http, gateway, &key, &file).await?;
    loop {
        let b: Value = http
            .get(format!("{gateway}/v1/batches/{id}"))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        match b["status"].as_str() {
            Some("completed") => {
                anyhow::ensure!(b["request_counts"]["completed"] == n, "{b}");
                break;
            }
            Some("failed" | "expired" | "cancelled") => anyhow::bail!("batch ended: {b}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let took = started.elapsed();
    println!(
        "items_done: {n} items in {:.2} s ({:.0} items/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (stage, admin, gateway) = (arg(0), arg(1), arg(2));
    let developers: usize = arg(3).parse().unwrap_or(10);
    let n: usize = arg(4).parse().unwrap_or(1000);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    match stage.as_str() {
        "create" => create(&http, &admin, &gateway, n).await,
        "queue" => queue(&http, &admin, &gateway, developers, n).await,
        "items" => items(&http, &admin, &gateway, n).await,
        _ => anyhow::bail!(
            "usage: tasks-bench create|queue|items ADMIN_URL GATEWAY_URL DEVELOPERS N"
        ),
    }
}
