//! Choosing the endpoint of an upstream a request goes to first (`balance:` and `weights:`):
//! weighted round robin (smooth, nginx's: weights 5, 1, 1 give a a b a c a a, not
//! a a a a a b c), the
//! fewest requests in flight, or the lower latency score of two endpoints picked at random
//! (power of two choices over a moving average of the time to the response header, times
//! the requests in flight). Endpoints in cooldown are never chosen first unless all are.
//! Lock-free: a precomputed sequence and per-endpoint atomics.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// How an upstream spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In turn, in proportion to `weights`.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight (from this gateway node).
    LeastInFlight,
    /// Of two endpoints picked at random, the one with the lower moving average of the time
    /// to the response header times its requests in flight plus one.
    Latency,
}

/// An endpoint's live load figures.
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicU32,
    /// Moving average of the time to the response header, µs; 0 = not measured yet.
    ewma_us: AtomicU64,
}

/// Marks a request in flight to an endpoint until dropped.
pub struct InFlight<'a>(&'a Load);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Load {
    /// Counts a request in flight until the guard is dropped.
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Folds a time to the response header into the moving average (weight 1/5).
    pub fn observe(&self, latency: Duration) {
        let sample = (latency.as_micros() as u64).max(1);
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        self.ewma_us.store(new, Ordering::Relaxed);
    }

    /// The moving average of the time to the response header (zero: not measured yet).
    pub fn ewma(&self) -> Duration {
        Duration::from_micros(self.ewma_us.load(Ordering::Relaxed))
    }

    /// The latency strategy's score (lower is better).
    fn score(&self) -> u64 {
        self.ewma_us
            .load(Ordering::Relaxed)
            .saturating_mul(u64::from(self.in_flight()) + 1)
    }
}

/// The round-robin sequence of smooth weighted round robin (nginx's): each endpoint appears
/// as often as its weight, spread out.
pub fn sequence(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let best = (0..weights.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("at least one endpoint");
        current[best] -= total;
        out.push(best);
    }
    out
}

/// A well-mixed number from a counter (splitmix64): the random picks of the latency strategy.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A number in 0..1000 drawn from a request's turn (independent of the latency strategy's
/// picks): the slow start's coin.
pub fn draw_permille(tick: u64) -> u32 {
    (mix(tick ^ 0x5157_A7E5_0000_0001) % 1000) as u32
}

/// The endpoint to try first among `n`: `tick` is this request's turn (a shared counter),
/// `load(i)` an endpoint's figures, `available(i)` whether it is outside its cooldown (when
/// none is, all count as available). Allocates nothing: it runs on every request.
pub fn first<'a>(
    strategy: Strategy,
    sequence: &[usize],
    tick: u64,
    n: usize,
    load: impl Fn(usize) -> &'a Load,
    available: impl Fn(usize) -> bool,
) -> usize {
    let any = (0..n).any(&available);
    let ok = |i: usize| !any || available(i);
    // The first usable endpoint from `from` on, in turn.
    let next_ok = |from: usize| {
        (0..n)
            .map(|k| (from + k) % n)
            .find(|&i| ok(i))
            .unwrap_or(from)
    };
    match strategy {
        Strategy::RoundRobin => {
            // The sequence's next entry that is usable.
            let len = sequence.len() as u64;
            (0..len)
                .map(|k| sequence[((tick + k) % len) as usize])
                .find(|&i| ok(i))
                .unwrap_or(sequence[(tick % len) as usize])
        }
        Strategy::LeastInFlight => {
            // Ties go round robin from this request's turn.
            let start = (tick % n as u64) as usize;
            (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| ok(i))
                .min_by_key(|&i| load(i).in_flight())
                .unwrap_or(start)
        }
        Strategy::Latency => {
            let r = mix(tick);
            let a = next_ok((r % n as u64) as usize);
            let b = next_ok(((r >> 32) % n as u64) as usize);
            let b = if b == a { next_ok((a + 1) % n) } else { b };
            if load(b).score() < load(a).score() {
                b
            } else {
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_sequence() {
        assert_eq!(sequence(&[1, 1]), vec![0, 1]);
        assert_eq!(sequence(&[3, 1]), vec![0, 0, 1, 0]);
        // nginx's documented order for weights 5, 1, 1: a a b a c a a (not a a a a a b c).
        assert_eq!(sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn strategies_pick_as_documented() {
        let (a, b) = (Load::default(), Load::default());
        let loads = [&a, &b];
        let seq = sequence(&[1, 1]);
        let pick =
            |strategy, tick, up: [bool; 2]| first(strategy, &seq, tick, 2, |i| loads[i], |i| up[i]);
        let both = [true, true];
        assert_eq!(pick(Strategy::RoundRobin, 0, both), 0);
        assert_eq!(pick(Strategy::RoundRobin, 1, both), 1);
        assert_eq!(pick(Strategy::RoundRobin, 0, [false, true]), 1);
        assert_eq!(
            pick(Strategy::RoundRobin, 0, [false, false]),
            0,
            "none up: all count"
        );
        let _busy = [a.enter(), a.enter()];
        for tick in 0..4 {
            assert_eq!(pick(Strategy::LeastInFlight, tick, both), 1);
        }
        a.observe(Duration::from_millis(50));
        b.observe(Duration::from_millis(5));
        for tick in 0..8 {
            assert_eq!(pick(Strategy::Latency, tick, both), 1);
        }
        b.observe(Duration::from_millis(5));
        assert_eq!(b.ewma(), Duration::from_millis(5));
    }
}
