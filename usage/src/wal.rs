//! The write-ahead log: usage records as JSON lines in numbered segment files.
//!
//! Each process writes into its own folder `WAL_DIR/<pid>-<start ms>-<n>/`, held with an exclusive
//! lock on its `LOCK` file for the life of the process ([`WalDir`]): two gateways sharing
//! `WAL_DIR` (the old and the new process of a zero-downtime upgrade) never write or send the
//! same segment. Folders whose lock is free belong to processes that ended; their segments are
//! adopted, at start and then periodically, by whichever process takes the lock first.
//!
//! `NNNNNNNNNNNNNNNNNNNN.open` is the segment being written; closing it renames it to `.ready`.
//! A segment is deleted only after its rows are confirmed in ClickHouse; one that ClickHouse
//! refuses as data moves to `WAL_DIR/dead/` with a `.error` file beside it. Adopted `.open` and
//! `.ready` files (and segments left directly in `WAL_DIR` by versions before per-process
//! folders) are replayed, oldest first. A torn last line (the process died mid-write) is
//! skipped and counted.
//!
//! Writes go through a 64 KiB buffer flushed to the OS every flush interval; the buffer is also
//! flushed when the writer is dropped, so a runtime shutdown loses nothing already received.
//!
//! Records hold client addresses and user agents: the folders this module creates are
//! owner-only (0700) and every file it writes is 0600, whatever the process umask.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::record::UsageRecord;

/// A closed segment waiting for ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// Left by an earlier process, or a previous insert attempt failed: its rows may already
    /// be in ClickHouse, so they are deduplicated before insert.
    pub maybe_inserted: bool,
    /// The rows, still in memory for a segment this process just closed (saves reading and
    /// parsing the file back); `None` means read the file.
    pub rows: Option<Arc<Vec<UsageRecord>>>,
}

/// The segment currently being appended to.
pub struct OpenSegment {
    pub seq: u64,
    path: PathBuf,
    writer: BufWriter<File>,
    kept: Vec<UsageRecord>,
    /// The line being encoded (reused: no allocation per record).
    line: Vec<u8>,
    pub rows: usize,
    pub bytes: u64,
}

fn name(dir: &Path, seq: u64, ext: &str) -> PathBuf {
    dir.join(format!("{seq:020}.{ext}"))
}

/// Creates `dir` and its missing parents with mode 0700 (an existing folder keeps its mode).
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates a new file with mode 0600 for writing; fails if it exists.
fn create_private_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// This process's folder of the WAL, locked for the life of the value.
pub struct WalDir {
    base: PathBuf,
    dir: PathBuf,
    /// The exclusive lock on `dir/LOCK` (released when the file is closed).
    _lock: File,
}

const LOCK: &str = "LOCK";

impl WalDir {
    /// Creates and locks `base/<pid>-<start ms>-<n>/` (and `base/dead/`).
    pub fn open(base: &Path) -> io::Result<WalDir> {
        create_private_dir(&base.join("dead"))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        // A counter too: two pipelines of one process (tests) started in the same millisecond.
        static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("{}-{started}-{n}", std::process::id()));
        create_private_dir(&dir)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is locked by another process", dir.display()),
            ),
            fs::TryLockError::Error(e) => e,
        })?;
        Ok(WalDir {
            base: base.to_owned(),
            dir,
            _lock: lock,
        })
    }

    /// Where this process writes its segments.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where refused segments go (shared by every process).
    pub fn dead_dir(&self) -> PathBuf {
        self.base.join("dead")
    }

    /// Takes over the segments of processes that ended (their folder's lock is free) and those
    /// left directly in the base folder by earlier versions: each is moved into this folder as
    /// `.ready` under a new number from `next_seq`, oldest first, and comes back marked
    /// `maybe_inserted` (its rows may be in ClickHouse already). Emptied folders are removed.
    pub fn adopt(&self, next_seq: &mut u64) -> io::Result<Vec<Segment>> {
        let mut adopted = Vec::new();
        let mut orphans = leftover_segments(&self.base)?;
        for entry in fs::read_dir(&self.base)? {
            let path = entry?.path();
            if path == self.dir || !path.join(LOCK).is_file() {
                continue;
            }
            let Ok(lock) = File::open(path.join(LOCK)) else {
                continue;
            };
            // Held: its process is alive (or another one is adopting it right now).
            if lock.try_lock().is_err() {
                continue;
            }
            let found = leftover_segments(&path)?;
            orphans.extend(found);
            // Keep the lock while moving: nobody else adopts these files meanwhile.
            for segment in std::mem::take(&mut orphans) {
                adopted.push(self.take(segment, next_seq)?);
            }
            fs::remove_file(path.join(LOCK))?;
            drop(lock);
            // Leaves a folder an operator put something else into.
            let _ = fs::remove_dir(&path);
        }
        for segment in orphans {
            adopted.push(self.take(segment, next_seq)?);
        }
        Ok(adopted)
    }

    fn take(&self, segment: Segment, next_seq: &mut u64) -> io::Result<Segment> {
        let path = name(&self.dir, *next_seq, "ready");
        fs::rename(&segment.path, &path)?;
        *next_seq += 1;
        Ok(Segment {
            seq: *next_seq - 1,
            path,
            ..segment
        })
    }
}

/// Segments (`.open` and `.ready`) directly in `dir`, oldest first.
fn leftover_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if ext != "open" && ext != "ready" {
            continue;
        }
        let Some(seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        found.push(Segment {
            seq,
            bytes: entry.metadata()?.len(),
            path,
            maybe_inserted: true,
            rows: None,
        });
    }
    found.sort_by_key(|s| s.seq);
    Ok(found)
}

impl OpenSegment {
    pub fn create(dir: &Path, seq: u64) -> io::Result<OpenSegment> {
        let path = name(dir, seq, "open");
        let file = create_private_file(&path)?;
        Ok(OpenSegment {
            seq,
            path,
            writer: BufWriter::with_capacity(64 * 1024, file),
            kept: Vec::new(),
            line: Vec::with_capacity(1024),
            rows: 0,
            bytes: 0,
        })
    }

    /// Appends one record (buffered); the record is also kept in memory for the insert.
    pub fn append(&mut self, record: UsageRecord) -> io::Result<()> {
        self.line.clear();
        let encoded = serde_json::to_writer(&mut self.line, &record).map_err(io::Error::other);
        self.kept.push(record);
        self.rows += 1;
        encoded?;
        self.line.push(b'\n');
        self.bytes += self.line.len() as u64;
        self.writer.write_all(&self.line)
    }

    /// Hands buffered records to the OS: from here a process crash no longer loses them.
    pub fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }

    /// Flushes, syncs and renames the segment to `.ready`.
    pub fn close(mut self) -> io::Result<Segment> {
        self.writer.flush()?;
        self.writer.get_ref().sync_data()?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let ready = name(dir, self.seq, "ready");
        fs::rename(&self.path, &ready)?;
        Ok(Segment {
            seq: self.seq,
            path: ready,
            bytes: self.bytes,
            maybe_inserted: false,
            rows: Some(Arc::new(std::mem::take(&mut self.kept))),
        })
    }
}

/// Reads a segment's records; returns them and the number of unreadable lines (a torn tail).
pub fn read(segment: &Segment) -> io::Result<(Vec<UsageRecord>, usize)> {
    let mut rows = Vec::new();
    let mut bad = 0;
    for line in BufReader::new(File::open(&segment.path)?).lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<UsageRecord>(&line) {
            Ok(r) => rows.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((rows, bad))
}

/// Deletes a delivered segment.
pub fn remove(segment: &Segment) -> io::Result<()> {
    fs::remove_file(&segment.path)
}

/// Moves a refused segment into `dir` (`WAL_DIR/dead/`), with the refusal beside it.
pub fn dead_letter(segment: &Segment, dir: &Path, error: &str) -> io::Result<PathBuf> {
    create_private_dir(dir)?;
    let target = dir.join(segment.path.file_name().unwrap_or_default());
    fs::rename(&segment.path, &target)?;
    let note = target.with_extension("error");
    // A refusal written again for a segment of the same name replaces the old note.
    match fs::remove_file(&note) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create_private_file(&note)?.write_all(error.as_bytes())?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a new process finds in `base`: its own locked folder and the segments it adopted.
    fn adopt(base: &Path) -> (WalDir, Vec<Segment>) {
        let wal = WalDir::open(base).unwrap();
        let mut seq = 1;
        let found = wal.adopt(&mut seq).unwrap();
        (wal, found)
    }

    pub fn record(n: u32) -> UsageRecord {
        UsageRecord {
            request_id: uuid::Uuid::now_v7(),
            ts: 1_700_000_000 + n,
            ts_ms: 1_700_000_000_000 + u64::from(n),
            developer_id: "dev".into(),
            key_id: "key".into(),
            endpoint: "chat/completions".into(),
            method: "POST".into(),
            model: "m".into(),
            upstream_model: "m".into(),
            upstream: "u".into(),
            upstream_endpoint: "http://u/v1".into(),
            prompt_tokens: n,
            cached_tokens: 0,
            completion_tokens: 1,
            total_tokens: n + 1,
            cost_nanos: 1000,
            gateway_overhead_us: 5,
            upstream_latency_ms: 1,
            total_latency_ms: 2,
            status: 200,
            error_type: String::new(),
            streamed: 0,
            usage_estimated: 0,
            client_ip: "127.0.0.1".into(),
            user_agent: "t \"quoted\"\n".into(),
            batch_id: String::new(),
            attempts: 1,
        }
    }

    #[test]
    fn write_close_recover_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), 7).unwrap();
        let rows: Vec<_> = (0..3).map(record).collect();
        for r in &rows {
            seg.append(r.clone()).unwrap();
        }
        let closed = seg.close().unwrap();
        assert!(!closed.maybe_inserted);
        assert_eq!(closed.rows.as_deref(), Some(&rows));
        assert_eq!(read(&closed).unwrap(), (rows.clone(), 0));

        // A second segment left open with a torn last line, as after kill -9.
        let mut open = OpenSegment::create(dir.path(), 8).unwrap();
        open.append(rows[0].clone()).unwrap();
        open.flush().unwrap();
        drop(open);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(format!("{:020}.open", 8)))
            .unwrap();
        f.write_all(b"{\"request_id\":\"01").unwrap();

        let (wal, found) = adopt(dir.path());
        // Oldest first, renumbered into the new process's folder.
        assert_eq!(found.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(found
            .iter()
            .all(|s| s.maybe_inserted && s.path.starts_with(wal.path())));
        assert_eq!(read(&found[0]).unwrap(), (rows.clone(), 0));
        assert_eq!(read(&found[1]).unwrap(), (vec![rows[0].clone()], 1));

        let dead = dead_letter(&found[0], &wal.dead_dir(), "Code: 53").unwrap();
        assert!(dead.exists() && dead.with_extension("error").exists());
        remove(&found[1]).unwrap();
        drop(wal);
        assert!(adopt(dir.path()).1.is_empty());
    }

    /// The folders and files the WAL creates are owner-only whatever the umask (0022 in
    /// tests, as on most systems), from `WalDir::open`, which the pipeline's `open` starts with.
    #[test]
    fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/wal");
        let (wal, found) = adopt(&dir);
        assert!(found.is_empty());
        for d in [
            tmp.path().join("data"),
            dir.clone(),
            dir.join("dead"),
            wal.path().into(),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&wal.path().join(LOCK)), 0o600);
        let mut seg = OpenSegment::create(wal.path(), 1).unwrap();
        let open_path = wal.path().join(format!("{:020}.open", 1));
        assert_eq!(mode(&open_path), 0o600);
        seg.append(record(1)).unwrap();
        let closed = seg.close().unwrap();
        assert_eq!(mode(&closed.path), 0o600);
        let dead = dead_letter(&closed, &wal.dead_dir(), "Code: 53").unwrap();
        assert_eq!(mode(&dead), 0o600);
        assert_eq!(mode(&dead.with_extension("error")), 0o600);
    }

    /// A line written before `batch_id` existed reads as a live request's record.
    #[test]
    fn lines_of_older_binaries_read_without_batch_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), 1).unwrap();
        let mut tagged = record(1);
        tagged.batch_id = "batch_abc".into();
        seg.append(tagged.clone()).unwrap();
        drop(seg);
        let path = dir.path().join(format!("{:020}.open", 1));
        let line = fs::read_to_string(&path).unwrap();
        let old = line.replace(",\"batch_id\":\"batch_abc\"", "");
        assert_ne!(old, line);
        fs::write(&path, format!("{old}{line}")).unwrap();
        let (_wal, found) = adopt(dir.path());
        let (rows, torn) = read(&found[0]).unwrap();
        assert_eq!(torn, 0);
        assert_eq!(rows[0].batch_id, "");
        assert_eq!(rows[1], tagged);
    }

    #[test]
    fn dropping_the_writer_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), 1).unwrap();
        seg.append(record(1)).unwrap();
        drop(seg);
        let (_wal, found) = adopt(dir.path());
        assert_eq!(read(&found[0]).unwrap().0.len(), 1);
    }

    /// Two processes on one WAL folder (an upgrade's old and new gateway): neither takes the
    /// other's segments while it lives; once it ended, its segments are taken once.
    #[test]
    fn a_live_process_keeps_its_segments_and_an_ended_one_is_adopted_once() {
        let base = tempfile::tempdir().unwrap();
        let (old, _) = adopt(base.path());
        let mut seg = OpenSegment::create(old.path(), 1).unwrap();
        seg.append(record(1)).unwrap();
        seg.close().unwrap();
        let mut open = OpenSegment::create(old.path(), 2).unwrap();
        open.append(record(2)).unwrap();
        drop(open);

        let (new, found) = adopt(base.path());
        assert!(found.is_empty(), "the old process still holds its folder");
        let mut seq = 10;
        assert!(new.adopt(&mut seq).unwrap().is_empty());

        let old_dir = old.path().to_owned();
        drop(old); // the old process exits
        let taken = new.adopt(&mut seq).unwrap();
        assert_eq!(
            taken.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert_eq!(seq, 12);
        assert!(!old_dir.exists(), "the emptied folder is removed");
        let rows: usize = taken.iter().map(|s| read(s).unwrap().0.len()).sum();
        assert_eq!(rows, 2);
        // Nothing left for a third process.
        let (_third, found) = adopt(base.path());
        assert!(found.is_empty());
        assert!(new.path().exists());
    }
}
