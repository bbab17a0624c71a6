//! When to try again: by default immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h
//! after each failure ([`SCHEDULE`]; `webhooks.retry_schedule` replaces it), an endpoint's
//! retry count taking the first N retries, each with ±10 % jitter so retries of many
//! deliveries do not arrive together; a `Retry-After` longer than the schedule's delay wins
//! (up to a day).

use std::time::Duration;

/// The delay before attempt `n + 1` is `SCHEDULE[n]`; attempt 1 is immediate.
pub const SCHEDULE: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// The most retries an endpoint may ask for (the schedule's length after the first attempt).
pub const MAX_RETRIES: i64 = SCHEDULE.len() as i64 - 1;

/// The longest `Retry-After` honoured.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(86_400);

/// The delay after failed attempt `attempt` (1 = the first) before the next one, on
/// `schedule` (whose first entry, the first attempt's, is not used here).
pub fn next_delay(schedule: &[Duration], attempt: i64, retry_after: Option<Duration>) -> Duration {
    let last = schedule.len().saturating_sub(1).max(1) as i64;
    let base = schedule
        .get(attempt.clamp(1, last) as usize)
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let ms = base.as_millis() as u64;
    let jitter = if ms >= 10 {
        rand::random_range(0..=ms / 5) as i64 - (ms / 10) as i64
    } else {
        0
    };
    let delay = Duration::from_millis((ms as i64 + jitter).max(0) as u64);
    match retry_after {
        Some(r) => delay.max(r.min(RETRY_AFTER_CAP)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_jitter_and_retry_after() {
        for _ in 0..100 {
            let d = next_delay(&SCHEDULE, 1, None);
            assert!(d >= Duration::from_millis(4_500) && d <= Duration::from_millis(5_500));
            let d = next_delay(&SCHEDULE, 7, None);
            assert!(d >= Duration::from_secs(9 * 3600) && d <= Duration::from_secs(11 * 3600));
        }
        assert!(next_delay(&SCHEDULE, 1, Some(Duration::from_secs(60))) == Duration::from_secs(60));
        assert!(next_delay(&SCHEDULE, 2, Some(Duration::from_secs(1))) >= Duration::from_secs(270));
        assert_eq!(
            next_delay(&SCHEDULE, 1, Some(Duration::from_secs(10 * 86_400))),
            Duration::from_secs(86_400)
        );
        assert_eq!(MAX_RETRIES, 7);
    }
}
