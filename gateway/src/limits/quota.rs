//! Monthly plan quotas: what each developer has used this period, as this node knows it.
//!
//! A developer's entry holds the period's committed tokens and metered cost (seeded from
//! ClickHouse at start, then counted per request, or — with Redis — the last global totals
//! Redis returned plus what this node settled since), and the tokens reserved by this node's
//! in-flight requests. Admission refuses:
//! - on a hard-stop plan, once committed + reserved tokens reach the included tokens (before
//!   the body is read), and when what the request itself declares (its prompt plus its
//!   `max_tokens` × `n`) does not fit in what is left ([`QuotaRule::fits`], once the body is
//!   read): a hard stop lets no single oversized request through;
//! - on an overage plan with a spend cap, once the overage charge reaches the cap.
//!
//! The overage charge the gateway enforces is the period's metered cost times the share of its
//! tokens beyond the included ones (a stateless estimate from totals; the invoice prices the
//! overage exactly). Entries are per developer; when the period turns over (the wall clock
//! leaves it, forwards or backwards) the old period's entries are parked for a step back.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aihub_plans::Period;
use dashmap::DashMap;

/// A developer's quota rule, resolved from the plan and the developer's overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRule {
    /// Tokens per period covered by the plan (or the developer's override); `None` = unlimited.
    pub included: Option<u64>,
    /// Refuse once `included` is used up (no overage).
    pub hard: bool,
    /// Most overage charge per period, nano-USD (overage plans only).
    pub spend_cap_nanos: Option<i64>,
}

/// Why the quota refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The included tokens of a hard-stop plan are used up.
    Exhausted,
    /// The overage charge reached the developer's spend cap.
    SpendCap,
}

/// One developer's period usage on this node.
#[derive(Debug, Default)]
pub struct DevUsage {
    pub tokens: AtomicU64,
    pub cost_nanos: AtomicI64,
    /// Tokens reserved by this node's requests in flight.
    pub reserved: AtomicU64,
    /// The totals are Redis' global ones (which include ClickHouse's seed): a late seed must
    /// not be added to them.
    pub global: AtomicBool,
}

impl DevUsage {
    /// Committed tokens and cost.
    pub fn totals(&self) -> (u64, i64) {
        (
            self.tokens.load(Ordering::Relaxed),
            self.cost_nanos.load(Ordering::Relaxed),
        )
    }
}

/// The estimated overage charge of `tokens` costing `cost_nanos` when `included` are free:
/// the cost times the share of tokens beyond `included`, rounded down.
pub fn overage_nanos(tokens: u64, cost_nanos: i64, included: Option<u64>) -> i64 {
    let Some(included) = included else { return 0 };
    if tokens <= included || tokens == 0 {
        return 0;
    }
    let over = i128::from(tokens - included);
    (i128::from(cost_nanos) * over / i128::from(tokens)) as i64
}

impl QuotaRule {
    /// Checks a developer's usage against the rule.
    pub fn check(&self, tokens: u64, cost_nanos: i64, reserved: u64) -> Result<(), QuotaRefusal> {
        if let (true, Some(included)) = (self.hard, self.included) {
            if tokens.saturating_add(reserved) >= included {
                return Err(QuotaRefusal::Exhausted);
            }
        }
        if let (Some(cap), Some(included)) = (self.spend_cap_nanos, self.included) {
            // Only in overage territory: a cap of 0 allows the included tokens, nothing more.
            if !self.hard
                && tokens >= included
                && overage_nanos(tokens, cost_nanos, self.included) >= cap
            {
                return Err(QuotaRefusal::SpendCap);
            }
        }
        Ok(())
    }

    /// Whether a request declaring `declared` tokens fits what is left of a hard-stop quota
    /// after the committed `tokens` and the `reserved` tokens of other requests in flight.
    pub fn fits(&self, tokens: u64, reserved: u64, declared: u64) -> Result<(), QuotaRefusal> {
        if let (true, Some(included)) = (self.hard, self.included) {
            if tokens.saturating_add(reserved).saturating_add(declared) > included {
                return Err(QuotaRefusal::Exhausted);
            }
        }
        Ok(())
    }
}

/// Every developer's usage this period, on this node.
///
/// The period follows the wall clock (a month is a calendar fact) both ways: a clock stepping
/// forward across the month's end turns it over, and one stepping back across the month's start
/// turns it back. The entries of the period left are parked, not dropped, and come back with
/// it: a step back (say from 1 January 00:00:05 to 31 December 23:59:58) must not reopen
/// December's spent quota, nor a step forward again January's.
pub struct QuotaBook {
    /// Serializes period turnovers; holds the entries of the period last left.
    turnover: Mutex<Option<Parked>>,
    /// The current period as `year * 12 + month - 1`.
    period_code: AtomicI64,
    /// Start and end of the current period, unix ms (checked on every access; cheap).
    period_start_ms: AtomicI64,
    period_end_ms: AtomicI64,
    devs: DashMap<Arc<str>, Arc<DevUsage>, foldhash::fast::RandomState>,
}

/// The entries of a period the clock left, kept for a step back into it.
struct Parked {
    code: i64,
    devs: Vec<(Arc<str>, Arc<DevUsage>)>,
}

fn code(p: Period) -> i64 {
    i64::from(p.year) * 12 + i64::from(p.month) - 1
}

fn from_code(c: i64) -> Period {
    Period {
        year: c.div_euclid(12) as i32,
        month: c.rem_euclid(12) as u32 + 1,
    }
}

impl QuotaBook {
    pub fn new(now_ms: i64) -> QuotaBook {
        let period = Period::of_unix_ms(now_ms);
        QuotaBook {
            turnover: Mutex::new(None),
            period_code: AtomicI64::new(code(period)),
            period_start_ms: AtomicI64::new(period.start_ms()),
            period_end_ms: AtomicI64::new(period.end_ms()),
            devs: DashMap::default(),
        }
    }

    /// The current period; turning it over when `now_ms` is outside it (past its end, or
    /// before its start: the wall clock stepped back). The period left is parked; the period
    /// parked, when `now_ms` is in it again, comes back with its usage.
    #[inline]
    pub fn period(&self, now_ms: i64) -> Period {
        if self.outside(now_ms) {
            let mut parked = self.turnover.lock().expect("quota turnover lock");
            if self.outside(now_ms) {
                let p = Period::of_unix_ms(now_ms);
                let left = Parked {
                    code: self.period_code.load(Ordering::Acquire),
                    devs: self
                        .devs
                        .iter()
                        .map(|e| (Arc::clone(e.key()), Arc::clone(e.value())))
                        .collect(),
                };
                self.devs.clear();
                if let Some(back) = parked.take().filter(|b| b.code == code(p)) {
                    for (id, usage) in back.devs {
                        self.devs.insert(id, usage);
                    }
                }
                *parked = Some(left);
                self.period_code.store(code(p), Ordering::Release);
                self.period_start_ms.store(p.start_ms(), Ordering::Release);
                self.period_end_ms.store(p.end_ms(), Ordering::Release);
            }
        }
        from_code(self.period_code.load(Ordering::Acquire))
    }

    #[inline]
    fn outside(&self, now_ms: i64) -> bool {
        now_ms >= self.period_end_ms.load(Ordering::Acquire)
            || now_ms < self.period_start_ms.load(Ordering::Acquire)
    }

    /// Unix ms at which the current period ends.
    pub fn period_end_ms(&self) -> i64 {
        self.period_end_ms.load(Ordering::Relaxed)
    }

    /// The developer's entry in the current period (created empty).
    pub fn dev(&self, developer_id: &Arc<str>, now_ms: i64) -> Arc<DevUsage> {
        self.period(now_ms);
        if let Some(d) = self.devs.get(developer_id) {
            return Arc::clone(&d);
        }
        Arc::clone(&self.devs.entry(Arc::clone(developer_id)).or_default())
    }

    /// The developer's committed totals in `period` (zero when unknown or another period).
    pub fn totals(&self, period: Period, developer_id: &str) -> (u64, i64) {
        if code(period) != self.period_code.load(Ordering::Acquire) {
            return (0, 0);
        }
        self.devs.get(developer_id).map_or((0, 0), |d| d.totals())
    }

    /// Adds usage recorded before this node started (ClickHouse) to the current period.
    pub fn add_seed(&self, period: Period, developer_id: &str, tokens: u64, cost_nanos: i64) {
        if code(period) != self.period_code.load(Ordering::Acquire) {
            return;
        }
        let d = self.dev(&Arc::from(developer_id), period.start_ms());
        if d.global.load(Ordering::Relaxed) {
            return;
        }
        d.tokens.fetch_add(tokens, Ordering::Relaxed);
        d.cost_nanos.fetch_add(cost_nanos, Ordering::Relaxed);
    }
}

/// Alert thresholds (percent of `quota`) crossed by going from `before` to `after` tokens.
pub fn crossed(thresholds: &[u32], quota: u64, before: u64, after: u64) -> Vec<u32> {
    if quota == 0 {
        return Vec::new();
    }
    thresholds
        .iter()
        .copied()
        .filter(|&pct| {
            let mark = (u128::from(quota) * u128::from(pct)).div_ceil(100);
            u128::from(before) < mark && u128::from(after) >= mark
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_stop_counts_reservations() {
        let r = QuotaRule {
            included: Some(1000),
            hard: true,
            spend_cap_nanos: None,
        };
        assert_eq!(r.check(900, 0, 99), Ok(()));
        assert_eq!(r.check(900, 0, 100), Err(QuotaRefusal::Exhausted));
        assert_eq!(r.check(1000, 0, 0), Err(QuotaRefusal::Exhausted));
    }

    #[test]
    fn a_request_must_fit_what_is_left() {
        let r = QuotaRule {
            included: Some(1000),
            hard: true,
            spend_cap_nanos: None,
        };
        assert_eq!(r.fits(900, 50, 50), Ok(()));
        assert_eq!(r.fits(900, 50, 51), Err(QuotaRefusal::Exhausted));
        assert_eq!(r.fits(0, 0, 1001), Err(QuotaRefusal::Exhausted));
        assert_eq!(r.fits(0, 0, u64::MAX), Err(QuotaRefusal::Exhausted));
        let overage = QuotaRule { hard: false, ..r };
        assert_eq!(overage.fits(900, 50, 5000), Ok(()));
        let unlimited = QuotaRule {
            included: None,
            ..r
        };
        assert_eq!(unlimited.fits(900, 50, 5000), Ok(()));
    }

    #[test]
    fn spend_cap_on_the_overage_share() {
        let r = QuotaRule {
            included: Some(100),
            hard: false,
            spend_cap_nanos: Some(500),
        };
        // 200 tokens for 1000 nano-USD: half is overage = 500 → at the cap.
        assert_eq!(overage_nanos(200, 1000, Some(100)), 500);
        assert_eq!(r.check(200, 1000, 0), Err(QuotaRefusal::SpendCap));
        assert_eq!(r.check(199, 1000, 0), Ok(()));
        assert_eq!(overage_nanos(100, 1000, Some(100)), 0);
        assert_eq!(overage_nanos(100, 1000, None), 0);
        let zero = QuotaRule {
            spend_cap_nanos: Some(0),
            ..r
        };
        assert_eq!(zero.check(99, 990, 0), Ok(()));
        assert_eq!(zero.check(100, 1000, 0), Err(QuotaRefusal::SpendCap));
        let uncapped = QuotaRule {
            spend_cap_nanos: None,
            ..r
        };
        assert_eq!(uncapped.check(u64::MAX / 2, i64::MAX / 2, 0), Ok(()));
    }

    #[test]
    fn thresholds_cross_once() {
        assert_eq!(crossed(&[80, 100], 1000, 0, 799), Vec::<u32>::new());
        assert_eq!(crossed(&[80, 100], 1000, 799, 800), vec![80]);
        assert_eq!(crossed(&[80, 100], 1000, 800, 999), Vec::<u32>::new());
        assert_eq!(crossed(&[80, 100], 1000, 500, 1500), vec![80, 100]);
        assert_eq!(crossed(&[80, 100], 3, 2, 3), vec![80, 100]);
    }

    #[test]
    fn periods_turn_over() {
        let nov = Period::parse("2026-11").unwrap();
        let book = QuotaBook::new(nov.start_ms() + 5);
        let dev: Arc<str> = "dev_a".into();
        book.add_seed(nov, "dev_a", 700, 70);
        assert_eq!(book.dev(&dev, nov.start_ms() + 10).totals(), (700, 70));
        // A seed for another period is ignored.
        book.add_seed(nov.next(), "dev_a", 1, 1);
        assert_eq!(book.dev(&dev, nov.start_ms() + 10).totals(), (700, 70));
        assert_eq!(book.dev(&dev, nov.end_ms()).totals(), (0, 0));
        assert_eq!(book.period(nov.end_ms()), nov.next());
    }

    #[test]
    fn a_clock_step_back_across_the_month_start_brings_the_old_period_back() {
        let nov = Period::parse("2026-11").unwrap();
        let book = QuotaBook::new(nov.end_ms() - 10_000);
        let dev: Arc<str> = "dev_a".into();
        book.dev(&dev, nov.end_ms() - 9_000)
            .tokens
            .fetch_add(900, Ordering::Relaxed);
        // Forward into December: a new period, empty.
        let dec = book.dev(&dev, nov.end_ms() + 5_000);
        assert_eq!(book.period(nov.end_ms() + 5_000), nov.next());
        assert_eq!(dec.totals(), (0, 0));
        dec.tokens.fetch_add(30, Ordering::Relaxed);
        // Back into November (a step of the wall clock): November's usage, not a fresh count.
        assert_eq!(book.period(nov.end_ms() - 2_000), nov);
        assert_eq!(book.dev(&dev, nov.end_ms() - 1_000).totals(), (900, 0));
        assert_eq!(book.totals(nov, "dev_a"), (900, 0));
        // And forward again: December's.
        assert_eq!(book.dev(&dev, nov.end_ms() + 6_000).totals(), (30, 0));
        // A step back into a period never seen starts it empty.
        assert_eq!(book.dev(&dev, nov.start_ms() - 1).totals(), (0, 0));
        assert_eq!(book.period(nov.start_ms() - 1), nov.prev());
    }
}
