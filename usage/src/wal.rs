//! The write-ahead log: usage records as JSON lines in numbered segment files.
//!
//! `NNNNNNNNNNNNNNNNNNNN.open` is the segment being written; closing it renames it to `.ready`.
//! A segment is deleted only after its rows are confirmed in ClickHouse; one that ClickHouse
//! refuses as data moves to `dead/` with a `.error` file beside it. At start every `.open` and
//! `.ready` file left by an earlier process is replayed, oldest first. A torn last line (the
//! process died mid-write) is skipped and counted.
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

/// Lists segments left on disk (`.open` and `.ready`), oldest first; creates `dir` and
/// `dir/dead` when missing.
pub fn recover(dir: &Path) -> io::Result<Vec<Segment>> {
    create_private_dir(&dir.join("dead"))?;
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
        let bytes = entry.metadata()?.len();
        let path = if ext == "open" {
            let ready = name(dir, seq, "ready");
            fs::rename(&path, &ready)?;
            ready
        } else {
            path
        };
        found.push(Segment {
            seq,
            path,
            bytes,
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

/// Moves a refused segment to `dead/`, with the refusal beside it.
pub fn dead_letter(segment: &Segment, error: &str) -> io::Result<PathBuf> {
    let dir = segment.path.parent().unwrap_or(Path::new(".")).join("dead");
    create_private_dir(&dir)?;
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

        let found = recover(dir.path()).unwrap();
        assert_eq!(found.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![7, 8]);
        assert!(found.iter().all(|s| s.maybe_inserted));
        assert_eq!(read(&found[1]).unwrap(), (vec![rows[0].clone()], 1));

        let dead = dead_letter(&found[0], "Code: 53").unwrap();
        assert!(dead.exists() && dead.with_extension("error").exists());
        remove(&found[1]).unwrap();
        assert!(recover(dir.path()).unwrap().is_empty());
    }

    /// The folders and files the WAL creates are owner-only whatever the umask (0022 in
    /// tests, as on most systems), from `recover`, which the pipeline's `open` starts with.
    #[test]
    fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/wal");
        assert!(recover(&dir).unwrap().is_empty());
        for d in [tmp.path().join("data"), dir.clone(), dir.join("dead")] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        let mut seg = OpenSegment::create(&dir, 1).unwrap();
        let open_path = dir.join(format!("{:020}.open", 1));
        assert_eq!(mode(&open_path), 0o600);
        seg.append(record(1)).unwrap();
        let closed = seg.close().unwrap();
        assert_eq!(mode(&closed.path), 0o600);
        let dead = dead_letter(&closed, "Code: 53").unwrap();
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
        let found = recover(dir.path()).unwrap();
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
        let found = recover(dir.path()).unwrap();
        assert_eq!(read(&found[0]).unwrap().0.len(), 1);
    }
}
