//! A JSON response body's usage, whatever its size.
//!
//! Bodies up to [`KEEP_MAX`] are kept aside as reference-counted chunks (the usual one-chunk
//! body costs neither an allocation nor a copy) and read at the end with
//! [`super::json_usage`]. Past that, the kept chunks and every later one go through a streaming
//! [`Scanner`] that keeps only the top-level `usage` object and a sample of the text (for an
//! estimate), so an embeddings answer of 50 MiB is metered as exactly as one of 500 bytes,
//! in constant memory.

use bytes::Bytes;

use super::estimate::Delivered;
use super::fields::{json_usage, Usage, UsageFields};
use crate::api::Api;

/// Bodies up to this size are kept whole until the end; larger ones are scanned as they pass.
pub const KEEP_MAX: usize = 1024 * 1024;

/// Deepest nesting the scanner follows; deeper bodies are not read (the usage is estimated).
const MAX_DEPTH: usize = 512;
/// Largest usage object kept (real ones are a few hundred bytes).
const USAGE_MAX: usize = 64 * 1024;
/// Text is handed to [`Delivered`] in pieces of about this size.
const TEXT_PIECE: usize = 16 * 1024;

/// Metering state of one JSON response body.
#[derive(Debug, Default)]
pub struct JsonMeter {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
    len: usize,
    scanner: Option<Box<Scanner>>,
}

impl JsonMeter {
    /// Takes the next chunk of the body (as it goes to the client).
    pub fn push(&mut self, chunk: &Bytes) {
        if let Some(scanner) = &mut self.scanner {
            scanner.feed(chunk);
            return;
        }
        self.len += chunk.len();
        if self.len > KEEP_MAX {
            let mut scanner = Box::<Scanner>::default();
            for kept in self.first.take().iter().chain(self.rest.drain(..).as_ref()) {
                scanner.feed(kept);
            }
            scanner.feed(chunk);
            self.scanner = Some(scanner);
        } else if self.first.is_none() {
            self.first = Some(chunk.clone());
        } else {
            self.rest.push(chunk.clone());
        }
    }

    fn kept(&self) -> std::borrow::Cow<'_, [u8]> {
        let first = self.first.as_deref().unwrap_or(&[]);
        if self.rest.is_empty() {
            return first.into();
        }
        let mut all = Vec::with_capacity(self.len);
        all.extend_from_slice(first);
        self.rest.iter().for_each(|c| all.extend_from_slice(c));
        all.into()
    }

    /// The usage the body reports, read as `api` defines it; `None` when it reports none.
    pub fn usage(&self, api: Api) -> Option<Usage> {
        match &self.scanner {
            None => json_usage(&self.kept(), api),
            Some(s) => s.usage.as_ref()?.usage(api),
        }
    }

    /// The generated text the body carried (for an estimate).
    pub fn delivered(&self) -> Delivered {
        match &self.scanner {
            Some(s) => s.delivered.clone(),
            None => {
                let mut s = Scanner::default();
                s.feed(&self.kept());
                s.finish_text();
                s.delivered
            }
        }
    }
}

/// The usage (read as `api` defines it) and the count of delivered characters that the
/// streaming scan (what bodies past [`KEEP_MAX`] get) reads from `chunks`: for the fuzz targets,
/// which cannot afford a megabyte per input to reach it through [`JsonMeter`].
#[doc(hidden)]
pub fn scan_usage<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    api: Api,
) -> (Option<Usage>, u64) {
    let mut s = Scanner::default();
    for chunk in chunks {
        s.feed(chunk);
    }
    s.finish_text();
    (
        s.usage.as_ref().and_then(|u| u.usage(api)),
        s.delivered.chars,
    )
}

/// Which key the value being read belongs to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum KeyClass {
    #[default]
    Other,
    /// The top-level `usage`.
    Usage,
    /// Generated text: `content`, `text`, `arguments`, `refusal`, `thinking`.
    Text,
}

/// A streaming reader of one JSON value: tracks strings and nesting across chunk boundaries,
/// captures the top-level `usage` object and samples generated text.
#[derive(Debug, Default)]
struct Scanner {
    /// Open containers, `{` or `[`.
    stack: Vec<u8>,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
    string_is_text: bool,
    /// The key being read (its first bytes).
    key: Vec<u8>,
    expect_key: bool,
    key_class: KeyClass,
    capture: Option<Vec<u8>>,
    usage: Option<UsageFields>,
    /// Raw contents of the text string being read, not yet handed over.
    text: Vec<u8>,
    delivered: Delivered,
    /// Nested too deep: nothing more is read.
    broken: bool,
}

impl Scanner {
    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.broken {
                return;
            }
            if let Some(capture) = &mut self.capture {
                capture.push(b);
                if capture.len() > USAGE_MAX {
                    self.capture = None;
                }
            }
            if self.in_string {
                self.string_byte(b);
            } else {
                self.structural_byte(b);
            }
        }
    }

    fn string_byte(&mut self, b: u8) {
        let escaped = self.escape;
        if escaped {
            self.escape = false;
        } else if b == b'\\' {
            self.escape = true;
        } else if b == b'"' {
            self.in_string = false;
            if self.string_is_key {
                self.key_class = match (self.stack.len(), self.key.as_slice()) {
                    (1, b"usage") => KeyClass::Usage,
                    (_, b"content" | b"text" | b"arguments" | b"refusal" | b"thinking") => {
                        KeyClass::Text
                    }
                    _ => KeyClass::Other,
                };
            } else if self.string_is_text {
                self.finish_text();
            }
            return;
        }
        if self.string_is_key {
            if self.key.len() < 16 {
                self.key.push(b);
            } else {
                self.key.clear(); // longer than any key we look for
                self.key.extend_from_slice(b"-");
            }
        } else if self.string_is_text {
            // Hand over long texts in pieces, cut before an ASCII byte outside an escape
            // (`\uXXXX` included) and outside a multi-byte character.
            if self.text.len() >= TEXT_PIECE
                && !escaped
                && b < 0x80
                && b != b'\\'
                && !self.text[self.text.len() - 6..].contains(&b'\\')
            {
                self.finish_text();
            }
            self.text.push(b);
        }
    }

    fn structural_byte(&mut self, b: u8) {
        match b {
            b'"' => {
                self.in_string = true;
                self.string_is_key = self.expect_key && self.stack.last() == Some(&b'{');
                self.string_is_text = !self.string_is_key && self.key_class == KeyClass::Text;
                self.key.clear();
            }
            b':' => self.expect_key = false,
            b',' => self.expect_key = self.stack.last() == Some(&b'{'),
            b'{' | b'[' => {
                if b == b'{' && self.stack.len() == 1 && self.key_class == KeyClass::Usage {
                    self.capture = Some(vec![b'{']);
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.broken = true;
                    return;
                }
                self.stack.push(b);
                self.expect_key = b == b'{';
            }
            b'}' | b']' => {
                self.stack.pop();
                self.expect_key = false;
                if self.stack.len() == 1 {
                    if let Some(raw) = self.capture.take() {
                        if let Ok(fields) = serde_json::from_slice::<UsageFields>(&raw) {
                            self.usage = Some(fields);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn finish_text(&mut self) {
        if !self.text.is_empty() {
            self.delivered.push_json_str(&self.text);
            self.text.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_in_pieces(body: &[u8], piece: usize) -> JsonMeter {
        let mut m = JsonMeter::default();
        for c in body.chunks(piece) {
            m.push(&Bytes::copy_from_slice(c));
        }
        m
    }

    #[test]
    fn large_bodies_keep_their_usage() {
        // An embeddings answer of ~3 MiB, usage last; then the same with usage first.
        let vector = format!("[{}0.5]", "0.123456789,".repeat(250_000));
        let body = format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{vector}}}],"model":"m","usage":{{"prompt_tokens":77,"total_tokens":77}}}}"#
        );
        for piece in [1000, 65536, 7] {
            let m = feed_in_pieces(body.as_bytes(), piece);
            assert!(m.scanner.is_some());
            assert_eq!(m.usage(Api::Embeddings).unwrap().prompt, 77, "{piece}");
        }
        let first = format!(
            r#"{{"usage":{{"input_tokens":3,"output_tokens":4}},"output":[{{"content":[{{"type":"output_text","text":"{}"}}]}}]}}"#,
            "ab\\\"c ".repeat(400_000)
        );
        let m = feed_in_pieces(first.as_bytes(), 4096);
        let u = m.usage(Api::Responses).unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (3, 4, 7));
        assert_eq!(m.delivered().chars, 5 * 400_000);
        // A nested `usage` is not the response's.
        let nested = format!(
            r#"{{"data":{{"usage":{{"prompt_tokens":1}}}},"pad":"{}"}}"#,
            "x".repeat(KEEP_MAX)
        );
        assert_eq!(
            feed_in_pieces(nested.as_bytes(), 9999).usage(Api::Embeddings),
            None
        );
    }

    #[test]
    fn small_bodies_and_their_text() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"abc\u00e9"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let m = feed_in_pieces(body, 10);
        assert!(m.scanner.is_none());
        assert_eq!(m.usage(Api::ChatCompletions).unwrap().total, 7);
        assert_eq!(m.delivered().chars, 4);
    }
}
