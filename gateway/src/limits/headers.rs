//! The rate-limit headers a limited response carries: OpenAI's `x-ratelimit-*` (which SDKs
//! read) and the IETF draft's `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-
//! headers-10), one policy for requests and one for tokens, each per minute.
//!
//! ```text
//! x-ratelimit-limit-requests: 600        x-ratelimit-limit-tokens: 150000
//! x-ratelimit-remaining-requests: 599    x-ratelimit-remaining-tokens: 149000
//! x-ratelimit-reset-requests: 100ms      x-ratelimit-reset-tokens: 400ms
//! RateLimit-Policy: "requests";q=600;w=60, "tokens";q=150000;w=60
//! RateLimit: "requests";r=599;t=1, "tokens";r=149000;t=1
//! ```
//!
//! A reset is the time until the bucket is full again; when nothing remains, the time until it
//! admits again (so `Retry-After` on a 429 is never earlier than the reset it names). `t` is
//! that time in whole seconds, rounded up.

use http::{HeaderMap, HeaderName, HeaderValue};

/// One limit as shown to the client: the most constraining of the key's and the developer's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shown {
    /// Units per minute.
    pub limit: u32,
    pub remaining: u64,
    /// µs until the bucket is full (or, with nothing remaining, admits again).
    pub reset_us: i64,
}

impl Shown {
    /// The more constraining of two views of the same unit (fewer remaining).
    pub fn tighter(a: Option<Shown>, b: Option<Shown>) -> Option<Shown> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The limits shown on one response.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    pub requests: Option<Shown>,
    pub tokens: Option<Shown>,
}

impl RateHeaders {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Adds the headers to a response's header map (nothing when no limit applies): static
    /// names, integer values, one map insert each (this runs on every limited response).
    pub fn apply(&self, headers: &mut HeaderMap) {
        use std::fmt::Write;
        if self.is_empty() {
            return;
        }
        let mut policy = String::with_capacity(64);
        let mut state = String::with_capacity(64);
        for (unit, shown, names) in [
            ("requests", self.requests, &REQUESTS),
            ("tokens", self.tokens, &TOKENS),
        ] {
            let Some(s) = shown else { continue };
            let [limit, remaining, reset] = names;
            headers.insert(limit, HeaderValue::from(s.limit));
            headers.insert(remaining, HeaderValue::from(s.remaining));
            if let Ok(v) = HeaderValue::try_from(go_duration(s.reset_us)) {
                headers.insert(reset, v);
            }
            if !policy.is_empty() {
                policy.push_str(", ");
                state.push_str(", ");
            }
            let _ = write!(policy, "\"{unit}\";q={};w=60", s.limit);
            let _ = write!(
                state,
                "\"{unit}\";r={};t={}",
                s.remaining,
                ceil_secs(s.reset_us)
            );
        }
        if let Ok(v) = HeaderValue::try_from(policy) {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::try_from(state) {
            headers.insert(RATELIMIT, v);
        }
    }
}

const REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Whole seconds, rounded up (`Retry-After`, the IETF `t`).
pub fn ceil_secs(us: i64) -> u64 {
    if us <= 0 {
        0
    } else {
        (us as u64).div_ceil(1_000_000)
    }
}

/// A duration as OpenAI writes it (Go's `time.Duration` format, millisecond precision):
/// `0s`, `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn go_duration(us: i64) -> String {
    let ms = (us.max(0) as u64).div_ceil(1000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let s = format!("{}.{:03}", rest / 1000, rest % 1000);
        format!("{}s", s.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_openai() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(-5), "0s");
        assert_eq!(go_duration(1), "1ms");
        assert_eq!(go_duration(20_000), "20ms");
        assert_eq!(go_duration(1_000_000), "1s");
        assert_eq!(go_duration(1_500_000), "1.5s");
        assert_eq!(go_duration(17_250_000), "17.25s");
        assert_eq!(go_duration(360_000_000), "6m0s");
        assert_eq!(go_duration(390_500_000), "6m30.5s");
        assert_eq!(go_duration(3_723_000_000), "1h2m3s");
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1_000_000), 1);
        assert_eq!(ceil_secs(1_000_001), 2);
    }

    #[test]
    fn both_header_families() {
        let h = RateHeaders {
            requests: Some(Shown {
                limit: 600,
                remaining: 599,
                reset_us: 100_000,
            }),
            tokens: Some(Shown {
                limit: 150_000,
                remaining: 149_000,
                reset_us: 400_000,
            }),
        };
        let mut resp = HeaderMap::new();
        h.apply(&mut resp);
        let get = |n: &str| resp.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(get("x-ratelimit-limit-requests"), "600");
        assert_eq!(get("x-ratelimit-remaining-requests"), "599");
        assert_eq!(get("x-ratelimit-reset-requests"), "100ms");
        assert_eq!(get("x-ratelimit-limit-tokens"), "150000");
        assert_eq!(get("x-ratelimit-remaining-tokens"), "149000");
        assert_eq!(get("x-ratelimit-reset-tokens"), "400ms");
        assert_eq!(
            get("ratelimit-policy"),
            "\"requests\";q=600;w=60, \"tokens\";q=150000;w=60"
        );
        assert_eq!(
            get("ratelimit"),
            "\"requests\";r=599;t=1, \"tokens\";r=149000;t=1"
        );
        let mut resp = HeaderMap::new();
        RateHeaders::default().apply(&mut resp);
        assert!(resp.is_empty());
    }
}
