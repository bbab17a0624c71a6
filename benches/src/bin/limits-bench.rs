//! Open-loop HTTP load client for the rate-limit benchmarks (`loadtests/limits-bench.sh`).
//!
//! `limits-bench load --rate R --seconds S --key KEY --url URL [--url URL2 …] [--connections C]
//! [--timeout-ms T] [--threads N]` sends `POST {url}/v1/chat/completions` (a short chat request,
//! `max_tokens: 16`) R times a second for S seconds, round-robin over the URLs, and prints one
//! JSON line:
//!
//! ```json
//! {"sent": 20000, "status": {"200": 19990, "429": 10}, "errors": 0, "p50_ms": 0.41,
//!  "p99_ms": 1.2, "p999_ms": 3.1, "max_ms": 7.9, "achieved_rate": 1000.0, …}
//! ```
//!
//! Open loop: request *n* is due at `start + n / R` whether or not earlier ones have finished,
//! and its latency is counted from that due time, not from when it was actually sent, so a
//! stalled server shows up in the percentiles instead of slowing the client down (no coordinated
//! omission). The schedule runs on its own thread with `std::thread::sleep` (tokio's timer wheel
//! has a 1 ms granularity, as large as the latencies measured); requests run on the tokio
//! runtime. At most C requests are in flight (default 256); a request waiting for one of those
//! slots keeps its due time. Latency percentiles cover every request that got an HTTP answer
//! (any status, body read to the end); `errors` counts transport failures and timeouts.
//!
//! Further fields: `by_url` (status counts per URL, to see how each node decided),
//! `send_window_s` (first to last send: the span the offered load covered), `send_lag_max_ms`
//! (how late the scheduler sent a request at worst), `first_error`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

const BODY: &str =
    r#"{"model":"mock-gpt","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}"#;
const USAGE: &str = concat!(
    "usage: limits-bench load --rate R --seconds S --key KEY --url URL [--url URL …] ",
    "[--connections C] [--timeout-ms T] [--threads N]"
);

/// Command-line options of `load`.
struct Options {
    rate: f64,
    seconds: f64,
    key: String,
    urls: Vec<String>,
    connections: usize,
    timeout: Duration,
    threads: Option<usize>,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        rate: 0.0,
        seconds: 0.0,
        key: String::new(),
        urls: Vec::new(),
        connections: 256,
        timeout: Duration::from_secs(10),
        threads: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> anyhow::Result<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n > 0.0)
                .ok_or_else(|| anyhow::anyhow!("{flag}: expected a positive number, got `{v}`"))
        };
        match flag.as_str() {
            "--rate" => o.rate = num(value)?,
            "--seconds" => o.seconds = num(value)?,
            "--key" => o.key = value.clone(),
            "--url" => o.urls.push(value.trim_end_matches('/').to_owned()),
            "--connections" => o.connections = num(value)? as usize,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(value)? as u64),
            "--threads" => o.threads = Some(num(value)? as usize),
            _ => anyhow::bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    if o.rate == 0.0 || o.seconds == 0.0 || o.key.is_empty() || o.urls.is_empty() {
        anyhow::bail!("--rate, --seconds, --key and --url are required\n{USAGE}");
    }
    o.connections = o.connections.max(1);
    Ok(o)
}

/// What became of one request.
struct Outcome {
    url: usize,
    /// HTTP status and latency from the due time, or the transport error.
    result: Result<(u16, Duration), String>,
}

async fn one(
    http: reqwest::Client,
    slots: Arc<Semaphore>,
    url: String,
    key: Arc<str>,
    due: Instant,
) -> Result<(u16, Duration), String> {
    let _slot = slots.acquire_owned().await.map_err(|e| e.to_string())?;
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .bearer_auth(&*key)
        .body(BODY)
        .send()
        .await
        .map_err(|e| chain(&e))?;
    let status = response.status().as_u16();
    response.bytes().await.map_err(|e| chain(&e))?;
    Ok((status, due.elapsed()))
}

/// An error with its causes (reqwest's own message names only the URL).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    round3(sorted[i].as_secs_f64() * 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn load(o: Options) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.connections)
        .tcp_nodelay(true)
        .timeout(o.timeout)
        .build()?;
    let endpoints: Vec<String> = o
        .urls
        .iter()
        .map(|u| format!("{u}/v1/chat/completions"))
        .collect();
    let total = (o.rate * o.seconds).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / o.rate);
    let slots = Arc::new(Semaphore::new(o.connections));
    let key: Arc<str> = o.key.into();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let handle = tokio::runtime::Handle::current();

    // The schedule, on a thread of its own: sleep until each due time, then hand the request
    // to the runtime. Behind schedule it sends at once (the latency still counts from `due`).
    let n_urls = endpoints.len();
    let scheduler = tokio::task::spawn_blocking(move || {
        let begin = Instant::now();
        let mut lag_max = Duration::ZERO;
        let mut first_last = (begin, begin);
        for n in 0..total {
            let due = begin + interval.mul_f64(n as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let sent = Instant::now();
            lag_max = lag_max.max(sent.saturating_duration_since(due));
            if n == 0 {
                first_last.0 = sent;
            }
            first_last.1 = sent;
            let url = (n as usize) % n_urls;
            let task = one(
                http.clone(),
                slots.clone(),
                endpoints[url].clone(),
                key.clone(),
                due,
            );
            let tx = tx.clone();
            handle.spawn(async move {
                let result = task.await;
                let _ = tx.send(Outcome { url, result });
            });
        }
        (lag_max, first_last.1.duration_since(first_last.0))
    });

    let mut latencies = Vec::with_capacity(total as usize);
    let mut status: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_url: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); n_urls];
    let (mut errors, mut first_error) = (0u64, None::<String>);
    // Every task holds a sender; the channel ends when the last request has finished.
    while let Some(o) = rx.recv().await {
        match o.result {
            Ok((code, latency)) => {
                latencies.push(latency);
                *status.entry(code.to_string()).or_default() += 1;
                *by_url[o.url].entry(code.to_string()).or_default() += 1;
            }
            Err(e) => {
                errors += 1;
                *by_url[o.url].entry("error".into()).or_default() += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let (lag_max, window) = scheduler.await?;
    latencies.sort_unstable();
    let achieved = if total > 1 && !window.is_zero() {
        (total - 1) as f64 / window.as_secs_f64()
    } else {
        0.0
    };
    let by_url: Vec<Value> = o
        .urls
        .iter()
        .zip(by_url)
        .map(|(url, counts)| json!({"url": url, "status": counts}))
        .collect();
    Ok(json!({
        "sent": total,
        "status": status,
        "errors": errors,
        "p50_ms": percentile_ms(&latencies, 0.50),
        "p99_ms": percentile_ms(&latencies, 0.99),
        "p999_ms": percentile_ms(&latencies, 0.999),
        "max_ms": round3(latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)),
        "achieved_rate": round3(achieved),
        "offered_rate": o.rate,
        "send_window_s": round3(window.as_secs_f64()),
        "send_lag_max_ms": round3(lag_max.as_secs_f64() * 1000.0),
        "by_url": by_url,
        "first_error": first_error,
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("load") => {
            let o = parse(&args[1..])?;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = o.threads {
                rt.worker_threads(n);
            }
            let result = rt.enable_all().build()?.block_on(load(o))?;
            println!("{result}");
            Ok(())
        }
        _ => anyhow::bail!("{USAGE}"),
    }
}
