//! One base URL of an upstream, live: every address its host resolves to (as pingora peers,
//! each with the upstream's timeouts and TLS material), which address a request uses, and the
//! endpoint's health: passive (failures of real requests, a cooldown), active (checks that
//! eject and return it) and the slow start of an endpoint coming back.
//!
//! Addresses are swapped as a whole by the DNS refresher ([`crate::upkeep`]); a request keeps
//! the set it picked from. Health is atomics only: requests read and update it lock-free.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora_core::upstreams::peer::HttpPeer;

use crate::balance::Load;
use crate::config::BaseUrl;

/// One base URL of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// The base URL as configured (a metrics label; holds no secret).
    pub url: String,
    /// `Host` header value for requests to this endpoint.
    pub host: HeaderValue,
    /// Path prefix replacing the client's `/v1`.
    pub base_path: String,
    /// Query string of the base URL, sent before the client's (may be empty).
    pub base_query: String,
    /// Requests in flight and the moving average of the time to the response header.
    pub load: Load,
    pub health: Health,
    /// Host and port to resolve again; `None` for an IP literal.
    name: Option<(String, u16)>,
    /// The peer settings every address gets (timeouts, TLS); its address is a placeholder.
    template: HttpPeer,
    addresses: ArcSwap<Addresses>,
    next_address: AtomicUsize,
}

/// The addresses of an endpoint at one time, each a ready peer with its own connect cooldown.
#[derive(Debug)]
pub struct Addresses {
    peers: Vec<HttpPeer>,
    skip_until_ms: Vec<AtomicU64>,
}

impl Addresses {
    fn new(template: &HttpPeer, addrs: &[SocketAddr]) -> Addresses {
        let peers = addrs
            .iter()
            .map(|a| {
                let mut p = template.clone();
                p._address = pingora_core::protocols::l4::socket::SocketAddr::Inet(*a);
                p
            })
            .collect();
        Addresses {
            peers,
            skip_until_ms: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The socket addresses, in resolution order.
    pub fn list(&self) -> impl Iterator<Item = String> + '_ {
        self.peers.iter().map(|p| p._address.to_string())
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Never true: a resolution without addresses is refused.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn same(&self, addrs: &[SocketAddr]) -> bool {
        self.peers.len() == addrs.len()
            && self.peers.iter().zip(addrs).all(|(p, a)| {
                matches!(&p._address, pingora_core::protocols::l4::socket::SocketAddr::Inet(x) if x == a)
            })
    }
}

/// The address one attempt uses: a share of the set it was picked from.
pub struct PeerRef {
    addresses: Arc<Addresses>,
    k: usize,
}

impl PeerRef {
    pub fn peer(&self) -> &HttpPeer {
        &self.addresses.peers[self.k]
    }
}

/// Resolves a base URL's host: every address, IPv4 and IPv6 as the system resolver orders them
/// (blocking: at load, or on the blocking pool).
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .collect();
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    if addrs.is_empty() {
        return Err(format!("`{host}` has no address"));
    }
    Ok(addrs)
}

/// The `Host` header for a base URL: the port only when it is not the scheme's default.
pub fn host_header(base: &BaseUrl) -> Result<HeaderValue, String> {
    let default_port = if base.tls { 443 } else { 80 };
    let host = if base.port == default_port {
        base.host.clone()
    } else if base.host.contains(':') {
        format!("[{}]:{}", base.host, base.port)
    } else {
        format!("{}:{}", base.host, base.port)
    };
    HeaderValue::from_str(&host).map_err(|e| e.to_string())
}

impl Endpoint {
    /// Resolves `base`'s host (the only I/O) and builds a peer per address from `template`
    /// (whose address is ignored). Errors say why, without the URL.
    pub fn build(url: String, base: BaseUrl, template: HttpPeer) -> Result<Endpoint, String> {
        let literal = base.host.parse::<std::net::IpAddr>().is_ok();
        let addrs = resolve(&base.host, base.port)?;
        Ok(Endpoint {
            url,
            host: host_header(&base)?,
            addresses: ArcSwap::from_pointee(Addresses::new(&template, &addrs)),
            name: (!literal).then_some((base.host, base.port)),
            template,
            base_path: base.path,
            base_query: base.query,
            load: Load::default(),
            health: Health::default(),
            next_address: AtomicUsize::new(0),
        })
    }

    /// A peer template for `base`: scheme, SNI, and nothing else set.
    pub fn template(base: &BaseUrl) -> HttpPeer {
        HttpPeer::new(
            SocketAddr::from(([0, 0, 0, 0], base.port)),
            base.tls,
            base.host.clone(),
        )
    }

    /// The address for the next attempt: the endpoint's addresses in turn, skipping those in
    /// their connect cooldown (unless all are).
    pub fn pick(&self, now_ms: u64) -> PeerRef {
        let addresses = self.addresses.load_full();
        let n = addresses.peers.len();
        let start = if n == 1 {
            0
        } else {
            self.next_address.fetch_add(1, Ordering::Relaxed) % n
        };
        let k = (0..n)
            .map(|i| (start + i) % n)
            .find(|&k| addresses.skip_until_ms[k].load(Ordering::Relaxed) <= now_ms)
            .unwrap_or(start);
        PeerRef { addresses, k }
    }

    /// Skips `p`'s address for `cooldown_ms` after a failed connect.
    pub fn address_failed(&self, p: &PeerRef, now_ms: u64, cooldown_ms: u64) {
        p.addresses.skip_until_ms[p.k].store(now_ms + cooldown_ms, Ordering::Relaxed);
    }

    /// The current addresses.
    pub fn addresses(&self) -> Arc<Addresses> {
        self.addresses.load_full()
    }

    /// Host and port to resolve again, unless the URL names an IP address.
    pub fn name(&self) -> Option<(&str, u16)> {
        self.name.as_ref().map(|(h, p)| (h.as_str(), *p))
    }

    /// Replaces the addresses with a new resolution; true when they changed (an unchanged set
    /// keeps its cooldowns).
    pub fn set_addresses(&self, addrs: &[SocketAddr]) -> bool {
        if addrs.is_empty() || self.addresses.load().same(addrs) {
            return false;
        }
        self.addresses
            .store(Arc::new(Addresses::new(&self.template, addrs)));
        true
    }

    /// Takes over the health of the same endpoint in the table being replaced (a reload). Its
    /// addresses are not taken: the new table resolved them just now.
    pub fn carry_over(&self, old: &Endpoint) {
        self.health.carry_over(&old.health);
    }
}

/// An endpoint's health. Available unless skipped after failures (`passive`, until a time) or
/// ejected by active checks (until enough pass); then, for `slow_start`, a growing share.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    /// End of the passive cooldown, ms since the epoch (0: none).
    skip_until_ms: AtomicU64,
    /// Ejected by active checks.
    ejected: AtomicBool,
    /// Active checks in a row: positive passes, negative failures.
    streak: AtomicI32,
    /// When active checks last returned the endpoint (slow start origin; 0: never).
    back_at_ms: AtomicU64,
}

/// What a check result did to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Ejected,
    Returned,
}

impl Health {
    /// Whether the endpoint takes new requests at `now_ms`.
    pub fn is_available(&self, now_ms: u64) -> bool {
        !self.ejected.load(Ordering::Relaxed)
            && self.skip_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Ejected by active checks.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Share of the requests it would be chosen for that it takes, per mille: 1000 unless it
    /// came back less than `slow_start_ms` ago (from 100 up to 1000 over that time).
    pub fn share_permille(&self, now_ms: u64, slow_start_ms: u64) -> u32 {
        if slow_start_ms == 0 {
            return 1000;
        }
        let back = self
            .skip_until_ms
            .load(Ordering::Relaxed)
            .max(self.back_at_ms.load(Ordering::Relaxed));
        if back == 0 || back > now_ms || now_ms - back >= slow_start_ms {
            return 1000;
        }
        100 + (900 * (now_ms - back) / slow_start_ms) as u32
    }

    /// Records a failed request; after `to_trip` in a row the endpoint is skipped for
    /// `cooldown_ms`. True when it just started being skipped.
    pub fn record_failure(&self, now_ms: u64, to_trip: u32, cooldown_ms: u64) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= to_trip {
            let was_down = self.skip_until_ms.load(Ordering::Relaxed) > now_ms;
            self.skip_until_ms
                .store(now_ms + cooldown_ms, Ordering::Relaxed);
            return !was_down;
        }
        false
    }

    /// Records a successful request: the failure count starts again, and an endpoint in its
    /// cooldown (tried because nothing else was left) is back now, with its slow start.
    pub fn record_success(&self, now_ms: u64) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            if self.skip_until_ms.load(Ordering::Relaxed) > now_ms {
                self.skip_until_ms.store(now_ms, Ordering::Relaxed);
            }
        }
    }

    /// Records an active check: `unhealthy` failures in a row eject the endpoint, `healthy`
    /// passes in a row return it (its slow start begins).
    pub fn record_check(
        &self,
        pass: bool,
        now_ms: u64,
        unhealthy: u32,
        healthy: u32,
    ) -> Option<Transition> {
        let streak = self.streak.load(Ordering::Relaxed);
        let streak = match (pass, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.streak.store(streak, Ordering::Relaxed);
        let ejected = self.ejected.load(Ordering::Relaxed);
        if !ejected && !pass && streak.unsigned_abs() >= unhealthy {
            self.ejected.store(true, Ordering::Relaxed);
            return Some(Transition::Ejected);
        }
        if ejected && pass && streak.unsigned_abs() >= healthy {
            self.ejected.store(false, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.skip_until_ms.store(0, Ordering::Relaxed);
            self.back_at_ms.store(now_ms, Ordering::Relaxed);
            return Some(Transition::Returned);
        }
        None
    }

    fn carry_over(&self, old: &Health) {
        let copy = |to: &AtomicU64, from: &AtomicU64| {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
        };
        copy(&self.skip_until_ms, &old.skip_until_ms);
        copy(&self.back_at_ms, &old.back_at_ms);
        self.consecutive_failures.store(
            old.consecutive_failures.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.ejected
            .store(old.ejected.load(Ordering::Relaxed), Ordering::Relaxed);
        self.streak
            .store(old.streak.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_cooldown_then_slow_start() {
        let h = Health::default();
        assert!(!h.record_failure(1_000, 2, 500));
        assert!(h.record_failure(1_000, 2, 500));
        assert!(!h.is_available(1_200));
        assert!(h.is_available(1_500));
        // Back at 1 500: a tenth of its share, growing to all of it over 1 000 ms.
        assert_eq!(h.share_permille(1_500, 1_000), 100);
        assert_eq!(h.share_permille(2_000, 1_000), 550);
        assert_eq!(h.share_permille(2_500, 1_000), 1000);
        assert_eq!(h.share_permille(2_000, 0), 1000);
        // A success while cooling down brings it back at once.
        assert!(h.record_failure(3_000, 1, 500));
        h.record_success(3_100);
        assert!(h.is_available(3_100));
        assert_eq!(h.share_permille(3_100, 1_000), 100);
    }

    #[test]
    fn active_checks_eject_and_return() {
        let h = Health::default();
        assert_eq!(h.record_check(false, 10, 2, 3), None);
        assert_eq!(h.record_check(false, 20, 2, 3), Some(Transition::Ejected));
        assert!(!h.is_available(20));
        assert_eq!(h.record_check(false, 30, 2, 3), None);
        assert_eq!(h.record_check(true, 40, 2, 3), None);
        assert_eq!(h.record_check(true, 50, 2, 3), None);
        assert_eq!(h.record_check(true, 60, 2, 3), Some(Transition::Returned));
        assert!(h.is_available(60));
        assert_eq!(h.share_permille(60, 100), 100);
        assert_eq!(h.share_permille(160, 100), 1000);
    }

    #[test]
    fn every_address_in_turn_skipping_failed_ones() {
        let base = BaseUrl::parse("http://127.0.0.1:9/v1").unwrap();
        let e = Endpoint::build("u".into(), base.clone(), Endpoint::template(&base)).unwrap();
        assert_eq!(e.addresses().len(), 1);
        assert!(e.name().is_none());
        let a: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:9".parse().unwrap();
        assert!(e.set_addresses(&[a, b]));
        assert!(!e.set_addresses(&[a, b]), "unchanged");
        let first = e.pick(0);
        let second = e.pick(0);
        assert_ne!(first.peer()._address, second.peer()._address);
        e.address_failed(&first, 0, 1_000);
        for _ in 0..3 {
            assert_eq!(e.pick(10).peer()._address, second.peer()._address);
        }
        assert_eq!(e.addresses().list().count(), 2);
    }
}
