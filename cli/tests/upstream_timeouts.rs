//! Per-route timeouts and the first-byte rule, black-box: `timeouts.first_byte` turns a slow
//! provider into a 504 for one route and not another of the same upstream; `timeouts.idle`
//! cuts a stream that goes silent; `timeouts.total` bounds a whole stream and the retries
//! before it; and an answer whose first byte reached the client is never sent again, whether
//! the provider breaks it after its header or in the middle of a stream.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Routes `fast` (with `timeouts`) and `slow` (without) to one upstream of `endpoints`.
fn gateway(endpoints: &[String], upstream_extra: &[&str], timeouts: &str, k: &TestKey) -> Gateway {
    let body = config(
        &[upstream("m", endpoints, upstream_extra)],
        &[("fast", "m", None), ("slow", "m", None)],
        &[k],
    )
    .replace(
        "  - model: fast\n    upstream: m\n",
        &format!("  - model: fast\n    upstream: m\n    timeouts: {timeouts}\n"),
    );
    Gateway::start(&body, &[])
}

/// Sends a request and reads its body as far as it goes: (status, bytes received, whether the
/// body ended cleanly, time taken).
async fn call(
    gw: &Gateway,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, String, bool, Duration) {
    let start = Instant::now();
    let mut req = gw.post(key, "/v1/chat/completions").json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let mut text = Vec::new();
    let clean = loop {
        match r.chunk().await {
            Ok(Some(c)) => text.extend_from_slice(&c),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    (
        status,
        String::from_utf8_lossy(&text).into_owned(),
        clean,
        start.elapsed(),
    )
}

fn stream(model: &str) -> serde_json::Value {
    let mut b = chat(model);
    b["stream"] = true.into();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_and_idle_timeouts_apply_to_their_route_only() {
    let mock = Mock::start(&["--name", "a"]);
    let k = key("timeouts", &[]);
    let gw = gateway(
        &[mock.base_url()],
        &["retry: {attempts: 1}"],
        "{first_byte: 300ms, idle: 300ms}",
        &k,
    );
    let slow_header = [("x-mock-latency-ms", "1200")];
    let (status, body, _, took) = call(&gw, &k.key, &chat("fast"), &slow_header).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"), "{body}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    let (status, _, clean, took) = call(&gw, &k.key, &chat("slow"), &slow_header).await;
    assert_eq!(status, 200);
    assert!(clean && took >= Duration::from_millis(1200));

    // Events 600 ms apart: the route's 300 ms idle timeout cuts the stream after the first.
    let gaps = [("x-mock-chunk-interval-ms", "600"), ("x-mock-chunks", "3")];
    let (status, text, clean, took) = call(&gw, &k.key, &stream("fast"), &gaps).await;
    assert_eq!(status, 200);
    assert!(!clean, "the cut stream does not end cleanly");
    assert!(
        text.starts_with("data: ") && !text.contains("[DONE]"),
        "{text}"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let (_, text, clean, _) = call(&gw, &k.key, &stream("slow"), &gaps).await;
    assert!(clean && text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_bounds_a_stream_and_the_retries_before_it() {
    let mock = Mock::start(&["--name", "a"]);
    let k = key("total", &[]);
    let gw = gateway(
        &[mock.base_url()],
        &[
            "retry: {attempts: 5, on_timeout: true}",
            "read_timeout: 400ms",
        ],
        "{total: 700ms}",
        &k,
    );
    // 20 events 100 ms apart (2 s): cut at 700 ms.
    let paced = [("x-mock-chunk-interval-ms", "100"), ("x-mock-chunks", "20")];
    let (status, text, clean, took) = call(&gw, &k.key, &stream("fast"), &paced).await;
    assert_eq!(status, 200);
    assert!(!clean && !text.contains("[DONE]"), "{text}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1300),
        "{took:?}"
    );
    let (_, text, clean, _) = call(&gw, &k.key, &stream("slow"), &paced).await;
    assert!(clean && text.ends_with("data: [DONE]\n\n"));

    // A provider that never answers: retries on timeout stop at the total, not after 5 × 400 ms.
    let (status, body, _, took) = call(&gw, &k.key, &chat("fast"), &[("x-mock-hang", "1")]).await;
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_millis(1300), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_never_sent_again_once_its_first_byte_reached_the_client() {
    let a = Mock::start(&["--name", "a"]);
    let b = Mock::start(&["--name", "b"]);
    let k = key("first-byte", &[]);
    let gw = gateway(
        &[a.base_url(), b.base_url()],
        &["retry: {attempts: 3}", "health: {failures: 100}"],
        "{}",
        &k,
    );
    // A stream broken after three events: the client has them, and nothing is retried; also
    // when the events and the break arrive together.
    for pause in ["20", "1", "0"] {
        let (status, text, clean, _) = call(
            &gw,
            &k.key,
            &stream("slow"),
            &[
                ("x-mock-close-after-events", "3"),
                ("x-mock-abort-pause-ms", pause),
            ],
        )
        .await;
        assert_eq!(status, 200);
        assert!(!clean, "a broken stream is not passed off as complete");
        assert_eq!(text.matches("data: ").count(), 3, "pause {pause}: {text}");
    }
    // A JSON answer broken right after its header.
    let (status, _, clean, _) = call(
        &gw,
        &k.key,
        &chat("slow"),
        &[("x-mock-reset-after-headers", "1")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!clean);
    let chats = "POST /v1/chat/completions";
    assert_eq!(
        a.received(chats).await + b.received(chats).await,
        4,
        "one attempt each"
    );
    for m in [&a, &b] {
        let retried = format!(
            "aihub_upstream_attempts_total{{endpoint=\"{}\",result=\"retried_status\",upstream=\"m\"}}",
            m.base_url()
        );
        assert_eq!(gw.metric(&retried), 0.0);
    }
}
