//! API keys as the gateway sees them: what a key may do ([`KeyRecord`]), where keys are looked
//! up ([`KeyStore`]), the in-memory map every implementation serves from ([`MemoryKeyStore`], a
//! dashmap keyed by the key's sha256), and the gateway's two-layer key set ([`KeySet`]).
//!
//! Keys come from two sources: the YAML `keys:` list (replaced whole on reload) and the control
//! plane's change feed ([`crate::keysync`]). Each fills its own map of the [`KeySet`], so a
//! reload never drops a synced key and the sync never touches a declared one. A request never
//! waits on anything but these maps. Declared records are built while the configuration is
//! checked (`Config::check`), synced ones by the key sync; this module imports neither.
//!
//! The permission patterns live in `aihub-apikey` (shared with the admin API) and are
//! re-exported here.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use aihub_apikey::KeyHash;
use dashmap::DashMap;

pub use aihub_apikey::pattern::{parse_ip_net, IpNet, Pattern, PatternError, Patterns};

use crate::error::AuthFailure;

/// A key's limits as stored: its own, its developer's overrides, its developer's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Everything the gateway knows about a key. Never holds the key itself.
#[derive(Debug, Default)]
pub struct KeyRecord {
    pub key_id: Arc<str>,
    pub developer_id: Arc<str>,
    pub models: Patterns,
    pub endpoints: Patterns,
    /// Unix milliseconds from which the key is refused; `None` = never.
    pub expires_at_ms: Option<u64>,
    pub active: bool,
    /// Client networks the key may be used from; `None` = any address. An empty list admits
    /// nobody: it only arises when every entry of a stored allowlist was invalid (fail closed).
    pub ip_allowlist: Option<Arc<[IpNet]>>,
    pub source: KeySource,
    /// Last successful use, unix milliseconds (0 = not since loaded). Control-plane keys only.
    pub last_used_ms: AtomicU64,
    /// The `last_used_ms` the control plane has already been told (written by the flusher).
    pub reported_used_ms: AtomicU64,
    /// The key's, its developer's and its plan's limits (resolved per request).
    pub limits: KeyLimits,
    /// Requests in flight on this node (the plan's concurrency cap); shared by the versions
    /// of a synced key, so a key update does not reset it.
    pub in_flight: Arc<AtomicU32>,
}

impl KeyRecord {
    /// Whether the key may be used at `now_ms` (unix milliseconds). A key is refused from its
    /// expiry instant on, inclusive.
    pub fn check_usable(&self, now_ms: u64) -> Result<(), AuthFailure> {
        if !self.active {
            return Err(AuthFailure::Disabled);
        }
        match self.expires_at_ms {
            Some(exp) if now_ms >= exp => Err(AuthFailure::Expired),
            _ => Ok(()),
        }
    }

    /// Whether a client at `ip` may use the key. IPv4-mapped IPv6 addresses are compared as
    /// IPv4; a client without an IP address (Unix socket) passes only keys without a list.
    #[inline]
    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        match &self.ip_allowlist {
            None => true,
            Some(nets) => ip.is_some_and(|ip| {
                let ip = ip.to_canonical();
                nets.iter().any(|n| n.contains(&ip))
            }),
        }
    }

    /// Notes a successful use at `now_ms` for last-used reporting: one relaxed load, and a
    /// store at most once per [`LAST_USED_GRANULARITY_MS`]. Declared keys are not reported.
    #[inline]
    pub fn mark_used(&self, now_ms: u64) {
        if self.source == KeySource::ControlPlane
            && now_ms >= self.last_used_ms.load(Ordering::Relaxed) + LAST_USED_GRANULARITY_MS
        {
            self.last_used_ms.store(now_ms, Ordering::Relaxed);
        }
    }
}

/// Shares equal strings and pattern lists between key records: with a million keys, per-key
/// copies of the same developer id and permissions would dominate memory.
#[derive(Default)]
pub struct Interner {
    strings: HashMap<String, Arc<str>>,
    patterns: HashMap<Vec<String>, Patterns>,
    nets: HashMap<Vec<String>, Arc<[IpNet]>>,
}

impl Interner {
    pub fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(s.to_owned(), Arc::clone(&shared));
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
    pub fn ip_allowlist(&mut self, list: &[String]) -> Result<Option<Arc<[IpNet]>>, PatternError> {
        if list.is_empty() {
            return Ok(None);
        }
        if let Some(shared) = self.nets.get(list) {
            return Ok(Some(Arc::clone(shared)));
        }
        let parsed: Arc<[IpNet]> = list
            .iter()
            .map(|s| parse_ip_net(s))
            .collect::<Result<Vec<_>, _>>()?
            .into();
        self.nets.insert(list.to_vec(), Arc::clone(&parsed));
        Ok(Some(parsed))
    }

    /// Like [`Interner::ip_allowlist`], but keeps the valid entries of a list with invalid
    /// ones. A non-empty list stays non-empty in meaning: if no entry is valid, the result
    /// admits nobody rather than everybody.
    pub fn ip_allowlist_lenient(
        &mut self,
        list: &[String],
    ) -> (Option<Arc<[IpNet]>>, Vec<PatternError>) {
        match self.ip_allowlist(list) {
            Ok(nets) => (nets, Vec::new()),
            Err(_) => {
                let (ok, errors): (Vec<_>, Vec<_>) = list
                    .iter()
                    .map(|s| parse_ip_net(s))
                    .partition(Result::is_ok);
                let nets: Vec<IpNet> = ok.into_iter().filter_map(Result::ok).collect();
                (
                    Some(nets.into()),
                    errors.into_iter().filter_map(Result::err).collect(),
                )
            }
        }
    }

    /// Number of distinct strings and lists held (to bound the interner of a long-running
    /// sync: it can be rebuilt when it grows far beyond the keys it serves).
    pub fn len(&self) -> usize {
        self.strings.len() + self.patterns.len() + self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the gateway finds keys. Implementations must answer from memory: this is called on
/// every request.
pub trait KeyStore: Send + Sync + 'static {
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>>;
    /// Number of keys held (for the `aihub_keys_loaded` gauge).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hashes a [`KeyHash`] by taking its first eight bytes: it is already a uniform sha256.
#[derive(Clone, Copy, Default)]
pub struct PrehashedState;

pub struct PrehashedHasher(u64);

impl BuildHasher for PrehashedState {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write(&mut self, bytes: &[u8]) {
        // `KeyHash` hashes as one `write_u64`; fold anything else in so the hasher stays total.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

/// The in-memory key map every gateway serves from.
#[derive(Default)]
pub struct MemoryKeyStore {
    map: DashMap<KeyHash, Arc<KeyRecord>, PrehashedState>,
}

impl MemoryKeyStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        MemoryKeyStore {
            map: DashMap::with_capacity_and_hasher(n, PrehashedState),
        }
    }

    pub fn insert(&self, hash: KeyHash, record: KeyRecord) {
        self.map.insert(hash, Arc::new(record));
    }

    /// Inserts a shared record; returns the one it replaced.
    pub fn insert_shared(&self, hash: KeyHash, record: Arc<KeyRecord>) -> Option<Arc<KeyRecord>> {
        self.map.insert(hash, record)
    }

    pub fn remove(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        self.map.remove(hash).map(|(_, r)| r)
    }

    /// Calls `f` on every record (for the last-used flusher; takes each shard's read lock in
    /// turn, as lookups do, so requests are not held up).
    pub fn for_each(&self, mut f: impl FnMut(&KeyHash, &Arc<KeyRecord>)) {
        for entry in self.map.iter() {
            f(entry.key(), entry.value());
        }
    }

    /// Makes the store hold exactly `keys`: upserts them, then drops every other key. Lookups
    /// running meanwhile see either the old or the new record of a key, never a gap for a key
    /// present in both sets.
    pub fn replace_all(&self, keys: Vec<(KeyHash, KeyRecord)>) {
        let keep: std::collections::HashSet<KeyHash> = keys.iter().map(|(h, _)| *h).collect();
        for (hash, record) in keys {
            self.insert(hash, record);
        }
        self.map.retain(|h, _| keep.contains(h));
    }
}

impl KeyStore for MemoryKeyStore {
    #[inline]
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        self.map.get(hash).map(|r| Arc::clone(r.value()))
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The gateway's keys in two layers: `declared` from the YAML file (replaced whole on reload)
/// and `synced` from the control plane (kept current by [`crate::keysync`]). A key present in
/// both is governed by its control-plane record while that record exists.
pub struct KeySet {
    pub declared: MemoryKeyStore,
    pub synced: MemoryKeyStore,
    /// Whether the synced layer is in use (a control plane is configured); without it,
    /// lookups cost what they did before there were two layers.
    with_sync: bool,
}

impl KeySet {
    pub fn new(declared_capacity: usize, with_sync: bool) -> Self {
        KeySet {
            declared: MemoryKeyStore::with_capacity(declared_capacity),
            synced: MemoryKeyStore::new(),
            with_sync,
        }
    }
}

impl KeyStore for KeySet {
    #[inline]
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        if self.with_sync {
            if let Some(record) = self.synced.get(hash) {
                return Some(record);
            }
        }
        self.declared.get(hash)
    }

    /// Keys held by both layers (a key listed in both counts twice).
    fn len(&self) -> usize {
        self.declared.len() + self.synced.len()
    }
}

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
        assert_eq!(declared.last_used_ms.load(Ordering::Relaxed), 0);
        let synced = KeyRecord {
            source: KeySource::ControlPlane,
            ..record(true, None)
        };
        synced.mark_used(5_000);
        synced.mark_used(5_500);
        assert_eq!(synced.last_used_ms.load(Ordering::Relaxed), 5_000);
        synced.mark_used(6_000);
        assert_eq!(synced.last_used_ms.load(Ordering::Relaxed), 6_000);
    }

    #[test]
    fn key_set_layers() {
        let set = KeySet::new(0, true);
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        set.declared.insert(a, record(true, None));
        set.synced.insert(a, record(false, None));
        set.synced.insert(b, record(true, None));
        // The control-plane record governs a key in both layers.
        assert!(!set.get(&a).unwrap().active);
        assert_eq!(set.len(), 3);
        // Replacing the declared layer leaves synced keys alone.
        set.declared.replace_all(Vec::new());
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

    #[test]
    fn replace_all_drops_missing_keys() {
        let store = MemoryKeyStore::new();
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        store.insert(a, record(true, None));
        store.replace_all(vec![(b, record(true, None))]);
        assert!(store.get(&a).is_none() && store.get(&b).is_some());
        assert_eq!(store.len(), 1);
    }
}
