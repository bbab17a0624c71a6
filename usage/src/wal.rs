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
//! Records are written by the request path itself, before its response ends (`commit`):
//! unbuffered appends to the page cache, several records per write under concurrency. A segment
//! is `fsync`ed when it is closed. Records the file could not take (disk full, read-only) stay
//! in memory with their segment until delivered.
//!
//! Records hold client addresses and user agents: the folders this module creates are
//! owner-only (0700) and every file it writes is 0600, whatever the process umask.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Rows that are not in the file (it could not be written): the segment's rows stay in
    /// memory until delivered, whatever the memory policy for other segments.
    pub unwritten: usize,
    /// The rows, still in memory for a segment this process just closed (saves reading and
    /// parsing the file back); `None` means read the file.
    pub rows: Option<Arc<Vec<UsageRecord>>>,
}

/// The segment currently being appended to. Lines go to the file unbuffered (the caller
/// batches them: `commit`); every record is also kept in memory for the insert.
pub struct OpenSegment {
    pub seq: u64,
    path: PathBuf,
    /// `None` once the file could not be created or written: later records are kept in memory
    /// only (a torn write is cut back first, so the file stays readable).
    file: Option<File>,
    kept: Vec<UsageRecord>,
    pub rows: usize,
    /// Rows not in the file.
    pub unwritten: usize,
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
    pub fn adopt(&self, next_seq: &AtomicU64) -> io::Result<Vec<Segment>> {
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

    fn take(&self, segment: Segment, next_seq: &AtomicU64) -> io::Result<Segment> {
        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
        let path = name(&self.dir, seq, "ready");
        fs::rename(&segment.path, &path)?;
        Ok(Segment {
            seq,
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
            unwritten: 0,
            rows: None,
        });
    }
    found.sort_by_key(|s| s.seq);
    Ok(found)
}

impl OpenSegment {
    /// Creates `dir/<seq>.open`. A failure is returned beside a segment without a file, which
    /// keeps its records in memory.
    pub fn create(dir: &Path, seq: u64) -> (OpenSegment, Option<io::Error>) {
        let path = name(dir, seq, "open");
        let (file, error) = match create_private_file(&path) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        };
        let segment = OpenSegment {
            seq,
            path,
            file,
            kept: Vec::new(),
            rows: 0,
            unwritten: 0,
            bytes: 0,
        };
        (segment, error)
    }

    /// Appends `lines` (the JSON lines of `records`, in order) with one write, and moves
    /// `records` into the segment. Returns the bytes written; on failure the records are kept
    /// in memory only, counted in `unwritten`, and the file is cut back to its last whole line.
    pub fn append(&mut self, lines: &[u8], records: &mut Vec<UsageRecord>) -> io::Result<u64> {
        let n = records.len();
        self.rows += n;
        self.kept.append(records);
        let written = match &mut self.file {
            Some(file) => file.write_all(lines).inspect_err(|_| {
                // A partial line would join the next one: cut it off (best effort).
                let _ = file.set_len(self.bytes);
            }),
            None => Err(io::Error::other("the segment file could not be created")),
        };
        match written {
            Ok(()) => {
                self.bytes += lines.len() as u64;
                Ok(lines.len() as u64)
            }
            Err(e) => {
                self.file = None;
                self.unwritten += n;
                Err(e)
            }
        }
    }

    /// Syncs the file and renames it to `.ready`. The segment comes back with its rows in any
    /// case; a failure (sync, rename) is returned beside it: the rows are then delivered from
    /// memory, and a crash before that loses those the file did not take.
    pub fn close(mut self) -> (Segment, Option<io::Error>) {
        let mut error = None;
        let mut path = self.path.clone();
        if let Some(file) = self.file.take() {
            match file.sync_data() {
                Ok(()) => {
                    let dir = self.path.parent().unwrap_or(Path::new("."));
                    let ready = name(dir, self.seq, "ready");
                    match fs::rename(&self.path, &ready) {
                        Ok(()) => path = ready,
                        Err(e) => error = Some(e), // stays `.open`: replayed all the same
                    }
                }
                Err(e) => {
                    // What the kernel holds of the file is unknown: keep every row.
                    self.unwritten = self.rows;
                    error = Some(e);
                }
            }
        }
        let segment = Segment {
            seq: self.seq,
            path,
            bytes: self.bytes,
            maybe_inserted: false,
            unwritten: self.unwritten,
            rows: Some(Arc::new(std::mem::take(&mut self.kept))),
        };
        (segment, error)
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
    match fs::remove_file(&segment.path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && segment.unwritten > 0 => Ok(()),
        other => other,
    }
}

/// Moves a refused segment into `dir` (`WAL_DIR/dead/`), with the refusal beside it. A segment
/// with rows its file lacks is written out whole from `rows` instead.
pub fn dead_letter(
    segment: &Segment,
    rows: &[UsageRecord],
    dir: &Path,
    error: &str,
) -> io::Result<PathBuf> {
    create_private_dir(dir)?;
    let target = dir.join(segment.path.file_name().unwrap_or_default());
    if segment.unwritten > 0 {
        let mut out = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut out, row).map_err(io::Error::other)?;
            out.push(b'\n');
        }
        create_private_file(&target)?.write_all(&out)?;
        remove(segment)?;
    } else {
        fs::rename(&segment.path, &target)?;
    }
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
pub(crate) mod tests {
    use super::*;

    /// What a new process finds in `base`: its own locked folder and the segments it adopted.
    fn adopt(base: &Path) -> (WalDir, Vec<Segment>) {
        let wal = WalDir::open(base).unwrap();
        let seq = AtomicU64::new(1);
        let found = wal.adopt(&seq).unwrap();
        (wal, found)
    }

    pub fn create(dir: &Path, seq: u64) -> OpenSegment {
        let (segment, error) = OpenSegment::create(dir, seq);
        assert!(error.is_none(), "{error:?}");
        segment
    }

    pub fn push(segment: &mut OpenSegment, record: UsageRecord) {
        let mut line = serde_json::to_vec(&record).unwrap();
        line.push(b'\n');
        segment.append(&line, &mut vec![record]).unwrap();
    }

    pub fn close(segment: OpenSegment) -> Segment {
        let (closed, error) = segment.close();
        assert!(error.is_none(), "{error:?}");
        closed
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
        let mut seg = create(dir.path(), 7);
        let rows: Vec<_> = (0..3).map(record).collect();
        for r in &rows {
            push(&mut seg, r.clone());
        }
        let closed = close(seg);
        assert!(!closed.maybe_inserted);
        assert_eq!(closed.rows.as_deref(), Some(&rows));
        assert_eq!(read(&closed).unwrap(), (rows.clone(), 0));

        // A second segment left open with a torn last line, as after kill -9.
        let mut open = create(dir.path(), 8);
        push(&mut open, rows[0].clone());
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

        let dead = dead_letter(&found[0], &[], &wal.dead_dir(), "Code: 53").unwrap();
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
        let mut seg = create(wal.path(), 1);
        let open_path = wal.path().join(format!("{:020}.open", 1));
        assert_eq!(mode(&open_path), 0o600);
        push(&mut seg, record(1));
        let closed = close(seg);
        assert_eq!(mode(&closed.path), 0o600);
        let dead = dead_letter(&closed, &[], &wal.dead_dir(), "Code: 53").unwrap();
        assert_eq!(mode(&dead), 0o600);
        assert_eq!(mode(&dead.with_extension("error")), 0o600);
    }

    /// A line written before `batch_id` existed reads as a live request's record.
    #[test]
    fn lines_of_older_binaries_read_without_batch_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = create(dir.path(), 1);
        let mut tagged = record(1);
        tagged.batch_id = "batch_abc".into();
        push(&mut seg, tagged.clone());
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
    fn an_appended_record_is_in_the_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = create(dir.path(), 1);
        push(&mut seg, record(1));
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
        let mut seg = create(old.path(), 1);
        push(&mut seg, record(1));
        close(seg);
        let mut open = create(old.path(), 2);
        push(&mut open, record(2));
        drop(open);

        let (new, found) = adopt(base.path());
        assert!(found.is_empty(), "the old process still holds its folder");
        let seq = AtomicU64::new(10);
        assert!(new.adopt(&seq).unwrap().is_empty());

        let old_dir = old.path().to_owned();
        drop(old); // the old process exits
        let taken = new.adopt(&seq).unwrap();
        assert_eq!(
            taken.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert_eq!(seq.load(Ordering::Relaxed), 12);
        assert!(!old_dir.exists(), "the emptied folder is removed");
        let rows: usize = taken.iter().map(|s| read(s).unwrap().0.len()).sum();
        assert_eq!(rows, 2);
        // Nothing left for a third process.
        let (_third, found) = adopt(base.path());
        assert!(found.is_empty());
        assert!(new.path().exists());
    }
}
