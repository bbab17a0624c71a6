//! Where keys are looked up: the [`KeyStore`] trait and the in-memory stores every gateway
//! serves from: [`KeyTable`] behind [`DeclaredStore`] (the YAML keys: a sorted array swapped
//! whole on reload), [`MemoryKeyStore`] (synced keys: sharded sets of record pointers) and
//! [`KeySet`] (both layers, declared first).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use aihub_apikey::KeyHash;
use arc_swap::ArcSwap;

use super::KeyRecord;

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

/// The declared keys as an immutable table: `(short hash, record)` sorted by short hash, and a
/// directory of where each value of the short hash's top bits starts (about two entries per
/// slot). A lookup reads the directory, then one or two adjacent entries: no lock, no probing.
/// 16 bytes per key plus 2-4 for the directory.
#[derive(Default)]
pub struct KeyTable {
    entries: Vec<(u64, Arc<KeyRecord>)>,
    dir: Vec<u32>,
    shift: u32,
}

impl KeyTable {
    /// A table of `records` (each found by its `hash`; the caller has refused duplicates).
    pub fn new(records: impl IntoIterator<Item = Arc<KeyRecord>>) -> KeyTable {
        KeyTable::from_entries(records.into_iter().map(|r| (r.hash.short(), r)).collect())
    }

    /// A table of `(record.hash.short(), record)` entries, sorted in place (the vector is
    /// kept as it is, spare room included: untouched, it costs no memory).
    pub fn from_entries(mut entries: Vec<(u64, Arc<KeyRecord>)>) -> KeyTable {
        debug_assert!(entries.iter().all(|(s, r)| *s == r.hash.short()));
        entries.sort_unstable_by_key(|(short, _)| *short);
        let n = entries.len();
        if n == 0 {
            return KeyTable::default();
        }
        assert!(n < u32::MAX as usize, "too many keys for one table");
        // About two entries per slot.
        let bits = (n.next_power_of_two().trailing_zeros()).clamp(2, 32) - 1;
        let shift = 64 - bits;
        let slots = 1usize << bits;
        let mut dir = Vec::with_capacity(slots + 1);
        let mut i = 0;
        for slot in 0..slots as u64 {
            while i < n && (entries[i].0 >> shift) < slot {
                i += 1;
            }
            dir.push(i as u32);
        }
        dir.push(n as u32);
        KeyTable {
            entries,
            dir,
            shift,
        }
    }

    #[inline]
    pub fn get(&self, hash: &KeyHash) -> Option<&Arc<KeyRecord>> {
        if self.entries.is_empty() {
            return None;
        }
        let short = hash.short();
        let slot = (short >> self.shift) as usize;
        let (lo, hi) = (self.dir[slot] as usize, self.dir[slot + 1] as usize);
        self.entries[lo..hi]
            .iter()
            .find(|(s, r)| *s == short && r.hash == *hash)
            .map(|(_, r)| r)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The records, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.entries.iter().map(|(_, r)| r)
    }
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable")
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl KeyStore for KeyTable {
    #[inline]
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        KeyTable::get(self, hash).cloned()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The declared layer: a [`KeyTable`] replaced whole (atomically) on reload.
#[derive(Default)]
pub struct DeclaredStore(ArcSwap<KeyTable>);

impl DeclaredStore {
    /// Serves `table` from now on. Lookups running meanwhile see the old or the new table.
    pub fn replace_all(&self, table: Arc<KeyTable>) {
        self.0.store(table);
    }

    /// The table served now.
    pub fn table(&self) -> Arc<KeyTable> {
        self.0.load_full()
    }
}

impl KeyStore for DeclaredStore {
    #[inline]
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        self.0.load().get(hash).cloned()
    }

    fn len(&self) -> usize {
        self.0.load().len()
    }
}

/// A record in a [`MemoryKeyStore`] shard, hashed and compared by its key hash.
struct Entry(Arc<KeyRecord>);

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash.hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.0.hash == other.0.hash
    }
}

impl Eq for Entry {}

impl Borrow<KeyHash> for Entry {
    fn borrow(&self) -> &KeyHash {
        &self.0.hash
    }
}

/// A set of record pointers, hashed by the records' key hashes.
type Shard = RwLock<HashSet<Entry, PrehashedState>>;

/// Fewest shards of a [`MemoryKeyStore`] (and one more than the most).
const MIN_SHARDS: usize = 64;
const MAX_SHARDS: usize = 128;

/// Slots the standard hash set allocates to hold `n` entries: a power of two, at most 7/8 used.
fn slots_for(n: usize) -> usize {
    match n {
        0 => 0,
        1..4 => 4,
        4..8 => 8,
        _ => (n * 8).div_ceil(7).next_power_of_two(),
    }
}

/// The shards of a [`MemoryKeyStore`].
struct Shards(Box<[Shard]>);

impl Shards {
    /// Shards for `n` keys: the number of them (64 to 127) for which their sets need the fewest
    /// slots. (Each set's slots are a power of two: with a fixed number of shards, a million
    /// keys would leave them half empty, 9 MiB more.)
    fn sized(n: usize) -> Shards {
        let count = (MIN_SHARDS..MAX_SHARDS)
            .min_by_key(|&s| s * slots_for(n.div_ceil(s)))
            .unwrap_or(MIN_SHARDS);
        let per_shard = n.div_ceil(count);
        Shards(
            (0..count)
                .map(|_| RwLock::new(HashSet::with_capacity_and_hasher(per_shard, PrehashedState)))
                .collect(),
        )
    }

    /// The shard of a hash, from bits the sets do not use (their slot index takes the low
    /// bits, their tag the top seven).
    #[inline]
    fn of(&self, hash: &KeyHash) -> &Shard {
        let bits = (hash.short() >> 25) & u64::from(u32::MAX);
        &self.0[((bits * self.0.len() as u64) >> 32) as usize]
    }
}

/// The in-memory key map of the synced layer: record pointers in sharded hash sets (one word
/// a slot; the record holds its hash). Lookups take one shard's read lock. The shards are
/// replaced (re-counted) only while the map is empty: by [`MemoryKeyStore::reserve`] and
/// [`MemoryKeyStore::clear`].
pub struct MemoryKeyStore {
    shards: ArcSwap<Shards>,
}

impl Default for MemoryKeyStore {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl MemoryKeyStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        MemoryKeyStore {
            shards: ArcSwap::from_pointee(Shards::sized(n)),
        }
    }

    /// Inserts `record` as the key `hash` (setting its `hash`).
    pub fn insert(&self, hash: KeyHash, mut record: KeyRecord) {
        record.hash = hash;
        self.insert_shared(Arc::new(record));
    }

    /// Inserts a shared record under its `hash`; returns the one it replaced. Lookups see the
    /// old or the new record, never neither.
    pub fn insert_shared(&self, record: Arc<KeyRecord>) -> Option<Arc<KeyRecord>> {
        let shards = self.shards.load();
        let mut shard = shards
            .of(&record.hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        shard.replace(Entry(record)).map(|e| e.0)
    }

    pub fn remove(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        let shards = self.shards.load();
        let mut shard = shards
            .of(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        shard.take(hash).map(|e| e.0)
    }

    /// Makes room for `n` more keys, so that loading them does not grow the sets step by step.
    /// An empty map is re-sharded for `n` keys. (Only the key sync writes to the map: nothing
    /// is inserted meanwhile.)
    pub fn reserve(&self, n: usize) {
        if self.is_empty() {
            self.shards.store(Arc::new(Shards::sized(n)));
            return;
        }
        let shards = self.shards.load();
        let per_shard = n.div_ceil(shards.0.len());
        for shard in shards.0.iter() {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve(per_shard);
        }
    }

    /// Drops every key (and the memory of the sets).
    pub fn clear(&self) {
        self.shards.store(Arc::new(Shards::sized(0)));
    }

    /// Calls `f` on every record (for the last-used flusher and snapshots; takes each shard's
    /// read lock in turn, as lookups do, so requests are not held up).
    pub fn for_each(&self, mut f: impl FnMut(&KeyHash, &Arc<KeyRecord>)) {
        for shard in self.shards.load().0.iter() {
            for entry in shard.read().unwrap_or_else(PoisonError::into_inner).iter() {
                f(&entry.0.hash, &entry.0);
            }
        }
    }
}

impl KeyStore for MemoryKeyStore {
    #[inline]
    fn get(&self, hash: &KeyHash) -> Option<Arc<KeyRecord>> {
        let shards = self.shards.load();
        let shard = shards
            .of(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard.get(hash).map(|e| Arc::clone(&e.0))
    }

    fn len(&self) -> usize {
        self.shards
            .load()
            .0
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// The gateway's keys in two layers: `declared` from the YAML file (replaced whole on reload)
/// and `synced` from the control plane (kept current by [`crate::keysync`]). A key present in
/// both is governed by its control-plane record while that record exists.
pub struct KeySet {
    pub declared: DeclaredStore,
    pub synced: MemoryKeyStore,
    /// Whether the synced layer is in use (a control plane is configured); without it,
    /// lookups cost what they did before there were two layers.
    with_sync: bool,
}

impl KeySet {
    /// `_declared_capacity` is not needed any more (the declared table is built whole, to
    /// size); kept for callers.
    pub fn new(_declared_capacity: usize, with_sync: bool) -> Self {
        KeySet {
            declared: DeclaredStore::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(active: bool, expires_at_ms: Option<u64>) -> KeyRecord {
        KeyRecord {
            key_id: "key_1".into(),
            developer_id: "dev_1".into(),
            expires_at_ms: expires_at_ms.and_then(super::super::expiry_ms),
            active,
            ..KeyRecord::default()
        }
    }

    #[test]
    fn tables_find_every_key_and_only_those() {
        for n in [0usize, 1, 2, 3, 5, 100, 10_000] {
            let hashes: Vec<KeyHash> = (0..n).map(|i| KeyHash::of(&i.to_string())).collect();
            let table = KeyTable::new(hashes.iter().enumerate().map(|(i, h)| {
                Arc::new(KeyRecord {
                    hash: *h,
                    key_id: i.to_string().into(),
                    ..KeyRecord::default()
                })
            }));
            assert_eq!(table.len(), n);
            for (i, h) in hashes.iter().enumerate() {
                assert_eq!(&*table.get(h).expect("present").key_id, i.to_string());
            }
            assert!(table.get(&KeyHash::of("absent")).is_none());
            // Same short hash (first eight bytes), different key: not found.
            if let Some(h) = hashes.first() {
                let mut twin = *h;
                twin.0[31] ^= 1;
                assert!(table.get(&twin).is_none());
            }
        }
        // Extreme short hashes land in the first and last slots.
        let (lo, hi) = (KeyHash([0; 32]), KeyHash([0xff; 32]));
        let table = KeyTable::new([lo, hi].map(|hash| {
            Arc::new(KeyRecord {
                hash,
                ..KeyRecord::default()
            })
        }));
        assert!(table.get(&lo).is_some() && table.get(&hi).is_some());
    }

    #[test]
    fn shard_counts_fill_the_sets() {
        // A million keys: the sets' slots at least 85 % used, not half.
        let n = 1_000_000;
        let shards = Shards::sized(n);
        let slots: usize = shards.0.len() * slots_for(n.div_ceil(shards.0.len()));
        assert!(
            n as f64 / slots as f64 > 0.85,
            "{} shards, {slots} slots",
            shards.0.len()
        );
        assert_eq!(Shards::sized(0).0.len(), MIN_SHARDS);
        // Keys spread over every shard.
        let mut seen = vec![0usize; shards.0.len()];
        for i in 0..100_000u32 {
            let h = KeyHash::of(&i.to_string());
            let s = shards.of(&h) as *const Shard;
            let at = shards.0.iter().position(|x| std::ptr::eq(x, s)).unwrap();
            seen[at] += 1;
        }
        assert!(seen.iter().all(|&c| c > 600), "{seen:?}");
        // Re-sharded while empty, kept while not.
        let store = MemoryKeyStore::new();
        store.reserve(n);
        assert_eq!(store.shards.load().0.len(), shards.0.len());
        store.insert(KeyHash::of("a"), record(true, None));
        store.reserve(10);
        assert!(store.get(&KeyHash::of("a")).is_some());
    }

    #[test]
    fn memory_store_replaces_removes_and_clears() {
        let store = MemoryKeyStore::new();
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        store.insert(a, record(true, None));
        let old = store
            .insert_shared(Arc::new(KeyRecord {
                hash: a,
                ..record(false, None)
            }))
            .expect("replaced");
        assert!(old.active && !store.get(&a).unwrap().active);
        store.insert(b, record(true, None));
        assert_eq!(store.len(), 2);
        let mut seen = Vec::new();
        store.for_each(|h, r| {
            assert_eq!(*h, r.hash);
            seen.push(*h);
        });
        seen.sort();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(seen, both);
        assert!(store.remove(&a).is_some() && store.get(&a).is_none());
        store.clear();
        assert!(store.is_empty() && store.get(&b).is_none());
    }
}
