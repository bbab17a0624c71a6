//! Black-box tests of every error the gateway answers itself, key expiry, upstream failover and
//! failures, and that keys never reach the logs.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn authentication_errors() {
    let mock = Mock::start(&[]);
    let ok = key("ok", &[]);
    let off = key("off", &["active: false"]);
    let old = key("old", &["expires_at: 2020-01-01T00:00:00Z"]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&ok, &off, &old],
    );
    let gw = Gateway::start(&body, &[]);
    let c = client();
    let send = |auth: Option<(&'static str, String)>| {
        let mut r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("mock-gpt"));
        if let Some((h, v)) = auth {
            r = r.header(h, v);
        }
        r.send()
    };
    expect_error(send(None).await.unwrap(), 401, "invalid_api_key").await;
    expect_error(
        send(Some(("authorization", "Basic abc".into())))
            .await
            .unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    let e = expect_error(
        send(Some(("authorization", "Bearer sk-not-ours".into())))
            .await
            .unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("ahub_dev_"));
    // A typo is caught by the checksum, before any lookup.
    let mut typo = ok.key.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let e = expect_error(
        send(Some((
            "authorization",
            format!("Bearer {}", String::from_utf8(typo).unwrap()),
        )))
        .await
        .unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("checksum"));
    let unknown = aihub_apikey::generate();
    expect_error(
        send(Some(("x-api-key", unknown.clone()))).await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    expect_error(
        send(Some(("authorization", format!("Bearer {}", off.key))))
            .await
            .unwrap(),
        401,
        "api_key_disabled",
    )
    .await;
    expect_error(
        send(Some(("authorization", format!("Bearer {}", old.key))))
            .await
            .unwrap(),
        401,
        "api_key_expired",
    )
    .await;
    assert_eq!(
        send(Some(("authorization", format!("bearer {}", ok.key))))
            .await
            .unwrap()
            .status(),
        200
    );
    let m = gw.metrics();
    for reason in ["missing", "malformed", "not_found", "disabled", "expired"] {
        assert!(
            m.contains(&format!("aihub_auth_failures_total{{reason=\"{reason}\"}}")),
            "{reason} missing from metrics"
        );
    }
    let log = gw.log_text();
    for secret in [&ok.key, &off.key, &old.key, &unknown] {
        assert!(!log.contains(secret.as_str()), "a key leaked into the log");
    }
}

#[tokio::test]
async fn request_errors_have_the_openai_shape_and_status() {
    let mock = Mock::start(&[]);
    let k = key(
        "k",
        &[
            "models: [\"mock-gpt\", \"demo\"]",
            "endpoints: [\"chat/completions\"]",
        ],
    );
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[
            ("mock-gpt", "m", None),
            ("demo", "m", Some("mock-gpt")),
            ("other", "m", None),
        ],
        &[&k],
    );
    let gw = Gateway::start(&body, &["max_request_body_bytes: 2000"]);
    let c = client();
    let post = |path: &str, body: String| {
        c.post(gw.url(path))
            .bearer_auth(&k.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        post("/v1/chat/completions", "{not json".into())
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(
        post("/v1/chat/completions", "[1,2]".into()).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let e = expect_error(
        post("/v1/chat/completions", "{\"messages\":[]}".into())
            .await
            .unwrap(),
        400,
        "missing_model",
    )
    .await;
    assert_eq!(e["param"], "model");
    expect_error(
        post("/v1/chat/completions", "{\"model\":42}".into())
            .await
            .unwrap(),
        400,
        "missing_model",
    )
    .await;
    let e = expect_error(
        post("/v1/chat/completions", chat("gpt-9").to_string())
            .await
            .unwrap(),
        404,
        "model_not_found",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("gpt-9"));
    expect_error(
        post("/v1/chat/completions", chat("other").to_string())
            .await
            .unwrap(),
        403,
        "permission_denied",
    )
    .await;
    expect_error(
        post(
            "/v1/embeddings",
            serde_json::json!({"model": "mock-gpt", "input": "x"}).to_string(),
        )
        .await
        .unwrap(),
        403,
        "permission_denied",
    )
    .await;
    let big = serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "x".repeat(3000)}]});
    expect_error(
        post("/v1/chat/completions", big.to_string()).await.unwrap(),
        413,
        "request_too_large",
    )
    .await;
    // Chunked bodies (no Content-Length) are bounded too.
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes_of(&"y".repeat(500)))),
    );
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "request_too_large").await;
    expect_error(
        post("/v1/nope", chat("demo").to_string()).await.unwrap(),
        403,
        "permission_denied",
    )
    .await;
    let resp = c
        .get(gw.url("/v1/chat/completions"))
        .bearer_auth(&k.key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "unknown_url").await;
    let resp = c.get(gw.url("/")).send().await.unwrap();
    expect_error(resp, 404, "unknown_url").await;
    // Upstream error bodies pass through untouched, with their status.
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("x-mock-status", "429")
        .json(&chat("demo"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 429, "rate_limit_exceeded").await;
}

fn bytes_of(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[tokio::test]
async fn key_is_refused_from_its_expiry_instant() {
    let mock = Mock::start(&[]);
    // Whole seconds in the config: expiry lands 2–3 s from now.
    let k = key(
        "soon",
        &[&format!(
            "expires_at: {}",
            rfc3339_in(Duration::from_secs(3))
        )],
    );
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    let send = || {
        gw.post(&k.key, "/v1/chat/completions")
            .json(&chat("mock-gpt"))
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    expect_error(send().await.unwrap(), 401, "api_key_expired").await;
}

#[tokio::test]
async fn fails_over_to_the_next_endpoint_when_one_refuses_connections() {
    let mock = Mock::start(&["--name", "alive"]);
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let k = key("k", &[]);
    let body = config(
        &[upstream(
            "m",
            &[dead.clone(), mock.base_url()],
            &["health: {failures: 2, cooldown: 1h}"],
        )],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    for _ in 0..10 {
        let resp = gw.chat(&k.key, &chat("mock-gpt")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-mock-server"], "alive");
    }
    // Two connect failures tripped the cooldown: the dead endpoint is no longer tried first.
    let connect_errors = gw.metric(&format!(
        "aihub_upstream_errors_total{{endpoint=\"{dead}\",kind=\"connect\",upstream=\"m\"}}"
    ));
    assert_eq!(connect_errors, 2.0);
    assert_eq!(
        gw.metric(&format!(
            "aihub_upstream_endpoint_healthy{{endpoint=\"{dead}\",upstream=\"m\"}}"
        )),
        0.0
    );
    assert_eq!(
        gw.metric(&format!(
            "aihub_upstream_endpoint_healthy{{endpoint=\"{}\",upstream=\"m\"}}",
            mock.base_url()
        )),
        1.0
    );
}

#[tokio::test]
async fn upstream_refused_is_502_and_timeout_is_504() {
    let mock = Mock::start(&[]);
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let k = key("k", &[]);
    let body = config(
        &[
            upstream("dead", &[dead], &[]),
            upstream("slow", &[mock.base_url()], &["read_timeout: 500ms"]),
        ],
        &[("down", "dead", None), ("mock-gpt", "slow", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    let resp = gw.chat(&k.key, &chat("down")).await;
    let e = expect_error(resp, 502, "upstream_unreachable").await;
    assert!(
        !e["message"].as_str().unwrap().contains("127.0.0.1"),
        "internals leaked: {e}"
    );
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("x-mock-hang", "1")
        .json(&chat("mock-gpt"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 504, "upstream_timeout").await;
    // A stream cut by the upstream mid-way is cut for the client too: no clean end.
    let mut body = chat("mock-gpt");
    body["stream"] = true.into();
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("x-mock-chunks", "4")
        .header("x-mock-chunk-interval-ms", "800")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a truncated stream must not end cleanly"
    );
}

/// The upstream credential comes from the environment and replaces the client's key; neither
/// reaches the log, even at trace level.
#[tokio::test]
async fn credentials_are_injected_and_stay_out_of_logs_even_at_trace_level() {
    let mock = Mock::start(&["--api-key", "sk-upstream-secret"]);
    let k = key("k", &[]);
    let body = config(
        &[upstream(
            "m",
            &[mock.base_url()],
            &["api_key_env: AIHUB_TEST_UPSTREAM_KEY"],
        )],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start_with_env(
        &body,
        &[],
        &[
            ("AIHUB_TEST_UPSTREAM_KEY", "sk-upstream-secret"),
            ("RUST_LOG", "trace"),
        ],
    );
    let unknown = aihub_apikey::generate();
    // The mock answers 401 unless it gets its own key: 200 proves the client's key was replaced.
    for (presented, status) in [(&k.key, 200), (&unknown, 401)] {
        let resp = gw.chat(presented, &chat("mock-gpt")).await;
        assert_eq!(resp.status(), status);
        resp.bytes().await.unwrap();
    }
    let log = gw.wait_for_log("invalid_api_key");
    assert!(
        log.contains("aihub::access"),
        "no access log at trace level?"
    );
    for secret in [k.key.as_str(), unknown.as_str(), "sk-upstream-secret"] {
        assert!(!log.contains(secret), "secret leaked into the log");
    }
}

/// Writes `head` (and `body`) on a raw connection and returns everything read until close or
/// `wait` passes.
fn raw_exchange(addr: std::net::SocketAddr, head: &str, body: &[u8], wait: Duration) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_error_answer(&mut s)
}

#[tokio::test]
async fn slow_bodies_time_out_and_expect_continue_is_honoured() {
    let mock = Mock::start(&[]);
    let k = key("k", &[]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&k],
    );
    let gw = Gateway::start(&body, &["request_body_timeout: 500ms"]);
    // Half a body, then silence: 408 once the body timeout passes.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n",
        k.key
    );
    let out = raw_exchange(gw.addr, &head, b"{\"model\":", Duration::from_secs(5));
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"code\":\"request_timeout\""), "{out}");
    // curl sends `Expect: 100-continue` for large bodies and waits for the interim response.
    let payload = serde_json::to_vec(&chat("mock-gpt")).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        k.key,
        payload.len()
    );
    let interim = raw_exchange(gw.addr, &head, b"", Duration::from_millis(500));
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    let out = raw_exchange(gw.addr, &head, &payload, Duration::from_secs(5));
    assert!(out.contains("HTTP/1.1 200"), "{out}");
}
