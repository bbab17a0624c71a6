//! Key sync: keeps the gateway's control-plane keys (`KeySet::synced`) equal to the
//! control-plane database, off the request path. Owns the database pool, the initial load, the
//! change-feed follower, the optional Redis subscription that wakes it, and the write-back of
//! last-used times.
//!
//! - **Initial load**: the feed head is read first, then every live key in pages; from then on
//!   the feed is followed from `(head, last key read with that number)`, so a change committed
//!   during the load is read again afterwards (rows are whole states, applying one twice is
//!   harmless), but not the keys stamped with the head itself, all visible to the load.
//!   `/readyz` stays not-ready until this load has completed once; declared (YAML) keys serve
//!   meanwhile. The map is sized to the live keys' count first; pages are of 1,000 rows.
//! - **Following**: the feed is read every `poll_interval` (250 ms), or every
//!   `push_poll_interval` (1 s) while a Redis subscription to [`feed::REDIS_CHANNEL`] is live;
//!   each notice there triggers a read at once. A revoked key is removed; any other row replaces
//!   the key's record whole.
//! - **Outages**: a failed read (database down, tables missing, timeout) changes nothing: the
//!   gateway keeps its last known keys, retries with backoff, logs once when the database
//!   becomes unreachable and once when it is back, and sets `aihub_key_sync_up` to 0. The first
//!   read after a failure, and one read every 5 s, check that the database still holds the
//!   change the cursor names ([`feed::holds`]); one that went back (a failover that lost
//!   commits the gateway had read) is loaded anew while the keys held keep serving.
//! - **Internal secret**: the secret the admin API shares with gateways
//!   (`settings.internal_secret`; it signs forwarded Files/Batches identities and batch
//!   tokens) is read with the initial load and, while the admin API has not created it yet,
//!   after every feed read; once loaded it is never read again (it does not change).
//! - **Last used**: requests note the time in the record (`KeyRecord::mark_used`); every
//!   `last_used_flush_interval` the keys used since the last write are sent in one batch. A
//!   failed write is retried at the next flush; requests never wait for it.
//!
//! **Invariant:** nothing here runs on the request path: lookups only read the in-memory maps,
//! so a flood of unknown keys costs the database nothing. The gateway never migrates the
//! control-plane schema (the admin API owns it).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aihub_apikey::internal::{self, InternalSecret};
use aihub_apikey::KeyHash;
use aihub_store::feed::{self, Cursor, KeyState};
use aihub_store::settings;
use aihub_store::{Store, StoreError, StoreOptions};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::Notify;

use crate::config::ControlPlaneConfig;
use crate::context::Shared;
use crate::keys::KeyLimits;
use crate::keys::{InFlight, Interner, KeyRecord, KeySet, KeySource, KeyStore, Unreported};
use crate::metrics::KeySyncMetrics;

/// Rows read per feed query.
const PAGE: i64 = 1_000;
/// Longest a single database call may take before it counts as a failure.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a pooled connection (a down database fails a read this fast).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the follower checks that the database still holds the change it read last (two
/// small queries): a failover to a standby that missed commits can happen between two reads
/// without either failing (the pool replaces a dead connection unseen). Also checked after
/// every failed read.
const FEED_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between retries while the database (or Redis) is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest a last-used write-back may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed read or write of the control-plane database.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn timed<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, SyncError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(SyncError::from),
        Err(_) => Err(SyncError::Timeout(limit)),
    }
}

/// The pingora background service running the key sync.
pub struct KeySync {
    config: ControlPlaneConfig,
    shared: Arc<Shared>,
    keys: Arc<KeySet>,
}

impl KeySync {
    pub fn new(config: ControlPlaneConfig, shared: Arc<Shared>, keys: Arc<KeySet>) -> Self {
        KeySync {
            config,
            shared,
            keys,
        }
    }
}

#[async_trait]
impl BackgroundService for KeySync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let cfg = &self.config;
        let metrics = self.shared.metrics.key_sync.clone();
        let opts = StoreOptions {
            max_connections: cfg.max_connections,
            acquire_timeout: ACQUIRE_TIMEOUT,
            ..StoreOptions::new(cfg.database_url.as_str())
        };
        let store = match Store::connect(&opts).await {
            Ok(store) => store,
            Err(e) => {
                // Only a malformed URL fails here (connections open lazily).
                tracing::error!(error = %e, "control_plane.database_url is unusable; control-plane keys are disabled");
                let _ = shutdown.changed().await;
                return;
            }
        };
        let wake = Arc::new(Notify::new());
        let push_live = Arc::new(AtomicBool::new(false));
        match cfg.redis_target() {
            Some(Ok(redis)) => {
                tokio::spawn(follow_redis(
                    redis,
                    Arc::clone(&wake),
                    Arc::clone(&push_live),
                    metrics.clone(),
                ));
            }
            // Checked when the configuration was loaded; the TLS files may have gone since.
            Some(Err(e)) => {
                tracing::error!(error = %e, "control_plane.redis_url is unusable; polling only")
            }
            None => {}
        }
        tokio::spawn(flush_last_used(
            store.clone(),
            Arc::clone(&self.keys),
            metrics.clone(),
            cfg.last_used_flush_interval,
            shutdown.clone(),
        ));
        let mut follower = Follower {
            store,
            keys: Arc::clone(&self.keys),
            metrics,
            interner: Interner::default(),
            cursor: Cursor::default(),
            health: Health::Unknown,
            check_head: false,
            checked: Instant::now(),
            bad_secret_logged: false,
        };

        // Initial load, retried until it completes once; the first failure falls back to the
        // local snapshot, if there is one (the load from the database is then not needed: the
        // feed is followed from the snapshot's position).
        let mut backoff = cfg.poll_interval;
        let mut snapshot_tried = cfg.snapshot_path.is_none();
        loop {
            let started = Instant::now();
            match follower.initial_load().await {
                Ok(n) => {
                    let took = started.elapsed();
                    follower
                        .metrics
                        .initial_load_seconds
                        .set(took.as_secs_f64());
                    follower.load_secret(&self.shared).await;
                    self.shared.keys_ready.store(true, Ordering::Relaxed);
                    tracing::info!(
                        keys = n,
                        ms = took.as_millis() as u64,
                        "control-plane keys loaded"
                    );
                    break;
                }
                Err(e) => {
                    follower.failed(&e, "initial key load");
                    if !snapshot_tried {
                        snapshot_tried = true;
                        if let Some(path) = &cfg.snapshot_path {
                            if follower.load_snapshot(path) {
                                self.shared.keys_ready.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }

        // Follow the feed.
        let mut backoff = cfg.poll_interval;
        let mut failing = false;
        let mut snapshots = SnapshotWriter::new(cfg.snapshot_path.clone());
        loop {
            snapshots.maybe_write(&follower);
            let wait = if failing {
                backoff
            } else if push_live.load(Ordering::Relaxed) {
                cfg.push_poll_interval
            } else {
                cfg.poll_interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            match follower.poll().await {
                Ok(applied) => {
                    if applied > 0 {
                        snapshots.dirty = true;
                    }
                    follower.load_secret(&self.shared).await;
                    failing = false;
                    backoff = cfg.poll_interval;
                }
                Err(e) => {
                    follower.failed(&e, "key change feed read");
                    // The database may come back as another one (a promoted standby that
                    // missed commits this gateway read): checked at the next read.
                    follower.check_head = true;
                    backoff = if failing {
                        (backoff * 2).min(MAX_BACKOFF)
                    } else {
                        cfg.poll_interval
                    };
                    failing = true;
                }
            }
        }
    }
}

/// Keeps the local key snapshot current: after changes, at most every
/// [`SNAPSHOT_INTERVAL`], one write at a time (captured in the sync task, written on the
/// blocking pool).
struct SnapshotWriter {
    path: Option<std::path::PathBuf>,
    dirty: bool,
    last: Option<Instant>,
    writing: Arc<AtomicBool>,
}

/// Shortest time between two snapshot writes.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

impl SnapshotWriter {
    fn new(path: Option<std::path::PathBuf>) -> Self {
        SnapshotWriter {
            path,
            // The keys just loaded are worth a snapshot.
            dirty: true,
            last: None,
            writing: Arc::new(AtomicBool::new(false)),
        }
    }

    fn maybe_write(&mut self, follower: &Follower) {
        let Some(path) = &self.path else { return };
        if !self.dirty
            || self.last.is_some_and(|t| t.elapsed() < SNAPSHOT_INTERVAL)
            || self.writing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let snapshot = crate::keysnapshot::capture(&follower.keys.synced, &follower.cursor);
        self.dirty = false;
        self.last = Some(Instant::now());
        let (path, writing) = (path.clone(), Arc::clone(&self.writing));
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::keysnapshot::write(&path, &snapshot) {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the key snapshot");
            }
            writing.store(false, Ordering::Release);
        });
    }
}

/// Whether the database answered the last read, for logging transitions only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Unknown,
    Up,
    Down,
}

/// Reads the feed and applies it to `keys.synced`.
struct Follower {
    store: Store,
    keys: Arc<KeySet>,
    metrics: KeySyncMetrics,
    interner: Interner,
    cursor: Cursor,
    health: Health,
    /// Set after loading the local snapshot and after a failed read: the next read from the
    /// database checks that the feed has not gone back behind the cursor (a restored or
    /// replaced database, a failover to a standby that missed commits read here), and reloads
    /// everything if it has.
    check_head: bool,
    /// When the feed was last checked to still hold the cursor (see [`FEED_CHECK_INTERVAL`]).
    checked: Instant,
    /// A stored internal secret too short to use was reported (reported once).
    bad_secret_logged: bool,
}

impl Follower {
    /// Loads every live key; returns how many. Starts from an empty map each attempt, so a key
    /// revoked between a failed attempt and the next is not kept.
    async fn initial_load(&mut self) -> Result<usize, SyncError> {
        self.load(false).await
    }

    /// Loads every live key again while the keys held keep serving (no request sees a map
    /// half loaded), then drops those the database no longer holds (read from a primary that
    /// failed over without them). Returns how many were loaded.
    async fn reload(&mut self) -> Result<usize, SyncError> {
        self.load(true).await
    }

    async fn load(&mut self, keep_serving: bool) -> Result<usize, SyncError> {
        let head = timed(DB_TIMEOUT, feed::head(&self.store)).await?;
        if !keep_serving {
            self.keys.synced.clear();
        }
        let mut seen = std::collections::HashSet::new();
        // Maps sized once (a map grown key by key leaves its outgrown tables behind).
        let (keys, developers) = timed(DB_TIMEOUT, feed::live_keys(&self.store)).await?;
        if !keep_serving {
            self.keys.synced.reserve(usize::try_from(keys).unwrap_or(0));
        }
        self.interner = Interner::with_capacity(usize::try_from(developers).unwrap_or(0));
        let mut cursor = Cursor::default();
        let mut loaded = 0;
        // The last key read stamped with the head itself: every change up to the head was
        // visible before the load began, so the feed is followed from there, not from the
        // head's first key (a bulk change stamps many keys with one number: all of them would
        // be read and applied again).
        let mut last_at_head = String::new();
        loop {
            let page = timed(
                DB_TIMEOUT,
                feed::changes_since(&self.store, &cursor, true, PAGE),
            )
            .await?;
            if let Some(last) = page.last() {
                cursor = Cursor {
                    seq: last.change_seq,
                    id: last.id.clone(),
                };
            }
            if let Some(at_head) = page.iter().rfind(|s| s.change_seq == head) {
                last_at_head.clone_from(&at_head.id);
            }
            for state in &page {
                self.apply(state);
                if let (true, Ok(hash)) = (keep_serving, KeyHash::from_hex(&state.key_hash)) {
                    seen.insert(hash.0);
                }
            }
            loaded += page.len();
            if (page.len() as i64) < PAGE {
                break;
            }
        }
        if keep_serving {
            let mut gone = Vec::new();
            self.keys.synced.for_each(|hash, _| {
                if !seen.contains(&hash.0) {
                    gone.push(*hash);
                }
            });
            for hash in &gone {
                self.keys.synced.remove(hash);
            }
            if !gone.is_empty() {
                tracing::warn!(
                    keys = gone.len(),
                    "keys the database no longer holds dropped"
                );
            }
        }
        self.cursor = Cursor {
            seq: head,
            id: last_at_head,
        };
        // What the keys share is in their records now; the interner's own tables (a set of
        // every developer id, ~9 MiB for a million keys) are not needed to hold it.
        self.interner = Interner::default();
        self.succeeded(loaded);
        Ok(loaded)
    }

    /// Serves the keys of the local snapshot and follows the feed from its position. Returns
    /// whether it loaded.
    fn load_snapshot(&mut self, path: &std::path::Path) -> bool {
        match crate::keysnapshot::read(path) {
            Ok((cursor, keys)) => {
                let n = keys.len();
                self.keys.synced.clear();
                self.keys.synced.reserve(n);
                for key in keys {
                    self.keys.synced.insert_shared(key);
                }
                self.metrics.keys.set(n as i64);
                self.cursor = cursor;
                self.check_head = true;
                tracing::warn!(
                    keys = n,
                    path = %path.display(),
                    "control-plane database unreachable at start: serving the keys of the local snapshot until it answers"
                );
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "key snapshot unusable; ignored");
                false
            }
        }
    }

    /// Applies every change after the cursor; returns how many rows were applied.
    async fn poll(&mut self) -> Result<usize, SyncError> {
        if self.check_head || self.checked.elapsed() >= FEED_CHECK_INTERVAL {
            let head = timed(DB_TIMEOUT, feed::head(&self.store)).await?;
            let holds = timed(DB_TIMEOUT, feed::holds(&self.store, &self.cursor)).await?;
            self.check_head = false;
            self.checked = Instant::now();
            if head < self.cursor.seq || !holds {
                tracing::warn!("the key feed went back behind what this gateway read (database failed over, restored or replaced?): reloading every key");
                return self.reload().await;
            }
        }
        let mut applied = 0;
        loop {
            let page = timed(
                DB_TIMEOUT,
                feed::changes_since(&self.store, &self.cursor, false, PAGE),
            )
            .await?;
            for state in &page {
                self.apply(state);
            }
            if let Some(last) = page.last() {
                self.cursor = Cursor {
                    seq: last.change_seq,
                    id: last.id.clone(),
                };
            }
            applied += page.len();
            if (page.len() as i64) < PAGE {
                break;
            }
        }
        self.succeeded(applied);
        Ok(applied)
    }

    /// Reads the secret the admin API shares with the gateways (`settings.internal_secret`,
    /// created by the first admin node to start; it never changes afterwards) into `shared`,
    /// until it is there: one query per feed read while it is missing, none after.
    async fn load_secret(&mut self, shared: &Shared) {
        if shared.internal_secret.load().is_some() {
            return;
        }
        match timed(DB_TIMEOUT, settings::get(&self.store, internal::SETTING)).await {
            Ok(Some(text)) => match InternalSecret::new(&text) {
                Some(secret) => {
                    shared.internal_secret.store(Some(Arc::new(secret)));
                    tracing::info!(
                        "internal secret loaded: Files, Batches and batch items enabled"
                    );
                }
                None if !self.bad_secret_logged => {
                    self.bad_secret_logged = true;
                    tracing::warn!("the stored internal secret is shorter than 32 bytes; ignored (Files, Batches and batch items stay off)");
                }
                None => {}
            },
            // The admin API has not started yet.
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the internal secret; retrying at the next feed read")
            }
        }
    }

    /// Applies one feed row as the key's whole state.
    fn apply(&mut self, state: &KeyState) {
        let Ok(hash) = KeyHash::from_hex(&state.key_hash) else {
            tracing::warn!(key_id = %state.id, "stored key hash is not 64 hex digits; key ignored");
            return;
        };
        if state.deleted {
            self.keys.synced.remove(&hash);
            return;
        }
        let mut record = record_from_state(state, &mut self.interner);
        record.hash = hash;
        if let Some(old) = self.keys.synced.get(&hash) {
            // Requests in flight on the previous version still hold their slots.
            record.in_flight = InFlight::next_version(&old);
            // Ids held already are shared rather than held twice.
            if old.key_id == record.key_id {
                record.key_id = Arc::clone(&old.key_id);
            }
            if old.developer_id == record.developer_id {
                record.developer_id = Arc::clone(&old.developer_id);
            }
        }
        let record = Arc::new(record);
        if let Some(old) = self.keys.synced.insert_shared(Arc::clone(&record)) {
            // Keep the last use noted on the previous record of the key.
            record.last_use.carry_from(&old.last_use);
        }
    }

    fn succeeded(&mut self, applied: usize) {
        let m = &self.metrics;
        m.polls.inc();
        m.changes.inc_by(applied as u64);
        m.up.set(1);
        m.last_success.set(
            (crate::clock::now_ms() / 1000)
                .try_into()
                .unwrap_or(i64::MAX),
        );
        if applied > 0 {
            let held = self.keys.synced.len();
            m.keys.set(held as i64);
            // The interner only grows; rebuild it when it holds far more than the live keys use.
            if self.interner.len() > 2 * held + 1024 {
                self.interner = Interner::default();
            }
        }
        if self.health == Health::Down {
            tracing::info!("control-plane database reachable again; key sync resumed");
        }
        self.health = Health::Up;
    }

    fn failed(&mut self, e: &SyncError, what: &str) {
        self.metrics.errors.inc();
        self.metrics.up.set(0);
        if self.health == Health::Down {
            tracing::debug!(error = %e, "{what} failed again");
        } else {
            tracing::warn!(
                error = %e,
                "{what} failed: control-plane database unreachable or not migrated; \
                 serving the last known keys and retrying"
            );
        }
        self.health = Health::Down;
    }
}

/// The gateway's record of a stored key. Invalid permission entries (which the admin API
/// refuses, so only a hand-edited row has them) are dropped with a warning: the key can only
/// lose permissions that way, and an allowlist with no valid entry admits nobody.
pub fn record_from_state(state: &KeyState, interner: &mut Interner) -> KeyRecord {
    let (models, mut errors) = interner.patterns_lenient(&state.models);
    let (endpoints, e) = interner.patterns_lenient(&state.endpoints);
    errors.extend(e);
    let (ip_allowlist, e) = interner.ip_allowlist_lenient(&state.ip_allowlist);
    errors.extend(e);
    if !errors.is_empty() {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        tracing::warn!(key_id = %state.id, ?errors, "stored key has invalid permission entries; they are ignored");
    }
    KeyRecord {
        key_id: state.id.as_str().into(),
        developer_id: interner.string(&state.developer_id),
        models,
        endpoints,
        expires_at_ms: state
            .expires_at
            .and_then(|t| crate::keys::expiry_ms(t.max(0) as u64)),
        active: state.active,
        ip_allowlist,
        source: KeySource::ControlPlane,
        limits: interner.limits(KeyLimits {
            plan: Some(state.plan.as_str().into()),
            key_rpm: positive(state.rate_limit_rpm),
            key_tpm: positive(state.rate_limit_tpm),
            dev_rpm: positive(state.dev_rate_limit_rpm),
            dev_tpm: positive(state.dev_rate_limit_tpm),
            dev_quota_tokens: state.dev_quota_tokens.map(|q| q.max(0) as u64),
            spend_cap_nanos: state.spend_cap_nanos,
        }),
        ..KeyRecord::default()
    }
}

/// A stored per-minute limit as the gateway applies it (the admin API stores positive values
/// only; anything else is read as no limit).
fn positive(v: Option<i64>) -> Option<u32> {
    v.filter(|&n| n > 0)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Subscribes to the admin API's change notices; each one wakes the follower. Reconnects with
/// backoff; while not subscribed the follower polls at its fast interval.
async fn follow_redis(
    redis: aihub_net::redis::RedisTarget,
    wake: Arc<Notify>,
    live: Arc<AtomicBool>,
    metrics: KeySyncMetrics,
) {
    use futures_util::StreamExt;
    let mut down_logged = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        let subscribed = tokio::time::timeout(DB_TIMEOUT, async {
            let mut pubsub = redis.pubsub().await?;
            pubsub.subscribe(feed::REDIS_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                live.store(true, Ordering::Relaxed);
                metrics.push_connected.set(1);
                tracing::info!(
                    channel = feed::REDIS_CHANNEL,
                    "subscribed to key change notices"
                );
                backoff = Duration::from_millis(250);
                // Catch up on whatever changed while not subscribed.
                wake.notify_one();
                let mut messages = pubsub.into_on_message();
                while messages.next().await.is_some() {
                    wake.notify_one();
                }
                live.store(false, Ordering::Relaxed);
                metrics.push_connected.set(0);
                // Wake the follower so it switches to fast polling now.
                wake.notify_one();
                tracing::warn!("Redis key change subscription lost; polling until it is back");
                down_logged = true;
            }
            Ok(Err(e)) if !down_logged => {
                tracing::warn!(error = %e, "cannot subscribe to Redis key change notices; polling until it works");
                down_logged = true;
            }
            Err(_) if !down_logged => {
                tracing::warn!("Redis did not answer; polling until it does");
                down_logged = true;
            }
            _ => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Writes last-used times every `interval`, and once more at shutdown.
async fn flush_last_used(
    store: Store,
    keys: Arc<KeySet>,
    metrics: KeySyncMetrics,
    interval: Duration,
    mut shutdown: ShutdownWatch,
) {
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = shutdown.changed() => true,
        };
        match flush_once(&store, &keys).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.last_used_flushes.with_label_values(&["ok"]).inc();
                if failing {
                    tracing::info!(keys = n, "last-used times written again");
                }
                failing = false;
            }
            Err(e) => {
                metrics
                    .last_used_flushes
                    .with_label_values(&["error"])
                    .inc();
                if !failing {
                    tracing::warn!(error = %e, "cannot write last-used times; retrying at the next flush");
                }
                failing = true;
            }
        }
        if stopping {
            return;
        }
    }
}

/// Sends the last-used time of every key used since its last report; returns how many.
async fn flush_once(store: &Store, keys: &KeySet) -> Result<usize, SyncError> {
    let mut uses: Vec<(String, i64)> = Vec::new();
    let mut records: Vec<(Arc<KeyRecord>, Unreported)> = Vec::new();
    keys.synced.for_each(|_, r| {
        if let Some(used) = r.last_use.unreported() {
            uses.push((r.key_id.to_string(), used.ms() as i64));
            records.push((Arc::clone(r), used));
        }
    });
    if uses.is_empty() {
        return Ok(0);
    }
    timed(FLUSH_TIMEOUT, feed::record_last_used(store, &uses)).await?;
    for (r, used) in records {
        r.last_use.reported(used);
    }
    Ok(uses.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(models: &[&str], ips: &[&str]) -> KeyState {
        KeyState {
            id: "key_1".into(),
            key_hash: KeyHash::of("k").to_hex(),
            developer_id: "dev_1".into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            endpoints: vec!["*".into()],
            ip_allowlist: ips.iter().map(|s| s.to_string()).collect(),
            rate_limit_rpm: Some(60),
            rate_limit_tpm: Some(0),
            plan: "pro".into(),
            dev_rate_limit_rpm: None,
            dev_rate_limit_tpm: Some(5000),
            dev_quota_tokens: Some(-1),
            spend_cap_nanos: Some(7),
            expires_at: Some(1_700_000_000_000),
            active: true,
            deleted: false,
            change_seq: 3,
        }
    }

    #[test]
    fn records_from_stored_states() {
        let mut interner = Interner::default();
        let r = record_from_state(&state(&["gpt-4o*"], &[]), &mut interner);
        assert_eq!(r.source, KeySource::ControlPlane);
        assert!(r.models.matches("gpt-4o-mini") && !r.models.matches("demo"));
        assert!(r.ip_allowlist.is_none());
        assert_eq!(r.expires_at_ms.map(|e| e.get()), Some(1_700_000_000_000));
        assert_eq!(
            *r.limits,
            KeyLimits {
                plan: Some("pro".into()),
                key_rpm: Some(60),
                key_tpm: None,
                dev_rpm: None,
                dev_tpm: Some(5000),
                dev_quota_tokens: Some(0),
                spend_cap_nanos: Some(7),
            }
        );
        // Invalid entries narrow the key, never widen it.
        let r = record_from_state(&state(&["a*b", "demo"], &["nope"]), &mut interner);
        assert!(r.models.matches("demo") && !r.models.matches("a"));
        assert!(!r.allows_ip(Some("127.0.0.1".parse().unwrap())));
    }
}
