//! Token estimates for responses whose usage the gateway could not read: the upstream sent
//! none, the client left mid-stream, or the API is one the gateway does not meter exactly.
//!
//! Tokens are counted with a real BPE tokenizer, OpenAI's `o200k_base` (the GPT-4o family's;
//! vocabulary compiled into the binary by `tiktoken-rs`), so Chinese or Japanese text is counted
//! as such rather than as a quarter of its characters. Other model families tokenize
//! differently; the record says `usage_estimated = 1` either way.
//!
//! - The prompt: every string the request carries for the model (`messages`, `input`,
//!   `prompt`, `system`, `instructions`, …), the JSON of structured parts the model reads
//!   (`tools`, `functions`, `response_format`, `text`, `tool_choice`), a fixed overhead per
//!   message, and a fixed count per image or audio part (their bytes are not text). Settings
//!   (`model`, `user`, `metadata`, `stop`, …) are not counted.
//! - The completion: the text delivered to the client ([`Delivered`]); a sample of at most
//!   [`SAMPLE_MAX`] bytes is tokenized and scaled to every delivered character.
//!
//! Tokenizing is CPU work proportional to the text: callers run [`estimate`] on the blocking
//! pool, never on a proxy worker, and only when no usage was read. The tokenizer (about 30 MB)
//! is built on first use, so a gateway that never estimates never pays for it.

use serde_json::Value;

use super::fields::Usage;

/// Bytes of delivered text kept for tokenizing; longer texts are scaled from this sample.
pub const SAMPLE_MAX: usize = 256 * 1024;

/// Tokens counted per message for its role and separators (OpenAI's chat format), and once for
/// the reply's priming.
const PER_MESSAGE: u64 = 4;
const REPLY_PRIMING: u64 = 3;
/// Tokens counted per image part (a high-detail 512×512 image: 85 base + 4 × 170 per tile) and
/// per audio part (about 10 s of audio).
const PER_IMAGE: u64 = 765;
const PER_AUDIO: u64 = 100;

/// Request fields that are settings, not text the model reads.
const SETTINGS: &[&str] = &[
    "model",
    "user",
    "metadata",
    "stop",
    "stream",
    "stream_options",
    "service_tier",
    "store",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "encoding_format",
    "modalities",
    "previous_response_id",
    "include",
    "truncation",
    "background",
];

/// Request fields whose JSON the model reads as a whole (schemas, tool definitions).
const STRUCTURED: &[&str] = &[
    "tools",
    "functions",
    "response_format",
    "text",
    "tool_choice",
];

/// Text delivered to the client, for an estimate: a decoded sample and the full count.
#[derive(Debug, Default, Clone)]
pub struct Delivered {
    sample: String,
    sample_chars: u64,
    /// Characters delivered in all (sampled or not).
    pub chars: u64,
}

impl Delivered {
    /// Adds a JSON string's contents (between its quotes, still escaped).
    pub fn push_json_str(&mut self, raw: &[u8]) {
        if self.sample.len() < SAMPLE_MAX {
            let n = super::scan::decode_into(raw, &mut self.sample);
            self.sample_chars += n;
            self.chars += n;
        } else {
            // Past the sample only the count matters: escapes count as one character.
            self.chars += raw
                .iter()
                .filter(|&&b| b & 0xC0 != 0x80 && b != b'\\')
                .count() as u64;
        }
    }

    /// Estimated tokens of the delivered text.
    pub fn tokens(&self) -> u64 {
        if self.sample_chars == 0 {
            return 0;
        }
        let counted = count(&self.sample);
        (counted * self.chars).div_ceil(self.sample_chars)
    }
}

fn bpe() -> &'static tiktoken_rs::CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

fn count(text: &str) -> u64 {
    if text.is_empty() {
        0
    } else {
        bpe().count_ordinary(text) as u64
    }
}

/// The estimated usage of a request (its JSON body) whose answer delivered `delivered`.
pub fn estimate(request_body: &[u8], delivered: &Delivered) -> Usage {
    let prompt = prompt_tokens(request_body);
    let completion = delivered.tokens();
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Usage {
        prompt: clamp(prompt),
        cached: 0,
        completion: clamp(completion),
        total: clamp(prompt + completion),
    }
}

/// Estimated prompt tokens of a request body.
pub fn prompt_tokens(body: &[u8]) -> u64 {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        // Not JSON (the gateway routes JSON only): a byte-based bound.
        return (body.len() as u64).div_ceil(4);
    };
    let mut text = String::new();
    let mut fixed = 0;
    for (field, value) in &request {
        let field = field.as_str();
        if SETTINGS.contains(&field) {
            continue;
        }
        if STRUCTURED.contains(&field) {
            if !value.is_null() {
                text.push_str(&value.to_string());
                text.push('\n');
            }
            continue;
        }
        if field == "messages" {
            let n = value.as_array().map_or(0, |m| m.len() as u64);
            fixed += n * PER_MESSAGE + REPLY_PRIMING;
        }
        fixed += strings(value, &mut text);
    }
    count(&text) + fixed
}

/// Appends every string under `v` to `text` (one per line); returns the fixed counts of the
/// image and audio parts met, whose data is not text.
fn strings(v: &Value, text: &mut String) -> u64 {
    match v {
        Value::String(s) => {
            text.push_str(s);
            text.push('\n');
            0
        }
        Value::Array(items) => items.iter().map(|i| strings(i, text)).sum(),
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "image_url" | "input_image" | "image" => return PER_IMAGE,
                "input_audio" | "audio" => return PER_AUDIO,
                // A document's text is in its encoded data: counted like an image.
                "file" | "input_file" | "document" => return PER_IMAGE,
                _ => {}
            }
            o.iter()
                .filter(|(k, _)| *k != "type")
                .map(|(_, v)| strings(v, text))
                .sum()
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_tokenized_not_divided() {
        let english =
            br#"{"model":"m","messages":[{"role":"user","content":"Hello, how are you today?"}]}"#;
        // "user" + "Hello, how are you today?" ≈ 1 + 7 tokens, + 4 per message + 3 priming.
        let n = prompt_tokens(english);
        assert!((12..=18).contains(&n), "{n}");
        // 40 CJK characters: about one token each, where ⌈chars/4⌉ said 10.
        let cjk = format!(
            r#"{{"model":"m","input":"{}"}}"#,
            "人工智能网关为开发者提供统一的接口和计量服务。".repeat(2)
        );
        let n = prompt_tokens(cjk.as_bytes());
        assert!(n >= 20, "{n}");
        // Tools count; settings do not.
        let with_tools = br#"{"model":"m","user":"someone-long-identifier","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Get the weather for a city","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]}"#;
        let without = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert!(prompt_tokens(with_tools) > prompt_tokens(without) + 15);
        // An image part is a fixed count, not its base64.
        let image = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
            "A".repeat(100_000)
        );
        let n = prompt_tokens(image.as_bytes());
        assert!((PER_IMAGE..PER_IMAGE + 20).contains(&n), "{n}");
    }

    #[test]
    fn delivered_text_is_sampled_and_scaled() {
        let mut d = Delivered::default();
        d.push_json_str(br#"Hello \"world\"\n"#);
        assert_eq!(d.chars, 14);
        assert!(d.tokens() >= 3);
        let mut big = Delivered::default();
        let chunk = "word ".repeat(1000);
        for _ in 0..100 {
            big.push_json_str(chunk.as_bytes());
        }
        // 100,000 words of "word ": about 100,000 tokens, from a 256 KiB sample.
        let t = big.tokens();
        assert!((90_000..=110_000).contains(&t), "{t}");
        assert_eq!(Delivered::default().tokens(), 0);
    }
}
