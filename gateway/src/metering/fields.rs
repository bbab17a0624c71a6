//! The usage object of every API the gateway meters exactly, read into one [`Usage`]; a leaf
//! of [`super`] (it imports none of its siblings).

use serde::Deserialize;

use crate::api::Api;

/// Token counts reported by the upstream (or estimated). `prompt` includes `cached`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u32,
    pub cached: u32,
    pub completion: u32,
    pub total: u32,
}

/// Every field of every usage object the gateway knows; later reports of a stream override
/// earlier ones field by field ([`UsageFields::merge`]).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct UsageFields {
    // Chat Completions, Completions, Embeddings.
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    // Responses and Messages.
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    // Messages: prompt tokens read from and written to the prompt cache (not in input_tokens).
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl UsageFields {
    /// Takes every field `later` reports (a stream's later event knows more).
    pub fn merge(&mut self, later: UsageFields) {
        fn take<T>(mine: &mut Option<T>, theirs: Option<T>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        take(&mut self.prompt_tokens, later.prompt_tokens);
        take(&mut self.completion_tokens, later.completion_tokens);
        take(&mut self.total_tokens, later.total_tokens);
        take(&mut self.prompt_tokens_details, later.prompt_tokens_details);
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(&mut self.input_tokens_details, later.input_tokens_details);
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
    }

    /// The usage these fields state, read the way `api` defines them; `None` when they state
    /// no token count (an empty object, or only a total): the caller estimates.
    pub fn usage(&self, api: Api) -> Option<Usage> {
        let anthropic = api == Api::Messages
            || self.cache_read_input_tokens.is_some()
            || self.cache_creation_input_tokens.is_some();
        if self.input_tokens.is_some() || self.output_tokens.is_some() {
            let output = self.output_tokens.unwrap_or(0);
            let (prompt, cached) = if anthropic {
                // Anthropic's input_tokens leave out the cache reads and writes.
                let read = self.cache_read_input_tokens.unwrap_or(0);
                let written = self.cache_creation_input_tokens.unwrap_or(0);
                let input = self.input_tokens.unwrap_or(0);
                (input.saturating_add(read).saturating_add(written), read)
            } else {
                let cached = self
                    .input_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0);
                (self.input_tokens.unwrap_or(0), cached)
            };
            let total = match self.total_tokens {
                Some(t) if !anthropic => t,
                _ => prompt.saturating_add(output),
            };
            return Some(Usage {
                prompt: clamp(prompt),
                cached: clamp(cached.min(prompt)),
                completion: clamp(output),
                total: clamp(total),
            });
        }
        if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            let prompt = self.prompt_tokens.unwrap_or(0);
            let completion = self.completion_tokens.unwrap_or(0);
            let cached = self
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0);
            return Some(Usage {
                prompt: clamp(prompt),
                cached: clamp(cached.min(prompt)),
                completion: clamp(completion),
                total: clamp(
                    self.total_tokens
                        .unwrap_or_else(|| prompt.saturating_add(completion)),
                ),
            });
        }
        None
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageFields>,
}

/// Reads the top-level `usage` of a complete JSON response body of `api`. Fast path: the usage
/// object usually ends the body, so the object after the last `"usage":` key is parsed alone (a
/// key cannot occur inside a string value, where quotes are escaped); the whole body is parsed
/// only when that fails.
pub fn json_usage(body: &[u8], api: Api) -> Option<Usage> {
    static USAGE_KEY: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(b"\"usage\""));
    if let Some(at) = USAGE_KEY.rfind(body) {
        let rest = &body[at + 7..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace());
        if colon.is_some_and(|c| rest[c] == b':') {
            let value = &rest[colon.unwrap_or(0) + 1..];
            let mut values = serde_json::Deserializer::from_slice(value).into_iter::<UsageFields>();
            if let Some(Ok(u)) = values.next() {
                if let Some(usage) = u.usage(api) {
                    return Some(usage);
                }
            }
        }
    }
    serde_json::from_slice::<WithUsage>(body)
        .ok()?
        .usage?
        .usage(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u32, cached: u32, completion: u32, total: u32) -> Usage {
        Usage {
            prompt,
            cached,
            completion,
            total,
        }
    }

    #[test]
    fn every_api_usage_object() {
        let chat = br#"{"choices":[{"message":{"content":"abcdefgh"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":3}}}"#;
        assert_eq!(
            json_usage(chat, Api::ChatCompletions),
            Some(usage(5, 3, 2, 7))
        );
        let emb = br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(json_usage(emb, Api::Embeddings), Some(usage(4, 0, 0, 4)));
        let responses = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":1234,"input_tokens_details":{"cached_tokens":200},"output_tokens":567,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":1801},"user":null}"#;
        assert_eq!(
            json_usage(responses, Api::Responses),
            Some(usage(1234, 200, 567, 1801))
        );
        let messages = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":5}}"#;
        assert_eq!(
            json_usage(messages, Api::Messages),
            Some(usage(60, 30, 5, 65))
        );
        // Nothing readable: no exact zero.
        assert_eq!(json_usage(b"{\"x\":1}", Api::ChatCompletions), None);
        assert_eq!(json_usage(br#"{"usage":{}}"#, Api::ChatCompletions), None);
        assert_eq!(
            json_usage(br#"{"usage":{"total_tokens":9}}"#, Api::Responses),
            None
        );
        // `usage` before other fields, with spaces, and a decoy inside a string value.
        let odd = br#"{"usage" : {"prompt_tokens":1,"completion_tokens":1}, "choices":[{"message":{"content":"say \"usage\": {}"}}]}"#;
        assert_eq!(json_usage(odd, Api::ChatCompletions).unwrap().total, 2);
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        // Found writing the json_usage fuzz target: sums of counts near u64::MAX overflowed (a panic
        // with overflow checks, a wrapped total without).
        let max = u64::MAX;
        for (body, api) in [
            (
                format!(r#"{{"usage":{{"prompt_tokens":{max},"completion_tokens":1}}}}"#),
                Api::ChatCompletions,
            ),
            (
                format!(r#"{{"usage":{{"input_tokens":{max},"output_tokens":1}}}}"#),
                Api::Responses,
            ),
            (
                format!(
                    r#"{{"usage":{{"input_tokens":{max},"cache_read_input_tokens":{max},"cache_creation_input_tokens":1,"output_tokens":1}}}}"#
                ),
                Api::Messages,
            ),
        ] {
            let u = json_usage(body.as_bytes(), api).unwrap();
            assert_eq!((u.prompt, u.total), (u32::MAX, u32::MAX), "{body}");
        }
    }

    #[test]
    fn merged_stream_reports() {
        // Messages: message_start, then message_delta with the final output count.
        let mut f: UsageFields = serde_json::from_str(
            r#"{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}"#,
        )
        .unwrap();
        f.merge(serde_json::from_str(r#"{"output_tokens":15}"#).unwrap());
        assert_eq!(f.usage(Api::Messages), Some(usage(30, 5, 15, 45)));
    }
}
