//! The fault switches (reset after headers, close after N events) and the `/__mock/` control
//! endpoints, seen from a raw HTTP/1.1 client.

mod common;

use aihub_mock_upstream::{Fault, MockConfig};
use common::{http, mock};

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str =
    r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// The `choices` of each chat chunk (ids and timestamps differ between answers).
fn choices(events: &[String]) -> Vec<serde_json::Value> {
    let data = |e: &String| e.strip_prefix("data: ").map(str::to_owned);
    let parse = |d: String| {
        serde_json::from_str(&d).map_or(d.into(), |v: serde_json::Value| v["choices"].clone())
    };
    events.iter().filter_map(data).map(parse).collect()
}

#[tokio::test]
async fn reset_after_headers_sends_the_header_then_breaks_the_body() {
    let addr = mock(MockConfig::default()).await;
    let reset = [("x-mock-reset-after-headers", "1")];

    let json = http(addr, "POST", "/v1/chat/completions", &reset, CHAT).await;
    assert_eq!(json.status, 200);
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(json.header("transfer-encoding"), Some("chunked"));
    assert!(json.body.is_empty(), "{json:?}");
    assert!(!json.complete, "{json:?}");

    let sse = http(addr, "POST", "/v1/chat/completions", &reset, STREAM).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert!(sse.body.is_empty(), "{sse:?}");
    assert!(!sse.complete, "{sse:?}");

    // Error answers are not broken; the server still serves whole answers afterwards.
    let error = [
        ("x-mock-reset-after-headers", "1"),
        ("x-mock-status", "429"),
    ];
    let r = http(addr, "POST", "/v1/chat/completions", &error, CHAT).await;
    assert_eq!((r.status, r.complete), (429, true));
    let ok = http(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
    assert_eq!((ok.status, ok.complete), (200, true));
    assert_eq!(ok.json()["object"], "chat.completion");
}

#[tokio::test]
async fn close_after_events_sends_exactly_n_events_then_breaks_the_stream() {
    let addr = mock(MockConfig::default()).await;
    let whole = http(addr, "POST", "/v1/chat/completions", &[], STREAM).await;
    assert!(whole.complete);
    let all = whole.events();
    assert_eq!(all.last().map(String::as_str), Some("data: [DONE]"));
    assert!(all.len() > 3);

    let close = [("x-mock-close-after-events", "3")];
    let cut = http(addr, "POST", "/v1/chat/completions", &close, STREAM).await;
    assert_eq!(cut.status, 200);
    assert!(!cut.complete, "{cut:?}");
    assert_eq!(choices(&cut.events()), choices(&all[..3]));
    assert!(cut.body.ends_with(b"\n\n"), "no partial event");
    assert_eq!(cut.header("x-mock-body-sha256"), None);

    // More events than the stream has: all of them, and still no clean end.
    let close = [("x-mock-close-after-events", "1000")];
    let r = http(addr, "POST", "/v1/chat/completions", &close, STREAM).await;
    assert_eq!((choices(&r.events()), r.complete), (choices(&all), false));

    // Other streaming APIs too.
    let messages = r#"{"model":"claude","max_tokens":16,"stream":true,
        "messages":[{"role":"user","content":"hi"}]}"#;
    let close = [("x-mock-close-after-events", "2")];
    let r = http(addr, "POST", "/v1/messages", &close, messages).await;
    assert_eq!((r.events().len(), r.complete), (2, false));
    assert!(r.events()[0].starts_with("event: message_start"));

    // A JSON answer with N: the header, then the abort.
    let r = http(addr, "POST", "/v1/chat/completions", &close, CHAT).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.body.is_empty() && !r.complete, "{r:?}");
}

#[tokio::test]
async fn server_wide_fault_can_be_turned_off_per_request() {
    let addr = mock(MockConfig {
        fault: Some(Fault::CloseAfterEvents(2)),
        ..MockConfig::default()
    })
    .await;
    let r = http(addr, "POST", "/v1/chat/completions", &[], STREAM).await;
    assert_eq!((r.events().len(), r.complete), (2, false));
    let off = [("x-mock-reset-after-headers", "0")];
    let r = http(addr, "POST", "/v1/chat/completions", &off, STREAM).await;
    assert!(r.complete);
    assert_eq!(r.events().last().map(String::as_str), Some("data: [DONE]"));
    // The per-request switch wins over the server's.
    let one = [("x-mock-close-after-events", "1")];
    let r = http(addr, "POST", "/v1/chat/completions", &one, STREAM).await;
    assert_eq!((r.events().len(), r.complete), (1, false));

    let addr = mock(MockConfig {
        fault: Some(Fault::ResetAfterHeaders),
        ..MockConfig::default()
    })
    .await;
    let r = http(addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty() && !r.complete, "{r:?}");
}

#[tokio::test]
async fn mock_fail_makes_every_request_fail_until_cleared() {
    let addr = mock(MockConfig::default()).await;
    let r = http(addr, "GET", "/__mock/fail", &[], "").await;
    assert_eq!(r.json(), serde_json::json!({"status": null}));

    let r = http(addr, "POST", "/__mock/fail", &[], r#"{"status": 503}"#).await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"status": 503}))
    );
    for _ in 0..2 {
        let r = http(addr, "GET", "/v1/models", &[], "").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["type"], "server_error");
        let r = http(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
        assert_eq!(r.status, 503);
    }
    // A request's own x-mock-status still wins.
    let r = http(addr, "GET", "/v1/models", &[("x-mock-status", "429")], "").await;
    assert_eq!(r.status, 429);

    let r = http(addr, "POST", "/__mock/fail", &[], r#"{"status": null}"#).await;
    assert_eq!(r.json(), serde_json::json!({"status": null}));
    let r = http(addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(r.status, 200);

    http(addr, "POST", "/__mock/fail", &[], r#"{"status": 500}"#).await;
    let r = http(addr, "POST", "/v1/embeddings", &[], CHAT).await;
    assert_eq!(r.status, 500);
    let r = http(addr, "DELETE", "/__mock/fail", &[], "").await;
    assert_eq!(r.json(), serde_json::json!({"status": null}));
    let r = http(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(r.status, 200);

    for bad in [r#"{"status": 200}"#, r#"{"status": "503"}"#, "{}", "nope"] {
        let r = http(addr, "POST", "/__mock/fail", &[], bad).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let r = http(addr, "GET", "/__mock/nothing", &[], "").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn mock_stats_counts_requests_by_method_and_path() {
    let addr = mock(MockConfig {
        api_key: Some("sk-mock".into()),
        ..MockConfig::default()
    })
    .await;
    let auth = [("authorization", "Bearer sk-mock")];
    for _ in 0..3 {
        http(addr, "GET", "/v1/models", &auth, "").await;
    }
    http(addr, "POST", "/v1/chat/completions", &auth, CHAT).await;
    http(addr, "POST", "/v1/chat/completions?x=1", &[], CHAT).await; // 401, still counted
    http(addr, "GET", "/elsewhere", &auth, "").await;
    http(addr, "POST", "/__mock/fail", &[], r#"{"status": null}"#).await;

    // Control endpoints need no key and are not counted.
    let r = http(addr, "GET", "/__mock/stats", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"requests": 6, "by_path": {
            "GET /v1/models": 3,
            "POST /v1/chat/completions": 2,
            "GET /elsewhere": 1,
        }})
    );

    let r = http(addr, "DELETE", "/__mock/stats", &[], "").await;
    assert_eq!(r.json(), serde_json::json!({"requests": 0, "by_path": {}}));
    http(addr, "GET", "/v1/models", &auth, "").await;
    let r = http(addr, "GET", "/__mock/stats", &[], "").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"requests": 1, "by_path": {"GET /v1/models": 1}})
    );
}
