//! The loss-free path of usage records from the request path to ClickHouse.
//!
//! ```text
//! request path ──try_send──▶ bounded channel ──▶ writer task ──append──▶ WAL segment (.open)
//!                                                   │ every flush_interval: write to the OS
//!                                                   │ batch_max_rows / batch_max_age: close (.ready)
//!                                                   ▼
//!                                   sender task: read segment → (dedup if maybe inserted)
//!                                   → (drop batch items answered already)
//!                                   → INSERT … FORMAT RowBinary → delete segment
//!                                   data error → dead/ ; other error → retry with backoff
//! ```
//!
//! The request path never waits on ClickHouse: it hands a record to the channel and moves on
//! (it waits on the channel only if it is full, which admission control keeps from happening).
//! **Policy at the disk cap**: when the WAL holds more than `wal_max_bytes` (ClickHouse down for
//! long), [`UsageSink::admit`] turns false and the gateway refuses new requests with 503
//! `metering_unavailable` until the backlog drains: requests are never served unmetered.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use tokio::sync::{mpsc, watch, Notify};

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
    /// How often buffered records are written to the WAL file: the most a `kill -9` can lose.
    /// Default 100ms.
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// A batch (segment) closes at this many rows… Default 50000 (larger inserts are what
    /// ClickHouse ingests fastest; at low traffic `batch_max_age` closes batches first).
    #[serde(default = "default_batch_rows")]
    pub batch_max_rows: usize,
    /// …or this age. Default 1s.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub batch_max_age: Duration,
    /// Records waiting between the request path and the writer. Default 65536.
    #[serde(default = "default_channel")]
    pub channel_capacity: usize,
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
fn default_channel() -> usize {
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
        if self.channel_capacity == 0 {
            return err("channel_capacity", "must be positive");
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
    /// Records waiting in the channel, sampled at each writer tick.
    pub queue_depth: IntGauge,
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
            queue_depth: gauge(
                "usage_queue_depth",
                "Usage records waiting for the WAL writer",
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
    tx: mpsc::Sender<UsageRecord>,
    state: Arc<State>,
}

struct State {
    config: PipelineConfig,
    /// This process's locked folder of the WAL.
    wal: wal::WalDir,
    metrics: PipelineMetrics,
    ready: Mutex<VecDeque<Segment>>,
    ready_changed: Notify,
    wal_bytes: AtomicU64,
    over_cap: AtomicBool,
}

/// The background half, run by the gateway as a background service.
pub struct UsagePipeline {
    rx: mpsc::Receiver<UsageRecord>,
    state: Arc<State>,
    next_seq: u64,
}

/// How often the writer looks for segments of ended processes sharing the WAL folder (the old
/// gateway of an upgrade, once its grace period is over).
const ADOPT_EVERY: Duration = Duration::from_secs(5);

impl UsageSink {
    /// Whether every record received so far is in ClickHouse (none queued, none in the WAL):
    /// a draining gateway may exit early once this holds and no request is in flight.
    pub fn delivered(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity()
            && self.state.wal_bytes.load(Ordering::Relaxed) == 0
    }

    /// False while the WAL is over its disk cap: the caller must refuse the request.
    #[inline]
    pub fn admit(&self) -> bool {
        !self.state.over_cap.load(Ordering::Relaxed)
    }

    /// Hands a record to the writer. Waits only if the channel is full.
    pub async fn record(&self, record: UsageRecord) {
        let r = match self.tx.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(r)) => r,
            Err(mpsc::error::TrySendError::Closed(r)) => {
                tracing::error!(request_id = %r.request_id, "usage pipeline stopped; record not written");
                return;
            }
        };
        if self.tx.send(r).await.is_err() {
            tracing::error!("usage pipeline stopped; record not written");
        }
    }
}

/// Opens the WAL (recovering leftover segments) and returns the two halves.
pub fn open(
    config: PipelineConfig,
    metrics: PipelineMetrics,
) -> std::io::Result<(UsageSink, UsagePipeline)> {
    let wal = wal::WalDir::open(&config.wal_dir)?;
    let mut next_seq = 1;
    let leftover = wal.adopt(&mut next_seq)?;
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
    let (tx, rx) = mpsc::channel(config.channel_capacity);
    let state = Arc::new(State {
        over_cap: AtomicBool::new(bytes > config.wal_max_bytes),
        wal,
        config,
        metrics,
        ready: Mutex::new(leftover.into()),
        ready_changed: Notify::new(),
        wal_bytes: AtomicU64::new(bytes),
    });
    Ok((
        UsageSink {
            tx,
            state: Arc::clone(&state),
        },
        UsagePipeline {
            rx,
            state,
            next_seq,
        },
    ))
}

impl State {
    fn add_bytes(&self, delta: i64) {
        let now = if delta >= 0 {
            self.wal_bytes.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
        } else {
            self.wal_bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed)
                - delta.unsigned_abs()
        };
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

    fn push_ready(&self, mut segment: Segment) {
        let mut ready = self.ready.lock().expect("not poisoned");
        // Memory stays bounded while ClickHouse is away: past a few waiting segments, rows are
        // read back from disk when their turn comes.
        if ready.len() >= MAX_SEGMENTS_IN_MEMORY {
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
    /// (so the sender can deliver it during the grace period) and the writer keeps taking the
    /// records of requests still finishing, flushing every 10 ms; it stops when every
    /// [`UsageSink`] is dropped. If the runtime is dropped first, the writer's buffer is
    /// flushed to disk on drop and the next start replays it.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let state = Arc::clone(&self.state);
        let (stop_tx, stop_rx) = watch::channel(false);
        let sender = tokio::spawn(send_loop(Arc::clone(&state), stop_rx));
        self.write_loop(shutdown).await;
        let _ = stop_tx.send(true);
        let _ = sender.await;
    }

    /// The writer wakes on a timer, not per record: waking another thread for every request
    /// would cost the request path a context switch each. Every tick it drains the channel into
    /// the open segment and hands the buffer to the OS, so a record waits at most one tick
    /// (≤ `flush_interval`) in memory.
    async fn write_loop(mut self, mut shutdown: watch::Receiver<bool>) {
        let config = self.state.config.clone();
        let mut open: Option<(OpenSegment, Instant)> = None;
        let mut tick = tokio::time::interval(config.flush_interval.min(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutting_down = false;
        let mut adopted_at = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if adopted_at.elapsed() >= ADOPT_EVERY {
                        adopted_at = Instant::now();
                        self.adopt_orphans();
                    }
                    let closed = self.drain(&mut open).await;
                    if let Some((seg, opened)) = open.as_mut() {
                        if let Err(e) = seg.flush() {
                            tracing::error!(error = %e, "cannot flush the usage WAL");
                        }
                        if opened.elapsed() >= config.batch_max_age || shutting_down {
                            self.rotate(&mut open);
                        }
                    }
                    if closed {
                        break; // every sink dropped and the channel is empty
                    }
                }
                changed = shutdown.changed(), if !shutting_down => {
                    if changed.is_err() || *shutdown.borrow() {
                        shutting_down = true;
                        self.drain(&mut open).await;
                        self.rotate(&mut open);
                        tick = tokio::time::interval(Duration::from_millis(10));
                    }
                }
            }
        }
        self.rotate(&mut open);
    }

    /// Takes over the segments of processes that ended on the same WAL folder and queues them
    /// for delivery (with dedup: they may be in ClickHouse already).
    fn adopt_orphans(&mut self) {
        match self.state.wal.adopt(&mut self.next_seq) {
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

    /// Moves every waiting record into the open segment; true once the channel is closed.
    /// Yields every 1,024 records so the sender sharing the runtime keeps its inserts moving.
    async fn drain(&mut self, open: &mut Option<(OpenSegment, Instant)>) -> bool {
        self.state.metrics.queue_depth.set(self.rx.len() as i64);
        let mut n = 0u32;
        loop {
            n += 1;
            if n.is_multiple_of(1024) {
                tokio::task::yield_now().await;
            }
            match self.rx.try_recv() {
                Ok(record) => {
                    if let Err(e) = self.append(open, record) {
                        // Disk trouble: the record is still held in memory for the insert, but
                        // a crash now would lose it.
                        tracing::error!(error = %e, "cannot write the usage WAL");
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return false,
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn append(
        &mut self,
        open: &mut Option<(OpenSegment, Instant)>,
        record: UsageRecord,
    ) -> std::io::Result<()> {
        if open.is_none() {
            let seg = OpenSegment::create(self.state.wal.path(), self.next_seq)?;
            self.next_seq += 1;
            *open = Some((seg, Instant::now()));
        }
        let (seg, _) = open.as_mut().expect("just opened");
        let before = seg.bytes;
        let written = seg.append(record);
        self.state.add_bytes((seg.bytes - before) as i64);
        written?;
        if seg.rows >= self.state.config.batch_max_rows {
            self.rotate(open);
        }
        Ok(())
    }

    fn rotate(&mut self, open: &mut Option<(OpenSegment, Instant)>) {
        if let Some((seg, _)) = open.take() {
            match seg.close() {
                Ok(closed) => self.state.push_ready(closed),
                // The file stays `.open`; the next start replays it.
                Err(e) => tracing::error!(error = %e, "cannot close a usage WAL segment"),
            }
        }
    }
}

async fn send_loop(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let client = state.config.clickhouse.client();
    let timeout = state.config.clickhouse.insert_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        // The rows kept in memory go with this attempt (the queue keeps the file): a retry
        // reads them back from disk.
        let next = state
            .ready
            .lock()
            .expect("not poisoned")
            .front_mut()
            .map(|front| {
                let rows = front.rows.take();
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
                state.ready.lock().expect("not poisoned").pop_front();
                state.metrics.wal_segments.dec();
                state.add_bytes(-(segment.bytes as i64));
            }
            Err(InsertError::Data(message)) => {
                tracing::error!(segment = %segment.path.display(), error = %message, "ClickHouse refused a usage batch; moved to dead letters");
                state
                    .metrics
                    .insert_failures
                    .with_label_values(&["data"])
                    .inc();
                let rows = wal::read(&segment).map_or(0, |(rows, _)| rows.len());
                state.metrics.dead_lettered_rows.inc_by(rows as u64);
                if let Err(e) = wal::dead_letter(&segment, &state.wal.dead_dir(), &message) {
                    tracing::error!(error = %e, "cannot move the refused segment; retrying later");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                state.ready.lock().expect("not poisoned").pop_front();
                state.metrics.wal_segments.dec();
                state.add_bytes(-(segment.bytes as i64));
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
    wal::remove(segment).map_err(|e| InsertError::Transient(e.to_string()))?;
    Ok(())
}
