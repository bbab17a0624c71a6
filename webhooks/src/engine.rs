//! The delivery engine: one loop per admin node that fans new outbox events out into
//! deliveries, leases due deliveries, sends them concurrently (bounded overall and per
//! endpoint, so a slow or dead receiver holds only its own slots), and records the results in
//! batches, each step one transaction (`aihub_store::deliveries`).
//!
//! At-least-once: a delivery is leased before it is sent and its result recorded after; a
//! node that dies between the two leaves a lease that expires, and the delivery is sent again
//! (same event id, so receivers de-duplicate). Nothing is lost: the outbox row is marked
//! dispatched in the transaction that creates its deliveries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aihub_store::deliveries::{self, Claimed, Disabled, Finished};
use aihub_store::outbox::OutboxEvent;
use aihub_store::{now_ms, Store};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::client::Sender;
use crate::config::WebhooksConfig;
use crate::{schedule, signature};

/// What the engine tells its owner: events it fanned out (the admin API mails usage alerts)
/// and endpoints it disabled (mailed to their developer).
#[derive(Debug, Clone)]
pub enum Notice {
    Events(Vec<OutboxEvent>),
    Disabled(Box<Disabled>),
}

/// The engine's metrics.
#[derive(Clone)]
pub struct Metrics {
    attempts: IntCounterVec,
    latency: Histogram,
    first_attempt: Histogram,
    in_flight: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let attempts = IntCounterVec::new(
            Opts::new("aihub_webhook_attempts_total", "Webhook attempts by result"),
            &["result"],
        )
        .expect("metric");
        let latency = Histogram::with_opts(
            HistogramOpts::new("aihub_webhook_attempt_seconds", "Webhook attempt duration")
                .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0]),
        )
        .expect("metric");
        let first_attempt = Histogram::with_opts(
            HistogramOpts::new(
                "aihub_webhook_first_attempt_delay_seconds",
                "From an event's creation to its first attempt's start",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .expect("metric");
        let in_flight =
            IntGauge::new("aihub_webhook_in_flight", "Webhook attempts in flight").expect("metric");
        for c in [
            Box::new(attempts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(first_attempt.clone()),
            Box::new(in_flight.clone()),
        ] {
            // A second engine on one registry (tests) keeps the first's metrics.
            let _ = registry.register(c);
        }
        Metrics {
            attempts,
            latency,
            first_attempt,
            in_flight,
        }
    }
}

/// Runs `engine` on its own runtime (two worker threads named `webhooks`) at a lower CPU
/// priority than the rest of the process: a draining backlog uses what the API leaves, and
/// never occupies the API's workers. Returns once the runtime is up.
pub fn spawn(engine: Arc<Engine>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("webhooks")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
        .map_err(|e| format!("webhook engine runtime: {e}"))?;
    std::thread::Builder::new()
        .name("webhooks".into())
        .spawn(move || {
            lower_priority();
            rt.block_on(engine.run(std::future::pending()));
        })
        .map_err(|e| format!("webhook engine thread: {e}"))?;
    Ok(())
}

/// Nice 10 for the calling thread (on Linux `setpriority` of "this process", `who = 0`, is
/// per thread).
fn lower_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, 10) {
        tracing::debug!(error = %e, "webhooks: cannot lower the engine threads' priority");
    }
}

/// The engine of one node.
pub struct Engine {
    store: Store,
    config: WebhooksConfig,
    sender: Sender,
    owner: String,
    wake: Arc<Notify>,
    metrics: Metrics,
    notices: mpsc::Sender<Notice>,
    /// Attempts in flight per endpoint.
    busy: Mutex<HashMap<String, usize>>,
}

/// How many events one fan-out transaction takes, and deliveries one claim.
const BATCH: i64 = 500;

impl Engine {
    /// An engine and the receiving end of its notices (dropped notices are only logged).
    pub fn new(
        store: Store,
        config: WebhooksConfig,
        sender: Sender,
        metrics: Metrics,
    ) -> (Arc<Engine>, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(1024);
        let owner = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "node".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        let engine = Engine {
            store,
            config,
            sender,
            owner,
            wake: Arc::new(Notify::new()),
            metrics,
            notices: tx,
            busy: Mutex::new(HashMap::new()),
        };
        (Arc::new(engine), rx)
    }

    /// A handle that wakes the engine (after a transaction that wrote events commits).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `shutdown` resolves; attempts in flight then finish or keep their lease.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let (done_tx, done_rx) = mpsc::channel::<Finished>(self.config.concurrency * 2);
        let recorder = tokio::spawn(self.clone().record(done_rx));
        tokio::pin!(shutdown);
        loop {
            let mut busy = false;
            let mut wait = self.config.poll_interval;
            // A read first: an idle engine takes no write lock.
            let (events, due) = match deliveries::work(&self.store).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "webhooks: cannot read the backlog; retrying");
                    (false, None)
                }
            };
            if events {
                match self.fan_out().await {
                    Ok(n) => busy |= n as i64 == BATCH,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhooks: cannot fan events out; retrying")
                    }
                }
            }
            let now = now_ms();
            if events || due.is_some_and(|d| d <= now) {
                match self.claim_and_send(&slots, &done_tx).await {
                    Ok(full) => busy |= full,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhooks: cannot claim deliveries; retrying")
                    }
                }
            } else if let Some(d) = due {
                wait = wait.min(Duration::from_millis((d - now).max(1) as u64));
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        drop(done_tx);
        // In-flight attempts end within the timeout; their results are recorded.
        let _ = tokio::time::timeout(self.config.timeout * 2, recorder).await;
    }

    /// Fans out one batch of events; returns how many.
    async fn fan_out(&self) -> Result<usize, aihub_store::StoreError> {
        let (events, _) = deliveries::fan_out(&self.store, BATCH).await?;
        let n = events.len();
        if n > 0 && self.notices.try_send(Notice::Events(events)).is_err() {
            tracing::warn!("webhooks: notice queue full; events not passed to the mailer");
        }
        Ok(n)
    }

    /// Claims what the free slots allow and starts sending; `true` when the claim was full
    /// (more may be due).
    async fn claim_and_send(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        done: &mpsc::Sender<Finished>,
    ) -> Result<bool, aihub_store::StoreError> {
        let free = slots.available_permits().min(BATCH as usize);
        if free == 0 {
            return Ok(false);
        }
        let cap = self.config.per_endpoint_concurrency;
        let full: Vec<String> = {
            let busy = self.busy.lock().expect("busy map");
            busy.iter()
                .filter(|(_, n)| **n >= cap)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let skip: Vec<&str> = full.iter().map(String::as_str).collect();
        let lease_until = now_ms() + self.config.lease.as_millis() as i64;
        let claimed =
            deliveries::claim(&self.store, &self.owner, lease_until, free as i64, &skip).await?;
        let n = claimed.len();
        let mut over = Vec::new();
        for c in claimed {
            let admitted = {
                let mut busy = self.busy.lock().expect("busy map");
                let slot = busy.entry(c.endpoint.id.clone()).or_insert(0);
                (*slot < cap).then(|| *slot += 1).is_some()
            };
            if !admitted {
                over.push(c.id);
                continue;
            }
            let permit = slots
                .clone()
                .try_acquire_owned()
                .expect("claimed within free slots");
            let (engine, done) = (self.clone(), done.clone());
            self.metrics.in_flight.inc();
            tokio::spawn(async move {
                let finished = engine.attempt(&c).await;
                drop(permit);
                // The recorder frees the endpoint's slot once the result is saved.
                let _ = done.send(finished).await;
            });
        }
        if !over.is_empty() {
            let ids: Vec<&str> = over.iter().map(String::as_str).collect();
            deliveries::release(&self.store, &ids).await?;
        }
        Ok(n == free && over.is_empty())
    }

    /// One attempt of one delivery.
    async fn attempt(&self, c: &Claimed) -> Finished {
        let started = now_ms();
        let attempt = c.attempts + 1;
        if attempt == 1 {
            self.metrics
                .first_attempt
                .observe((started - c.created_at).max(0) as f64 / 1000.0);
        }
        let secrets = c.endpoint.signing_secrets(started);
        let body = Bytes::from(c.payload.clone());
        let signed = signature::sign(&secrets, &c.event_id, started / 1000, &body);
        let headers = headers(c, &signed);
        let answer = self.sender.post(&c.endpoint.url, &headers, body).await;
        self.metrics.latency.observe(answer.latency.as_secs_f64());
        let succeeded = answer.status.is_some_and(|s| (200..300).contains(&s));
        let gone = answer.status == Some(410);
        let result = match (succeeded, answer.status, answer.refused) {
            (true, _, _) => "success",
            (_, Some(_), _) => "failure",
            (_, None, true) => "refused",
            (_, None, false) => "error",
        };
        self.metrics.attempts.with_label_values(&[result]).inc();
        let error = answer.error.clone().or_else(|| match answer.status {
            Some(s) if (300..400).contains(&s) => Some(format!("{s}: redirects are not followed")),
            Some(s) if !succeeded => Some(format!("the endpoint answered {s}")),
            _ => None,
        });
        let next_attempt_at = (!succeeded && !gone && attempt < c.max_attempts).then(|| {
            now_ms()
                + schedule::next_delay(&self.config.retry_schedule, attempt, answer.retry_after)
                    .as_millis() as i64
        });
        Finished {
            delivery_id: c.id.clone(),
            endpoint_id: c.endpoint.id.clone(),
            attempt,
            started_at: started,
            status_code: answer.status.map(i64::from),
            latency_ms: answer.latency.as_millis() as i64,
            response_body: answer.body,
            error,
            succeeded,
            next_attempt_at,
            disable: gone.then(|| "the endpoint answered 410 Gone".to_owned()),
        }
    }

    /// Saves results in batches (whatever arrived within a few milliseconds, up to 500), then
    /// frees their endpoints' slots. A failed save is retried with the same batch.
    async fn record(self: Arc<Self>, mut done: mpsc::Receiver<Finished>) {
        let disable_after = self.config.disable_after.as_millis() as i64;
        let mut batch: Vec<Finished> = Vec::with_capacity(BATCH as usize);
        while let Some(first) = done.recv().await {
            batch.push(first);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(5);
            while batch.len() < BATCH as usize {
                match tokio::time::timeout_at(deadline, done.recv()).await {
                    Ok(Some(f)) => batch.push(f),
                    _ => break,
                }
            }
            let mut wait = Duration::from_millis(100);
            loop {
                match deliveries::finish(&self.store, &batch, disable_after).await {
                    Ok(disabled) => {
                        for d in disabled {
                            tracing::warn!(endpoint_id = %d.endpoint.id, reason = %d.reason, "webhook endpoint disabled");
                            let _ = self.notices.try_send(Notice::Disabled(Box::new(d)));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, results = batch.len(), "webhooks: cannot record attempts; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
            {
                let mut busy = self.busy.lock().expect("busy map");
                for f in &batch {
                    if let Some(n) = busy.get_mut(&f.endpoint_id) {
                        *n -= 1;
                        if *n == 0 {
                            busy.remove(&f.endpoint_id);
                        }
                    }
                }
            }
            self.metrics.in_flight.sub(batch.len() as i64);
            batch.clear();
            self.wake.notify_one();
        }
    }
}

/// The request headers: both signature schemes, the event type and the delivery id.
fn headers(c: &Claimed, s: &signature::Signed) -> Vec<(HeaderName, HeaderValue)> {
    let v = |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""));
    vec![
        (HeaderName::from_static("x-aihub-event"), v(&c.event_type)),
        (HeaderName::from_static("x-aihub-signature"), v(&s.aihub)),
        (HeaderName::from_static("x-aihub-delivery"), v(&c.id)),
        (HeaderName::from_static("webhook-id"), v(&c.event_id)),
        (
            HeaderName::from_static("webhook-timestamp"),
            v(&s.timestamp),
        ),
        (HeaderName::from_static("webhook-signature"), v(&s.standard)),
    ]
}
