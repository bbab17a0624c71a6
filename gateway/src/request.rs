//! What the gateway reads from a request body, without copying it: the `model` (and where it
//! sits, so an alias can be spliced in place), and whether the client asked for a stream.
//!
//! The body itself is forwarded byte for byte unless the model is rewritten; then only the
//! model's JSON string changes.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// Facts read from a JSON request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub model: String,
    /// Byte range of the model's JSON string (quotes included) in the body.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// Byte range of the `stream_options` value, when present.
    pub stream_options_span: Option<Range<usize>>,
    /// `max_completion_tokens`, else `max_tokens`, when a non-negative integer (the token
    /// reservation; anything else is left for the upstream to judge).
    pub max_tokens: Option<u64>,
    /// `n` (choices), when a positive integer; default 1.
    pub n: u64,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
}

/// A JSON value read as a non-negative integer, else `None`.
fn uint(v: Option<&RawValue>) -> Option<u64> {
    v.and_then(|v| v.get().parse::<u64>().ok())
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Parses the body as a JSON object and finds its `model` and `stream` fields.
pub fn inspect(body: &[u8]) -> Result<Probe, GatewayError> {
    // serde also maps arrays onto structs; only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(GatewayError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    }
    let fields: Fields<'_> = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message names line and column only; never echo the body back.
        GatewayError::InvalidJson(e.to_string())
    })?;
    let raw = fields.model.ok_or(GatewayError::MissingModel)?;
    let model: String = serde_json::from_str(raw.get()).map_err(|_| GatewayError::MissingModel)?;
    if model.is_empty() {
        return Err(GatewayError::MissingModel);
    }
    let include_usage = match fields.stream_options {
        Some(o) if o.get() != "null" => serde_json::from_str::<StreamOptions>(o.get())
            .map_err(|e| GatewayError::InvalidJson(format!("stream_options: {e}")))?
            .include_usage
            .unwrap_or(false),
        _ => false,
    };
    Ok(Probe {
        model,
        model_span: span(body, raw),
        stream: fields.stream.unwrap_or(false),
        include_usage,
        stream_options_span: fields.stream_options.map(|o| span(body, o)),
        max_tokens: uint(fields.max_completion_tokens).or_else(|| uint(fields.max_tokens)),
        n: uint(fields.n).filter(|&n| n > 0).unwrap_or(1),
    })
}

/// Where `raw`, which borrows from `body`, sits in it: the distance between the two pointers.
fn span(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// The body to send upstream: `model` renamed when `upstream_model` is set, and
/// `stream_options.include_usage` turned on for a stream whose client did not ask (the gateway
/// meters it and strips the extra chunk). Returns the body and whether usage was injected.
pub fn upstream_body(
    body: Bytes,
    probe: &Probe,
    upstream_model: Option<&str>,
    metering: bool,
) -> (Bytes, bool) {
    let inject = metering && probe.stream && !probe.include_usage;
    if upstream_model.is_none() && !inject {
        return (body, false); // the common case: the original bytes, no allocation
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::with_capacity(2);
    if let Some(m) = upstream_model {
        edits.push((
            probe.model_span.clone(),
            serde_json::to_string(m).expect("strings serialize"),
        ));
    }
    if inject {
        match &probe.stream_options_span {
            Some(span) => {
                let mut options: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&body[span.clone()]).unwrap_or_default();
                options.insert("include_usage".into(), true.into());
                edits.push((span.clone(), serde_json::Value::Object(options).to_string()));
            }
            None => {
                // Right after the opening brace: the body has at least `model` after it.
                let brace = body
                    .iter()
                    .position(|&b| b == b'{')
                    .expect("inspect checked the object");
                edits.push((
                    brace + 1..brace + 1,
                    "\"stream_options\":{\"include_usage\":true},".into(),
                ));
            }
        }
    }
    (splice(&body, edits), inject)
}

/// Applies non-overlapping replacements.
fn splice(body: &[u8], mut edits: Vec<(Range<usize>, String)>) -> Bytes {
    edits.sort_by_key(|(r, _)| r.start);
    let grow: usize = edits.iter().map(|(_, s)| s.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + grow);
    let mut at = 0;
    for (range, text) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(text.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_model_anywhere_and_rewrites_in_place() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\""}], "stream": true, "model" : "demo" }"#;
        let p = inspect(body).unwrap();
        assert_eq!(p.model, "demo");
        assert!(p.stream);
        assert_eq!(&body[p.model_span.clone()], br#""demo""#);
        let (out, injected) =
            upstream_body(Bytes::copy_from_slice(body), &p, Some("mock-\"x\""), false);
        assert!(!injected);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "mock-\"x\"");
        assert_eq!(v["messages"][0]["content"], "hi \"model\"");
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let p = inspect(br#"{"model":"gpt\u002d4o"}"#).unwrap();
        assert_eq!(p.model, "gpt-4o");
        assert!(!p.stream);
    }

    #[test]
    fn bad_bodies() {
        assert!(matches!(
            inspect(b"{nope"),
            Err(GatewayError::InvalidJson(_))
        ));
        assert!(matches!(inspect(b"[1]"), Err(GatewayError::InvalidJson(_))));
        assert!(matches!(inspect(b"{}"), Err(GatewayError::MissingModel)));
        assert!(matches!(
            inspect(br#"{"model":3}"#),
            Err(GatewayError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"{"model":""}"#),
            Err(GatewayError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"{"model":"a","model":"b"}"#),
            Err(GatewayError::InvalidJson(_))
        ));
        assert!(matches!(
            inspect(br#"{"model":"a","stream":"yes"}"#),
            Err(GatewayError::InvalidJson(_))
        ));
        assert!(matches!(
            inspect(br#"{"model":"a","stream_options":{"include_usage":1}}"#),
            Err(GatewayError::InvalidJson(_))
        ));
    }

    fn upstream(body: &[u8], alias: Option<&str>) -> (serde_json::Value, bool) {
        let p = inspect(body).unwrap();
        let (out, injected) = upstream_body(Bytes::copy_from_slice(body), &p, alias, true);
        (serde_json::from_slice(&out).unwrap(), injected)
    }

    #[test]
    fn include_usage_is_injected_only_when_needed() {
        let (v, injected) = upstream(br#"{"messages":[],"stream":true,"model":"a"}"#, Some("b"));
        assert!(injected);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "b");
        let (v, injected) = upstream(
            br#"{"model":"a","stream":true,"stream_options":{"include_obfuscation":false}}"#,
            None,
        );
        assert!(injected);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
        let asked = br#"{"model":"a","stream":true,"stream_options":{"include_usage":true}}"#;
        let p = inspect(asked).unwrap();
        assert!(p.include_usage);
        let (out, injected) = upstream_body(Bytes::from_static(asked), &p, None, true);
        assert!(!injected);
        assert_eq!(&out[..], asked, "untouched when nothing changes");
        let (_, injected) = upstream(br#"{"model":"a"}"#, None);
        assert!(!injected, "no stream, no injection");
    }
}
