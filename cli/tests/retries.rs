//! Retries before the first byte and fallback routes, black-box: the real gateway in front of
//! mock upstreams with fault switches. A 503 endpoint is hidden by its healthy sibling;
//! statuses outside `retry.on_status` and paths outside `retry.paths` go to the client as they
//! came; when every attempt fails the client sees the provider's own error; `Retry-After` is
//! waited out, or ends the retries when it would pass the deadline; a first byte that does not
//! come within `read_timeout` moves on to the next endpoint; every attempt is counted and the
//! usage record says how many were made. A failing route falls back to the next model of its
//! chain (also on configured error codes such as `context_length_exceeded`), priced as the
//! serving model, recorded with both models.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn gateway(upstreams: &[String], keys: &[&TestKey], metering: &str) -> Gateway {
    Gateway::start(
        &format!(
            "{}{metering}",
            config(upstreams, &[("gpt-4o", "m", None)], keys)
        ),
        &[],
    )
}

/// A mock upstream answering every request with `status`.
fn failing(name: &str, status: &str) -> Mock {
    Mock::start(&[
        "--name",
        name,
        "--error-every",
        "1",
        "--error-status",
        status,
    ])
}

fn server(r: &reqwest::Response) -> String {
    r.headers()["x-mock-server"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_endpoint_is_hidden_by_its_sibling_and_every_attempt_is_recorded() {
    let bad = failing("bad", "503");
    let good = Mock::start(&["--name", "good"]);
    let k = key("retry", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let gw = gateway(
        &[upstream(
            "m",
            &[bad.base_url(), good.base_url()],
            &["health: {failures: 100}", "retry: {backoff: 2s}"],
        )],
        &[&k],
        &db.metering_yaml(wal.path(), &[]),
    );
    for _ in 0..40 {
        let started = Instant::now();
        let r = gw.chat(&k.key, &chat("gpt-4o")).await;
        assert_eq!(r.status(), 200, "the 503 never reaches the client");
        // Moving on to the sibling (not tried yet) does not wait the 2 s backoff.
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(server(&r), "good");
        r.bytes().await.unwrap();
    }
    let retried = gw.metric_eventually(
        &format!(
            "aihub_upstream_attempts_total{{endpoint=\"{}\",result=\"retried_status\",upstream=\"m\"}}",
            bad.base_url()
        ),
        20.0,
    );
    assert_eq!(
        retried, 20.0,
        "round robin starts on the bad endpoint every other time"
    );
    assert_eq!(
        db.wait_for(
            "SELECT count() FROM usage_events WHERE status = 200",
            40,
            WAIT
        )
        .await,
        40
    );
    assert_eq!(
        db.query("SELECT attempts, count() FROM usage_events GROUP BY attempts ORDER BY attempts")
            .await
            .trim(),
        "1\t20\n2\t20"
    );
    let endpoints = db
        .query("SELECT DISTINCT upstream_endpoint FROM usage_events")
        .await;
    assert_eq!(
        endpoints.trim(),
        good.base_url(),
        "the final endpoint is recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_retried_goes_to_the_client_as_it_came() {
    let first = failing("a", "503");
    let other = failing("b", "503");
    let k = key("noretry", &[]);
    let gw = gateway(
        &[upstream(
            "m",
            &[first.base_url(), other.base_url()],
            &["retry: {attempts: 2, paths: [embeddings]}"],
        )],
        &[&k],
        "",
    );
    // chat/completions is not in retry.paths: one attempt, the provider's answer.
    let r = gw.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].is_object(),
        "the provider's own error body: {body}"
    );
    assert!(
        !gw.metrics().contains("result=\"retried_status\""),
        "nothing was retried"
    );

    // A status outside on_status (400) is the client's answer on the first attempt.
    let g2 = Mock::start(&["--name", "c"]);
    let k2 = key("noretry2", &[]);
    let gw2 = gateway(&[upstream("m", &[g2.base_url()], &[])], &[&k2], "");
    let r = gw2
        .post(&k2.key, "/v1/chat/completions")
        .header("x-mock-status", "400")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_attempt_fails_the_client_sees_the_providers_error() {
    let a = failing("a", "529");
    let b = failing("b", "529");
    let k = key("allfail", &[]);
    let gw = gateway(
        &[upstream(
            "m",
            &[a.base_url(), b.base_url()],
            &["retry: {attempts: 3}"],
        )],
        &[&k],
        "",
    );
    let started = Instant::now();
    let r = gw.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 529);
    let retried: f64 = [a.base_url(), b.base_url()]
        .iter()
        .map(|url| {
            gw.metric(&format!(
                "aihub_upstream_attempts_total{{endpoint=\"{url}\",result=\"retried_status\",upstream=\"m\"}}"
            ))
        })
        .sum();
    assert_eq!(
        retried, 2.0,
        "three attempts: two retried, the last answered"
    );
    // a, then b at once (not tried yet), then back to a after the 50 ms backoff, and no more.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_waited_out_within_the_deadline() {
    let m = Mock::start(&["--name", "m"]);
    let k = key("after", &[]);
    let gw = gateway(&[upstream("m", &[m.base_url()], &[])], &[&k], "");
    // The first request the mock receives answers 429 with `Retry-After: 1`.
    let started = Instant::now();
    let r = gw
        .post(&k.key, "/v1/chat/completions")
        .header("x-mock-fail-first", "1")
        .header("x-mock-fail-status", "429")
        .header("x-mock-retry-after", "1")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After was honoured: {took:?}"
    );

    // A wait past the deadline ends the retries: the 429 goes to the client at once.
    let m2 = Mock::start(&["--name", "m2"]);
    let k2 = key("after2", &[]);
    let gw2 = gateway(
        &[upstream(
            "m",
            &[m2.base_url()],
            &["retry: {deadline: 500ms}"],
        )],
        &[&k2],
        "",
    );
    let started = Instant::now();
    let r = gw2
        .post(&k2.key, "/v1/chat/completions")
        .header("x-mock-fail-first", "1")
        .header("x-mock-fail-status", "429")
        .header("x-mock-retry-after", "5")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "5", "the provider's own answer");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_byte_that_does_not_come_moves_on_to_the_next_endpoint() {
    let slow = Mock::start(&["--name", "slow", "--latency", "5s"]);
    let fast = Mock::start(&["--name", "fast"]);
    let k = key("slow", &[]);
    let gw = gateway(
        &[upstream(
            "m",
            &[slow.base_url(), fast.base_url()],
            &["read_timeout: 300ms", "health: {failures: 100}"],
        )],
        &[&k],
        "",
    );
    for _ in 0..4 {
        let started = Instant::now();
        let r = gw.chat(&k.key, &chat("gpt-4o")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(server(&r), "fast");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let timeouts = gw.metric(&format!(
        "aihub_upstream_attempts_total{{endpoint=\"{}\",result=\"retried_timeout\",upstream=\"m\"}}",
        slow.base_url()
    ));
    assert_eq!(timeouts, 2.0);

    // Turned off: the timeout is the client's 504.
    let k2 = key("slow2", &[]);
    let gw2 = gateway(
        &[upstream(
            "m",
            &[slow.base_url()],
            &["read_timeout: 300ms", "retry: {on_timeout: false}"],
        )],
        &[&k2],
        "",
    );
    expect_error(
        gw2.chat(&k2.key, &chat("gpt-4o")).await,
        504,
        "upstream_timeout",
    )
    .await;
}

/// Routes with fallbacks: `gpt-4o` (on `bad`) falls back to `claude` (on `good`).
fn fallback_gateway(bad: &Mock, good: &Mock, k: &TestKey, extra: &str, metering: &str) -> Gateway {
    Gateway::start(
        &format!(
            "upstreams:\n{}{}routes:\n  - model: gpt-4o\n    upstream: bad\n    fallbacks: [claude]\n{extra}\
             \n  - model: claude\n    upstream: good\n\
             pricing:\n  default: {{per_1k: 0.001}}\n  models:\n    gpt-4o: {{per_1k: 0.015}}\n    claude: {{per_1k: 0.003}}\n\
             keys:\n{}{metering}",
            upstream("bad", &[bad.base_url()], &["retry: {attempts: 1}"]),
            upstream("good", &[good.base_url()], &[]),
            k.yaml
        ),
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_route_falls_back_and_the_record_keeps_both_models() {
    let bad = failing("bad", "503");
    let good = Mock::start(&["--name", "good"]);
    let k = key("fb", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let gw = fallback_gateway(&bad, &good, &k, "", &db.metering_yaml(wal.path(), &[]));
    let r = gw.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(server(&r), "good");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["model"], "claude",
        "the fallback's model was sent upstream"
    );
    let tokens = body["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        gw.metric_eventually(
            "aihub_fallbacks_total{from=\"gpt-4o\",to=\"claude\",why=\"status\"}",
            1.0
        ),
        1.0
    );
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", 1, WAIT)
            .await,
        1
    );
    let row = db
        .query("SELECT model, upstream_model, upstream, cost_nanos FROM usage_events")
        .await;
    // Priced as the serving model: 0.003 USD per 1k tokens = 3,000 nano-USD per token.
    assert_eq!(
        row.trim(),
        format!("gpt-4o\tclaude\tgood\t{}", tokens * 3_000)
    );

    // The last route of the chain relays whatever it gets.
    let dead = failing("dead", "502");
    let k2 = key("fb2", &[]);
    let gw2 = fallback_gateway(&bad, &dead, &k2, "", "");
    let r = gw2.chat(&k2.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(server(&r), "dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_window_errors_fall_back_only_when_configured() {
    let small = Mock::start(&[
        "--name",
        "small",
        "--error-every",
        "1",
        "--error-status",
        "400",
        "--error-code",
        "context_length_exceeded",
    ]);
    let large = Mock::start(&["--name", "large"]);
    let k = key("ctx", &[]);
    let gw = fallback_gateway(
        &small,
        &large,
        &k,
        "    fallback_on: [context_length_exceeded]",
        "",
    );
    let r = gw.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(server(&r), "large");
    assert_eq!(
        gw.metric_eventually(
            "aihub_fallbacks_total{from=\"gpt-4o\",to=\"claude\",why=\"code\"}",
            1.0
        ),
        1.0
    );
    // Not configured: the 400 (read to check its code, then relayed whole) reaches the client.
    let k2 = key("ctx2", &[]);
    let gw2 = fallback_gateway(&small, &large, &k2, "", "");
    let r = gw2.chat(&k2.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    // A key that may not use the fallback's model gets no fallback.
    let k3 = key("ctx3", &["models: [\"gpt-4o\"]"]);
    let gw3 = fallback_gateway(
        &small,
        &large,
        &k3,
        "    fallback_on: [context_length_exceeded]",
        "",
    );
    let r = gw3.chat(&k3.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 400);
}

/// Azure OpenAI and Anthropic-style upstreams: a base URL with a query string (`api-version`)
/// sent before the client's, the credential in another header, fixed extra headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_url_queries_and_fixed_headers_reach_the_upstream() {
    let m = Mock::start(&["--name", "azure", "--api-key", "azure-secret"]);
    let k = key("azure", &[]);
    let base = format!("{}?api-version=2024-06-01", m.base_url());
    let gw = Gateway::start_with_env(
        &config(
            &[upstream(
                "m",
                &[base],
                &[
                    "api_key_env: AIHUB_TEST_AZURE_KEY",
                    "api_key_header: authorization",
                    "headers: {anthropic-version: \"2023-06-01\", x-extra: one}",
                ],
            )],
            &[("gpt-4o", "m", None)],
            &[&k],
        ),
        &[],
        &[("AIHUB_TEST_AZURE_KEY", "azure-secret")],
    );
    let r = gw
        .post(&k.key, "/v1/chat/completions?trace=1")
        .header("x-extra", "from-the-client")
        .header("x-mock-echo", "anthropic-version, x-extra")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the credential reached the mock");
    let seen_query = r.headers()["x-mock-request-query"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen_query, "api-version=2024-06-01&trace=1");
    assert_eq!(
        r.headers()["x-mock-request-anthropic-version"],
        "2023-06-01"
    );
    assert_eq!(
        r.headers()["x-mock-request-x-extra"],
        "one",
        "fixed headers replace the client's"
    );
}
