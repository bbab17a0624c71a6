//! OpenAI's Responses API (`POST /v1/responses`): the response object (JSON) and its typed SSE
//! events, ending with `response.completed`, which carries the usage. Like OpenAI, it refuses
//! Chat Completions' `stream_options` (400 "Unknown parameter").

use bytes::Bytes;
use serde_json::{json, Value};

use crate::wire::{unix_now, Completion};

/// Request fields this API refuses (a gateway must not add them).
pub const UNKNOWN_PARAMETERS: &[&str] = &["stream_options", "messages", "max_tokens"];

/// One generated response.
pub struct Response {
    id: String,
    model: String,
    created: u64,
    text_tokens: Vec<&'static str>,
    input_tokens: u64,
    cached_tokens: u64,
}

impl Response {
    pub fn new(request: &Value, model: &str, id: &str, chunks: usize, cached: u64) -> Response {
        let limit = request
            .get("max_output_tokens")
            .and_then(Value::as_u64)
            .map_or(chunks, |m| (m as usize).min(chunks));
        let mut input = crate::wire::prompt_tokens(request);
        if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
            input += (instructions.chars().count() as u64).div_ceil(4);
        }
        Response {
            id: format!("resp_{id}"),
            model: model.to_owned(),
            created: unix_now(),
            text_tokens: Completion::words(limit),
            input_tokens: input,
            cached_tokens: cached.min(input),
        }
    }

    fn text(&self) -> String {
        self.text_tokens.concat()
    }

    pub fn usage(&self) -> Value {
        let output = self.text_tokens.len() as u64;
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output
        })
    }

    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([{"type": "output_text", "text": t, "annotations": []}]),
            None => json!([]),
        };
        json!({"id": format!("msg_{}", self.id), "type": "message", "status": status,
               "role": "assistant", "content": content})
    }

    /// The response object; `done` adds the output and the usage.
    pub fn object(&self, done: bool) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": if done { "completed" } else { "in_progress" },
            "error": null,
            "incomplete_details": null,
            "instructions": null,
            "max_output_tokens": null,
            "model": self.model,
            "output": if done { json!([self.message("completed", Some(&self.text()))]) } else { json!([]) },
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": true,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": if done { self.usage() } else { Value::Null },
            "user": null,
            "metadata": {}
        })
    }

    /// The SSE events of a streamed response, each with its `event:` line and a sequence number.
    pub fn events(&self) -> Vec<Bytes> {
        let item_id = format!("msg_{}", self.id);
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(self.text_tokens.len() + 8);
        let mut push = |kind: &str, mut v: Value| {
            v["type"] = json!(kind);
            v["sequence_number"] = json!(seq);
            seq += 1;
            out.push(Bytes::from(format!("event: {kind}\ndata: {v}\n\n")));
        };
        push("response.created", json!({"response": self.object(false)}));
        push(
            "response.in_progress",
            json!({"response": self.object(false)}),
        );
        push(
            "response.output_item.added",
            json!({"output_index": 0, "item": self.message("in_progress", None)}),
        );
        push(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
        );
        for t in &self.text_tokens {
            push(
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": t,
                       "logprobs": []}),
            );
        }
        let text = self.text();
        push(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text,
                   "logprobs": []}),
        );
        push(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": text, "annotations": []}}),
        );
        push(
            "response.output_item.done",
            json!({"output_index": 0, "item": self.message("completed", Some(&text))}),
        );
        push("response.completed", json!({"response": self.object(true)}));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_only_in_the_completed_event() {
        let req = json!({"model": "m", "input": "12345678", "instructions": "abcd"});
        let r = Response::new(&req, "m", "1", 3, 1);
        let events = r.events();
        let last = std::str::from_utf8(events.last().unwrap()).unwrap();
        assert!(last.starts_with("event: response.completed\n"));
        let data: Value =
            serde_json::from_str(last.lines().nth(1).unwrap().trim_start_matches("data: "))
                .unwrap();
        assert_eq!(data["response"]["usage"]["output_tokens"], 3);
        // "12345678" → 2, "abcd" → 1.
        assert_eq!(data["response"]["usage"]["input_tokens"], 3);
        assert_eq!(
            data["response"]["usage"]["input_tokens_details"]["cached_tokens"],
            1
        );
        assert_eq!(r.object(true)["usage"]["total_tokens"], 6);
    }
}
