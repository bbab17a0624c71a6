//! API keys as the gateway sees them: what a key may do ([`KeyRecord`]), where keys are looked
//! up ([`KeyStore`]), and the in-memory store every implementation serves from
//! ([`MemoryKeyStore`], a dashmap keyed by the key's sha256).
//!
//! In declarative mode the store is filled from the YAML `keys:` list (and refilled on reload);
//! the control plane's key sync will fill the same store from its change feed. A request never
//! waits on anything but this map.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aihub_apikey::KeyHash;
use dashmap::DashMap;

use crate::config::KeyConfig;
use crate::error::AuthFailure;

/// A model or endpoint pattern: `*`, `prefix*`, or an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl Pattern {
    pub fn parse(p: &str) -> Result<Pattern, String> {
        match p {
            "" => Err("empty pattern".into()),
            "*" => Ok(Pattern::Any),
            _ => match p.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => Ok(Pattern::Prefix(prefix.into())),
                None if !p.contains('*') => Ok(Pattern::Exact(p.into())),
                _ => Err(format!("`{p}`: `*` is only allowed at the end")),
            },
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => s.starts_with(&**p),
            Pattern::Exact(e) => &**e == s,
        }
    }
}

/// A list of patterns; empty matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns(Arc<[Pattern]>);

impl Patterns {
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Patterns, String> {
        let v: Result<Vec<_>, _> = list.iter().map(|p| Pattern::parse(p.as_ref())).collect();
        Ok(Patterns(v?.into()))
    }

    pub fn any() -> Patterns {
        Patterns(Arc::from([Pattern::Any]))
    }

    pub fn matches(&self, s: &str) -> bool {
        self.0.iter().any(|p| p.matches(s))
    }
}

/// Everything the gateway knows about a key. Never holds the key itself.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub key_id: Arc<str>,
    pub developer_id: Arc<str>,
    pub models: Patterns,
    pub endpoints: Patterns,
    /// Unix milliseconds from which the key is refused; `None` = never.
    pub expires_at_ms: Option<u64>,
    pub active: bool,
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

    /// Builds a record from its YAML entry, sharing identical developer ids and permission
    /// lists with earlier records through `interner` (most keys share them).
    pub fn from_config(
        k: &KeyConfig,
        interner: &mut Interner,
    ) -> Result<(KeyHash, KeyRecord), String> {
        let hash = KeyHash::from_hex(&k.hash).map_err(|e| e.to_string())?;
        Ok((
            hash,
            KeyRecord {
                key_id: k.id.as_str().into(),
                developer_id: interner.string(&k.developer_id),
                models: interner.patterns(&k.models)?,
                endpoints: interner.patterns(&k.endpoints)?,
                expires_at_ms: k.expires_at.map(unix_ms),
                active: k.active,
            },
        ))
    }
}

/// Shares equal strings and pattern lists between key records: with a million keys, per-key
/// copies of the same developer id and permissions would dominate memory.
#[derive(Default)]
pub struct Interner {
    strings: HashMap<String, Arc<str>>,
    patterns: HashMap<Vec<String>, Patterns>,
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

    pub fn patterns(&mut self, list: &[String]) -> Result<Patterns, String> {
        if let Some(shared) = self.patterns.get(list) {
            return Ok(shared.clone());
        }
        let parsed = Patterns::parse(list)?;
        self.patterns.insert(list.to_vec(), parsed.clone());
        Ok(parsed)
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

    pub fn remove(&self, hash: &KeyHash) {
        self.map.remove(hash);
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

/// Unix milliseconds of a system time (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The current time in unix milliseconds.
#[inline]
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
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
        }
    }

    #[test]
    fn patterns() {
        let p = Patterns::parse(&["gpt-4o*", "demo"]).unwrap();
        assert!(p.matches("gpt-4o-mini") && p.matches("demo"));
        assert!(!p.matches("demo2") && !p.matches("gpt-4"));
        assert!(Pattern::parse("a*b").is_err() && Pattern::parse("").is_err());
        assert!(!Patterns::parse::<&str>(&[]).unwrap().matches("x"));
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
