//! The `keys:` section: declarative API keys, turned into key records as they are read.
//!
//! A file may declare a million keys. Each entry ([`KeyConfig`]) is read (streamed by
//! [`Config::load`](super::Config::load), see `aihub_yamlconf::parse_streaming`), checked and
//! turned into its [`KeyRecord`] at once, so no list of entries is ever held: the section is
//! kept as [`DeclaredKeys`], the finished [`KeyTable`] (shared with `Checked::keys` and then
//! with the gateway's key set, never copied) plus what [`Config::check`](super::Config::check)
//! still needs: the first invalid key's error, reported in its place among the configuration's
//! checks, and the plans the keys name.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::SystemTime;

use aihub_apikey::pattern::{parse_ip_net, Pattern};
use aihub_apikey::KeyHash;
use serde::Deserialize;

use crate::clock::unix_ms;
use crate::keys::{expiry_ms, Interner, KeyLimits, KeyRecord, KeySource, KeyTable};

/// A declarative API key: its hash and what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Stable key id, as written in usage records (`key_…`).
    pub id: String,
    /// `sha256:<64 hex>` of the whole key, as printed by `aihub keys generate`.
    pub hash: String,
    pub developer_id: String,
    #[serde(default)]
    pub name: String,
    /// Model patterns (`*`, `gpt-4o*`, exact names). Default `["*"]`.
    #[serde(default = "star")]
    pub models: Vec<String>,
    /// Endpoint patterns on the path after `/v1/` (`chat/completions`, `embeddings`, `*`).
    /// Default `["*"]`.
    #[serde(default = "star")]
    pub endpoints: Vec<String>,
    /// RFC 3339 instant from which the key is refused. Default: never.
    #[serde(default, with = "humantime_serde")]
    pub expires_at: Option<SystemTime>,
    /// Default true.
    #[serde(default = "super::default_true")]
    pub active: bool,
    /// Client addresses the key may be used from: CIDR networks (`10.0.0.0/8`) or single
    /// addresses. Other clients get 403 `ip_not_allowed`. Default: empty (any address).
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    /// The developer's plan (`limits.plans_file`): its rate limits and monthly quota apply.
    /// Default: none (only the key's own limits).
    #[serde(default)]
    pub plan: Option<String>,
    /// The key's own requests per minute (burst = the same). Default: none.
    #[serde(default)]
    pub rate_limit_rpm: Option<u32>,
    /// The key's own tokens per minute. Default: none.
    #[serde(default)]
    pub rate_limit_tpm: Option<u32>,
}

fn star() -> Vec<String> {
    vec!["*".into()]
}

/// A key's error: the key path (`keys[3].hash`) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyError {
    pub key: String,
    pub message: String,
}

/// The `keys:` section, read: the declared keys as a table, or the first invalid key's error.
#[derive(Clone, Default)]
pub struct DeclaredKeys {
    /// Entries in the section.
    len: usize,
    /// The records, when every key is valid (else empty).
    table: Arc<KeyTable>,
    error: Option<Box<KeyError>>,
    /// Each plan named, with the index of the first key naming it.
    plans: Vec<(Arc<str>, usize)>,
}

impl DeclaredKeys {
    /// Number of keys declared.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records (shared, not copied).
    pub fn table(&self) -> Arc<KeyTable> {
        Arc::clone(&self.table)
    }

    /// The first invalid key's error, in the order keys are checked.
    pub(super) fn error(&self) -> Option<&KeyError> {
        self.error.as_deref()
    }

    /// The plans the keys name, each with the first key (index) naming it, in key order.
    pub(super) fn plans(&self) -> impl Iterator<Item = (&str, usize)> {
        self.plans.iter().map(|(p, i)| (&**p, *i))
    }
}

impl fmt::Debug for DeclaredKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeclaredKeys")
            .field("len", &self.len)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Read whole (a `keys:` list that was not streamed, e.g. in flow style): still one entry at a
/// time into the builder.
impl<'de> Deserialize<'de> for DeclaredKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = DeclaredKeys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<DeclaredKeys, A::Error> {
                let mut keys = KeysBuilder::default();
                while let Some(k) = seq.next_element::<KeyConfig>()? {
                    keys.push(k);
                }
                Ok(keys.finish())
            }
        }
        d.deserialize_seq(Entries)
    }
}

/// Which check of a key failed, in the order the checks run (the first failing check of the
/// first invalid key is reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Check {
    Id,
    Hash,
    Unique,
    Developer,
    Models,
    Endpoints,
    IpAllowlist,
    RateLimitRpm,
    RateLimitTpm,
}

/// The first key failing one of its own checks (not counting duplicates).
struct Invalid {
    index: usize,
    check: Check,
    error: KeyError,
    /// Its id and hash, for the duplicate checks (which come before some of its own).
    id: String,
    hash: Option<KeyHash>,
}

/// Turns entries into records one at a time; [`KeysBuilder::finish`] checks ids and hashes
/// are unique and builds the table.
#[derive(Default)]
pub(super) struct KeysBuilder {
    interner: Interner,
    /// The table of the last load of the same file, while it is served: its records of
    /// unchanged keys are reused (a reload holds one record per key, not two, and keeps their
    /// in-flight counts).
    previous: Option<Arc<KeyTable>>,
    /// Entries pushed.
    len: usize,
    /// The records of the entries before the first invalid one, in order, with their short
    /// hashes: sorted in place into the table at the end.
    entries: Vec<(u64, Arc<KeyRecord>)>,
    invalid: Option<Invalid>,
    plans: BTreeMap<Arc<str>, usize>,
}

/// The fewest bytes a `keys:` entry takes in a file (`- {id: k, hash: <64 hex>, developer_id:
/// d}`), to size the table from the file's size: room never used is never touched (no memory),
/// and the table never grows (no copies left behind).
pub(super) const MIN_ENTRY_BYTES: u64 = 90;

impl KeysBuilder {
    /// A builder with room for `n` keys, reusing the records of `previous` (the table the
    /// gateway serves) for the keys that did not change.
    pub fn new(n: usize, previous: Option<Arc<KeyTable>>) -> Self {
        KeysBuilder {
            entries: Vec::with_capacity(n),
            previous,
            ..KeysBuilder::default()
        }
    }

    pub fn push(&mut self, k: KeyConfig) {
        let index = self.len;
        self.len += 1;
        if self.invalid.is_some() {
            // Only the first invalid key is reported; nothing after it is needed.
            return;
        }
        match self.record(index, &k) {
            Ok(record) => {
                if let Some(plan) = &record.limits.plan {
                    self.plans.entry(Arc::clone(plan)).or_insert(index);
                }
                self.entries.push((record.hash.short(), record));
            }
            Err((check, error)) => {
                self.invalid = Some(Invalid {
                    index,
                    check,
                    error,
                    hash: KeyHash::from_hex(&k.hash).ok(),
                    id: k.id,
                });
                // Freed now rather than after the whole file.
                self.interner = Interner::default();
            }
        }
    }

    /// Checks one entry and builds its record, or takes the previous table's record of the key
    /// when it is the same.
    fn record(&mut self, index: usize, k: &KeyConfig) -> Result<Arc<KeyRecord>, (Check, KeyError)> {
        // The key path is built only on this error path (a million valid keys, no allocation).
        let fail = |check, field: &str, message: String| {
            Err((
                check,
                KeyError {
                    key: format!("keys[{index}].{field}"),
                    message,
                },
            ))
        };
        if k.id.is_empty() {
            return fail(Check::Id, "id", format!("`{}` is empty or repeated", k.id));
        }
        let Ok(hash) = KeyHash::from_hex(&k.hash) else {
            return fail(
                Check::Hash,
                "hash",
                "expected `sha256:` and 64 hex digits".into(),
            );
        };
        if k.developer_id.is_empty() {
            return fail(Check::Developer, "developer_id", "empty".into());
        }
        // The first invalid entry of a list, named by its index (only on this error path).
        let first_invalid = |list: &[String], parse: &dyn Fn(&str) -> Option<String>| {
            list.iter()
                .enumerate()
                .find_map(|(j, p)| parse(p).map(|m| (j, m)))
                .expect("a list that fails to parse has an invalid entry")
        };
        let pattern_error = |p: &str| Pattern::parse(p).err().map(|e| e.to_string());
        let Ok(models) = self.interner.patterns(&k.models) else {
            let (j, m) = first_invalid(&k.models, &pattern_error);
            return fail(Check::Models, &format!("models[{j}]"), m);
        };
        let Ok(endpoints) = self.interner.patterns(&k.endpoints) else {
            let (j, m) = first_invalid(&k.endpoints, &pattern_error);
            return fail(Check::Endpoints, &format!("endpoints[{j}]"), m);
        };
        let Ok(ip_allowlist) = self.interner.ip_allowlist(&k.ip_allowlist) else {
            let (j, m) = first_invalid(&k.ip_allowlist, &|e| {
                parse_ip_net(e).err().map(|e| e.to_string())
            });
            return fail(Check::IpAllowlist, &format!("ip_allowlist[{j}]"), m);
        };
        for (check, field, v) in [
            (Check::RateLimitRpm, "rate_limit_rpm", k.rate_limit_rpm),
            (Check::RateLimitTpm, "rate_limit_tpm", k.rate_limit_tpm),
        ] {
            if v == Some(0) {
                return fail(
                    check,
                    field,
                    "must be at least 1 (leave it out for no limit)".into(),
                );
            }
        }
        let limits = self.interner.limits(KeyLimits {
            plan: k.plan.as_deref().map(Arc::from),
            key_rpm: k.rate_limit_rpm,
            key_tpm: k.rate_limit_tpm,
            ..KeyLimits::default()
        });
        let expires_at_ms = k.expires_at.map(unix_ms).and_then(expiry_ms);
        if let Some(old) = self.previous.as_ref().and_then(|t| t.get(&hash)) {
            if *old.developer_id == *k.developer_id {
                // Other keys of the developer share the id already held.
                self.interner.adopt(&old.developer_id);
            }
            let same = *old.key_id == *k.id
                && *old.developer_id == *k.developer_id
                && old.models == models
                && old.endpoints == endpoints
                && old.expires_at_ms == expires_at_ms
                && old.active == k.active
                && old.ip_allowlist == ip_allowlist
                && old.limits == limits
                && old.source == KeySource::Declared;
            if same {
                return Ok(Arc::clone(old));
            }
        }
        Ok(Arc::new(KeyRecord {
            hash,
            key_id: k.id.as_str().into(),
            developer_id: self.interner.string(&k.developer_id),
            models,
            endpoints,
            expires_at_ms,
            active: k.active,
            ip_allowlist,
            source: KeySource::Declared,
            limits,
            ..KeyRecord::default()
        }))
    }

    /// Checks that ids and hashes are unique and builds the table (or keeps the first error).
    pub fn finish(mut self) -> DeclaredKeys {
        self.interner = Interner::default();
        self.previous = None;
        let invalid = self.invalid.take();
        // Keys `0..valid` have records; the invalid key (if any) is key `valid`, and still
        // takes part in the uniqueness checks, which come before some of its own.
        let valid = self.entries.len();
        let record = |i: usize| &*self.entries[i].1;
        let mut first: Option<(usize, Check, KeyError)> = invalid
            .as_ref()
            .map(|i| (i.index, i.check, i.error.clone()));
        let mut consider =
            |index: Option<usize>, check: Check, error: &dyn Fn(usize) -> KeyError| {
                if let Some(index) = index {
                    if first.as_ref().is_none_or(|f| (index, check) < (f.0, f.1)) {
                        first = Some((index, check, error(index)));
                    }
                }
            };
        let id = |i: usize| match &invalid {
            Some(inv) if i == valid => inv.id.as_str(),
            _ => &*record(i).key_id,
        };
        let ids = valid + usize::from(invalid.is_some());
        consider(first_repeat(ids, id), Check::Id, &|i| KeyError {
            key: format!("keys[{i}].id"),
            message: format!("`{}` is empty or repeated", id(i)),
        });
        let invalid_hash = invalid.as_ref().and_then(|inv| inv.hash);
        let hashes = valid + usize::from(invalid_hash.is_some());
        let hash = |i: usize| match invalid_hash {
            Some(h) if i == valid => h,
            _ => record(i).hash,
        };
        consider(first_repeat(hashes, hash), Check::Unique, &|i| KeyError {
            key: format!("keys[{i}].hash"),
            message: "the same key is listed twice".into(),
        });
        match first {
            Some((_, _, error)) => DeclaredKeys {
                len: self.len,
                table: Arc::default(),
                error: Some(Box::new(error)),
                plans: Vec::new(),
            },
            None => {
                let mut plans: Vec<(Arc<str>, usize)> = self.plans.into_iter().collect();
                plans.sort_by_key(|(_, i)| *i);
                let entries = std::mem::take(&mut self.entries);
                DeclaredKeys {
                    len: self.len,
                    table: Arc::new(KeyTable::from_entries(entries)),
                    error: None,
                    plans,
                }
            }
        }
    }
}

/// The first of `0..n` whose `value` is also an earlier one's. Sorts 32-bit hashes of the
/// values packed with their indices (8 bytes a value: far less than a hash set of a million
/// ids) and compares values only among equal hashes.
fn first_repeat<T: Eq + std::hash::Hash>(n: usize, value: impl Fn(usize) -> T) -> Option<usize> {
    const INDEX: u64 = u32::MAX as u64;
    assert!(n as u64 <= INDEX, "too many keys");
    let state = foldhash::fast::FixedState::default();
    let mut hashed: Vec<u64> = (0..n)
        .map(|i| (state.hash_one(value(i)) & !INDEX) | i as u64)
        .collect();
    hashed.sort_unstable();
    let mut first: Option<usize> = None;
    for run in hashed
        .chunk_by(|a, b| a & !INDEX == b & !INDEX)
        .filter(|run| run.len() > 1)
    {
        // Indices ascend within a run; its values are almost always all equal.
        for (k, &j) in run.iter().enumerate().skip(1) {
            let j = (j & INDEX) as usize;
            let v = value(j);
            if run[..k].iter().any(|&i| value((i & INDEX) as usize) == v) {
                first = Some(first.map_or(j, |f| f.min(j)));
                break;
            }
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_repeats() {
        let of = |v: &[u32]| first_repeat(v.len(), |i| v[i]);
        assert_eq!(of(&[]), None);
        assert_eq!(of(&[1, 2, 3]), None);
        assert_eq!(of(&[1, 2, 1, 2]), Some(2));
        assert_eq!(of(&[5, 6, 7, 6, 5]), Some(3));
        assert_eq!(of(&[9, 9, 9]), Some(1));
        let many: Vec<u32> = (0..100_000).chain([99_999]).collect();
        assert_eq!(of(&many), Some(100_000));
    }
}
