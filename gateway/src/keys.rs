//! API keys as the gateway sees them: what a key may do ([`KeyRecord`]), where keys are looked
//! up ([`KeyStore`]), the two in-memory stores ([`KeyTable`]/[`DeclaredStore`] for the YAML
//! keys, [`MemoryKeyStore`] for synced ones) and the gateway's two-layer key set ([`KeySet`]).
//!
//! Keys come from two sources: the YAML `keys:` list (replaced whole on reload) and the control
//! plane's change feed ([`crate::keysync`]). Each fills its own layer of the [`KeySet`], so a
//! reload never drops a synced key and the sync never touches a declared one. A request never
//! waits on anything but these maps. Declared records are built while the configuration is
//! read (`config::DeclaredKeys`), synced ones by the key sync; this module imports neither.
//!
//! **Memory** (a million keys must fit in a few hundred MiB): a record is one allocation of at
//! most 160 bytes plus its id; everything keys tend to have in common
//! (developer id, permission lists, IP allowlist, limits) is shared between records through the
//! [`Interner`], and pointers to shared data are one word wide. The declared layer is a sorted
//! array of `(short hash, record)` (16 bytes a key, no load factor), swapped whole on reload;
//! the synced layer is a sharded hash set of record pointers (9 bytes a slot), the record
//! holding its own hash.
//!
//! The permission patterns live in `aihub-apikey` (shared with the admin API) and are
//! re-exported here.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use aihub_apikey::KeyHash;

pub use aihub_apikey::pattern::{
    parse_ip_net, IpAllowlist, IpNet, Pattern, PatternError, Patterns,
};

use crate::error::AuthFailure;

/// A key's limits as stored: its own, its developer's overrides, its developer's plan. Records
/// share equal limits (`Arc`, through the [`Interner`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KeyLimits {
    /// The developer's plan; `None` (YAML keys without `plan`) = no plan limits.
    pub plan: Option<Arc<str>>,
    pub key_rpm: Option<u32>,
    pub key_tpm: Option<u32>,
    pub dev_rpm: Option<u32>,
    pub dev_tpm: Option<u32>,
    /// Monthly tokens instead of the plan's included tokens.
    pub dev_quota_tokens: Option<u64>,
    /// The developer's monthly overage spend cap, nano-USD.
    pub spend_cap_nanos: Option<i64>,
}

/// Where a key record came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeySource {
    /// The YAML `keys:` list.
    #[default]
    Declared,
    /// The control-plane database, through the change feed.
    ControlPlane,
}

/// Last-used times are recorded at most once per this many milliseconds per key, so a busy key
/// does not write its cache line on every request.
pub const LAST_USED_GRANULARITY_MS: u64 = 1_000;

/// Everything the gateway knows about a key. Never holds the key itself. Kept within 136
/// bytes: with its `Arc` counts, 152, which the allocator serves from its 160-byte blocks even
/// through its aligned path (mimalloc's `mi_malloc_aligned`, which Rust's `Arc` takes: a block
/// with 7 bytes to spare; at 160 bytes it takes a 192-byte one, 30 MiB more per million keys).
#[derive(Debug, Default)]
pub struct KeyRecord {
    /// sha256 of the key: what the record is found by.
    pub hash: KeyHash,
    pub key_id: Arc<str>,
    pub developer_id: Arc<str>,
    pub models: Patterns,
    pub endpoints: Patterns,
    /// Unix milliseconds from which the key is refused; `None` = never. (An expiry at the
    /// epoch itself is stored as 1 ms: both are long past.)
    pub expires_at_ms: Option<NonZeroU64>,
    pub active: bool,
    /// Client networks the key may be used from; `None` = any address. An empty list admits
    /// nobody: it only arises when every entry of a stored allowlist was invalid (fail closed).
    pub ip_allowlist: Option<Arc<IpAllowlist>>,
    pub source: KeySource,
    /// Last successful use and whether the control plane was told. Control-plane keys only.
    pub last_use: LastUse,
    /// The key's, its developer's and its plan's limits (resolved per request).
    pub limits: Arc<KeyLimits>,
    /// Requests in flight on this node (the plan's concurrency cap). A key update does not
    /// reset it while requests admitted on the older version are in flight (see [`InFlight`]).
    pub in_flight: InFlight,
}

/// When a key was last used, for the control plane, in one word: unix milliseconds shifted
/// left by one, the low bit set once the control plane was told. (One word, not two: see
/// [`KeyRecord`]'s size.)
#[derive(Debug, Default)]
pub struct LastUse(AtomicU64);

/// A use not reported yet, from [`LastUse::unreported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreported(u64);

impl Unreported {
    /// Unix milliseconds.
    pub fn ms(self) -> u64 {
        self.0 >> 1
    }
}

impl LastUse {
    /// Notes a use at `now_ms`, at most once per [`LAST_USED_GRANULARITY_MS`].
    #[inline]
    pub fn mark(&self, now_ms: u64) {
        if now_ms >= self.ms() + LAST_USED_GRANULARITY_MS {
            self.0.store(now_ms << 1, Ordering::Relaxed);
        }
    }

    /// Last use, unix milliseconds (0 = none noted).
    pub fn ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed) >> 1
    }

    /// The last use, if the control plane was not told yet.
    pub fn unreported(&self) -> Option<Unreported> {
        let v = self.0.load(Ordering::Relaxed);
        (v != 0 && v & 1 == 0).then_some(Unreported(v))
    }

    /// Notes `use_` as told to the control plane, unless a later use was noted since.
    pub fn reported(&self, use_: Unreported) {
        let _ = self
            .0
            .compare_exchange(use_.0, use_.0 | 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Takes over an older version's last use, when it is the later one.
    pub fn carry_from(&self, older: &LastUse) {
        self.0
            .fetch_max(older.0.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A key's count of requests in flight ([`KeyRecord::in_flight`]; dereferences to the
/// counter). Held in the record (no allocation of its own: a million keys, 24 MiB less). When a
/// synced key is updated while its current version may still be used by a request (requests
/// admitted on it are in flight, or a request holds it, looked up but not admitted yet, for
/// instance while its body is read), the new version counts on the same counter, the one of
/// the version it points to (kept alive until the key is next replaced while nothing holds the
/// older versions, or removed); otherwise the new version starts its own. So every version of
/// a key in use counts on one counter and the plan's cap holds across updates. Declared keys
/// are only ever replaced whole, on reload, whose unchanged keys keep their records.
#[derive(Debug)]
pub enum InFlight {
    Own(AtomicU32),
    /// The count of an earlier version of the key (whose own `in_flight` is `Own`).
    Of(Arc<KeyRecord>),
}

impl InFlight {
    /// The count for a new version of the key whose current version is `old`, as held by the
    /// store and by the caller's lookup (any further holder is a request).
    pub fn next_version(old: &Arc<KeyRecord>) -> InFlight {
        // Holders beyond the store and the caller: requests that looked `old` up.
        let old_held = Arc::strong_count(old) > 2;
        let (root, root_held) = match &old.in_flight {
            // `old` holds the root once; any other holder is a request or a version held by one.
            InFlight::Of(root) => (root, Arc::strong_count(root) > 1),
            InFlight::Own(_) => (old, false),
        };
        if old_held || root_held || root.in_flight.load(Ordering::Relaxed) > 0 {
            InFlight::Of(Arc::clone(root))
        } else {
            InFlight::default()
        }
    }
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::Own(AtomicU32::new(0))
    }
}

impl std::ops::Deref for InFlight {
    type Target = AtomicU32;

    #[inline]
    fn deref(&self) -> &AtomicU32 {
        match self {
            InFlight::Own(c) => c,
            InFlight::Of(root) => &root.in_flight,
        }
    }
}

/// An expiry in unix milliseconds as [`KeyRecord::expires_at_ms`] holds it.
pub fn expiry_ms(ms: u64) -> Option<NonZeroU64> {
    Some(NonZeroU64::new(ms).unwrap_or(NonZeroU64::MIN))
}

impl KeyRecord {
    /// Whether the key may be used at `now_ms` (unix milliseconds). A key is refused from its
    /// expiry instant on, inclusive.
    pub fn check_usable(&self, now_ms: u64) -> Result<(), AuthFailure> {
        if !self.active {
            return Err(AuthFailure::Disabled);
        }
        match self.expires_at_ms {
            Some(exp) if now_ms >= exp.get() => Err(AuthFailure::Expired),
            _ => Ok(()),
        }
    }

    /// Whether a client at `ip` may use the key. IPv4-mapped IPv6 addresses are compared as
    /// IPv4; a client without an IP address (Unix socket) passes only keys without a list.
    #[inline]
    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        match &self.ip_allowlist {
            None => true,
            Some(nets) => ip.is_some_and(|ip| nets.contains(&ip.to_canonical())),
        }
    }

    /// Notes a successful use at `now_ms` for last-used reporting: one relaxed load, and a
    /// store at most once per [`LAST_USED_GRANULARITY_MS`]. Declared keys are not reported.
    #[inline]
    pub fn mark_used(&self, now_ms: u64) {
        if self.source == KeySource::ControlPlane {
            self.last_use.mark(now_ms);
        }
    }
}

/// Shares equal strings, pattern lists, allowlists and limits between key records: with a
/// million keys, per-key copies of the same developer id and permissions would dominate memory.
#[derive(Default)]
pub struct Interner {
    strings: HashSet<Arc<str>, foldhash::fast::RandomState>,
    patterns: HashMap<Vec<String>, Patterns, foldhash::fast::RandomState>,
    nets: HashMap<Vec<String>, Arc<IpAllowlist>, foldhash::fast::RandomState>,
    limits: HashSet<Arc<KeyLimits>, foldhash::fast::RandomState>,
}

impl Interner {
    /// An interner with room for `strings` strings (developer ids).
    pub fn with_capacity(strings: usize) -> Self {
        Interner {
            strings: HashSet::with_capacity_and_hasher(strings, Default::default()),
            ..Interner::default()
        }
    }

    pub fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(Arc::clone(&shared));
        shared
    }

    /// Makes `s` the shared copy of its text, unless there is one already.
    pub fn adopt(&mut self, s: &Arc<str>) {
        if !self.strings.contains(&**s) {
            self.strings.insert(Arc::clone(s));
        }
    }

    /// Equal limits, shared (plan names included).
    pub fn limits(&mut self, mut limits: KeyLimits) -> Arc<KeyLimits> {
        if let Some(shared) = self.limits.get(&limits) {
            return Arc::clone(shared);
        }
        limits.plan = limits.plan.map(|p| self.string(&p));
        let shared = Arc::new(limits);
        self.limits.insert(Arc::clone(&shared));
        shared
    }

    pub fn patterns(&mut self, list: &[String]) -> Result<Patterns, PatternError> {
        if let Some(shared) = self.patterns.get(list) {
            return Ok(shared.clone());
        }
        let parsed = Patterns::parse(list)?;
        self.patterns.insert(list.to_vec(), parsed.clone());
        Ok(parsed)
    }

    /// Like [`Interner::patterns`], but keeps the valid patterns of a list with invalid ones
    /// (returned as errors): for stored lists, where dropping a pattern only narrows the key.
    pub fn patterns_lenient(&mut self, list: &[String]) -> (Patterns, Vec<PatternError>) {
        match self.patterns(list) {
            Ok(p) => (p, Vec::new()),
            Err(_) => Patterns::parse_lenient(list),
        }
    }

    /// An IP allowlist: `None` for an empty list (any address).
    pub fn ip_allowlist(
        &mut self,
        list: &[String],
    ) -> Result<Option<Arc<IpAllowlist>>, PatternError> {
        if list.is_empty() {
            return Ok(None);
        }
        if let Some(shared) = self.nets.get(list) {
            return Ok(Some(Arc::clone(shared)));
        }
        let parsed = Arc::new(IpAllowlist::new(
            list.iter()
                .map(|s| parse_ip_net(s))
                .collect::<Result<Vec<_>, _>>()?,
        ));
        self.nets.insert(list.to_vec(), Arc::clone(&parsed));
        Ok(Some(parsed))
    }

    /// Like [`Interner::ip_allowlist`], but keeps the valid entries of a list with invalid
    /// ones. A non-empty list stays non-empty in meaning: if no entry is valid, the result
    /// admits nobody rather than everybody.
    pub fn ip_allowlist_lenient(
        &mut self,
        list: &[String],
    ) -> (Option<Arc<IpAllowlist>>, Vec<PatternError>) {
        match self.ip_allowlist(list) {
            Ok(nets) => (nets, Vec::new()),
            Err(_) => {
                let (ok, errors): (Vec<_>, Vec<_>) = list
                    .iter()
                    .map(|s| parse_ip_net(s))
                    .partition(Result::is_ok);
                let nets: Vec<IpNet> = ok.into_iter().filter_map(Result::ok).collect();
                (
                    Some(Arc::new(IpAllowlist::new(nets))),
                    errors.into_iter().filter_map(Result::err).collect(),
                )
            }
        }
    }

    /// Number of distinct values held (to bound the interner of a long-running sync: it can
    /// be rebuilt when it grows far beyond the keys it serves).
    pub fn len(&self) -> usize {
        self.strings.len() + self.patterns.len() + self.nets.len() + self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

mod store;

pub use store::{
    DeclaredStore, KeySet, KeyStore, KeyTable, MemoryKeyStore, PrehashedHasher, PrehashedState,
};

/// Checks a presented key end to end: format and checksum (no lookup when malformed), lookup by
/// sha256, active flag and expiry at `now_ms`.
#[inline]
pub fn authenticate(
    store: &dyn KeyStore,
    presented: Option<&str>,
    now_ms: u64,
) -> Result<Arc<KeyRecord>, AuthFailure> {
    let presented = presented.ok_or(AuthFailure::Missing)?;
    let hash = aihub_apikey::parse(presented).map_err(AuthFailure::Malformed)?;
    let record = store.get(&hash).ok_or(AuthFailure::NotFound)?;
    record.check_usable(now_ms)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(active: bool, expires_at_ms: Option<u64>) -> KeyRecord {
        let expires_at_ms = expires_at_ms.and_then(expiry_ms);
        KeyRecord {
            key_id: "key_1".into(),
            developer_id: "dev_1".into(),
            models: Patterns::parse(&["gpt-4o*", "demo"]).unwrap(),
            endpoints: Patterns::any(),
            expires_at_ms,
            active,
            ..KeyRecord::default()
        }
    }

    #[test]
    fn ip_allowlists() {
        let mut interner = Interner::default();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let open = record(true, None);
        assert!(open.allows_ip(ip("203.0.113.9")) && open.allows_ip(None));
        let list = vec!["10.0.0.0/8".to_owned(), "2001:db8::1".to_owned()];
        let only = KeyRecord {
            ip_allowlist: interner.ip_allowlist(&list).unwrap(),
            ..record(true, None)
        };
        assert!(only.allows_ip(ip("10.9.8.7")) && only.allows_ip(ip("::ffff:10.1.1.1")));
        assert!(only.allows_ip(ip("2001:db8::1")) && !only.allows_ip(ip("2001:db8::2")));
        assert!(!only.allows_ip(ip("127.0.0.1")) && !only.allows_ip(None));
        assert!(interner.ip_allowlist(&[]).unwrap().is_none());
        // A stored list whose entries are all invalid admits nobody.
        let (nets, errors) = interner.ip_allowlist_lenient(&["nope".to_owned()]);
        let closed = KeyRecord {
            ip_allowlist: nets,
            ..record(true, None)
        };
        assert_eq!(errors.len(), 1);
        assert!(!closed.allows_ip(ip("127.0.0.1")));
    }

    #[test]
    fn last_use_is_recorded_for_synced_keys_once_per_granule() {
        let declared = record(true, None);
        declared.mark_used(5_000);
        assert_eq!(declared.last_use.ms(), 0);
        let synced = KeyRecord {
            source: KeySource::ControlPlane,
            ..record(true, None)
        };
        assert_eq!(synced.last_use.unreported(), None);
        synced.mark_used(5_000);
        synced.mark_used(5_500);
        assert_eq!(synced.last_use.ms(), 5_000);
        let told = synced.last_use.unreported().unwrap();
        assert_eq!(told.ms(), 5_000);
        synced.last_use.reported(told);
        assert_eq!(synced.last_use.unreported(), None);
        // A use noted after the report was read stays to be reported.
        synced.mark_used(6_000);
        let told = synced.last_use.unreported().unwrap();
        synced.mark_used(7_000);
        synced.last_use.reported(told);
        assert_eq!(
            synced.last_use.unreported().map(Unreported::ms),
            Some(7_000)
        );
        // A new version takes over the later use (and whether it was told).
        let next = KeyRecord::default();
        next.last_use.carry_from(&synced.last_use);
        assert_eq!(next.last_use.unreported().map(Unreported::ms), Some(7_000));
    }

    #[test]
    fn key_set_layers() {
        let set = KeySet::new(0, true);
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        set.declared
            .replace_all(Arc::new(KeyTable::new([Arc::new(KeyRecord {
                hash: a,
                ..record(true, None)
            })])));
        set.synced.insert(a, record(false, None));
        set.synced.insert(b, record(true, None));
        // The control-plane record governs a key in both layers.
        assert!(!set.get(&a).unwrap().active);
        assert_eq!(set.len(), 3);
        // Replacing the declared layer leaves synced keys alone.
        set.declared.replace_all(Arc::default());
        assert!(set.get(&b).is_some() && set.get(&a).is_some());
        set.synced.remove(&a);
        assert!(set.get(&a).is_none());
    }

    #[test]
    fn authentication_outcomes() {
        let store = MemoryKeyStore::new();
        let good = aihub_apikey::generate();
        let off = aihub_apikey::generate();
        let old = aihub_apikey::generate();
        store.insert(KeyHash::of(&good), record(true, None));
        store.insert(KeyHash::of(&off), record(false, None));
        store.insert(KeyHash::of(&old), record(true, Some(1_000)));

        assert!(authenticate(&store, Some(&good), 5).is_ok());
        assert_eq!(
            authenticate(&store, None, 5).unwrap_err(),
            AuthFailure::Missing
        );
        assert!(matches!(
            authenticate(&store, Some("ahub_dev_short"), 5).unwrap_err(),
            AuthFailure::Malformed(_)
        ));
        let unknown = aihub_apikey::generate();
        assert_eq!(
            authenticate(&store, Some(&unknown), 5).unwrap_err(),
            AuthFailure::NotFound
        );
        assert_eq!(
            authenticate(&store, Some(&off), 5).unwrap_err(),
            AuthFailure::Disabled
        );
        // Refused at the exact expiry instant, accepted one millisecond before.
        assert!(authenticate(&store, Some(&old), 999).is_ok());
        assert_eq!(
            authenticate(&store, Some(&old), 1_000).unwrap_err(),
            AuthFailure::Expired
        );
    }

    /// A million records must stay small: one allocation of at most 152 bytes with its `Arc`
    /// counts (see [`KeyRecord`]), pointers to shared data one word wide.
    #[test]
    fn records_stay_compact() {
        assert!(std::mem::size_of::<KeyRecord>() <= 136);
        assert_eq!(std::mem::size_of::<Patterns>(), 8);
    }

    #[test]
    fn in_flight_counts_survive_key_updates() {
        let v1 = Arc::new(record(true, None));
        // Idle: the next version counts on its own.
        let v2 = Arc::new(KeyRecord {
            in_flight: InFlight::next_version(&v1),
            ..record(true, None)
        });
        assert!(matches!(v2.in_flight, InFlight::Own(_)));
        // Busy: the next versions count on the busy one's counter.
        v2.in_flight.fetch_add(2, Ordering::Relaxed);
        let v3 = Arc::new(KeyRecord {
            in_flight: InFlight::next_version(&v2),
            ..record(true, None)
        });
        let v4 = KeyRecord {
            in_flight: InFlight::next_version(&v3),
            ..record(true, None)
        };
        v4.in_flight.fetch_add(1, Ordering::Relaxed);
        v2.in_flight.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(v3.in_flight.load(Ordering::Relaxed), 2);
        assert!(matches!(&v4.in_flight, InFlight::Of(root) if Arc::ptr_eq(root, &v2)));
        // Idle, but v3 (which counts on v2) is still held, as by a request that looked it up
        // and is not admitted yet: the next version still counts on v2.
        v2.in_flight.fetch_sub(2, Ordering::Relaxed);
        let v4 = Arc::new(v4);
        assert!(matches!(InFlight::next_version(&v4), InFlight::Of(_)));
        // Once nothing holds the older versions, the chain is let go.
        drop((v2, v3));
        assert!(matches!(InFlight::next_version(&v4), InFlight::Own(_)));
        // A version held by requests beyond the store and the lookup (not admitted yet) is
        // shared even though its count is 0.
        let (_store, _lookup, _request) = (Arc::clone(&v4), Arc::clone(&v4), Arc::clone(&v4));
        assert!(matches!(InFlight::next_version(&v4), InFlight::Of(_)));
        assert_eq!(expiry_ms(0).map(NonZeroU64::get), Some(1));
    }

    #[test]
    fn interned_limits_and_strings_are_shared() {
        let mut interner = Interner::default();
        let limits = || KeyLimits {
            plan: Some("pro".into()),
            key_rpm: Some(5),
            ..KeyLimits::default()
        };
        let (a, b) = (interner.limits(limits()), interner.limits(limits()));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(
            a.plan.as_ref().unwrap(),
            &interner.string("pro")
        ));
        assert!(!Arc::ptr_eq(&a, &interner.limits(KeyLimits::default())));
    }
}
