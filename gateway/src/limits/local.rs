//! Request and token buckets held in this process: the limits when no Redis is configured, and
//! each node's share of them while Redis is unreachable.
//!
//! One small entry per key (only keys with limits of their own) and per developer, each a mutex
//! over two bucket states (requests, tokens). An admission locks the key's entry, then the
//! developer's (always in that order), decides every bucket, and commits all of them or none:
//! a request refused by the developer's limit costs the key nothing. An admission has two steps
//! ([`LocalBuckets::admit`] before the request's body is read, with no token cost: requests are
//! taken, tokens only checked; [`LocalBuckets::reserve`] once the reservation is known), and a
//! refusal in the second gives back what the first took. Entries that are full
//! again (idle) are evicted by [`LocalBuckets::evict`], so memory follows active keys only.

use std::sync::{Arc, Mutex};

use dashmap::mapref::one::Ref;
use dashmap::DashMap;

use super::gcra::{decide, give_back, peek, settle, Decision, Rate};
use super::headers::{RateHeaders, Shown};
use crate::error::Reason;

/// The buckets that apply to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// The key's own request limit (absent: the developer's covers the key).
    pub key_requests: Option<Rate>,
    pub dev_requests: Option<Rate>,
    pub key_tokens: Option<Rate>,
    pub dev_tokens: Option<Rate>,
}

impl Rates {
    pub fn is_empty(&self) -> bool {
        *self == Rates::default()
    }

    fn uses_key(&self) -> bool {
        self.key_requests.is_some() || self.key_tokens.is_some()
    }

    fn uses_dev(&self) -> bool {
        self.dev_requests.is_some() || self.dev_tokens.is_some()
    }

    /// This node's share of the limits when `nodes` share them without coordination.
    pub fn share(self, nodes: u32) -> Rates {
        if nodes <= 1 {
            return self;
        }
        let part = |r: Option<Rate>| {
            r.map(|r| Rate {
                per_minute: (r.per_minute / nodes).max(1),
                burst: (r.burst / nodes).max(1),
            })
        };
        Rates {
            key_requests: part(self.key_requests),
            dev_requests: part(self.dev_requests),
            key_tokens: part(self.key_tokens),
            dev_tokens: part(self.dev_tokens),
        }
    }
}

/// A refused admission: why, how long until it could pass (µs), and what to show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    pub reason: Reason,
    pub retry_us: i64,
    pub headers: RateHeaders,
}

#[derive(Debug, Default)]
struct Pair {
    requests: i64,
    tokens: i64,
}

type Map = DashMap<Arc<str>, Mutex<Pair>, foldhash::fast::RandomState>;

/// Buckets by key id and by developer id.
#[derive(Default)]
pub struct LocalBuckets {
    keys: Map,
    devs: Map,
}

fn shown(rate: Rate, d: &Decision) -> Shown {
    Shown {
        limit: rate.per_minute,
        remaining: d.remaining,
        reset_us: d.reset_us,
    }
}

/// A bucket as it stands after a decision: refused ones empty, admitted ones untouched.
fn view(x: Option<(Rate, Decision)>, tat: Option<i64>, now: i64) -> Option<Shown> {
    x.zip(tat).map(|((r, d), tat)| {
        if d.allowed {
            let (remaining, reset_us) = peek(tat, now, r);
            Shown {
                limit: r.per_minute,
                remaining,
                reset_us,
            }
        } else {
            shown(r, &d)
        }
    })
}

/// Gives one request back to the request buckets that apply.
fn give_back_request(key: Option<&mut Pair>, dev: Option<&mut Pair>, rates: &Rates, now: i64) {
    if let (Some(p), Some(r)) = (key, rates.key_requests) {
        p.requests = give_back(p.requests, now, r);
    }
    if let (Some(p), Some(r)) = (dev, rates.dev_requests) {
        p.requests = give_back(p.requests, now, r);
    }
}

/// The entry for `id`, created when missing: one lookup on the hot path.
fn entry<'a>(map: &'a Map, id: &Arc<str>) -> Ref<'a, Arc<str>, Mutex<Pair>> {
    match map.get(id) {
        Some(r) => r,
        None => map.entry(Arc::clone(id)).or_default().downgrade(),
    }
}

impl LocalBuckets {
    /// Admits one request reserving `cost` tokens at `now` (µs), or refuses it without taking
    /// anything.
    pub fn admit(
        &self,
        key_id: &Arc<str>,
        dev_id: &Arc<str>,
        rates: &Rates,
        cost: u64,
        now: i64,
    ) -> Result<RateHeaders, Refused> {
        // Lock order: key, then developer.
        let key_ref = rates.uses_key().then(|| entry(&self.keys, key_id));
        let dev_ref = rates.uses_dev().then(|| entry(&self.devs, dev_id));
        let mut key = key_ref.as_ref().map(|r| r.lock().expect("bucket lock"));
        let mut dev = dev_ref.as_ref().map(|r| r.lock().expect("bucket lock"));

        let d = |rate: Option<Rate>, tat: Option<i64>, cost: u64, lenient: bool| {
            rate.zip(tat)
                .map(|(r, tat)| (r, decide(tat, now, r, cost, lenient)))
        };
        let kr = d(
            rates.key_requests,
            key.as_ref().map(|p| p.requests),
            1,
            false,
        );
        let dr = d(
            rates.dev_requests,
            dev.as_ref().map(|p| p.requests),
            1,
            false,
        );
        let kt = d(rates.key_tokens, key.as_ref().map(|p| p.tokens), cost, true);
        let dt = d(rates.dev_tokens, dev.as_ref().map(|p| p.tokens), cost, true);

        let refused = [
            (kr, Reason::Requests),
            (dr, Reason::Requests),
            (kt, Reason::Tokens),
            (dt, Reason::Tokens),
        ]
        .into_iter()
        .filter_map(|(x, reason)| x.filter(|(_, d)| !d.allowed).map(|(_, d)| (reason, d)))
        .fold(None::<(Reason, i64)>, |acc, (reason, d)| match acc {
            Some((r, wait)) => Some((r, wait.max(d.retry_us))),
            None => Some((reason, d.retry_us)),
        });

        if let Some((reason, retry_us)) = refused {
            // Show the buckets as they stand: refused ones empty, the others untouched.
            let headers = RateHeaders {
                requests: Shown::tighter(
                    view(kr, key.as_ref().map(|p| p.requests), now),
                    view(dr, dev.as_ref().map(|p| p.requests), now),
                ),
                tokens: Shown::tighter(
                    view(kt, key.as_ref().map(|p| p.tokens), now),
                    view(dt, dev.as_ref().map(|p| p.tokens), now),
                ),
            };
            return Err(Refused {
                reason,
                retry_us,
                headers,
            });
        }
        if let Some(p) = key.as_deref_mut() {
            if let Some((_, d)) = kr {
                p.requests = d.new_tat;
            }
            if let Some((_, d)) = kt {
                p.tokens = d.new_tat;
            }
        }
        if let Some(p) = dev.as_deref_mut() {
            if let Some((_, d)) = dr {
                p.requests = d.new_tat;
            }
            if let Some((_, d)) = dt {
                p.tokens = d.new_tat;
            }
        }
        let s = |x: Option<(Rate, Decision)>| x.map(|(r, d)| shown(r, &d));
        Ok(RateHeaders {
            requests: Shown::tighter(s(kr), s(dr)),
            tokens: Shown::tighter(s(kt), s(dt)),
        })
    }

    /// Takes a request's token reservation `cost` once its body is read (the second step of an
    /// admission whose first, [`LocalBuckets::admit`], took the request): the token buckets
    /// decide again, leniently, and are committed together, or nothing is taken. Refused, it
    /// gives back the request the first step took when `give_back` (under the same locks), so
    /// a refused request holds nothing. Returns the tokens shown.
    pub fn reserve(
        &self,
        (key_id, dev_id): (&Arc<str>, &Arc<str>),
        rates: &Rates,
        cost: u64,
        give_back: bool,
        now: i64,
    ) -> Result<Option<Shown>, Refused> {
        if rates.key_tokens.is_none() && rates.dev_tokens.is_none() {
            return Ok(None);
        }
        // Lock order: key, then developer.
        let key_ref = rates.uses_key().then(|| entry(&self.keys, key_id));
        let dev_ref = rates.uses_dev().then(|| entry(&self.devs, dev_id));
        let mut key = key_ref.as_ref().map(|r| r.lock().expect("bucket lock"));
        let mut dev = dev_ref.as_ref().map(|r| r.lock().expect("bucket lock"));
        let d = |rate: Option<Rate>, tat: Option<i64>| {
            rate.zip(tat)
                .map(|(r, tat)| (r, decide(tat, now, r, cost, true)))
        };
        let kt = d(rates.key_tokens, key.as_ref().map(|p| p.tokens));
        let dt = d(rates.dev_tokens, dev.as_ref().map(|p| p.tokens));
        let refused = [kt, dt]
            .into_iter()
            .flatten()
            .filter(|(_, d)| !d.allowed)
            .map(|(_, d)| d.retry_us)
            .max();
        if let Some(retry_us) = refused {
            let tokens = Shown::tighter(
                view(kt, key.as_ref().map(|p| p.tokens), now),
                view(dt, dev.as_ref().map(|p| p.tokens), now),
            );
            if give_back {
                give_back_request(key.as_deref_mut(), dev.as_deref_mut(), rates, now);
            }
            return Err(Refused {
                reason: Reason::Tokens,
                retry_us,
                headers: RateHeaders {
                    requests: None,
                    tokens,
                },
            });
        }
        if let (Some(p), Some((_, d))) = (key.as_deref_mut(), kt) {
            p.tokens = d.new_tat;
        }
        if let (Some(p), Some((_, d))) = (dev.as_deref_mut(), dt) {
            p.tokens = d.new_tat;
        }
        let s = |x: Option<(Rate, Decision)>| x.map(|(r, d)| shown(r, &d));
        Ok(Shown::tighter(s(kt), s(dt)))
    }

    /// Gives back the request [`LocalBuckets::admit`] took, for a request refused afterwards
    /// (its quota, decided outside the buckets).
    pub fn give_back_request(&self, key_id: &str, dev_id: &str, rates: &Rates, now: i64) {
        let key_ref = rates
            .key_requests
            .is_some()
            .then(|| self.keys.get(key_id))
            .flatten();
        let dev_ref = rates
            .dev_requests
            .is_some()
            .then(|| self.devs.get(dev_id))
            .flatten();
        let mut key = key_ref.as_ref().map(|r| r.lock().expect("bucket lock"));
        let mut dev = dev_ref.as_ref().map(|r| r.lock().expect("bucket lock"));
        give_back_request(key.as_deref_mut(), dev.as_deref_mut(), rates, now);
    }

    /// The buckets as they stand, without taking anything (for refusals decided elsewhere).
    pub fn peek(&self, key_id: &str, dev_id: &str, rates: &Rates, now: i64) -> RateHeaders {
        let view = |map: &Map, id: &str, rate: Option<Rate>, tokens: bool| {
            rate.map(|r| {
                let tat = map.get(id).map_or(0, |e| {
                    let p = e.lock().expect("bucket lock");
                    if tokens {
                        p.tokens
                    } else {
                        p.requests
                    }
                });
                let (remaining, reset_us) = peek(tat, now, r);
                Shown {
                    limit: r.per_minute,
                    remaining,
                    reset_us,
                }
            })
        };
        RateHeaders {
            requests: Shown::tighter(
                view(&self.keys, key_id, rates.key_requests, false),
                view(&self.devs, dev_id, rates.dev_requests, false),
            ),
            tokens: Shown::tighter(
                view(&self.keys, key_id, rates.key_tokens, true),
                view(&self.devs, dev_id, rates.dev_tokens, true),
            ),
        }
    }

    /// Replaces a request's token reservation by its real usage in the token buckets. Usage
    /// beyond the reservation is charged even if the bucket was evicted meanwhile.
    pub fn settle(
        &self,
        key_id: &Arc<str>,
        dev_id: &Arc<str>,
        rates: &Rates,
        (reserved, used): (u64, u64),
        now: i64,
    ) {
        if reserved == used {
            return;
        }
        for (map, id, rate) in [
            (&self.keys, key_id, rates.key_tokens),
            (&self.devs, dev_id, rates.dev_tokens),
        ] {
            let Some(r) = rate else { continue };
            let e = if used > reserved {
                Some(entry(map, id))
            } else {
                map.get(id)
            };
            if let Some(e) = e {
                let mut p = e.lock().expect("bucket lock");
                p.tokens = settle(p.tokens, now, r, reserved, used);
            }
        }
    }

    /// Drops entries whose buckets are full again at `now` (they hold nothing a new entry
    /// would not). Returns how many were dropped.
    pub fn evict(&self, now: i64) -> usize {
        let before = self.len();
        let idle = |_: &Arc<str>, p: &mut Mutex<Pair>| {
            let p = p.get_mut().expect("bucket lock");
            p.requests > now || p.tokens > now
        };
        self.keys.retain(idle);
        self.devs.retain(idle);
        before - self.len()
    }

    /// Entries held (keys and developers).
    pub fn len(&self) -> usize {
        self.keys.len() + self.devs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (Arc<str>, Arc<str>) {
        ("key_a".into(), "dev_a".into())
    }

    #[test]
    fn all_or_nothing() {
        let b = LocalBuckets::default();
        let (k, d) = ids();
        let rates = Rates {
            key_requests: Some(Rate::per_minute(5)),
            dev_requests: Some(Rate::per_minute(3)),
            ..Rates::default()
        };
        let now = 1_000_000_000;
        for i in 0..3 {
            let h = b.admit(&k, &d, &rates, 0, now).unwrap();
            // The developer's bucket is the tighter one.
            assert_eq!(h.requests.unwrap().remaining, 2 - i);
            assert_eq!(h.requests.unwrap().limit, 3);
        }
        let refused = b.admit(&k, &d, &rates, 0, now).unwrap_err();
        assert_eq!(refused.reason, Reason::Requests);
        // The key lost nothing to the developer's refusals: through another developer with room,
        // exactly the key's remaining 2 pass.
        for _ in 0..5 {
            let _ = b.admit(&k, &d, &rates, 0, now);
        }
        let other: Arc<str> = "dev_b".into();
        assert!(b.admit(&k, &other, &rates, 0, now).is_ok());
        assert!(b.admit(&k, &other, &rates, 0, now).is_ok());
        let refused = b.admit(&k, &other, &rates, 0, now).unwrap_err();
        assert_eq!(refused.headers.requests.unwrap().limit, 5);
    }

    #[test]
    fn tokens_settle_and_idle_entries_go() {
        let b = LocalBuckets::default();
        let (k, d) = ids();
        let rates = Rates {
            dev_tokens: Some(Rate::per_minute(1000)),
            ..Rates::default()
        };
        let now = 1_000_000_000;
        let h = b.admit(&k, &d, &rates, 600, now).unwrap();
        assert_eq!(h.tokens.unwrap().remaining, 400);
        assert!(h.requests.is_none());
        // Used 100 of the 600 reserved.
        b.settle(&k, &d, &rates, (600, 100), now);
        let h = b.admit(&k, &d, &rates, 0, now).unwrap();
        assert_eq!(h.tokens.unwrap().remaining, 900);
        assert_eq!(b.len(), 1, "no key entry without key limits");
        assert_eq!(b.evict(now), 0);
        assert_eq!(b.evict(now + 60_000_000), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn a_refused_reservation_gives_the_request_back() {
        let b = LocalBuckets::default();
        let (k, d) = ids();
        let rates = Rates {
            key_requests: Some(Rate::per_minute(2)),
            dev_tokens: Some(Rate::per_minute(100)),
            ..Rates::default()
        };
        let now = 1_000_000_000;
        // Step one takes the request and checks the tokens; step two takes them.
        let h = b.admit(&k, &d, &rates, 0, now).unwrap();
        assert_eq!(h.requests.unwrap().remaining, 1);
        assert_eq!(h.tokens.unwrap().remaining, 100);
        let t = b.reserve((&k, &d), &rates, 150, true, now).unwrap();
        assert_eq!(t.unwrap().remaining, 0, "in debt");
        // The next request passes step one (a request is left)… but its tokens are refused, and
        // its request comes back: two more step-one admissions fit, not one.
        let h = b.admit(&k, &d, &rates, 0, now);
        let refused = h.unwrap_err();
        assert_eq!(refused.reason, Reason::Tokens, "tokens checked in step one");
        let rates_no_tokens = Rates {
            dev_tokens: None,
            ..rates
        };
        let _ = b.admit(&k, &d, &rates_no_tokens, 0, now).unwrap();
        let err = b.reserve((&k, &d), &rates, 10, true, now).unwrap_err();
        assert_eq!(err.reason, Reason::Tokens);
        assert!(
            b.admit(&k, &d, &rates_no_tokens, 0, now).is_ok(),
            "the refused request's slot came back"
        );
        assert!(b.admit(&k, &d, &rates_no_tokens, 0, now).is_err());
        // Given back outside `reserve` (a quota refusal): the same.
        b.give_back_request(&k, &d, &rates_no_tokens, now);
        assert!(b.admit(&k, &d, &rates_no_tokens, 0, now).is_ok());
    }

    #[test]
    fn shares() {
        let r = Rates {
            dev_requests: Some(Rate {
                per_minute: 100,
                burst: 10,
            }),
            ..Rates::default()
        };
        assert_eq!(
            r.share(3).dev_requests,
            Some(Rate {
                per_minute: 33,
                burst: 3
            })
        );
        assert_eq!(r.share(1), r);
    }
}
