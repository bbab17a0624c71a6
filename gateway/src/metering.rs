//! Token usage from responses as they stream by, without holding back what the client sees.
//!
//! - JSON bodies are kept aside as reference-counted chunks ([`JsonBody`], up to
//!   [`JSON_KEEP_MAX`]) and their `usage` read at the end.
//! - SSE bodies go through [`SseMeter`]: events are cut at blank lines across arbitrary TCP
//!   splits; an event whose payload has a `"usage": {…}` object is parsed; when the gateway
//!   injected `stream_options.include_usage`, the usage-only event (`"choices": []`) is removed
//!   from the client's stream. Delivered text is counted on the way (for estimates).
//! - No usage from the upstream, or a client that left mid-stream: [`estimate`] counts ⌈chars/4⌉
//!   tokens of the prompt's strings and of the delivered text (a documented heuristic: no
//!   tokenizer is bundled), and the record is flagged `usage_estimated = 1`.

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// JSON response bodies larger than this are not kept for metering (the usage is estimated).
pub const JSON_KEEP_MAX: usize = 8 * 1024 * 1024;

/// A JSON response body kept aside for metering. Chunks are reference-counted, not copied: the
/// usual one-chunk body costs neither an allocation nor a copy.
#[derive(Debug, Default)]
pub struct JsonBody {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
    len: usize,
    too_large: bool,
}

impl JsonBody {
    pub fn push(&mut self, chunk: &Bytes) {
        if self.too_large {
            return;
        }
        self.len += chunk.len();
        if self.len > JSON_KEEP_MAX {
            *self = JsonBody {
                too_large: true,
                ..JsonBody::default()
            };
        } else if self.first.is_none() {
            self.first = Some(chunk.clone());
        } else {
            self.rest.push(chunk.clone());
        }
    }

    /// The whole body; `None` when it was too large to keep.
    pub fn bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        if self.too_large {
            return None;
        }
        let first = self.first.as_deref().unwrap_or(&[]);
        if self.rest.is_empty() {
            return Some(first.into());
        }
        let mut all = Vec::with_capacity(self.len);
        all.extend_from_slice(first);
        self.rest.iter().for_each(|c| all.extend_from_slice(c));
        Some(all.into())
    }
}

/// Token counts reported by the upstream (or estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u32,
    pub cached: u32,
    pub completion: u32,
    pub total: u32,
}

#[derive(Deserialize)]
struct UsageObject {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageObject>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<UsageObject> for Usage {
    fn from(u: UsageObject) -> Usage {
        let total = u
            .total_tokens
            .unwrap_or(u.prompt_tokens + u.completion_tokens);
        Usage {
            prompt: clamp(u.prompt_tokens),
            cached: clamp(
                u.prompt_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
            ),
            completion: clamp(u.completion_tokens),
            total: clamp(total),
        }
    }
}

/// Reads `usage` from a complete JSON response body. Fast path: OpenAI-style bodies end with
/// the top-level `usage` object, so the object after the last `"usage":` key is parsed alone
/// (a key cannot occur inside a string value, where quotes are escaped); the whole body is
/// parsed only when that fails.
pub fn json_usage(body: &[u8]) -> Option<Usage> {
    if let Some(at) = memchr::memmem::rfind(body, b"\"usage\"") {
        let rest = &body[at + 7..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace());
        if colon.is_some_and(|c| rest[c] == b':') {
            let value = &rest[colon.unwrap_or(0) + 1..];
            let mut values = serde_json::Deserializer::from_slice(value).into_iter::<UsageObject>();
            if let Some(Ok(u)) = values.next() {
                return Some(Usage::from(u));
            }
        }
    }
    serde_json::from_slice::<WithUsage>(body)
        .ok()?
        .usage
        .map(Usage::from)
}

/// The metering state of one SSE response.
#[derive(Debug, Default)]
pub struct SseMeter {
    /// Remove the usage-only event (the gateway asked for it, the client did not).
    strip: bool,
    /// Bytes of an event not complete yet.
    pending: BytesMut,
    pub usage: Option<Usage>,
    /// Characters of generated text delivered to the client so far.
    pub text_chars: u64,
}

impl SseMeter {
    pub fn new(strip: bool) -> SseMeter {
        SseMeter {
            strip,
            ..SseMeter::default()
        }
    }

    /// Takes the next bytes from the upstream; returns the bytes to send to the client.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip && self.pending.is_empty() {
            // Pass-through: scan complete events in place, keep only a partial tail aside.
            let consumed = self.scan(&chunk, None);
            self.pending.extend_from_slice(&chunk[consumed..]);
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let buffered = std::mem::take(&mut self.pending);
        let mut out = (self.strip).then(|| BytesMut::with_capacity(buffered.len()));
        let consumed = self.scan(&buffered, out.as_mut());
        self.pending.extend_from_slice(&buffered[consumed..]);
        match out {
            Some(out) => out.freeze(),
            None => chunk,
        }
    }

    /// The end of the stream: whatever is pending goes out as it is (an unterminated event).
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if self.strip {
            rest.freeze()
        } else {
            Bytes::new() // already forwarded by `feed`
        }
    }

    /// Inspects every complete event of `buf`; with `out`, copies the events to keep into it.
    /// Returns how many bytes were complete events.
    fn scan(&mut self, buf: &[u8], mut out: Option<&mut BytesMut>) -> usize {
        let mut start = 0;
        while let Some(end) = event_end(buf, start) {
            let event = &buf[start..end];
            let usage_only = self.inspect(event);
            if let Some(out) = out.as_deref_mut() {
                if !(self.strip && usage_only) {
                    out.extend_from_slice(event);
                }
            }
            start = end;
        }
        start
    }

    /// Reads one event; returns true when it is a usage-only chunk.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let mut usage_only = false;
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            self.text_chars += text_chars(data);
            if has_usage_object(data) {
                if let Ok(chunk) = serde_json::from_slice::<WithUsage>(data) {
                    if let Some(u) = chunk.usage {
                        self.usage = Some(Usage::from(u));
                        usage_only = chunk.choices.is_some_and(|c| c.is_empty());
                    }
                }
            }
        }
        usage_only
    }
}

/// End (exclusive) of the first complete event at or after `from`: after a blank line
/// (`\n\n`, or `\n\r\n` for CRLF streams).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    for i in memchr::memchr_iter(b'\n', &buf[from..]).map(|i| i + from) {
        match buf.get(i + 1) {
            Some(b'\n') => return Some(i + 2),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            _ => {}
        }
    }
    None
}

/// Whether `data` has `"usage"` followed by an object (not `null`).
fn has_usage_object(data: &[u8]) -> bool {
    let key = b"\"usage\"";
    let mut from = 0;
    while let Some(pos) = find(&data[from..], key) {
        let after = &data[from + pos + key.len()..];
        let mut rest = after.iter().skip_while(|b| b.is_ascii_whitespace());
        if rest.next() == Some(&b':') && rest.find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        from += pos + key.len();
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Characters inside `"content":"…"` and `"text":"…"` strings of a chunk (escapes count as one).
fn text_chars(data: &[u8]) -> u64 {
    let mut total = 0;
    for key in [&b"\"content\":\""[..], &b"\"text\":\""[..]] {
        let mut from = 0;
        while let Some(pos) = find(&data[from..], key) {
            let mut i = from + pos + key.len();
            while i < data.len() && data[i] != b'"' {
                if data[i] == b'\\' {
                    i += if data.get(i + 1) == Some(&b'u') { 6 } else { 2 };
                    total += 1;
                    continue;
                }
                if data[i] & 0xC0 != 0x80 {
                    total += 1;
                }
                i += 1;
            }
            from = i.min(data.len());
        }
    }
    total
}

/// ⌈chars / 4⌉: the estimate used when no tokenizer answer is available.
pub fn tokens_from_chars(chars: u64) -> u32 {
    clamp(chars.div_ceil(4))
}

/// Characters of every string under `messages`, `prompt` or `input` of a request body.
pub fn prompt_chars(body: &[u8]) -> u64 {
    fn chars(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::String(s) => s.chars().count() as u64,
            serde_json::Value::Array(a) => a.iter().map(chars).sum(),
            serde_json::Value::Object(o) => o.values().map(chars).sum(),
            _ => 0,
        }
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    ["messages", "prompt", "input"]
        .iter()
        .filter_map(|k| v.get(k))
        .map(chars)
        .sum()
}

/// Characters of generated text in a complete JSON response (choices' message content/text).
pub fn response_text_chars(body: &[u8]) -> u64 {
    text_chars(body)
}

/// An estimate from the request body and the delivered text.
pub fn estimate(request_body: &[u8], delivered_text_chars: u64) -> Usage {
    let prompt = tokens_from_chars(prompt_chars(request_body));
    let completion = tokens_from_chars(delivered_text_chars);
    Usage {
        prompt,
        cached: 0,
        completion,
        total: prompt.saturating_add(completion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(with_usage: bool) -> Vec<u8> {
        let mut s = String::new();
        for t in ["He", "llo", " wör\\\"ld"] {
            let usage = if with_usage { ",\"usage\":null" } else { "" };
            s.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]{usage}}}\n\n"
            ));
        }
        if with_usage {
            s.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n");
        }
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    fn run(meter: &mut SseMeter, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&input[last..c])));
            last = c;
        }
        out.extend_from_slice(&meter.finish());
        out
    }

    #[test]
    fn usage_is_read_and_stripped_at_every_split_point() {
        let with = stream(true);
        let without_usage_event: Vec<u8> = {
            let s = String::from_utf8(with.clone()).unwrap();
            let start = s.find("data: {\"id\":\"c\",\"choices\":[]").unwrap();
            let end = start + s[start..].find("\n\n").unwrap() + 2;
            [&with[..start], &with[end..]].concat()
        };
        let expected = Usage {
            prompt: 9,
            cached: 4,
            completion: 3,
            total: 12,
        };
        for cut in 0..=with.len() {
            for strip in [false, true] {
                let mut m = SseMeter::new(strip);
                let out = run(&mut m, &with, &[cut]);
                assert_eq!(m.usage, Some(expected), "cut {cut} strip {strip}");
                let want = if strip { &without_usage_event } else { &with };
                assert_eq!(&out, want, "cut {cut} strip {strip}");
                // "He" + "llo" + " wör\"ld" = 2 + 3 + 7
                assert_eq!(m.text_chars, 12, "cut {cut}");
            }
        }
        // Every byte its own read.
        let mut m = SseMeter::new(true);
        let cuts: Vec<usize> = (1..with.len()).collect();
        assert_eq!(run(&mut m, &with, &cuts), without_usage_event);
        assert_eq!(m.usage, Some(expected));
    }

    #[test]
    fn streams_without_usage_and_crlf_events() {
        let plain = stream(false);
        let mut m = SseMeter::new(false);
        assert_eq!(run(&mut m, &plain, &[5, 40]), plain);
        assert_eq!(m.usage, None);
        let crlf = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut m = SseMeter::new(true);
        assert_eq!(run(&mut m, crlf, &[10]), b"data: [DONE]\r\n\r\n");
        assert_eq!(
            m.usage,
            Some(Usage {
                prompt: 1,
                cached: 0,
                completion: 2,
                total: 3
            })
        );
    }

    #[test]
    fn json_usage_and_estimates() {
        let body = br#"{"choices":[{"message":{"content":"abcdefgh"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        assert_eq!(json_usage(body).unwrap().total, 7);
        let emb = br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(
            json_usage(emb).unwrap(),
            Usage {
                prompt: 4,
                cached: 0,
                completion: 0,
                total: 4
            }
        );
        assert_eq!(json_usage(b"{\"x\":1}"), None);
        // `usage` before other fields, with spaces, and a decoy inside a string value.
        let odd = br#"{"usage" : {"prompt_tokens":1,"completion_tokens":1}, "choices":[{"message":{"content":"say \"usage\": {}"}}]}"#;
        assert_eq!(json_usage(odd).unwrap().total, 2);
        assert_eq!(response_text_chars(body), 8);
        let req = br#"{"model":"m","messages":[{"role":"user","content":"1234567"}]}"#;
        // "user" + "1234567" = 11 chars → 3 tokens; 8 delivered chars → 2 tokens.
        assert_eq!(
            estimate(req, 8),
            Usage {
                prompt: 3,
                cached: 0,
                completion: 2,
                total: 5
            }
        );
    }
}
