//! A local snapshot of the control-plane keys (`control_plane.snapshot_path`), so that a
//! gateway *started* while the control-plane database is unreachable can still serve the keys
//! it last knew, instead of staying not-ready.
//!
//! The file is JSON lines: a header with the feed cursor the snapshot is consistent with, then
//! one line per key (hash, never the key itself; permissions as written). It is captured in the
//! key-sync task between two feed reads (so keys and cursor agree: the capture only takes the
//! records' pointers, 8 bytes a key; records are immutable), written by a blocking task
//! to a temporary file that is synced and renamed over the old one (a crash leaves the old or
//! the new snapshot, never a torn one), mode 600. After loading it, the gateway follows the
//! feed from the snapshot's cursor as soon as the database answers.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use aihub_apikey::KeyHash;
use aihub_store::feed::Cursor;
use serde::{Deserialize, Serialize};

use crate::keys::{Interner, KeyLimits, KeyRecord, KeySource, MemoryKeyStore};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    cursor_seq: i64,
    cursor_id: String,
    keys: usize,
    written_at_ms: u64,
}

/// One key as stored in the snapshot.
#[derive(Serialize, Deserialize)]
pub struct SnapshotKey {
    id: String,
    hash: String,
    developer_id: String,
    models: Vec<String>,
    endpoints: Vec<String>,
    /// `None` = any address; `Some([])` = nobody (kept: it fails closed).
    ip_allowlist: Option<Vec<String>>,
    expires_at_ms: Option<u64>,
    active: bool,
    /// Absent in snapshots written before limits existed: no limits until the feed says.
    #[serde(default)]
    limits: crate::keys::KeyLimits,
}

impl SnapshotKey {
    fn of(r: &KeyRecord) -> SnapshotKey {
        SnapshotKey {
            id: r.key_id.to_string(),
            hash: r.hash.to_hex(),
            developer_id: r.developer_id.to_string(),
            models: r.models.to_strings(),
            endpoints: r.endpoints.to_strings(),
            ip_allowlist: r
                .ip_allowlist
                .as_ref()
                .map(|nets| nets.nets().iter().map(ToString::to_string).collect()),
            expires_at_ms: r.expires_at_ms.map(|e| e.get()),
            active: r.active,
            limits: KeyLimits::clone(&r.limits),
        }
    }
}

/// Keys and the cursor they are consistent with, captured from memory.
pub struct Snapshot {
    cursor: Cursor,
    keys: Vec<Arc<KeyRecord>>,
}

/// Takes the synced keys (cheap: their pointers, no I/O; run between two feed reads).
pub fn capture(store: &MemoryKeyStore, cursor: &Cursor) -> Snapshot {
    let mut keys = Vec::with_capacity(crate::keys::KeyStore::len(store));
    store.for_each(|_, r| keys.push(Arc::clone(r)));
    Snapshot {
        cursor: cursor.clone(),
        keys,
    }
}

/// Writes `snapshot` to `path` atomically (temporary file, fsync, rename), mode 600; folders
/// it creates are owner-only (700).
pub fn write(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut out = BufWriter::new(file);
    let header = Header {
        version: VERSION,
        cursor_seq: snapshot.cursor.seq,
        cursor_id: snapshot.cursor.id.clone(),
        keys: snapshot.keys.len(),
        written_at_ms: crate::clock::now_ms(),
    };
    serde_json::to_writer(&mut out, &header)?;
    out.write_all(b"\n")?;
    for k in &snapshot.keys {
        serde_json::to_writer(&mut out, &SnapshotKey::of(k))?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a snapshot: the cursor it is consistent with and the key records to serve.
pub fn read(path: &Path) -> std::io::Result<(Cursor, Vec<Arc<KeyRecord>>)> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
    let header: Header = serde_json::from_str(&lines.next().ok_or_else(|| bad("empty".into()))??)
        .map_err(|e| bad(format!("header: {e}")))?;
    if header.version != VERSION {
        return Err(bad(format!(
            "version {} (expected {VERSION})",
            header.version
        )));
    }
    let mut interner = Interner::default();
    let mut keys = Vec::with_capacity(header.keys);
    for line in lines {
        let k: SnapshotKey =
            serde_json::from_str(&line?).map_err(|e| bad(format!("key line: {e}")))?;
        let hash = KeyHash::from_hex(&k.hash).map_err(|e| bad(format!("key {}: {e}", k.id)))?;
        let (models, _) = interner.patterns_lenient(&k.models);
        let (endpoints, _) = interner.patterns_lenient(&k.endpoints);
        // Written from a valid list (an empty one admits nobody, and stays so).
        let ip_allowlist = k
            .ip_allowlist
            .as_ref()
            .map(|list| interner.ip_allowlist_lenient(list).0.unwrap_or_default());
        let record = KeyRecord {
            hash,
            key_id: k.id.as_str().into(),
            developer_id: interner.string(&k.developer_id),
            models,
            endpoints,
            expires_at_ms: k.expires_at_ms.and_then(crate::keys::expiry_ms),
            active: k.active,
            ip_allowlist,
            source: KeySource::ControlPlane,
            limits: interner.limits(k.limits),
            ..KeyRecord::default()
        };
        keys.push(Arc::new(record));
    }
    if keys.len() != header.keys {
        return Err(bad(format!(
            "{} keys, header says {}",
            keys.len(),
            header.keys
        )));
    }
    let cursor = Cursor {
        seq: header.cursor_seq,
        id: header.cursor_id,
    };
    Ok((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyStore;

    #[test]
    fn round_trip() {
        let store = MemoryKeyStore::new();
        let mut interner = Interner::default();
        let a = KeyHash::of("a");
        let b = KeyHash::of("b");
        store.insert(
            a,
            KeyRecord {
                key_id: "key_a".into(),
                developer_id: "dev_1".into(),
                models: interner
                    .patterns(&["gpt-4o*".into(), "demo".into()])
                    .unwrap(),
                endpoints: interner.patterns(&["*".into()]).unwrap(),
                expires_at_ms: crate::keys::expiry_ms(42),
                active: true,
                ip_allowlist: interner.ip_allowlist(&["10.0.0.0/8".into()]).unwrap(),
                source: KeySource::ControlPlane,
                limits: Arc::new(KeyLimits {
                    plan: Some("pro".into()),
                    key_rpm: Some(60),
                    dev_tpm: Some(1000),
                    dev_quota_tokens: Some(5),
                    spend_cap_nanos: Some(9),
                    ..Default::default()
                }),
                ..KeyRecord::default()
            },
        );
        store.insert(
            b,
            KeyRecord {
                key_id: "key_b".into(),
                developer_id: "dev_2".into(),
                active: false,
                ip_allowlist: Some(Arc::default()),
                source: KeySource::ControlPlane,
                ..KeyRecord::default()
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap/keys.jsonl");
        let cursor = Cursor {
            seq: 7,
            id: "key_b".into(),
        };
        write(&path, &capture(&store, &cursor)).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
        let (back, keys) = read(&path).unwrap();
        assert_eq!(back, cursor);
        let loaded = MemoryKeyStore::new();
        for k in keys {
            loaded.insert_shared(k);
        }
        let ra = loaded.get(&a).unwrap();
        assert!(ra.models.matches("gpt-4o-mini") && ra.models.matches("demo"));
        assert!(!ra.models.matches("gpt-4"));
        assert_eq!(ra.expires_at_ms.map(|e| e.get()), Some(42));
        assert_eq!(ra.limits.plan.as_deref(), Some("pro"));
        assert_eq!(ra.limits.key_rpm, Some(60));
        assert_eq!(ra.limits.dev_tpm, Some(1000));
        assert_eq!(ra.limits.spend_cap_nanos, Some(9));
        assert!(ra.allows_ip(Some("10.1.2.3".parse().unwrap())));
        assert!(!ra.allows_ip(Some("192.0.2.1".parse().unwrap())));
        let rb = loaded.get(&b).unwrap();
        assert_eq!(*rb.limits, KeyLimits::default());
        assert!(!rb.active && !rb.allows_ip(Some("10.1.2.3".parse().unwrap())));
        // A torn or foreign file is refused, not half-loaded.
        std::fs::write(
            &path,
            "{\"version\":1,\"cursor_seq\":1,\"cursor_id\":\"\",\"keys\":3,\"written_at_ms\":0}\n",
        )
        .unwrap();
        assert!(read(&path).is_err());
    }
}
