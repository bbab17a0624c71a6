//! Anthropic's Messages API (`POST /v1/messages`): the message object (JSON) and its SSE events
//! (`message_start` with the input usage, `content_block_*`, `message_delta` with the final
//! output count, `message_stop`), and Anthropic's error shape. Like Anthropic, it refuses
//! fields it does not know ("Extra inputs are not permitted"), `stream_options` included.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::wire::Completion;

/// Top-level request fields the Messages API accepts.
const KNOWN: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
];

/// The first request field the API does not accept, if any.
pub fn unknown_field(request: &Value) -> Option<String> {
    request
        .as_object()?
        .keys()
        .find(|k| !KNOWN.contains(&k.as_str()))
        .cloned()
}

/// An Anthropic error body.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// One generated message.
pub struct Message {
    id: String,
    model: String,
    tokens: Vec<&'static str>,
    input_tokens: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl Message {
    /// `cached` prompt tokens are read from the cache; `cache_write` are written to it (both
    /// left out of `input_tokens`, as Anthropic reports them).
    pub fn new(
        request: &Value,
        model: &str,
        id: &str,
        chunks: usize,
        cached: u64,
        cache_write: u64,
    ) -> Message {
        let limit = request
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(chunks, |m| (m as usize).min(chunks));
        let mut prompt = crate::wire::prompt_tokens(request);
        if let Some(system) = request.get("system").and_then(Value::as_str) {
            prompt += (system.chars().count() as u64).div_ceil(4);
        }
        let cache_read = cached.min(prompt);
        let cache_creation = cache_write.min(prompt - cache_read);
        Message {
            id: format!("msg_{id}"),
            model: model.to_owned(),
            tokens: Completion::words(limit),
            input_tokens: prompt - cache_read - cache_creation,
            cache_read,
            cache_creation,
        }
    }

    fn usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output
        })
    }

    /// The non-streaming response body.
    pub fn body(&self) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.tokens.concat()}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": self.usage(self.tokens.len() as u64)
        })
    }

    /// The SSE events of a streamed message.
    pub fn events(&self) -> Vec<Bytes> {
        let event = |kind: &str, v: Value| Bytes::from(format!("event: {kind}\ndata: {v}\n\n"));
        let mut out = Vec::with_capacity(self.tokens.len() + 6);
        out.push(event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": self.usage(1)}}),
        ));
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ));
        out.push(event("ping", json!({"type": "ping"})));
        for t in &self.tokens {
            out.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        out.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        out.push(event(
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": self.tokens.len()}}),
        ));
        out.push(event("message_stop", json!({"type": "message_stop"})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_split_between_start_and_delta() {
        let req = json!({"model": "m", "max_tokens": 2, "system": "abcd",
                         "messages": [{"role": "user", "content": "12345678"}]});
        assert_eq!(unknown_field(&req), None);
        assert_eq!(
            unknown_field(&json!({"model": "m", "stream_options": {}})).as_deref(),
            Some("stream_options")
        );
        let m = Message::new(&req, "m", "1", 10, 1, 1);
        // "user" + "12345678" → 3, "abcd" → 1; one read from the cache, one written.
        assert_eq!(m.body()["usage"]["input_tokens"], 2);
        assert_eq!(m.body()["usage"]["output_tokens"], 2);
        let events = m.events();
        assert!(std::str::from_utf8(&events[0])
            .unwrap()
            .contains("\"cache_read_input_tokens\":1"));
        let delta = std::str::from_utf8(&events[events.len() - 2]).unwrap();
        assert!(delta.starts_with("event: message_delta\n"));
        assert!(delta.contains("\"output_tokens\":2"));
    }
}
