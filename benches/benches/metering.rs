//! Usage metering on the response path, and the off-path estimate.
//!
//! `cargo bench -p aihub-benches --bench metering` measures:
//! - an SSE chat stream of 22 events (the proxy benchmark's shape) through [`SseMeter`], passed
//!   through (the client asked for usage) and with the usage removed (the gateway asked);
//! - a small JSON answer's usage ([`JsonMeter`], the kept-body fast path), and a 20 MiB
//!   embeddings answer scanned in 64 KiB chunks (throughput);
//! - the tokenizer estimate of a chat prompt (runs on the blocking pool, only when no usage was
//!   read).

use std::hint::black_box;

use aihub_gateway::api::Api;
use aihub_gateway::metering::{estimate, JsonMeter, SseMeter};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn chat_stream(events: usize) -> Bytes {
    let mut s = String::new();
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n");
    for i in 0..events {
        s.push_str(&format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"));
    }
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":20,\"total_tokens\":29}}\n\n");
    s.push_str("data: [DONE]\n\n");
    Bytes::from(s)
}

fn sse(c: &mut Criterion) {
    let stream = chat_stream(19); // 22 events with the role, usage and [DONE] ones
    let events: Vec<Bytes> = stream
        .split_inclusive(|&b| b == b'\n')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|pair| Bytes::from(pair.concat()))
        .collect();
    let mut g = c.benchmark_group("sse_22_events");
    g.throughput(Throughput::Elements(1));
    for strip in [false, true] {
        let name = if strip {
            "usage_removed"
        } else {
            "pass_through"
        };
        g.bench_function(format!("{name}/one_read"), |b| {
            b.iter(|| {
                let mut m = SseMeter::new(Api::ChatCompletions, strip);
                let out = m.feed(stream.clone());
                black_box((out, m.finish(), m.usage()))
            })
        });
        g.bench_function(format!("{name}/read_per_event"), |b| {
            b.iter(|| {
                let mut m = SseMeter::new(Api::ChatCompletions, strip);
                for e in &events {
                    black_box(m.feed(e.clone()));
                }
                black_box((m.finish(), m.usage()))
            })
        });
    }
    g.finish();
}

fn json(c: &mut Criterion) {
    let small = Bytes::from_static(br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the AI Hub mock upstream. This text is generated one token at a time","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25,"prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"fp"}"#);
    c.bench_function("json_small_usage", |b| {
        b.iter(|| {
            let mut m = JsonMeter::default();
            m.push(&small);
            black_box(m.usage(Api::ChatCompletions))
        })
    });
    let vector = format!("[{}0.5]", "-0.12345678,".repeat(4095));
    let data: Vec<String> = (0..400)
        .map(|i| format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#))
        .collect();
    let big = format!(
        r#"{{"object":"list","data":[{}],"model":"m","usage":{{"prompt_tokens":4000,"total_tokens":4000}}}}"#,
        data.join(",")
    );
    let chunks: Vec<Bytes> = big
        .as_bytes()
        .chunks(64 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let mut g = c.benchmark_group("json_large");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(10);
    g.bench_function(format!("{}_mib_in_64k_chunks", big.len() >> 20), |b| {
        b.iter(|| {
            let mut m = JsonMeter::default();
            for c in &chunks {
                m.push(c);
            }
            black_box(m.usage(Api::Embeddings))
        })
    });
    g.finish();
}

fn estimates(c: &mut Criterion) {
    let chat = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "You are a helpful assistant that answers briefly."},
        {"role": "user", "content": "Explain what an API gateway does for a team that ships AI features, in three sentences."}
    ]})
    .to_string();
    // Build the tokenizer once, outside the measurement.
    black_box(estimate::prompt_tokens(chat.as_bytes()));
    c.bench_function("estimate_chat_prompt", |b| {
        b.iter(|| black_box(estimate::prompt_tokens(chat.as_bytes())))
    });
    let long = serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": "The gateway meters every request it forwards. ".repeat(2000)}
    ]})
    .to_string();
    let mut g = c.benchmark_group("estimate_long_prompt");
    g.throughput(Throughput::Bytes(long.len() as u64));
    g.sample_size(10);
    g.bench_function("96_kib", |b| {
        b.iter(|| black_box(estimate::prompt_tokens(long.as_bytes())))
    });
    g.finish();
}

criterion_group!(benches, sse, json, estimates);
criterion_main!(benches);
