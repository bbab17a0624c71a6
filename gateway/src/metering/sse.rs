//! Metering an SSE stream as it passes: events are cut at blank lines across arbitrary TCP
//! splits; usage is read from every API's events; generated text is sampled for estimates.
//!
//! - Chat Completions and Completions: any chunk's `usage` object (the last report wins).
//! - Responses: `response.usage` of `response.completed`, `.incomplete` or `.failed`.
//! - Messages: `message.usage` of `message_start`, then `usage` of `message_delta` (merged
//!   field by field: the delta's `output_tokens` is the final count).
//!
//! When the gateway asked for the usage (`stream_options.include_usage`) and the client did
//! not, no event the client receives carries a `usage` field: an event that carries nothing
//! else (`choices: []`, no `choices`, or choices with an empty delta and no finish reason) is
//! removed; from any other event only the `usage` member is removed, every other byte kept
//! (`"usage": null` on every chunk, or usage attached to the finish chunk).

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::estimate::Delivered;
use super::fields::{Usage, UsageFields};
use super::scan;
use crate::api::Api;

/// The metering state of one SSE response.
#[derive(Debug)]
pub struct SseMeter {
    api: Api,
    /// Remove `usage` from the client's stream (the gateway asked for it, the client did not).
    strip: bool,
    /// Bytes of an event not complete yet.
    pending: BytesMut,
    /// Every usage report so far, merged.
    fields: Option<UsageFields>,
    /// Generated text delivered so far (for an estimate).
    pub delivered: Delivered,
}

/// What becomes of one event in the client's stream.
enum Edit {
    Keep,
    Drop,
    /// The event without these bytes (its `usage` member).
    Cut(std::ops::Range<usize>),
}

impl Edit {
    fn apply(&self, event: &[u8], out: &mut BytesMut) {
        match self {
            Edit::Keep => out.extend_from_slice(event),
            Edit::Drop => {}
            Edit::Cut(cut) => {
                out.extend_from_slice(&event[..cut.start]);
                out.extend_from_slice(&event[cut.end..]);
            }
        }
    }
}

impl SseMeter {
    pub fn new(api: Api, strip: bool) -> SseMeter {
        SseMeter {
            api,
            strip,
            pending: BytesMut::new(),
            fields: None,
            delivered: Delivered::default(),
        }
    }

    /// The usage the stream reported; `None` when it reported none (or none readable).
    pub fn usage(&self) -> Option<Usage> {
        self.fields.as_ref()?.usage(self.api)
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

    /// The end of the stream: whatever is pending goes out as it is (an unterminated event),
    /// read for usage first.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if rest.is_empty() {
            return Bytes::new();
        }
        let edit = self.inspect(&rest);
        if !self.strip {
            return Bytes::new(); // already forwarded by `feed`
        }
        let mut out = BytesMut::with_capacity(rest.len());
        edit.apply(&rest, &mut out);
        out.freeze()
    }

    /// Inspects every complete event of `buf`; with `out`, copies what the client gets into
    /// it. Returns how many bytes were complete events.
    fn scan(&mut self, buf: &[u8], mut out: Option<&mut BytesMut>) -> usize {
        let mut start = 0;
        while let Some(end) = event_end(buf, start) {
            let event = &buf[start..end];
            let edit = self.inspect(event);
            if let Some(out) = out.as_deref_mut() {
                edit.apply(event, out);
            }
            start = end;
        }
        start
    }

    /// Reads one event; says what the client gets of it.
    fn inspect(&mut self, event: &[u8]) -> Edit {
        let mut edit = Edit::Keep;
        let mut at = 0;
        for line in event.split(|&b| b == b'\n') {
            let line_start = at;
            at += line.len() + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if !self.sample_text(data) {
                continue; // no `"usage"` string in this event
            }
            let reported = has_usage_object(data);
            if reported {
                self.read_usage(data);
            }
            if self.strip && matches!(edit, Edit::Keep) {
                if let Some(cut) = scan::member_cut(data, b"\"usage\"") {
                    // Only an event that reported usage can be nothing but usage; a chunk with
                    // `"usage": null` loses just that member.
                    edit = if reported && carries_nothing(data) {
                        Edit::Drop
                    } else {
                        let data_start = line_start + (line.len() - data.len());
                        Edit::Cut(data_start + cut.start..data_start + cut.end)
                    };
                }
            }
        }
        edit
    }

    fn read_usage(&mut self, data: &[u8]) {
        #[derive(Deserialize)]
        struct Event<'a> {
            #[serde(default)]
            usage: Option<UsageFields>,
            #[serde(borrow, default)]
            response: Option<&'a RawValue>,
            #[serde(borrow, default)]
            message: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Nested {
            #[serde(default)]
            usage: Option<UsageFields>,
        }
        let Ok(event) = serde_json::from_slice::<Event<'_>>(data) else {
            return;
        };
        let nested = |raw: Option<&RawValue>| {
            raw.and_then(|r| serde_json::from_str::<Nested>(r.get()).ok())
                .and_then(|n| n.usage)
        };
        let reported = [event.usage, nested(event.response), nested(event.message)];
        for fields in reported.into_iter().flatten() {
            self.fields
                .get_or_insert_with(UsageFields::default)
                .merge(fields);
        }
    }

    /// Adds the generated text of one event's data to the sample, in one pass over the event's
    /// strings (each skipped whole, so text inside a value never reads as a key); says whether
    /// one of them is `"usage"`.
    fn sample_text(&mut self, data: &[u8]) -> bool {
        let keys: &[&[u8]] = match self.api {
            // Responses repeats the whole text in its `.done` and `completed` events: only its
            // deltas count.
            Api::Responses => &[b"delta"],
            Api::Messages => &[b"text", b"partial_json", b"thinking"],
            _ => &[
                b"content",
                b"text",
                b"arguments",
                b"refusal",
                b"reasoning_content",
            ],
        };
        let mut usage = false;
        let mut from = 0;
        while let Some(pos) = memchr::memchr(b'"', &data[from..]) {
            let open = from + pos;
            let Some(close) = string_end(data, open + 1) else {
                break; // an unterminated string: nothing more to read
            };
            let string = &data[open + 1..close];
            from = close + 1;
            if string == b"usage" {
                usage = true;
            } else if keys.contains(&string) {
                if let Some((start, end)) = string_value_after_key(data, from) {
                    self.delivered.push_json_str(&data[start..end]);
                    from = end + 1;
                }
            }
        }
        usage
    }
}

/// The position of the quote that closes a JSON string whose contents start at `from`.
fn string_end(data: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let i = from + memchr::memchr2(b'"', b'\\', data.get(from..)?)?;
        if data[i] == b'"' {
            return Some(i);
        }
        from = i + 2; // an escape: the next byte is never the closing quote
    }
}

/// Searchers built once (building one costs more than searching an event with it).
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
/// When `data[at..]` is `<ws>:<ws>"…"`, the range of the string's contents.
fn string_value_after_key(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let ws = |i: usize| {
        data[i..]
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map_or(data.len(), |p| i + p)
    };
    let colon = ws(at);
    if data.get(colon) != Some(&b':') {
        return None;
    }
    let quote = ws(colon + 1);
    if data.get(quote) != Some(&b'"') {
        return None;
    }
    let mut i = quote + 1;
    while i < data.len() {
        match data[i] {
            b'\\' => i += 2,
            b'"' => return Some((quote + 1, i)),
            _ => i += 1,
        }
    }
    None
}

/// Whether a chunk carries nothing for the client but its usage: no choices, or only choices
/// with an empty delta (or text), no finish reason and no log probabilities.
fn carries_nothing(chunk: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde_json::Map<String, Value>>>,
    }
    fn empty(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.values().all(empty),
            _ => false,
        }
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk>(chunk) else {
        return false;
    };
    chunk
        .choices
        .unwrap_or_default()
        .iter()
        .all(|choice| choice.iter().all(|(k, v)| k == "index" || empty(v)))
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
    let key = USAGE.needle();
    let mut from = 0;
    while let Some(pos) = USAGE.find(&data[from..]) {
        let after = &data[from + pos + key.len()..];
        let mut rest = after.iter().skip_while(|b| b.is_ascii_whitespace());
        if rest.next() == Some(&b':') && rest.find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        from += pos + key.len();
    }
    false
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
