//! Black-box tests of the proxy path: bodies cross the gateway byte for byte in both directions,
//! streams arrive chunk by chunk, routing and alias rewrite, large bodies, `/v1/models`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

fn single_mock_config(mock: &Mock, keys: &[&TestKey]) -> String {
    config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[
            ("mock-gpt", "mock", None),
            ("demo", "mock", Some("mock-gpt")),
            ("mock-embed", "mock", None),
        ],
        keys,
    )
}

#[tokio::test]
async fn non_streaming_chat_is_byte_for_byte_both_ways() {
    let mock = Mock::start(&[]);
    let k = key("k1", &[]);
    let gw = Gateway::start(&single_mock_config(&mock, &[&k]), &[]);
    let body = serde_json::to_vec(&chat("mock-gpt")).unwrap();

    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    // The request reached the upstream unchanged.
    assert_eq!(h["x-mock-request-sha256"], sha256_hex(&body).as_str());
    // Added headers; the upstream's request id is kept under another name.
    let request_id = h["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(request_id.len(), 36, "a UUID");
    assert_eq!(h["x-upstream-request-id"], "req_mock1");
    let overhead: f64 = h["x-aihub-overhead-ms"].to_str().unwrap().parse().unwrap();
    assert!(overhead >= 0.0);
    // The response body is exactly what the upstream sent.
    let got = resp.bytes().await.unwrap();
    assert_eq!(h["x-mock-body-sha256"], sha256_hex(&got).as_str());
    let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["total_tokens"], 4 + 16);
    // And the access log names the request without the key.
    let log = gw.wait_for_log(&request_id);
    assert!(log.contains(&request_id), "{log}");
    assert!(!log.contains(&k.key));
}

#[tokio::test]
async fn streaming_chat_arrives_chunk_by_chunk_and_intact() {
    let mock = Mock::start(&[]);
    let k = key("k1", &[]);
    let gw = Gateway::start(&single_mock_config(&mock, &[&k]), &[]);
    let mut body = chat("mock-gpt");
    body["stream"] = true.into();

    let started = Instant::now();
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("x-mock-chunks", "8")
        .header("x-mock-chunk-interval-ms", "150")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let expected = resp.headers()["x-mock-body-sha256"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    let mut first_at = None;
    let mut reads = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        first_at.get_or_insert_with(|| started.elapsed());
        got.extend_from_slice(&chunk);
        reads += 1;
    }
    let total = started.elapsed();
    // 11 events 150 ms apart: the stream takes ≥ 1.5 s, the first event comes long before.
    assert!(total >= Duration::from_millis(1500), "{total:?}");
    assert!(
        first_at.unwrap() < total / 2,
        "first {first_at:?} of {total:?}"
    );
    assert!(
        reads >= 5,
        "the body arrived in {reads} reads: it was buffered"
    );
    assert_eq!(
        sha256_hex(&got),
        expected,
        "stream bytes differ from the upstream's"
    );
    let text = String::from_utf8(got).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(!text.contains("\"usage\""), "no usage chunk unless asked");
}

#[tokio::test]
async fn one_mib_prompt_with_model_last_reaches_upstream_intact() {
    let mock = Mock::start(&[]);
    let k = key("k1", &[]);
    let gw = Gateway::start(&single_mock_config(&mock, &[&k]), &[]);
    let prompt = "lorem ipsum ".repeat(1024 * 1024 / 12 + 1);
    // The OpenAI Python SDK serialises `messages` before `model`: the model sits past 1 MiB.
    let body = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{prompt}\"}}],\"model\":\"mock-gpt\"}}"
    );
    assert!(body.len() > 1024 * 1024);
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-mock-request-bytes"],
        body.len().to_string().as_str()
    );
    assert_eq!(
        resp.headers()["x-mock-request-sha256"],
        sha256_hex(body.as_bytes()).as_str()
    );

    // Through an alias, only the model string changes.
    let aliased = body.replace("\"model\":\"mock-gpt\"", "\"model\":\"demo\"");
    let resp = gw
        .post(&k.key, "/v1/chat/completions")
        .body(aliased)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-mock-request-sha256"],
        sha256_hex(body.as_bytes()).as_str()
    );
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "mock-gpt");
}

#[tokio::test]
async fn routes_by_model_with_alias_rewrite() {
    let (a, b) = (Mock::start(&["--name", "a"]), Mock::start(&["--name", "b"]));
    let k = key("k1", &[]);
    let body = config(
        &[
            upstream("ua", &[a.base_url()], &[]),
            upstream("ub", &[b.base_url()], &[]),
        ],
        &[
            ("model-a", "ua", None),
            ("model-b", "ub", Some("real-b")),
            ("embed-b", "ub", None),
        ],
        &[&k],
    );
    let gw = Gateway::start(&body, &[]);
    let c = client();
    for (model, server, upstream_model) in [("model-a", "a", "model-a"), ("model-b", "b", "real-b")]
    {
        let resp = gw.chat(&k.key, &chat(model)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-mock-server"], server);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["model"], upstream_model);
    }
    // Other endpoints route the same way; the query string is kept.
    let resp = c
        .post(gw.url("/v1/embeddings?api-version=1"))
        .header("x-api-key", &k.key)
        .json(&serde_json::json!({"model": "embed-b", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    let resp = gw
        .post(&k.key, "/v1/completions")
        .json(&serde_json::json!({"model": "model-a", "prompt": "hi", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn models_endpoint_lists_what_the_key_may_use() {
    let mock = Mock::start(&[]);
    let all = key("all", &[]);
    let some = key("some", &["models: [\"mock-*\"]"]);
    let gw = Gateway::start(&single_mock_config(&mock, &[&all, &some]), &[]);
    let ids = |v: serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let v = gw.get(&all.key, "/v1/models").await.json().await.unwrap();
    assert_eq!(ids(v), vec!["demo", "mock-embed", "mock-gpt"]);
    let v: serde_json::Value = gw.get(&some.key, "/v1/models").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["owned_by"], "mock");
    assert_eq!(ids(v), vec!["mock-embed", "mock-gpt"]);
    let v: serde_json::Value = gw
        .get(&some.key, "/v1/models/mock-gpt")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], "mock-gpt");
    let resp = gw.get(&some.key, "/v1/models/demo").await;
    expect_error(resp, 404, "model_not_found").await;
}

#[tokio::test]
async fn keepalive_connections_carry_many_requests() {
    let mock = Mock::start(&[]);
    let k = key("k1", &[]);
    let gw = Gateway::start(&single_mock_config(&mock, &[&k]), &[]);
    for i in 0..50 {
        let mut body = chat("demo");
        body["stream"] = (i % 2 == 0).into();
        let resp = gw.chat(&k.key, &body).await;
        assert_eq!(resp.status(), 200);
        let expected = resp.headers()["x-mock-body-sha256"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(sha256_hex(&resp.bytes().await.unwrap()), expected);
    }
    assert_eq!(
        gw.metric_eventually("aihub_requests_total{model=\"demo\",status=\"200\"}", 50.0),
        50.0
    );
}
