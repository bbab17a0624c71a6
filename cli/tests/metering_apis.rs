//! Black-box tests of metering every API the gateway forwards, against real ClickHouse and the
//! mock upstream speaking each API's real wire format: the Responses and Messages APIs (JSON
//! and SSE), every shape of a chat stream's usage (none may reach a client that did not ask),
//! JSON bodies larger than any buffer, opaque bodies, opted-in paths and tokenizer estimates.

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _mock: Mock,
    db: TestDb,
    gw: Gateway,
    key: String,
    _wal: tempfile::TempDir,
}

/// Prices per 1M tokens of the `claude` route (a cached input price of its own).
const PRICING: &str = "pricing:
  default: {per_1k: 0.001}
  models:
    claude: {input_per_1m: 3, output_per_1m: 15, cached_input_per_1m: 0.3}
    gpt-4o: {input_per_1m: 2.5, output_per_1m: 10, cached_input_per_1m: 1.25}
";

fn start(upstream_extra: &[&str]) -> Setup {
    let mock = Mock::start(&[]);
    let k = key("k", &[]);
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}{}",
        config(
            &[upstream("m", &[mock.base_url()], upstream_extra)],
            &[
                ("gpt-4o", "m", None),
                ("claude", "m", None),
                ("emb", "m", None)
            ],
            &[&k]
        ),
        PRICING,
        db.metering_yaml(wal.path(), &[])
    );
    let gw = Gateway::start(&body, &[]);
    Setup {
        _mock: mock,
        db,
        gw,
        key: k.key,
        _wal: wal,
    }
}

/// The usage row of one request: prompt, cached, completion, total, cost, estimated, status.
async fn row(db: &TestDb, request_id: &str) -> (u64, u64, u64, u64, i128, u8, u16) {
    let sql = format!(
        "SELECT prompt_tokens, cached_tokens, completion_tokens, total_tokens, cost_nanos, \
         usage_estimated, status FROM usage_events WHERE request_id = toUUID('{request_id}') \
         FORMAT TSV"
    );
    let count =
        format!("SELECT count() FROM usage_events WHERE request_id = toUUID('{request_id}')");
    assert_eq!(
        db.wait_for(&count, 1, WAIT).await,
        1,
        "no row for {request_id}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = db.query(&sql).await;
        if let Some(line) = out.lines().next() {
            let f: Vec<&str> = line.split('\t').collect();
            return (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
                f[5].parse().unwrap(),
                f[6].parse().unwrap(),
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no row for {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// Posts `body` to `path` with `headers`; asserts a 200; returns the request id and the answer.
async fn call(
    s: &Setup,
    path: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (String, reqwest::Response) {
    let mut req = s.gw.post(&s.key, path).json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    (request_id(&resp), resp)
}

/// [`call`] with `"stream": true` and no header; asserts the stream arrived byte for byte (so
/// nothing such as `stream_options` broke it); returns the request id and the stream.
async fn call_streamed(s: &Setup, path: &str, body: &serde_json::Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = true.into();
    let (id, resp) = call(s, path, &body, &[]).await;
    let sha = resp.headers()["x-mock-body-sha256"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = resp.text().await.unwrap();
    assert_eq!(sha256_hex(text.as_bytes()), sha);
    (id, text)
}

/// nano-USD of `tokens` at `per_1m` USD per million.
fn nanos(tokens: u64, per_1m: &str) -> i128 {
    let usd = Decimal::from(tokens) * Decimal::from_str(per_1m).unwrap() / Decimal::from(1_000_000);
    (usd * Decimal::from(1_000_000_000))
        .round()
        .try_into()
        .unwrap()
}

#[tokio::test]
async fn responses_api_is_metered_exactly_json_and_stream() {
    let s = start(&[]);
    let body = serde_json::json!({"model": "gpt-4o", "input": "Tell me a story about a gateway.",
                                  "instructions": "Be brief."});
    let (id, resp) = call(&s, "/v1/responses", &body, &[("x-mock-cached-tokens", "4")]).await;
    let v: serde_json::Value = resp.json().await.unwrap();
    let u = &v["usage"];
    let (input, output) = (
        u["input_tokens"].as_u64().unwrap(),
        u["output_tokens"].as_u64().unwrap(),
    );
    let cost = nanos(input - 4, "2.5") + nanos(4, "1.25") + nanos(output, "10");
    assert_eq!(
        row(&s.db, &id).await,
        (input, 4, output, input + output, cost, 0, 200)
    );

    // Streamed: no `stream_options` added (the real API refuses it), usage from
    // `response.completed`, the stream byte for byte.
    let (id, text) = call_streamed(&s, "/v1/responses", &body).await;
    assert!(text.contains("event: response.completed"), "{text}");
    let cost = nanos(input, "2.5") + nanos(output, "10");
    assert_eq!(
        row(&s.db, &id).await,
        (input, 0, output, input + output, cost, 0, 200)
    );
}

#[tokio::test]
async fn messages_api_is_metered_exactly_json_and_stream() {
    let s = start(&[]);
    let body = serde_json::json!({"model": "claude", "max_tokens": 64, "system": "Be brief.",
        "messages": [{"role": "user", "content": "Write a haiku about metering."}]});
    let cache = [
        ("x-mock-cached-tokens", "3"),
        ("x-mock-cache-write-tokens", "2"),
    ];
    let (id, resp) = call(&s, "/v1/messages", &body, &cache).await;
    let v: serde_json::Value = resp.json().await.unwrap();
    let u = &v["usage"];
    let input = u["input_tokens"].as_u64().unwrap();
    let output = u["output_tokens"].as_u64().unwrap();
    assert_eq!(u["cache_read_input_tokens"], 3);
    // The prompt is every input token: uncached, read from and written to the cache.
    let prompt = input + 3 + 2;
    let cost = nanos(prompt - 3, "3") + nanos(3, "0.3") + nanos(output, "15");
    assert_eq!(
        row(&s.db, &id).await,
        (prompt, 3, output, prompt + output, cost, 0, 200)
    );

    // Streamed: no `stream_options` added (the real API refuses extra fields).
    let (id, text) = call_streamed(&s, "/v1/messages", &body).await;
    assert!(text.contains("event: message_delta"));
    // No cache this time: every prompt token is an input token.
    let cost = nanos(prompt, "3") + nanos(output, "15");
    assert_eq!(
        row(&s.db, &id).await,
        (prompt, 0, output, prompt + output, cost, 0, 200)
    );
}

#[tokio::test]
async fn no_stream_usage_shape_reaches_a_client_that_did_not_ask() {
    let s = start(&[]);
    let mut body = chat("gpt-4o");
    body["stream"] = true.into();
    // Every shape, with and without `"usage": null` on the other chunks.
    for shape in ["choices-empty", "empty-delta", "on-finish"] {
        for null in ["1", "0"] {
            let resp =
                s.gw.post(&s.key, "/v1/chat/completions")
                    .header("x-mock-usage-shape", shape)
                    .header("x-mock-usage-null", null)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
            let id = request_id(&resp);
            let text = resp.text().await.unwrap();
            assert!(
                !text.contains("\"usage\""),
                "{shape}/{null} leaked usage: {text}"
            );
            assert!(text.ends_with("data: [DONE]\n\n"), "{shape}/{null}: {text}");
            // Every content token still arrives (16 words), and the finish reason.
            let words = text.matches("\"content\":\"").count();
            assert!(
                words >= 16,
                "{shape}/{null}: {words} content chunks in {text}"
            );
            assert!(
                text.contains("\"finish_reason\":\"stop\""),
                "{shape}/{null}"
            );
            let (prompt, _, completion, total, _, estimated, _) = row(&s.db, &id).await;
            assert_eq!((completion, estimated), (16, 0), "{shape}/{null}");
            assert_eq!(total, prompt + 16);
        }
    }
    // A client that asked gets every shape byte for byte.
    body["stream_options"] = serde_json::json!({"include_usage": true});
    for shape in ["choices-empty", "empty-delta", "on-finish"] {
        let resp =
            s.gw.post(&s.key, "/v1/chat/completions")
                .header("x-mock-usage-shape", shape)
                .json(&body)
                .send()
                .await
                .unwrap();
        let sha = resp.headers()["x-mock-body-sha256"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(sha256_hex(&resp.bytes().await.unwrap()), sha, "{shape}");
    }
}

#[tokio::test]
async fn json_bodies_larger_than_8_mib_keep_their_usage() {
    let s = start(&[]);
    // 300 inputs × 4096 dimensions: an embeddings answer of about 20 MiB.
    let inputs: Vec<String> = (0..300).map(|i| format!("input number {i}")).collect();
    let resp =
        s.gw.post(&s.key, "/v1/embeddings")
            .json(&serde_json::json!({"model": "emb", "input": inputs, "dimensions": 4096}))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let bytes = resp.bytes().await.unwrap();
    assert!(bytes.len() > 8 << 20, "{} bytes", bytes.len());
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let (p, _, c, t, _, estimated, _) = row(&s.db, &id).await;
    assert_eq!((p, c, t, estimated), (prompt, 0, prompt, 0));
}

#[tokio::test]
async fn other_paths_are_refused_unless_opted_in_then_estimated() {
    // Default paths: audio is not forwarded.
    let s = start(&[]);
    let speech = serde_json::json!({"model": "gpt-4o", "input": "Hello there, how are you?", "voice": "alloy"});
    let resp =
        s.gw.post(&s.key, "/v1/audio/speech")
            .json(&speech)
            .send()
            .await
            .unwrap();
    expect_error(resp, 404, "unsupported_endpoint").await;
    drop(s);

    // Opted in: forwarded, metered by estimate (an audio body has no usage to read).
    let s = start(&[
        "paths: [chat/completions, completions, embeddings, responses, messages, audio/speech]",
    ]);
    let resp =
        s.gw.post(&s.key, "/v1/audio/speech")
            .json(&speech)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    let id = request_id(&resp);
    assert!(resp.bytes().await.unwrap().starts_with(b"ID3"));
    let (prompt, _, _, _, cost, estimated, _) = row(&s.db, &id).await;
    assert_eq!(estimated, 1);
    assert!(prompt >= 6, "{prompt}");
    assert!(cost > 0);
}

#[tokio::test]
async fn estimates_use_a_tokenizer_and_count_tools() {
    // No usage from the upstream for streams: estimated.
    let s = start(&["inject_stream_usage: false"]);
    let cjk = "人工智能网关为开发者提供统一的接口和计量服务。".repeat(10); // 230 characters
    let body = serde_json::json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": cjk}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather for a city, in degrees Celsius.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]});
    let resp = s.gw.chat(&s.key, &body).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    resp.text().await.unwrap();
    let (prompt, _, completion, _, _, estimated, _) = row(&s.db, &id).await;
    assert_eq!(estimated, 1);
    // ⌈chars/4⌉ said about 75; a tokenizer counts well over 150 for the text plus the tool.
    assert!(prompt > 150, "{prompt}");
    assert!((10..=40).contains(&completion), "{completion}");
}
