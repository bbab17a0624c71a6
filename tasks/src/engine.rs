//! The worker engine: one per admin node, sharing the queue with every other node's.
//!
//! - **Items**: claims runnable items fairly ([`aihub_store::queue::claim`]) up to the free
//!   slots of this node's `concurrency`, runs each through the gateway ([`crate::run`]) and
//!   hands the result to one recorder, which writes results in batches (one transaction per
//!   batch) and stops tasks whose key became invalid or whose quota ran out.
//! - **Stages**: claims tasks whose task-level work is due ([`crate::stage`]).
//! - **Heartbeats** renew this node's leases every third of a lease; a node that dies stops
//!   renewing and its items and stages are taken over once their leases expire.
//! - **Rate limits**: an item refused by its key's rate limit goes back to the queue until the
//!   `Retry-After`. Every answer's `x-ratelimit-remaining-*` / `-reset-*` headers pace the
//!   developer's claims on this node: nothing remaining → none until the reset, little
//!   remaining → at most that many in flight; so a limited key is paced, not hammered.
//! - **Cancellation**: a cancel ends queued items at once (in its own transaction); items this
//!   node claimed but has not sent yet are dropped when the cancel is seen (polled every
//!   250 ms), so no new item starts later than that.
//! - **Sweeps**: tasks past their completion window expire; files past retention are removed.
//!
//! Exactly once where it matters: an item's request id is derived from the item, so an item
//! sent again after a takeover is metered once; its result line is written once (a worker's
//! result is recorded only while it holds the item's lease).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aihub_apikey::internal::InternalSecret;
use aihub_store::queue::{self, Claimed, ItemResult, Outcome};
use aihub_store::{now_ms, tasks, Store};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::config::TasksConfig;
use crate::files::FileStore;
use crate::run::{self, Ran, Stop};
use crate::stage::{self, Exporter, StageCtx};

/// The engine's metrics.
#[derive(Clone)]
pub struct Metrics {
    items: IntCounterVec,
    stages: IntCounterVec,
    in_flight: IntGauge,
    queued: IntGauge,
    running: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let items = IntCounterVec::new(
            Opts::new(
                "aihub_task_items_total",
                "Task and batch items run, by result",
            ),
            &["result"],
        )
        .expect("metric");
        let stages = IntCounterVec::new(
            Opts::new(
                "aihub_task_stages_total",
                "Task-level stages run, by result",
            ),
            &["result"],
        )
        .expect("metric");
        let in_flight = IntGauge::new("aihub_task_items_in_flight", "Items in flight on this node")
            .expect("metric");
        let queued = IntGauge::new(
            "aihub_task_items_queued",
            "Runnable items waiting (all nodes)",
        )
        .expect("metric");
        let running = IntGauge::new(
            "aihub_task_items_running",
            "Items leased by a worker (all nodes)",
        )
        .expect("metric");
        for c in [
            Box::new(items.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stages.clone()),
            Box::new(in_flight.clone()),
            Box::new(queued.clone()),
            Box::new(running.clone()),
        ] {
            let _ = registry.register(c);
        }
        Metrics {
            items,
            stages,
            in_flight,
            queued,
            running,
        }
    }
}

/// Wakes the engine when work was created on this node (other nodes' work is found by
/// polling).
#[derive(Clone, Default)]
pub struct Waker(Arc<Notify>);

impl Waker {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

struct Inner {
    store: Store,
    config: TasksConfig,
    client: reqwest::Client,
    secret: InternalSecret,
    stage: StageCtx,
    metrics: Metrics,
    wake_stage: Waker,
    wake_items: Arc<Notify>,
    cancelling: RwLock<HashSet<String>>,
    /// Developers whose keys' rate limits leave little room, as their last answers' headers
    /// (or a 429) said: no item is claimed for them until `until` (unix ms), then at most
    /// `cap` in flight, so a limited key is paced rather than hammered by its own batch.
    limited: Mutex<HashMap<String, (i64, i64)>>,
    slots: Arc<Semaphore>,
}

/// A running engine; [`Engine::stop`] ends its loops (leases left behind expire).
pub struct Engine {
    handles: Vec<JoinHandle<()>>,
}

/// The HTTP client items go through: TLS verified against the system's roots plus
/// `gateway_tls.ca_file`, presenting `gateway_tls.cert_file` when asked. The files were checked
/// when the configuration was loaded; if they became unusable since, the error is logged and
/// the client keeps the system's roots only (a private CA then fails the handshake: never an
/// unverified connection).
fn gateway_client(config: &TasksConfig) -> reqwest::Client {
    let builder = || reqwest::Client::builder().pool_max_idle_per_host(config.concurrency);
    match config
        .gateway_tls
        .connector()
        .map_err(|e| e.to_string())
        .and_then(|tls| {
            builder()
                .use_preconfigured_tls(tls)
                .build()
                .map_err(|e| e.to_string())
        }) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "tasks.gateway_tls is unusable; using the system's roots only");
            builder()
                .build()
                .expect("an HTTP client with the default TLS settings builds")
        }
    }
}

impl Engine {
    /// Starts the loops on the current runtime; `waker` is what the API nudges.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Store,
        files: Arc<dyn FileStore>,
        config: TasksConfig,
        secret: InternalSecret,
        exporter: Arc<dyn Exporter>,
        metrics: Metrics,
        waker: Waker,
    ) -> Engine {
        let owner = format!("worker-{}", uuid::Uuid::now_v7().simple());
        let client = gateway_client(&config);
        let inner = Arc::new(Inner {
            stage: StageCtx {
                store: store.clone(),
                files,
                config: config.clone(),
                exporter,
                owner,
            },
            slots: Arc::new(Semaphore::new(config.concurrency)),
            store,
            config,
            client,
            secret,
            metrics,
            wake_stage: waker,
            wake_items: Arc::new(Notify::new()),
            cancelling: RwLock::new(HashSet::new()),
            limited: Mutex::new(HashMap::new()),
        });
        tracing::info!(owner = %inner.stage.owner, "task engine started");
        let (tx, rx) = mpsc::channel(4096);
        let handles = vec![
            tokio::spawn(items_loop(Arc::clone(&inner), tx)),
            tokio::spawn(recorder(Arc::clone(&inner), rx)),
            tokio::spawn(stages_loop(Arc::clone(&inner))),
            tokio::spawn(heartbeats(Arc::clone(&inner))),
            tokio::spawn(watch_cancels(Arc::clone(&inner))),
            tokio::spawn(sweeps(inner)),
        ];
        Engine { handles }
    }

    /// Stops every loop now. Items in flight are abandoned: their leases expire and another
    /// worker (or this node after a restart) runs them again, metered once.
    pub fn stop(&self) {
        for h in &self.handles {
            h.abort();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lease_until(config: &TasksConfig) -> i64 {
    now_ms() + config.lease.as_millis() as i64
}

async fn items_loop(inner: Arc<Inner>, results: mpsc::Sender<(Claimed, Ran)>) {
    let cfg = &inner.config;
    loop {
        let free = inner.slots.available_permits();
        let mut claimed = Vec::new();
        if free > 0 {
            let caps = inner.limited_caps();
            let caps: Vec<(&str, i64)> = caps.iter().map(|(d, c)| (d.as_str(), *c)).collect();
            match queue::claim(
                &inner.store,
                &inner.stage.owner,
                lease_until(cfg),
                cfg.per_developer_concurrency,
                free.min(256) as i64,
                &caps,
            )
            .await
            {
                Ok(c) => claimed = c,
                Err(e) => tracing::warn!(error = %e, "task items could not be claimed"),
            }
        }
        let full = !claimed.is_empty() && claimed.len() == free;
        for item in claimed {
            let permit = Arc::clone(&inner.slots)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let inner = Arc::clone(&inner);
            let results = results.clone();
            inner.metrics.in_flight.inc();
            tokio::spawn(async move {
                let ran = if inner.is_cancelling(&item.task_id) {
                    Ran {
                        outcome: Outcome::Cancelled,
                        stop: None,
                        label: "cancelled",
                        room: None,
                    }
                } else {
                    run::run(
                        &inner.client,
                        &inner.secret,
                        &inner.config.gateway_url,
                        inner.config.item_timeout,
                        inner.config.max_attempts,
                        &item,
                    )
                    .await
                };
                inner.metrics.items.with_label_values(&[ran.label]).inc();
                inner.metrics.in_flight.dec();
                inner.pace(&item.developer_id, &ran);
                let _ = results.send((item, ran)).await;
                drop(permit);
                inner.wake_items.notify_one();
            });
        }
        if !full {
            // Nothing more to take now: wait for a free slot, a nudge or the poll interval.
            let _ = tokio::time::timeout(cfg.poll_interval, inner.wake_items.notified()).await;
        }
    }
}

impl Inner {
    /// The claim caps of developers with little room: 0 until their limit admits again, then
    /// the room their last answer showed (at least 1: a probe).
    fn limited_caps(&self) -> Vec<(String, i64)> {
        let now = now_ms();
        let Ok(limited) = self.limited.lock() else {
            return Vec::new();
        };
        limited
            .iter()
            .map(|(d, (until, cap))| (d.clone(), if *until > now { 0 } else { *cap }))
            .collect()
    }

    /// Learns a developer's room from an item's answer: a 429 or nothing remaining pauses
    /// them until the limit admits again; little remaining caps them at that; plenty (or no
    /// limit headers) lifts the cap.
    fn pace(&self, developer_id: &str, ran: &Ran) {
        let Ok(mut limited) = self.limited.lock() else {
            return;
        };
        let room = match (&ran.outcome, ran.room) {
            (Outcome::Retry { at, counts: false }, _) => Some((*at, 1)),
            (Outcome::Cancelled, _) => return,
            (_, Some(r)) if r.remaining == 0 => Some((r.until, 1)),
            (_, Some(r)) if (r.remaining as i64) < self.config.per_developer_concurrency => {
                Some((r.until, r.remaining as i64))
            }
            _ => None,
        };
        match room {
            Some(room) => {
                limited.insert(developer_id.to_owned(), room);
            }
            None => {
                limited.remove(developer_id);
            }
        }
    }

    fn is_cancelling(&self, task_id: &str) -> bool {
        self.cancelling
            .read()
            .map(|s| s.contains(task_id))
            .unwrap_or(false)
    }
}

/// Writes results in batches: whatever arrived within 20 ms, at most 512.
async fn recorder(inner: Arc<Inner>, mut rx: mpsc::Receiver<(Claimed, Ran)>) {
    let mut batch: Vec<(Claimed, Ran)> = Vec::with_capacity(512);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        while batch.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let results: Vec<ItemResult> = batch
            .iter()
            .map(|(c, r)| ItemResult {
                task_id: c.task_id.clone(),
                line: c.line,
                outcome: r.outcome.clone(),
            })
            .collect();
        let mut stops: Vec<&Stop> = batch.iter().filter_map(|(_, r)| r.stop.as_ref()).collect();
        stops.dedup_by(|a, b| a.task_id == b.task_id);
        // A failed write is retried until it lands: the leases stay valid meanwhile (the
        // heartbeat renews them), and a node that dies leaves them to expire.
        let mut delay = Duration::from_millis(100);
        loop {
            match queue::finish(&inner.store, &inner.stage.owner, &results).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "task results not recorded; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        for stop in stops {
            if let Err(e) = stop_task(&inner.store, stop).await {
                tracing::warn!(task_id = %stop.task_id, error = %e, "task could not be stopped");
            }
        }
        batch.clear();
        inner.wake_stage.wake();
    }
}

async fn stop_task(store: &Store, stop: &Stop) -> aihub_store::Result<()> {
    let mut tx = store.begin_write().await?;
    let n = queue::end_remaining(
        &mut tx,
        &stop.task_id,
        queue::FAILED,
        &stop.code,
        &stop.message,
        stop.reason.as_deref(),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(task_id = %stop.task_id, code = %stop.code, items = n, "task's remaining items ended");
    Ok(())
}

/// Task-level work runs this many tasks at a time on PostgreSQL: their file writes and syncs
/// overlap. On SQLite one at a time: its single writer turns concurrent stage transactions
/// into busy waits (measured: 8 at once made 10,000 one-item tasks take 189 s instead of 40 s).
fn stages_at_once(store: &Store) -> i64 {
    match store.dialect() {
        aihub_store::Dialect::Sqlite => 1,
        aihub_store::Dialect::Postgres => 8,
    }
}

async fn stages_loop(inner: Arc<Inner>) {
    loop {
        let claimed = tasks::claim_stage(
            &inner.store,
            &inner.stage.owner,
            lease_until(&inner.config),
            stages_at_once(&inner.store),
        )
        .await;
        let found = match claimed {
            Ok(list) => {
                let found = !list.is_empty();
                let mut runs = tokio::task::JoinSet::new();
                for task in list {
                    let inner = Arc::clone(&inner);
                    runs.spawn(async move { run_stage(&inner, &task).await });
                }
                while runs.join_next().await.is_some() {}
                inner.wake_items.notify_one();
                found
            }
            Err(e) => {
                tracing::warn!(error = %e, "task stages could not be claimed");
                false
            }
        };
        if !found {
            let _ = tokio::time::timeout(inner.config.poll_interval, inner.wake_stage.0.notified())
                .await;
        }
    }
}

async fn run_stage(inner: &Inner, task: &tasks::Task) {
    let label = match stage::run(&inner.stage, task).await {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(task_id = %task.id, error = %e, "task stage failed; retried in 5s");
            let _ =
                tasks::retry_stage(&inner.store, &task.id, &inner.stage.owner, now_ms() + 5_000)
                    .await;
            "error"
        }
    };
    inner.metrics.stages.with_label_values(&[label]).inc();
}

async fn heartbeats(inner: Arc<Inner>) {
    let every = inner.config.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let until = lease_until(&inner.config);
        if let Err(e) = queue::heartbeat(&inner.store, &inner.stage.owner, until).await {
            tracing::warn!(error = %e, "item leases not renewed");
        }
        if let Err(e) = tasks::heartbeat(&inner.store, &inner.stage.owner, until).await {
            tracing::warn!(error = %e, "task leases not renewed");
        }
    }
}

async fn watch_cancels(inner: Arc<Inner>) {
    loop {
        if let Ok(ids) = queue::cancelling(&inner.store).await {
            if let Ok(mut set) = inner.cancelling.write() {
                *set = ids.into_iter().collect();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn sweeps(inner: Arc<Inner>) {
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tick += 1;
        match stage::expire(&inner.store, 100).await {
            Ok(n) if n > 0 => {
                tracing::info!(tasks = n, "tasks past their completion window expired");
                inner.wake_stage.wake();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        if let Ok((queued, running)) = queue::depth(&inner.store).await {
            inner.metrics.queued.set(queued);
            inner.metrics.running.set(running);
        }
        if tick.is_multiple_of(12) {
            if let Err(e) = stage::sweep_files(&inner.store, &*inner.stage.files, 500).await {
                tracing::warn!(error = %e, "file retention sweep failed");
            }
        }
    }
}
