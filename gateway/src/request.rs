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
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
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
    // `raw` borrows from `body`: its offset is the distance between the two pointers.
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok(Probe {
        model,
        model_span: start..start + raw.get().len(),
        stream: fields.stream.unwrap_or(false),
    })
}

/// Returns `body` with the model string at `span` replaced by `new_model`.
pub fn rewrite_model(body: &[u8], span: Range<usize>, new_model: &str) -> Bytes {
    let quoted = serde_json::to_string(new_model).expect("strings serialize");
    let mut out = BytesMut::with_capacity(body.len() - span.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
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
        let out = rewrite_model(body, p.model_span, "mock-\"x\"");
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
    }
}
