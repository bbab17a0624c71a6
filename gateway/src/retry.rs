//! Sending a request again before its first byte reached the client: which answers qualify
//! (an upstream's `retry:` section, [`crate::config::RetryConfig`]) and, when the retry goes
//! back to an endpoint already tried, how long to wait first:
//! what the upstream asked for (`retry-after-ms`, `Retry-After` in seconds,
//! `x-ratelimit-reset-requests` / `-tokens` when nothing remains), else exponential backoff.
//! Pure functions over headers; the attempts themselves are in [`crate::forward`].

use std::time::Duration;

use http::HeaderMap;

/// The longest backoff between two attempts when the upstream names no wait.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long to wait before going back to an endpoint already tried, on the `round`-th pass
/// over the endpoints (1 = the first return): what the last answer asked for, else `backoff`
/// doubled for each further round, at most 2 s. (Moving on to an endpoint not tried yet does
/// not wait: an answer speaks for its own endpoint.)
pub fn wait(headers: &HeaderMap, round: u32, backoff: Duration) -> Duration {
    asked(headers).unwrap_or_else(|| {
        let doubled = backoff.saturating_mul(1 << (round.saturating_sub(1)).min(16));
        doubled.min(MAX_BACKOFF)
    })
}

/// The wait an answer asks for, if any.
fn asked(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    if let Some(s) = text("retry-after").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Duration::from_secs(s));
    }
    ["requests", "tokens"]
        .iter()
        .filter(|unit| text(&format!("x-ratelimit-remaining-{unit}")) == Some("0"))
        .filter_map(|unit| text(&format!("x-ratelimit-reset-{unit}")).and_then(go_duration))
        .max()
}

/// A Go-style duration as OpenAI writes its reset headers (`20ms`, `1.5s`, `6m0s`, `1h2m3s`).
fn go_duration(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|v| Duration::from_secs_f64(v.max(0.0) / 1000.0));
    }
    let mut total = 0.0;
    let mut rest = s;
    for (unit, secs) in [('h', 3600.0), ('m', 60.0), ('s', 1.0)] {
        if let Some((n, tail)) = rest.split_once(unit) {
            total += n.parse::<f64>().ok()? * secs;
            rest = tail;
        }
    }
    (rest.is_empty() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_upstream_names_the_wait() {
        let ms = Duration::from_millis;
        assert_eq!(wait(&headers(&[("retry-after", "2")]), 1, ms(50)), ms(2000));
        assert_eq!(
            wait(&headers(&[("retry-after-ms", "150")]), 1, ms(50)),
            ms(150)
        );
        let reset = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1.5s"),
            ("x-ratelimit-remaining-tokens", "100"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(
            wait(&reset, 1, ms(50)),
            ms(1500),
            "only the exhausted limit counts"
        );
        // A date (not sent by the providers here) falls back to the backoff.
        let date = headers(&[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")]);
        assert_eq!(wait(&date, 1, ms(50)), ms(50));
    }

    #[test]
    fn otherwise_the_backoff_doubles_to_two_seconds() {
        let ms = Duration::from_millis;
        let none = HeaderMap::new();
        assert_eq!(wait(&none, 1, ms(50)), ms(50));
        assert_eq!(wait(&none, 2, ms(50)), ms(100));
        assert_eq!(wait(&none, 3, ms(50)), ms(200));
        assert_eq!(wait(&none, 9, ms(50)), ms(2000));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("soon"), None);
    }
}
