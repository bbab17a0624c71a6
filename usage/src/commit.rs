//! Group commit: the request path's write of its usage record into the WAL.
//!
//! A request commits its record before the last byte of its response leaves
//! ([`crate::UsageSink::commit`]), so a `kill -9` never loses the usage of a delivered response:
//! the record is in the page cache, which outlives the process. A power loss can still take what
//! the kernel had not written back (a closed segment is `fsync`ed; the open one is not).
//!
//! ```text
//! request threads ──encode (thread-local buffer)──▶ Pending { lines, records }  (short lock)
//!                 ──whoever holds the segment lock writes every pending line in one write(2)
//! ```
//!
//! Each committer takes a ticket under the pending lock and then the segment lock; if the lines
//! up to its ticket were written meanwhile by another committer (a *leader* that took them with
//! its own), it returns at once. Threads committing at the same time share system calls; on one
//! thread, the request path's [`crate::UsageSink::commit`] yields once between the two steps, so
//! the requests that reach their commit in the same scheduler round share one `write` too. The writer task ([`crate::pipeline`]) only rotates
//! segments (by age and size) and `fsync`s them when it closes them, off the request path.
//!
//! When the file cannot be written (disk full, read-only, I/O error) the records are kept in
//! memory with the segment and delivered from there: counted as *unwritten*, they are what a
//! crash would lose, and the pipeline refuses new requests past a bound of them.

use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::record::UsageRecord;
use crate::wal::OpenSegment;

/// Records encoded but not written yet, in commit order.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    records: Vec<UsageRecord>,
    /// Tickets handed out: how many records were ever enqueued.
    enqueued: u64,
}

/// The segment being appended to, with what was written into it.
struct Active {
    segment: Option<(OpenSegment, Instant)>,
    /// Tickets written (to the file, or kept in memory when the file failed).
    written: u64,
    /// Swapped with [`Pending`]'s buffers so a commit allocates nothing in the steady state.
    spare_lines: Vec<u8>,
    spare_records: Vec<UsageRecord>,
}

/// The open end of the WAL, shared by the request path and the writer task.
pub(crate) struct CommitLog {
    pending: Mutex<Pending>,
    active: Mutex<Active>,
}

/// What one commit call did to the WAL (it may have written other committers' records too).
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// Bytes that reached the file.
    pub bytes: u64,
    /// Records that could not be written to the file (kept in memory only).
    pub unwritten: u64,
    /// The write or the segment's creation failed: the error, for the caller to report.
    pub error: Option<io::Error>,
    /// The segment reached its row limit: the writer should rotate it now.
    pub full: bool,
}

thread_local! {
    /// One record's JSON line, encoded outside every lock.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl CommitLog {
    pub fn new() -> CommitLog {
        CommitLog {
            pending: Mutex::new(Pending::default()),
            active: Mutex::new(Active {
                segment: None,
                written: 0,
                spare_lines: Vec::new(),
                spare_records: Vec::new(),
            }),
        }
    }

    /// Writes `record` into the open segment of `dir` (creating it with a number from
    /// `next_seq`), together with every record committed meanwhile. Returns once the record is in
    /// the file, or kept in memory if the file cannot be written.
    #[cfg(test)]
    pub fn commit(
        &self,
        dir: &Path,
        next_seq: &AtomicU64,
        max_rows: usize,
        record: UsageRecord,
    ) -> Committed {
        let ticket = self.enqueue(record);
        self.write_through(ticket, dir, next_seq, max_rows)
    }

    /// Encodes `record` and queues it; returns its ticket for [`CommitLog::write_through`].
    pub fn enqueue(&self, record: UsageRecord) -> u64 {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            // A record always encodes (plain strings and numbers); were it ever to fail, the
            // line is skipped and the record still goes to ClickHouse from memory.
            if serde_json::to_writer(&mut *line, &record).is_ok() {
                line.push(b'\n');
            } else {
                line.clear();
            }
            let mut pending = self.pending.lock().expect("not poisoned");
            pending.lines.extend_from_slice(&line);
            pending.records.push(record);
            pending.enqueued += 1;
            pending.enqueued
        })
    }

    /// Returns once the record of `ticket` is written: at once if another committer wrote it
    /// with its own, else by writing every queued line in one system call.
    pub fn write_through(
        &self,
        ticket: u64,
        dir: &Path,
        next_seq: &AtomicU64,
        max_rows: usize,
    ) -> Committed {
        let mut active = self.active.lock().expect("not poisoned");
        if active.written >= ticket {
            return Committed::default(); // a leader wrote it with its own
        }
        let active = &mut *active;
        let upto = {
            let mut pending = self.pending.lock().expect("not poisoned");
            std::mem::swap(&mut pending.lines, &mut active.spare_lines);
            std::mem::swap(&mut pending.records, &mut active.spare_records);
            pending.enqueued
        };
        let mut done = Committed::default();
        if active.segment.is_none() {
            let seq = next_seq.fetch_add(1, Ordering::Relaxed);
            let (segment, error) = OpenSegment::create(dir, seq);
            done.error = error;
            active.segment = Some((segment, Instant::now()));
        }
        let (segment, _) = active.segment.as_mut().expect("just opened");
        let rows = active.spare_records.len() as u64;
        match segment.append(&active.spare_lines, &mut active.spare_records) {
            Ok(bytes) => done.bytes = bytes,
            Err(e) => {
                done.unwritten = rows;
                done.error.get_or_insert(e);
            }
        }
        done.full = segment.rows >= max_rows;
        active.spare_lines.clear();
        active.written = upto;
        done
    }

    /// Takes the open segment out if it is older than `max_age` or holds `max_rows` (or
    /// whenever it holds anything, with `force`), for the writer to close off the request path.
    pub fn take_due(&self, max_age: Duration, max_rows: usize, force: bool) -> Option<OpenSegment> {
        let mut active = self.active.lock().expect("not poisoned");
        let due = match &active.segment {
            Some((segment, opened)) => {
                force || segment.rows >= max_rows || opened.elapsed() >= max_age
            }
            None => false,
        };
        if !due {
            return None;
        }
        active.segment.take().map(|(segment, _)| segment)
    }

    /// Rows in the open segment.
    #[cfg(test)]
    pub fn open_rows(&self) -> usize {
        let active = self.active.lock().expect("not poisoned");
        active.segment.as_ref().map_or(0, |(s, _)| s.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{self, tests::record};
    use std::sync::Arc;

    #[test]
    fn concurrent_commits_are_all_written_once_in_one_segment() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(CommitLog::new());
        let seq = Arc::new(AtomicU64::new(1));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (log, seq, path) = (Arc::clone(&log), Arc::clone(&seq), dir.path().to_owned());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let done = log.commit(&path, &seq, 1_000_000, record(t * 1000 + i));
                        assert!(done.error.is_none() && done.unwritten == 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log.open_rows(), 2000);
        // Before the segment is closed, every record is readable from the file: a kill -9 now
        // loses none.
        let open = wal::Segment {
            seq: 1,
            path: dir.path().join(format!("{:020}.open", 1)),
            bytes: 0,
            maybe_inserted: true,
            unwritten: 0,
            rows: None,
        };
        let (rows, torn) = wal::read(&open).unwrap();
        assert_eq!((rows.len(), torn), (2000, 0));
        let mut prompts: Vec<u32> = rows.iter().map(|r| r.prompt_tokens).collect();
        prompts.sort_unstable();
        prompts.dedup();
        assert_eq!(prompts.len(), 2000);

        let segment = log
            .take_due(Duration::from_secs(3600), 1_000_000, true)
            .unwrap();
        let (closed, error) = segment.close();
        assert!(error.is_none());
        assert_eq!(closed.rows.unwrap().len(), 2000);
        assert!(log.take_due(Duration::ZERO, 1, true).is_none());
    }

    #[test]
    fn a_full_segment_asks_for_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new();
        let seq = AtomicU64::new(1);
        assert!(!log.commit(dir.path(), &seq, 2, record(1)).full);
        assert!(log.commit(dir.path(), &seq, 2, record(2)).full);
        assert!(log.take_due(Duration::from_secs(3600), 2, false).is_some());
        assert!(!log.commit(dir.path(), &seq, 2, record(3)).full);
        assert_eq!(seq.load(Ordering::Relaxed), 3);
    }

    /// A folder that cannot take files (here: gone): records are kept in memory, counted as
    /// unwritten, and the closed segment still holds them all.
    #[test]
    fn an_unwritable_folder_keeps_records_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let log = CommitLog::new();
        let seq = AtomicU64::new(1);
        let done = log.commit(&gone, &seq, 10, record(1));
        assert_eq!(done.unwritten, 1);
        assert!(done.error.is_some());
        let done = log.commit(&gone, &seq, 10, record(2));
        assert_eq!(done.unwritten, 1);
        let (closed, _) = log.take_due(Duration::ZERO, 10, true).unwrap().close();
        assert_eq!(closed.unwritten, 2);
        assert_eq!(closed.rows.unwrap().len(), 2);
    }
}
