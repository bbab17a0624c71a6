//! The generic cell rate algorithm (GCRA) every limit uses, local and in Redis alike.
//!
//! A bucket is one number, its *theoretical arrival time* (`tat`, µs): the instant at which it
//! would be full again. A limit of `L` per minute emits one unit every `T = 60 s / L`; a burst
//! of `B` units may be taken at once (`τ = B·T`).
//!
//! - **Strict** admission (requests): the whole cost must fit, `max(tat, now) + cost·T − now ≤ τ`.
//!   A burst of exactly `B` requests passes and the `B+1`-th is refused: no early cut-in, no
//!   overshoot.
//! - **Lenient** admission (tokens): at least one unit must be available; the cost (a
//!   reservation) is then taken whole and may leave the bucket in debt, which later requests
//!   wait out. [`settle`] moves the bucket by the difference between the real usage and the
//!   reservation, giving back what was not used. A cost counts at most one whole window
//!   (`per_minute` units): debt never exceeds a minute, whatever a request claims or uses.
//!
//! The Redis scripts in [`super::distributed`] are this file written in Lua, with the same
//! arithmetic. Times are integer microseconds (`i64`; exact in Lua's doubles too, below 2^53)
//! and `T` is rounded up to whole microseconds, so a burst of exactly `B` is exact at any
//! limit; a limit's minute lasts at most `B` µs longer than 60 s.

/// One minute, the window of every limit, in µs.
pub const WINDOW_US: i64 = 60_000_000;

/// A limit: `per_minute` units per minute, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// `per_minute` with a burst of the same size (the whole minute's budget at once).
    pub fn per_minute(n: u32) -> Rate {
        Rate {
            per_minute: n,
            burst: n,
        }
    }

    /// Emission interval `T`, µs per unit, rounded up.
    #[inline]
    pub fn interval_us(self) -> i64 {
        let n = i64::from(self.per_minute.max(1));
        (WINDOW_US + n - 1) / n
    }

    /// Burst tolerance `τ = B·T`, µs.
    #[inline]
    pub fn tau_us(self) -> i64 {
        i64::from(self.burst.max(1)) * self.interval_us()
    }
}

/// The outcome of one admission against one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's state if the admission is committed (unchanged when refused).
    pub new_tat: i64,
    /// Units left after this admission (0 when refused or in debt).
    pub remaining: u64,
    /// Allowed: time until the bucket is full again. Refused: time until it admits again.
    pub reset_us: i64,
    /// Refused: time until this request could be admitted (0 when allowed).
    pub retry_us: i64,
}

/// Decides one admission of `cost` units at `now` (µs) against a bucket at `tat`.
#[inline]
pub fn decide(tat: i64, now: i64, rate: Rate, cost: u64, lenient: bool) -> Decision {
    let t = rate.interval_us();
    let tau = rate.tau_us();
    let base = tat.max(now);
    let cost = if lenient {
        window_units(rate, cost)
    } else {
        cost.min(u64::from(u32::MAX))
    };
    let new_tat = base + cost as i64 * t;
    let over = if lenient {
        base - now - (tau - t)
    } else {
        new_tat - now - tau
    };
    if over <= 0 {
        Decision {
            allowed: true,
            new_tat,
            remaining: units(tau - (new_tat - now), t),
            reset_us: new_tat - now,
            retry_us: 0,
        }
    } else {
        Decision {
            allowed: false,
            new_tat: tat,
            remaining: 0,
            reset_us: over,
            retry_us: over,
        }
    }
}

/// A lenient cost as the bucket counts it: at most one window.
#[inline]
pub fn window_units(rate: Rate, units: u64) -> u64 {
    units.min(u64::from(rate.per_minute))
}

/// A bucket's state once a request that reserved `reserved` units really used `used` (each
/// counted at most one window). Giving back never fills the bucket beyond full (`now`).
#[inline]
pub fn settle(tat: i64, now: i64, rate: Rate, reserved: u64, used: u64) -> i64 {
    let delta = window_units(rate, used) as i64 - window_units(rate, reserved) as i64;
    (tat.max(now) + delta * rate.interval_us()).max(now)
}

/// A bucket's state once one strictly admitted unit is given back (a request counted before its
/// body was read, then refused): never beyond full (`now`).
#[inline]
pub fn give_back(tat: i64, now: i64, rate: Rate) -> i64 {
    (tat - rate.interval_us()).max(now)
}

/// What a bucket at `tat` shows now without taking anything: remaining units and µs until full.
#[inline]
pub fn peek(tat: i64, now: i64, rate: Rate) -> (u64, i64) {
    let used = (tat - now).max(0);
    (units(rate.tau_us() - used, rate.interval_us()), used)
}

/// Whole units in `span` µs (never negative).
#[inline]
fn units(span: i64, t: i64) -> u64 {
    if span <= 0 {
        0
    } else {
        (span / t) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_exactly_the_limit_passes() {
        for n in [1u32, 3, 7, 10, 60, 600, 999, 10_000] {
            let rate = Rate::per_minute(n);
            let now = 1_700_000_000_000_000;
            let mut tat = 0;
            for i in 0..n {
                let d = decide(tat, now, rate, 1, false);
                assert!(d.allowed, "limit {n}: request {i} refused");
                assert_eq!(d.remaining, u64::from(n - i - 1), "limit {n} request {i}");
                tat = d.new_tat;
            }
            let d = decide(tat, now, rate, 1, false);
            assert!(!d.allowed, "limit {n}: request {} admitted", n + 1);
            assert_eq!(d.retry_us, rate.interval_us());
            // One interval later exactly one more passes.
            let later = now + rate.interval_us();
            let d = decide(tat, later, rate, 1, false);
            assert!(d.allowed);
            assert!(!decide(d.new_tat, later, rate, 1, false).allowed);
        }
    }

    #[test]
    fn tokens_go_into_debt_and_settle() {
        let rate = Rate::per_minute(1000); // T = 60 ms per token
        let now = 1_000_000_000_000;
        // 900 tokens reserved: 100 left.
        let d = decide(0, now, rate, 900, true);
        assert!(d.allowed);
        assert_eq!(d.remaining, 100);
        // 500 more: admitted (a unit was available), into debt.
        let d2 = decide(d.new_tat, now, rate, 500, true);
        assert!(d2.allowed);
        assert_eq!(d2.remaining, 0);
        // Now refused until the debt (400 tokens) is paid and one unit is back.
        let d3 = decide(d2.new_tat, now, rate, 1, true);
        assert!(!d3.allowed);
        assert_eq!(d3.retry_us, 401 * rate.interval_us());
        // The second request really used 100: 400 given back, so 900 + 100 are used.
        let tat = settle(d2.new_tat, now, rate, 500, 100);
        assert_eq!(peek(tat, now, rate).0, 0);
        // The first used only 300: 600 more given back.
        let tat = settle(tat, now, rate, 900, 300);
        assert_eq!(peek(tat, now, rate), (600, 400 * rate.interval_us()));
        // Giving back more than was taken never overfills.
        assert_eq!(settle(tat, now, rate, 5000, 0), now);
        assert_eq!(peek(now, now, rate), (1000, 0));
        // Absurd claims count one window: a full minute of debt at most.
        let d = decide(0, now, rate, u64::MAX, true);
        assert!(d.allowed);
        assert_eq!(d.new_tat - now, 1000 * rate.interval_us());
        assert_eq!(settle(d.new_tat, now, rate, u64::MAX, 0), now);
        assert_eq!(
            settle(now, now, rate, 0, u64::MAX) - now,
            1000 * rate.interval_us()
        );
    }

    #[test]
    fn a_request_given_back_is_as_if_never_taken() {
        let rate = Rate::per_minute(3);
        let now = 1_000_000_000;
        let first = decide(0, now, rate, 1, false);
        let second = decide(first.new_tat, now, rate, 1, false);
        assert_eq!(give_back(second.new_tat, now, rate), first.new_tat);
        assert_eq!(give_back(first.new_tat, now, rate), now);
        assert_eq!(give_back(now, now, rate), now, "never beyond full");
    }

    #[test]
    fn strict_costs_must_fit_whole() {
        let rate = Rate {
            per_minute: 60,
            burst: 5,
        };
        let d = decide(0, 0, rate, 5, false);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert!(!decide(0, 0, rate, 6, false).allowed);
        assert_eq!(d.reset_us, 5_000_000);
    }
}
