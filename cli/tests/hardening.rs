//! Black-box tests of the gateway's defences against clients (issue 14): non-canonical paths,
//! limits decided before the body is read, bounded body buffers, clients that stop reading,
//! account headers, and hard-stop quotas against oversized requests. Real gateway process,
//! real mock upstream, raw TCP where a well-behaved HTTP client cannot say what is tested.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn redis_url() -> String {
    std::env::var("AIHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Writes `request` on a new connection and returns what arrives until the connection closes,
/// a whole JSON error body is in, or `wait` passes.
fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(request).unwrap();
    read_error_answer(&mut s)
}

fn post_head(path: &str, key: &str, len: usize, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n{extra}\r\n"
    )
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn non_canonical_paths_are_refused_before_permissions_and_routing() {
    let mock = Mock::start(&[]);
    let k = key("emb", &["endpoints: [\"embeddings*\"]"]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    let payload = serde_json::to_string(&chat("mock-gpt")).unwrap();
    // The key may call embeddings only; each of these reaches chat completions on a server
    // that resolves dot segments or decodes before resolving.
    let bad = [
        "/v1/embeddings/../chat/completions",
        "/v1/embeddings/./../chat/completions",
        "/v1/embeddings/%2e%2e/chat/completions",
        "/v1/embeddings/%2E%2E/chat/completions",
        "/v1/embeddings/.%2e/chat/completions",
        "/v1/embeddings%2f..%2fchat/completions",
        "/v1/embeddings%2F..%2Fchat/completions",
        "/v1/embeddings/..%2Fchat/completions",
        "/v1/embeddings/..;/chat/completions",
        "/v1/embeddings//../chat/completions",
        "/v1//embeddings",
        "/v1/embeddings%252e%252e/chat/completions",
        "/v1/embeddings\\..\\chat/completions",
        "/v1/embeddings%5c..%5cchat/completions",
        "http://x/v1/embeddings/../chat/completions",
    ];
    for path in bad {
        let request = post_head(path, &k.key, payload.len(), "Connection: close\r\n") + &payload;
        let out = raw(gw.addr, request.as_bytes(), Duration::from_secs(5));
        assert_eq!(status_of(&out), 400, "{path}: {out}");
        assert!(out.contains("\"code\":\"invalid_path\""), "{path}: {out}");
        assert!(out.contains("x-request-id"), "{path}: {out}");
    }
    let get = "GET /v1/models/%2e%2e/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        .to_owned()
        + &k.key
        + "\r\nConnection: close\r\n\r\n";
    let out = raw(gw.addr, get.as_bytes(), Duration::from_secs(5));
    assert!(out.contains("\"code\":\"invalid_path\""), "{out}");
    // The canonical paths behave as before: the key's own endpoint passes, the other is 403.
    let r = gw
        .post(&k.key, "/v1/embeddings")
        .json(&serde_json::json!({"model": "mock-gpt", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.chat(&k.key, &chat("mock-gpt")).await;
    expect_error(r, 403, "permission_denied").await;
}

#[tokio::test]
async fn a_key_at_its_request_limit_is_refused_before_its_body_is_read() {
    let mock = Mock::start(&[]);
    let k = key("slow", &["rate_limit_rpm: 1"]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    ) + "limits:\n  default_max_tokens: 16\n";
    let gw = Gateway::start(&body, &["request_body_timeout: 30s"]);
    assert_eq!(gw.chat(&k.key, &chat("mock-gpt")).await.status(), 200);
    // 5 MB announced, 1 KB sent, the rest never: the answer comes without the body.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    s.write_all(post_head("/v1/chat/completions", &k.key, 5_000_000, "").as_bytes())
        .unwrap();
    s.write_all(&[b' '; 1024]).unwrap();
    let out = read_error_answer(&mut s);
    let waited = started.elapsed();
    assert_eq!(status_of(&out), 429, "{out}");
    assert!(out.contains("\"code\":\"rate_limit_exceeded\""), "{out}");
    assert!(out.to_ascii_lowercase().contains("retry-after:"), "{out}");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    // The same with `Expect: 100-continue`: refused instead of invited to send.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = post_head(
        "/v1/chat/completions",
        &k.key,
        5_000_000,
        "Expect: 100-continue\r\n",
    );
    s.write_all(head.as_bytes()).unwrap();
    let out = read_error_answer(&mut s);
    assert_eq!(status_of(&out), 429, "{out}");
}

/// Virtual memory of a process, kB (`VmSize` in `/proc/<pid>/status`).
fn vm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_declared_length_does_not_size_the_body_buffer() {
    let mock = Mock::start(&[]);
    let k = key("big", &[]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &["request_body_timeout: 30s"]);
    let before = vm_kb(gw.pid());
    // 40 clients announce 10 MB each and send two small pieces (two reads: the second one is
    // where the buffer is allocated), then nothing.
    let head = post_head("/v1/chat/completions", &k.key, 10_000_000, "");
    let mut conns: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(br#"{"model":"mock-gpt","#).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for s in &mut conns {
        s.write_all(br#""messages":[],"x":""#).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown_mb = vm_kb(gw.pid()).saturating_sub(before) / 1024;
    assert!(
        grown_mb < 100,
        "40 unfinished bodies took {grown_mb} MB of address space"
    );
    // The bodies are still being received: finishing one is an ordinary request.
    drop(conns);
    assert_eq!(gw.chat(&k.key, &chat("mock-gpt")).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_request_metered() {
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mock = Mock::start(&[]);
    let plans = wal.path().join("plans.yaml");
    write(
        &plans,
        "default_plan: one\nplans:\n  one:\n    overage: true\n    max_concurrent_requests: 1\n",
    );
    let k = key("stalled", &["plan: one"]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    ) + &format!("limits:\n  plans_file: \"{}\"\n", plans.display())
        + &db.metering_yaml(&wal.path().join("wal"), &[]);
    let gw = Gateway::start(&body, &["response_write_timeout: 1s"]);
    // A long stream (100,000 events, ~20 MB: far more than the socket buffers hold) to a client
    // that never reads.
    let payload = serde_json::to_string(&serde_json::json!({
        "model": "mock-gpt", "stream": true,
        "messages": [{"role": "user", "content": "Say hello"}]
    }))
    .unwrap();
    let head = post_head(
        "/v1/chat/completions",
        &k.key,
        payload.len(),
        "x-mock-chunks: 100000\r\n",
    );
    let mut stalled = TcpStream::connect(gw.addr).unwrap();
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.write_all(payload.as_bytes()).unwrap();
    let started = Instant::now();
    // The gateway gives up within the write timeout of the stall, and meters what it delivered.
    let rows = db
        .wait_for(
            "SELECT count() FROM usage_events WHERE error_type = 'client_timeout'",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(rows, 1, "no usage record for the stalled request");
    let row = db
        .query(
            "SELECT status, streamed, usage_estimated, completion_tokens, endpoint \
             FROM usage_events FORMAT TSV",
        )
        .await;
    let f: Vec<&str> = row.trim().split('\t').collect();
    assert_eq!(&f[..3], ["200", "1", "1"], "{row}");
    let delivered: u32 = f[3].parse().unwrap();
    assert!(
        delivered > 0 && delivered < 100_000,
        "completion estimated from what was delivered: {row}"
    );
    assert_eq!(f[4], "chat/completions");
    assert!(started.elapsed() < Duration::from_secs(15));
    // The concurrency slot came back (the plan allows one request in flight).
    let r = gw.chat(&k.key, &chat("mock-gpt")).await;
    assert_eq!(r.status(), 200);
    assert!(gw.log_text().contains("client_timeout"));
    drop(stalled);
}

#[tokio::test]
async fn account_headers_are_stripped_both_ways_unless_the_upstream_forwards_them() {
    let mock = Mock::start(&[]);
    let k = key("acct", &[]);
    let body = config(
        &[
            upstream("plain", &[mock.base_url()], &[]),
            upstream(
                "trusted",
                &[mock.base_url()],
                &["forward_account_headers: true"],
            ),
        ],
        &[
            ("via-plain", "plain", Some("mock-gpt")),
            ("via-trusted", "trusted", Some("mock-gpt")),
        ],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    let send = |model: &str| {
        gw.post(&k.key, "/v1/chat/completions")
            .header("OpenAI-Organization", "org-client-choice")
            .header("OpenAI-Project", "proj_client_choice")
            .json(&chat(model))
            .send()
    };
    let r = send("via-plain").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    for name in [
        "x-mock-request-openai-organization",
        "x-mock-request-openai-project",
        "openai-organization",
        "openai-project",
    ] {
        assert!(!h.contains_key(name), "{name} crossed the gateway: {h:?}");
    }
    assert!(h.contains_key("x-mock-server"), "the mock answered");
    let r = send("via-trusted").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-mock-request-openai-organization"], "org-client-choice");
    assert_eq!(h["x-mock-request-openai-project"], "proj_client_choice");
    assert_eq!(h["openai-organization"], "org-mock");
    assert_eq!(h["openai-project"], "proj_mock");
}

/// A chat body asking for `max_tokens`, with a prompt of about `prompt_bytes`.
fn asking(max_tokens: Option<u64>, prompt_bytes: usize) -> serde_json::Value {
    let mut v = serde_json::json!({
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": "x".repeat(prompt_bytes)}]
    });
    if let Some(m) = max_tokens {
        v["max_tokens"] = m.into();
    }
    v
}

/// The Free plan (1,000 tokens a month, hard stop): what a request declares must fit what is
/// left, and a refused request takes nothing from any bucket.
async fn free_plan_hard_stop(redis: Option<String>) {
    let mock = Mock::start(&[]);
    let k = key("free", &["plan: free"]);
    let mut limits = "limits:\n  default_max_tokens: 1024\n".to_owned();
    if let Some(url) = &redis {
        limits += &format!(
            "  redis:\n    url: \"{url}\"\n    prefix: \"aihub-test-free-{}\"\n    timeout: 1s\n",
            aihub_apikey::generate()[aihub_apikey::PREFIX.len()..][..12].to_ascii_lowercase()
        );
    }
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    ) + &limits;
    let gw = Gateway::start(&body, &[]);
    if redis.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.metric("aihub_limits_redis_up") != 1.0 {
            assert!(Instant::now() < deadline, "Redis never up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let post = |body: serde_json::Value, chunks: u64| {
        gw.post(&k.key, "/v1/chat/completions")
            .header("x-mock-chunks", chunks.to_string())
            .json(&body)
            .send()
    };
    // Larger than the whole month: refused, by its max_tokens or by its prompt.
    let r = post(asking(Some(5000), 10), 16).await.unwrap();
    let e = expect_error(r, 429, "insufficient_quota").await;
    assert_eq!(e["type"], "insufficient_quota");
    let r = post(asking(None, 8000), 16).await.unwrap();
    expect_error(r, 429, "insufficient_quota").await;
    // Nothing was taken by them: this is the developer's first request of the minute.
    let r = post(asking(Some(10), 10), 16).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "19");
    r.bytes().await.unwrap();
    // A request naming no max_tokens is checked on its prompt.
    let r = post(asking(None, 10), 16).await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // 300-token answers (each declaring ~322) until the next would not fit: after the ~34
    // tokens above, three fit (~946 used), a fourth would end past 1,000.
    let mut ok = 0;
    let refused = loop {
        tokio::time::sleep(Duration::from_millis(200)).await; // settled before the next
        let r = post(asking(Some(300), 10), 300).await.unwrap();
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        ok += 1;
        assert!(ok < 5, "never refused");
    };
    assert_eq!(ok, 3, "three 300-token answers fit, a fourth does not");
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        wait > 0 && wait <= 31 * 86_400,
        "until the month ends: {wait}"
    );
    expect_error(refused, 429, "insufficient_quota").await;
    // What is left still serves a request that fits.
    let r = post(asking(Some(10), 10), 16).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_free_plan_refuses_a_request_larger_than_what_is_left() {
    free_plan_hard_stop(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_free_plan_refuses_a_request_larger_than_what_is_left_through_redis() {
    free_plan_hard_stop(Some(redis_url())).await;
}
