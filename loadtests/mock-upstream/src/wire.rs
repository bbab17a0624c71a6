//! OpenAI response bodies: chat completions and completions (JSON and SSE chunks), embeddings,
//! the model list. Token counts are the mock's own, deterministic: a prompt token per four
//! characters of text (at least one per message), one completion token per content chunk.

use bytes::Bytes;
use serde_json::{json, Value};

const WORDS: &[&str] = &[
    "Hello",
    " from",
    " the",
    " AI",
    " Hub",
    " mock",
    " upstream",
    ".",
    " This",
    " text",
    " is",
    " generated",
    " one",
    " token",
    " at",
    " a",
    " time",
];

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prompt tokens of a request: ⌈chars/4⌉ of every string in `messages`, `prompt` or `input`.
pub fn prompt_tokens(request: &Value) -> u64 {
    fn chars(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(a) => a.iter().map(chars).sum(),
            Value::Object(o) => o.values().map(chars).sum(),
            _ => 0,
        }
    }
    let mut total = 0;
    for field in ["messages", "prompt", "input"] {
        if let Some(v) = request.get(field) {
            let parts = match v {
                Value::Array(a) => a.len().max(1) as u64,
                _ => 1,
            };
            total += chars(v).div_ceil(4).max(parts);
        }
    }
    total
}

/// How a chat or completion stream carries the usage it was asked for (`x-mock-usage-shape`,
/// `aihub mock-upstream --usage-shape`). OpenAI-compatible servers differ here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsageShape {
    /// OpenAI: a last chunk with `"choices": []` and the usage.
    #[default]
    ChoicesEmpty,
    /// vLLM and others: a last chunk with `"choices": [{"index":0,"delta":{}}]` and the usage.
    EmptyDelta,
    /// The usage on the finish chunk, which also carries the last content and `finish_reason`.
    OnFinish,
}

impl UsageShape {
    /// `choices-empty`, `empty-delta` or `on-finish`.
    pub fn parse(s: &str) -> Option<UsageShape> {
        match s {
            "choices-empty" => Some(UsageShape::ChoicesEmpty),
            "empty-delta" => Some(UsageShape::EmptyDelta),
            "on-finish" => Some(UsageShape::OnFinish),
            _ => None,
        }
    }
}

/// How a stream reports usage when asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamUsage {
    pub shape: UsageShape,
    /// `"usage": null` on every chunk without the usage (OpenAI does this; default true).
    pub null_elsewhere: bool,
}

impl Default for StreamUsage {
    fn default() -> Self {
        StreamUsage {
            shape: UsageShape::ChoicesEmpty,
            null_elsewhere: true,
        }
    }
}

/// One completion (chat or legacy), rendered as a JSON body or as SSE events.
pub struct Completion {
    id: String,
    model: String,
    created: u64,
    chat: bool,
    tokens: Vec<&'static str>,
    prompt_tokens: u64,
    /// Prompt tokens reported as read from the prompt cache.
    pub cached_tokens: u64,
}

impl Completion {
    pub fn new(request: &Value, model: &str, id: &str, chat: bool, chunks: usize) -> Completion {
        let limit = request
            .get("max_completion_tokens")
            .or_else(|| request.get("max_tokens"))
            .and_then(Value::as_u64)
            .map_or(chunks, |m| (m as usize).min(chunks));
        Completion {
            id: if chat {
                format!("chatcmpl-{id}")
            } else {
                format!("cmpl-{id}")
            },
            model: model.to_owned(),
            created: unix_now(),
            chat,
            tokens: Completion::words(limit),
            prompt_tokens: prompt_tokens(request),
            cached_tokens: 0,
        }
    }

    /// The first `n` words of the mock's text (one token each).
    pub fn words(n: usize) -> Vec<&'static str> {
        (0..n).map(|i| WORDS[i % WORDS.len()]).collect()
    }

    pub fn text(&self) -> String {
        self.tokens.concat()
    }

    pub fn usage(&self) -> Value {
        let completion = self.tokens.len() as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens.min(self.prompt_tokens), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    }

    /// The non-streaming response body.
    pub fn body(&self) -> Value {
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": self.text(), "refusal": null,
                   "annotations": []}, "logprobs": null, "finish_reason": "stop"})
        } else {
            json!({"index": 0, "text": self.text(), "logprobs": null, "finish_reason": "stop"})
        };
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
            "system_fingerprint": "fp_mock",
        })
    }

    /// SSE events: a role chunk (chat), one chunk per token, a finish chunk, the usage (when
    /// `include_usage`, in the given shape), then `[DONE]`.
    pub fn events(&self, include_usage: bool) -> Vec<Bytes> {
        self.events_with(include_usage.then(StreamUsage::default))
    }

    /// [`Completion::events`] with the usage reported as `usage` says (`None`: not asked).
    pub fn events_with(&self, usage: Option<StreamUsage>) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.tokens.len() + 4);
        let usage_field = usage.filter(|u| u.null_elsewhere).map(|_| Value::Null);
        if self.chat {
            out.push(self.chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
                &usage_field,
            ));
        }
        let shape = usage.map(|u| u.shape);
        let on_finish = shape == Some(UsageShape::OnFinish);
        let (body, last) = match self.tokens.split_last() {
            Some((last, body)) if on_finish => (body, Some(*last)),
            _ => (&self.tokens[..], None),
        };
        for t in body {
            out.push(self.chunk(json!({"content": t}), None, &usage_field));
        }
        match shape {
            Some(UsageShape::OnFinish) => {
                let delta = last.map_or(json!({}), |t| json!({"content": t}));
                out.push(self.chunk(delta, Some("stop"), &Some(self.usage())));
            }
            Some(UsageShape::EmptyDelta) => {
                out.push(self.chunk(json!({}), Some("stop"), &usage_field));
                let mut v = self.envelope(&Some(self.usage()));
                v["choices"] = json!([{"index": 0, "delta": {}}]);
                out.push(event(&v));
            }
            Some(UsageShape::ChoicesEmpty) => {
                out.push(self.chunk(json!({}), Some("stop"), &usage_field));
                let mut v = self.envelope(&Some(self.usage()));
                v["choices"] = json!([]);
                out.push(event(&v));
            }
            None => out.push(self.chunk(json!({}), Some("stop"), &None)),
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }

    fn envelope(&self, usage: &Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": [],
        });
        if let Some(u) = usage {
            v["usage"] = u.clone();
        }
        v
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, usage: &Option<Value>) -> Bytes {
        let mut v = self.envelope(usage);
        v["choices"] = if self.chat {
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}])
        };
        event(&v)
    }
}

fn event(v: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// An embeddings response: one deterministic vector per input.
pub fn embeddings(request: &Value, model: &str) -> Value {
    let inputs: Vec<Value> = match request.get("input") {
        Some(Value::Array(a)) => a.clone(),
        Some(v) => vec![v.clone()],
        None => vec![],
    };
    let dims = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .min(4096) as usize;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let seed = input.to_string().bytes().fold(i as u32 + 1, |h, b| {
                h.wrapping_mul(31).wrapping_add(b as u32)
            });
            let v: Vec<f32> = (0..dims)
                .map(|d| ((seed.wrapping_mul(d as u32 + 7) % 2000) as f32 / 1000.0) - 1.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let tokens = prompt_tokens(request);
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    })
}

/// `GET /v1/models`.
pub fn models() -> Value {
    json!({"object": "list", "data": [
        {"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "aihub-mock"},
        {"id": "mock-embed", "object": "model", "created": 0, "owned_by": "aihub-mock"}
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_chunk_only_when_asked() {
        let req = json!({"model": "m", "messages": [{"role": "user", "content": "12345678"}]});
        let c = Completion::new(&req, "m", "1", true, 3);
        let plain = c.events(false);
        assert_eq!(plain.len(), 1 + 3 + 1 + 1);
        assert!(plain
            .iter()
            .all(|e| !std::str::from_utf8(e).unwrap().contains("\"usage\"")));
        let with = c.events(true);
        let last_json = std::str::from_utf8(&with[with.len() - 2]).unwrap();
        let v: Value = serde_json::from_str(last_json.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["completion_tokens"], 3);
        // "user" + "12345678" = 12 chars → 3 tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(&with[with.len() - 1][..], b"data: [DONE]\n\n");
    }

    #[test]
    fn max_tokens_caps_the_completion() {
        let req = json!({"model": "m", "prompt": "hi", "max_tokens": 2});
        let c = Completion::new(&req, "m", "1", false, 10);
        assert_eq!(c.body()["usage"]["completion_tokens"], 2);
        assert_eq!(c.body()["object"], "text_completion");
    }
}
