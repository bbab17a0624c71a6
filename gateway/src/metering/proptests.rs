//! Property tests of the meters with an oracle: streams and bodies generated in every API's
//! shape (random text with escapes, multi-byte characters and `"usage"` decoys, random token
//! counts, LF or CRLF events) and cut at random points. The SSE meter and stripper give the
//! same bytes and usage on any split as on the whole, the usage is the one generated, and a
//! stripped stream carries no `usage` member; the JSON meter and its streaming scan read the
//! generated usage on any split. Fuzzing (`fuzz/`) covers arbitrary bytes; these cover
//! well-formed traffic with exact expectations.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::json::scan_usage;
use super::{JsonMeter, SseMeter, Usage};
use crate::api::Api;

/// Text pieces that stress the scanners: escapes, quotes, multi-byte characters, decoy keys.
fn text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "Hello",
        " wörld",
        "\"",
        "\\",
        "\n",
        "\u{1F600}",
        "\"usage\": {",
        "data: x\n\n",
        "}",
        "{\"usage\":1}",
        "\u{4f60}",
        ",",
        "\r\n\r\n",
    ]);
    prop::collection::vec(pieces, 0..6).prop_map(|v| v.concat())
}

/// Usage counts and the object in `api`'s shape, with the [`Usage`] the gateway must read.
fn usage_of(api: Api, prompt: u32, cached: u32, completion: u32) -> (Value, Usage) {
    let cached = cached.min(prompt);
    let total = prompt + completion;
    let value = match api {
        Api::Responses => json!({"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": total, "input_tokens_details": {"cached_tokens": cached}}),
        Api::Messages => json!({"input_tokens": prompt - cached,
            "cache_read_input_tokens": cached, "output_tokens": completion}),
        _ => json!({"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": total, "prompt_tokens_details": {"cached_tokens": cached}}),
    };
    let usage = Usage {
        prompt,
        cached,
        completion,
        total,
    };
    (value, usage)
}

fn apis() -> impl Strategy<Value = Api> {
    prop::sample::select(vec![
        Api::ChatCompletions,
        Api::Completions,
        Api::Responses,
        Api::Messages,
    ])
}

fn event(v: &Value, crlf: bool) -> String {
    if crlf {
        format!("data: {v}\r\n\r\n")
    } else {
        format!("data: {v}\n\n")
    }
}

/// A stream of `api` with the given texts, reporting `usage` the way that API does.
fn stream(api: Api, texts: &[String], usage: &Value, crlf: bool, null_usage: bool) -> String {
    let mut out = String::new();
    match api {
        Api::Responses => {
            for t in texts {
                out += &event(
                    &json!({"type": "response.output_text.delta", "delta": t}),
                    crlf,
                );
            }
            let done = json!({"type": "response.completed",
                "response": {"id": "r", "output": [{"content": [{"text": texts.concat()}]}], "usage": usage}});
            out += &event(&done, crlf);
        }
        Api::Messages => {
            let mut start = usage.clone();
            start["output_tokens"] = json!(1);
            out += &event(
                &json!({"type": "message_start", "message": {"id": "m", "usage": start}}),
                crlf,
            );
            for t in texts {
                out += &event(
                    &json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}}),
                    crlf,
                );
            }
            let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": usage["output_tokens"]}});
            out += &event(&delta, crlf);
        }
        _ => {
            let null = null_usage.then_some(Value::Null);
            for t in texts {
                let mut chunk = json!({"id": "c", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]});
                if let Some(n) = &null {
                    chunk["usage"] = n.clone();
                }
                out += &event(&chunk, crlf);
            }
            out += &event(&json!({"id": "c", "choices": [], "usage": usage}), crlf);
            out += "data: [DONE]\n\n";
        }
    }
    out
}

fn feed(meter: &mut SseMeter, body: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for c in cuts.into_iter().chain([body.len()]) {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&body[last..c])));
        last = c;
    }
    out.extend_from_slice(&meter.finish());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sse_meter_any_split_equals_the_whole(
        api in apis(),
        texts in prop::collection::vec(text(), 0..5),
        (prompt, cached, completion) in (0u32..1_000_000, 0u32..1_000_000, 0u32..1_000_000),
        crlf in any::<bool>(),
        null_usage in any::<bool>(),
        strip in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (value, want) = usage_of(api, prompt, cached, completion);
        let body = stream(api, &texts, &value, crlf, null_usage);
        let mut whole = SseMeter::new(api, strip);
        let whole_out = feed(&mut whole, body.as_bytes(), &[]);
        let mut split = SseMeter::new(api, strip);
        let split_out = feed(&mut split, body.as_bytes(), &cuts);
        prop_assert_eq!(&whole_out, &split_out);
        prop_assert_eq!(whole.usage(), Some(want));
        prop_assert_eq!(split.usage(), Some(want));
        prop_assert_eq!(whole.delivered.chars, split.delivered.chars);
        if !strip {
            prop_assert_eq!(&whole_out, body.as_bytes());
        } else if matches!(api, Api::ChatCompletions | Api::Completions) {
            // Stripped: every event is still JSON, none has a `usage` member, the text is kept.
            let out = String::from_utf8(whole_out).unwrap();
            let mut delivered = String::new();
            for line in out.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if line == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(line).unwrap();
                prop_assert!(v.get("usage").is_none(), "{}", line);
                delivered += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            }
            prop_assert_eq!(delivered, texts.concat());
        }
    }

    #[test]
    fn json_meter_any_split_reads_the_usage(
        api in prop::sample::select(vec![Api::ChatCompletions, Api::Completions, Api::Embeddings, Api::Responses, Api::Messages]),
        text in text(),
        (prompt, cached, completion) in (0u32..1_000_000, 0u32..1_000_000, 0u32..1_000_000),
        usage_first in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (value, want) = usage_of(api, prompt, cached, completion);
        let content = match api {
            Api::Responses => json!({"output": [{"content": [{"type": "output_text", "text": text}]}]}),
            Api::Messages => json!({"content": [{"type": "text", "text": text}]}),
            Api::Embeddings => json!({"data": [{"embedding": [0.5, -1.25e-3]}], "note": text}),
            _ => json!({"choices": [{"message": {"content": text}}]}),
        };
        let mut members = vec![("id".to_owned(), json!("x")), ("usage".to_owned(), value)];
        members.extend(content.as_object().unwrap().clone());
        if !usage_first {
            members.rotate_left(2);
        }
        let body = Value::Object(members.into_iter().collect()).to_string();
        let body = body.as_bytes();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().chain([body.len()]) {
            pieces.push(&body[last..c]);
            last = c;
        }
        let mut meter = JsonMeter::default();
        for p in &pieces {
            meter.push(&Bytes::copy_from_slice(p));
        }
        prop_assert_eq!(meter.usage(api), Some(want));
        prop_assert_eq!(scan_usage(pieces.iter().copied(), api).0, Some(want));
        prop_assert_eq!(scan_usage([body], api).1, meter.delivered().chars);
    }
}
