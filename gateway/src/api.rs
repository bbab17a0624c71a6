//! The model APIs the gateway knows by their path, and what metering needs to know of each: the
//! shape of its `usage` object, where a stream reports it, and whether a stream may be asked for
//! it with `stream_options`.
//!
//! | path (after `/v1/`) | API | usage | stream usage |
//! |---|---|---|---|
//! | `chat/completions` | OpenAI Chat Completions | `prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens` | the chunk with `usage` (asked for with `stream_options.include_usage`) |
//! | `completions` | OpenAI Completions | as chat | as chat |
//! | `embeddings` | OpenAI Embeddings | `prompt_tokens` | (no streams) |
//! | `responses` | OpenAI Responses | `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens` | `response.completed` (or `.incomplete`, `.failed`) |
//! | `messages` | Anthropic Messages | `input_tokens`, `output_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens` | `message_start`, then `message_delta` |
//!
//! Any other path is forwarded only when an upstream's `paths` lists it, and metered by estimate
//! unless its JSON answer carries one of the usage objects above.

/// A model API, by request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Messages,
    /// A path a platform engineer opted in: forwarded, metered by estimate.
    Other,
}

impl Api {
    /// The paths (after `/v1/`) whose usage the gateway reads exactly: every upstream's default.
    pub const METERED_PATHS: [&'static str; 5] = [
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "messages",
    ];

    /// The API at `path` (after `/v1/`, already normalized).
    pub fn of_path(path: &str) -> Api {
        match path {
            "chat/completions" => Api::ChatCompletions,
            "completions" => Api::Completions,
            "embeddings" => Api::Embeddings,
            "responses" => Api::Responses,
            "messages" => Api::Messages,
            _ => Api::Other,
        }
    }

    /// Whether a stream of this API reports its usage only when asked through
    /// `stream_options.include_usage` (which other APIs refuse as an unknown parameter).
    pub fn takes_stream_options(self) -> bool {
        matches!(self, Api::ChatCompletions | Api::Completions)
    }

    /// Whether the gateway reads this API's usage exactly (else it estimates, unless the
    /// answer happens to carry a usage object it knows).
    pub fn is_metered_exactly(self) -> bool {
        self != Api::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_apis() {
        for p in Api::METERED_PATHS {
            assert!(Api::of_path(p).is_metered_exactly(), "{p}");
        }
        assert_eq!(Api::of_path("audio/speech"), Api::Other);
        assert_eq!(Api::of_path("chat/completions/"), Api::Other);
        assert!(Api::ChatCompletions.takes_stream_options());
        assert!(!Api::Responses.takes_stream_options());
        assert!(!Api::Messages.takes_stream_options());
    }
}
