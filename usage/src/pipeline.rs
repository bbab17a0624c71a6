//! The loss-free path of usage records from the request path to ClickHouse.
//!
//! ```text
//! request path ──commit (group commit, before the response's last byte)──▶ WAL segment (.open)
//!                                                   │ writer task, every flush_interval:
//!                                                   │ batch_max_rows / batch_max_age: fsync, close (.ready)
//!                                                   ▼
//!                                   sender task: read segment → (dedup if maybe inserted)
//!                                   → (drop batch items answered already)
//!                                   → INSERT … FORMAT RowBinary → delete segment
//!                                   data error → dead/ ; other error → retry with backoff
//! ```
//!
//! The request path never waits on ClickHouse: it writes its record into the WAL file (the page
//! cache; `commit`) and moves on, so a `kill -9` loses no delivered response's usage.
//! **Policy at the disk cap**: when the WAL holds more than `wal_max_bytes` (ClickHouse down for
//! long), [`UsageSink::admit`] turns false and the gateway refuses new requests with 503
//! `metering_unavailable` until the backlog drains: requests are never served unmetered.
//! **Policy when the WAL cannot be written** (disk full, read-only, I/O errors): records are
//! kept in memory with their segment and delivered from there; past `memory_max_rows` of them
//! (ClickHouse not taking them either), new requests are refused the same way.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use tokio::sync::{watch, Notify};

use crate::commit::CommitLog;
use crate::record::UsageRecord;
use crate::sink::{self, ClickHouseConfig, InsertError};
use crate::wal::{self, OpenSegment, Segment};

/// The `metering:` section of the gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    /// WAL directory. Default `data/wal`. Each process writes into its own locked subfolder, so
    /// processes may share it (an upgrade's old and new gateway); segments of ended processes
    /// are adopted by a live one.
    #[serde(default = "default_wal_dir")]
    pub wal_dir: PathBuf,
    /// Disk cap of the WAL; past it new requests get 503. Default 1 GiB.
    #[serde(default = "default_wal_max_bytes")]
    pub wal_max_bytes: u64,
    /// How often the writer looks at the open segment (to close it at `batch_max_age`). Records
    /// do not wait for it: each is written before its response ends. Default 100ms.
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// A batch (segment) closes at this many rows… Default 50000 (larger inserts are what
    /// ClickHouse ingests fastest; at low traffic `batch_max_age` closes batches first).
    #[serde(default = "default_batch_rows")]
    pub batch_max_rows: usize,
    /// …or this age. Default 1s.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub batch_max_age: Duration,
    /// Records kept in memory only because the WAL could not be written (disk full, read-only)
    /// and not yet in ClickHouse; past it new requests get 503. Default 65536. (Formerly
    /// `channel_capacity`, still accepted.)
    #[serde(default = "default_memory_rows", alias = "channel_capacity")]
    pub memory_max_rows: usize,
    /// Longest wait between insert retries while ClickHouse is failing. Default 10s.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

fn default_wal_dir() -> PathBuf {
    "data/wal".into()
}
fn default_wal_max_bytes() -> u64 {
    1 << 30
}
fn default_flush_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_batch_rows() -> usize {
    50_000
}
fn default_batch_age() -> Duration {
    Duration::from_secs(1)
}
fn default_memory_rows() -> usize {
    65_536
}
fn default_backoff() -> Duration {
    Duration::from_secs(10)
}

impl PipelineConfig {
    /// Checks values; errors name the key under `metering.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("metering.{k}"), m.to_owned()));
        if self.batch_max_rows == 0 {
            return err("batch_max_rows", "must be positive");
        }
        if self.memory_max_rows == 0 {
            return err("memory_max_rows", "must be positive");
        }
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(10) {
            return err("flush_interval", "must be between 1ms and 10s");
        }
        self.clickhouse
            .validate()
            .map_err(|(k, m)| (format!("metering.clickhouse.{k}"), m))?;
        Ok(())
    }
}

/// Pipeline metrics, registered in the gateway's registry.
#[derive(Clone)]
pub struct PipelineMetrics {
    /// Records the WAL could not take, held in memory until delivered.
    pub unwritten_rows: IntGauge,
    pub wal_write_failures: IntCounter,
    pub rows_written: IntCounter,
    pub wal_bytes: IntGauge,
    pub wal_segments: IntGauge,
    pub insert_latency: Histogram,
    pub insert_failures: IntCounterVec,
    pub dead_lettered_rows: IntCounter,
    pub replay_duplicates_skipped: IntCounter,
    /// Batch items' answers not inserted because their item was answered already.
    pub batch_duplicates_skipped: IntCounter,
    pub torn_lines: IntCounter,
}

impl PipelineMetrics {
    pub fn new(registry: &Registry) -> PipelineMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        }
        let gauge = |n: &str, h: &str| reg(registry, IntGauge::new(n, h).expect("valid"));
        let counter = |n: &str, h: &str| reg(registry, IntCounter::new(n, h).expect("valid"));
        PipelineMetrics {
            unwritten_rows: gauge(
                "usage_unwritten_rows",
                "Usage records the WAL could not take (disk full, read-only), held in memory until in ClickHouse",
            ),
            wal_write_failures: counter(
                "usage_wal_write_failures_total",
                "Failed writes of usage records into the WAL (their records were kept in memory)",
            ),
            rows_written: counter(
                "usage_rows_written_total",
                "Usage rows confirmed in ClickHouse",
            ),
            wal_bytes: gauge("usage_wal_bytes", "Bytes of WAL segments on disk"),
            wal_segments: gauge("usage_wal_segments", "WAL segments on disk"),
            insert_latency: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("usage_insert_seconds", "ClickHouse insert latency")
                        .buckets(vec![
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        ]),
                )
                .expect("valid"),
            ),
            insert_failures: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "usage_insert_failures_total",
                        "Failed ClickHouse inserts by kind",
                    ),
                    &["kind"],
                )
                .expect("valid"),
            ),
            dead_lettered_rows: counter(
                "usage_dead_lettered_rows_total",
                "Usage rows ClickHouse refused as data, moved to the dead-letter directory",
            ),
            replay_duplicates_skipped: counter(
                "usage_replay_duplicates_skipped_total",
                "Rows of retried or replayed batches already present in ClickHouse",
            ),
            batch_duplicates_skipped: counter(
                "usage_batch_duplicates_skipped_total",
                "Answers of batch items already answered (sent again), not inserted",
            ),
            torn_lines: counter(
                "usage_wal_torn_lines_total",
                "Unreadable WAL lines skipped (torn writes)",
            ),
        }
    }
}

/// Closed segments whose rows stay in memory until inserted; later ones are read from disk.
const MAX_SEGMENTS_IN_MEMORY: usize = 4;

/// The request path's handle: cheap to clone.
#[derive(Clone)]
pub struct UsageSink {
    state: Arc<State>,
    /// The pipeline's writer ends once every sink is gone (no record can come any more).
    _alive: Arc<()>,
}

struct State {
    config: PipelineConfig,
    /// This process's locked folder of the WAL.
    wal: wal::WalDir,
    /// The open segment and the records being committed into it.
    log: CommitLog,
    /// Numbers for new segments and adopted ones.
    next_seq: AtomicU64,
    metrics: PipelineMetrics,
    ready: Mutex<VecDeque<Segment>>,
    ready_changed: Notify,
    /// A segment reached `batch_max_rows`: the writer closes it now.
    segment_full: Notify,
    wal_bytes: AtomicU64,
    over_cap: AtomicBool,
    /// Records the WAL could not take, still undelivered.
    unwritten: AtomicU64,
    memory_full: AtomicBool,
    /// The last write into the WAL failed (its error was logged once).
    failing: AtomicBool,
}

/// The background half, run by the gateway as a background service.
pub struct UsagePipeline {
    state: Arc<State>,
    sinks: Weak<()>,
}

/// How often the writer looks for segments of ended processes sharing the WAL folder (the old
/// gateway of an upgrade, once its grace period is over).
const ADOPT_EVERY: Duration = Duration::from_secs(5);

impl UsageSink {
    /// Whether every record committed so far is in ClickHouse (none in the WAL, none held in
    /// memory): a draining gateway may exit early once this holds and no request is in flight.
    pub fn delivered(&self) -> bool {
        self.state.wal_bytes.load(Ordering::Relaxed) == 0
            && self.state.unwritten.load(Ordering::Relaxed) == 0
    }

    /// False while the WAL is over its disk cap, or holds too many records in memory it could
    /// not write: the caller must refuse the request.
    #[inline]
    pub fn admit(&self) -> bool {
        !self.state.over_cap.load(Ordering::Relaxed)
            && !self.state.memory_full.load(Ordering::Relaxed)
    }

    /// Writes `record` into the WAL file (the page cache, no `fsync`) before returning. Between
    /// queueing the record and writing it, it yields to the scheduler once: the other requests
    /// of this round queue theirs, and one `write` takes them all (group commit on one thread;
    /// threads share writes as well). Never waits on ClickHouse; if the file cannot be written
    /// the record is kept in memory and delivered from there.
    pub async fn commit(&self, record: UsageRecord) {
        let ticket = self.state.log.enqueue(record);
        tokio::task::yield_now().await;
        self.write_through(ticket);
    }

    /// [`UsageSink::commit`] without the yield, for callers outside an async runtime: shares
    /// writes only with other threads.
    pub fn commit_now(&self, record: UsageRecord) {
        let ticket = self.state.log.enqueue(record);
        self.write_through(ticket);
    }

    fn write_through(&self, ticket: u64) {
        let state = &*self.state;
        let done = state.log.write_through(
            ticket,
            state.wal.path(),
            &state.next_seq,
            state.config.batch_max_rows,
        );
        if done.bytes > 0 {
            state.add_bytes(done.bytes as i64);
        }
        if done.unwritten > 0 {
            state.metrics.wal_write_failures.inc();
            state.add_unwritten(done.unwritten as i64);
        }
        match done.error {
            Some(e) if !state.failing.swap(true, Ordering::Relaxed) => {
                tracing::error!(error = %e, dir = %state.wal.path().display(), "cannot write the usage WAL: records are kept in memory until delivered");
            }
            Some(_) => {} // logged once per outage
            None if done.bytes > 0 && state.failing.load(Ordering::Relaxed) => {
                state.failing.store(false, Ordering::Relaxed);
                tracing::info!("the usage WAL is writable again");
            }
            None => {}
        }
        if done.full {
            state.segment_full.notify_one();
        }
    }
}

/// Opens the WAL (recovering leftover segments) and returns the two halves.
pub fn open(
    config: PipelineConfig,
    metrics: PipelineMetrics,
) -> std::io::Result<(UsageSink, UsagePipeline)> {
    let wal = wal::WalDir::open(&config.wal_dir)?;
    let next_seq = AtomicU64::new(1);
    let leftover = wal.adopt(&next_seq)?;
    let bytes: u64 = leftover.iter().map(|s| s.bytes).sum();
    if !leftover.is_empty() {
        tracing::info!(
            segments = leftover.len(),
            bytes,
            "replaying usage WAL segments left by an earlier run"
        );
    }
    metrics.wal_segments.set(leftover.len() as i64);
    metrics.wal_bytes.set(bytes as i64);
    let state = Arc::new(State {
        over_cap: AtomicBool::new(bytes > config.wal_max_bytes),
        wal,
        log: CommitLog::new(),
        next_seq,
        config,
        metrics,
        ready: Mutex::new(leftover.into()),
        ready_changed: Notify::new(),
        segment_full: Notify::new(),
        wal_bytes: AtomicU64::new(bytes),
        unwritten: AtomicU64::new(0),
        memory_full: AtomicBool::new(false),
        failing: AtomicBool::new(false),
    });
    let alive = Arc::new(());
    Ok((
        UsageSink {
            state: Arc::clone(&state),
            _alive: Arc::clone(&alive),
        },
        UsagePipeline {
            state,
            sinks: Arc::downgrade(&alive),
        },
    ))
}

/// Adds `delta` to `counter`; returns the new value.
fn add(counter: &AtomicU64, delta: i64) -> u64 {
    if delta >= 0 {
        counter.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
    } else {
        counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed) - delta.unsigned_abs()
    }
}

impl State {
    fn add_bytes(&self, delta: i64) {
        let now = add(&self.wal_bytes, delta);
        self.metrics.wal_bytes.set(now as i64);
        let over = now > self.config.wal_max_bytes;
        if self.over_cap.swap(over, Ordering::Relaxed) != over {
            if over {
                tracing::error!(bytes = now, cap = self.config.wal_max_bytes, "usage WAL over its disk cap: refusing new requests until ClickHouse catches up");
            } else {
                tracing::info!(
                    bytes = now,
                    "usage WAL back under its disk cap: accepting requests"
                );
            }
        }
    }

    fn add_unwritten(&self, delta: i64) {
        let now = add(&self.unwritten, delta);
        self.metrics.unwritten_rows.set(now as i64);
        let full = now >= self.config.memory_max_rows as u64;
        if self.memory_full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::error!(rows = now, "usage records the WAL could not take fill memory_max_rows: refusing new requests until ClickHouse takes them");
            } else {
                tracing::info!(
                    rows = now,
                    "usage records held in memory back under memory_max_rows: accepting requests"
                );
            }
        }
    }

    /// The queue's first segment is done with (inserted, or dead-lettered).
    fn delivered(&self, segment: &Segment) {
        self.ready.lock().expect("not poisoned").pop_front();
        self.metrics.wal_segments.dec();
        self.add_bytes(-(segment.bytes as i64));
        if segment.unwritten > 0 {
            self.add_unwritten(-(segment.unwritten as i64));
        }
    }

    fn push_ready(&self, mut segment: Segment) {
        let mut ready = self.ready.lock().expect("not poisoned");
        // Memory stays bounded while ClickHouse is away: past a few waiting segments, rows are
        // read back from disk when their turn comes (unless the file lacks some of them).
        if ready.len() >= MAX_SEGMENTS_IN_MEMORY && segment.unwritten == 0 {
            segment.rows = None;
        }
        ready.push_back(segment);
        drop(ready);
        self.metrics.wal_segments.inc();
        self.ready_changed.notify_one();
    }
}

impl UsagePipeline {
    /// Runs writer and sender. When `shutdown` turns true the open segment is closed at once
    /// (so the sender can deliver it during the grace period) and the writer keeps closing the
    /// segments of requests still finishing every 10 ms; it stops when every [`UsageSink`] is
    /// dropped. Records are in the WAL file from their commit on: a runtime dropped first loses
    /// none; the next start replays them.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let state = Arc::clone(&self.state);
        let (stop_tx, stop_rx) = watch::channel(false);
        let sender = tokio::spawn(send_loop(Arc::clone(&state), stop_rx));
        self.write_loop(shutdown).await;
        let _ = stop_tx.send(true);
        let _ = sender.await;
    }

    /// The writer wakes on a timer (and when a segment is full): it closes segments, `fsync`ing
    /// them off the request path, and adopts the segments of ended processes.
    async fn write_loop(self, mut shutdown: watch::Receiver<bool>) {
        let config = self.state.config.clone();
        let mut tick = tokio::time::interval(config.flush_interval.min(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutting_down = false;
        let mut adopted_at = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.state.segment_full.notified() => {}
                changed = shutdown.changed(), if !shutting_down => {
                    if changed.is_err() || *shutdown.borrow() {
                        shutting_down = true;
                        tick = tokio::time::interval(Duration::from_millis(10));
                    }
                }
            }
            if adopted_at.elapsed() >= ADOPT_EVERY {
                adopted_at = Instant::now();
                self.adopt_orphans();
            }
            // Checked before the last close: no record can be committed once every sink is gone.
            let ended = self.sinks.strong_count() == 0;
            let due = self.state.log.take_due(
                config.batch_max_age,
                config.batch_max_rows,
                shutting_down || ended,
            );
            if let Some(segment) = due {
                self.close(segment);
            }
            if ended {
                break;
            }
        }
    }

    /// Takes over the segments of processes that ended on the same WAL folder and queues them
    /// for delivery (with dedup: they may be in ClickHouse already).
    fn adopt_orphans(&self) {
        match self.state.wal.adopt(&self.state.next_seq) {
            Ok(found) => {
                if !found.is_empty() {
                    let bytes: u64 = found.iter().map(|s| s.bytes).sum();
                    tracing::info!(
                        segments = found.len(),
                        bytes,
                        "adopted usage WAL segments of an ended process"
                    );
                    self.state.add_bytes(bytes as i64);
                    for segment in found {
                        self.state.push_ready(segment);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for WAL segments of ended processes"),
        }
    }

    fn close(&self, segment: OpenSegment) {
        let before = segment.unwritten;
        let (closed, error) = segment.close();
        if let Some(e) = error {
            tracing::error!(error = %e, segment = %closed.path.display(), "cannot close a usage WAL segment: its rows are delivered from memory");
        }
        if closed.unwritten > before {
            self.state.add_unwritten((closed.unwritten - before) as i64);
        }
        self.state.push_ready(closed);
    }
}

async fn send_loop(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let client = state.config.clickhouse.client();
    let timeout = state.config.clickhouse.insert_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        // The rows kept in memory go with this attempt (the queue keeps the file): a retry
        // reads them back from disk. Rows the file lacks stay with the queue too.
        let next = state
            .ready
            .lock()
            .expect("not poisoned")
            .front_mut()
            .map(|front| {
                let rows = if front.unwritten > 0 {
                    front.rows.clone()
                } else {
                    front.rows.take()
                };
                (front.clone(), rows)
            });
        let Some((segment, rows)) = next else {
            tokio::select! {
                _ = state.ready_changed.notified() => continue,
                _ = stop.changed() => return,
            }
        };
        match deliver(&state, &client, timeout, &segment, rows).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                state.delivered(&segment);
            }
            Err(InsertError::Data(message)) => {
                tracing::error!(segment = %segment.path.display(), error = %message, "ClickHouse refused a usage batch; moved to dead letters");
                state
                    .metrics
                    .insert_failures
                    .with_label_values(&["data"])
                    .inc();
                let rows = match &segment.rows {
                    Some(rows) => rows.to_vec(),
                    None => wal::read(&segment).map_or_else(|_| Vec::new(), |(rows, _)| rows),
                };
                state.metrics.dead_lettered_rows.inc_by(rows.len() as u64);
                if let Err(e) = wal::dead_letter(&segment, &rows, &state.wal.dead_dir(), &message) {
                    tracing::error!(error = %e, "cannot move the refused segment; retrying later");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                state.delivered(&segment);
            }
            Err(InsertError::Transient(message)) => {
                tracing::warn!(error = %message, retry_in = ?backoff, "usage insert failed; retrying");
                state
                    .metrics
                    .insert_failures
                    .with_label_values(&["transient"])
                    .inc();
                // The attempt may have landed: from now on this segment is deduplicated.
                if let Some(front) = state.ready.lock().expect("not poisoned").front_mut() {
                    front.maybe_inserted = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(state.config.retry_backoff_max);
            }
        }
    }
}

async fn deliver(
    state: &State,
    client: &clickhouse::Client,
    timeout: Duration,
    segment: &Segment,
    kept: Option<Arc<Vec<UsageRecord>>>,
) -> Result<(), InsertError> {
    // A segment this process just closed still has its rows in memory: no read back, no parse.
    let (mut rows, torn) = match kept {
        Some(rows) => (Arc::unwrap_or_clone(rows), 0),
        None => wal::read(segment).map_err(|e| InsertError::Transient(e.to_string()))?,
    };
    if torn > 0 {
        tracing::warn!(segment = %segment.path.display(), lines = torn, "skipped torn WAL lines");
        state.metrics.torn_lines.inc_by(torn as u64);
    }
    let replayed = if segment.maybe_inserted {
        sink::drop_present(client, &mut rows).await?
    } else {
        0
    };
    // Every insert: a batch item answered already (sent again after a worker takeover) is not
    // inserted twice. No query when the batch holds no batch item.
    let answered = sink::drop_batch_duplicates(client, &mut rows).await?;
    let started = Instant::now();
    sink::insert(client, timeout, &rows).await?;
    state
        .metrics
        .insert_latency
        .observe(started.elapsed().as_secs_f64());
    // Counted once the batch landed: a failed attempt is retried and would count them again.
    state
        .metrics
        .replay_duplicates_skipped
        .inc_by(replayed as u64);
    state
        .metrics
        .batch_duplicates_skipped
        .inc_by(answered as u64);
    state.metrics.rows_written.inc_by(rows.len() as u64);
    if let Err(e) = wal::remove(segment) {
        // Delivered all the same (a read-only WAL): left on disk, the file is replayed with
        // dedup at the next start, which inserts nothing twice.
        tracing::warn!(error = %e, segment = %segment.path.display(), "cannot delete a delivered usage WAL segment");
    }
    Ok(())
}
