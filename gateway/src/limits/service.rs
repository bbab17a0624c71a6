//! The limiter's background work, as one pingora background service:
//! - **seed**: the current period's usage per developer from ClickHouse (hourly rollups for the
//!   whole hours before this node started, raw records for the rest), retried until it works;
//! - **Redis monitor** (distributed mode): connect, refresh the node registry, hand over usage
//!   counted during an outage, every second;
//! - **settler** (distributed mode): settles sent to Redis in batches ([`super::settler`]),
//!   still running after shutdown so that no settle of a finishing request is lost;
//! - **eviction**: bucket entries that are full again are dropped every 30 s;
//! - **alerts**: usage alerts become `api.usage_alert` outbox events in the control-plane
//!   database (one per developer, period and threshold, however many nodes report it), retried
//!   while the database is down.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aihub_plans::Period;
use aihub_store::{Store, StoreOptions};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc::Receiver;

use super::{Alert, Limits, Queues};
use crate::clock::now_ms;

const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
const EVICT_INTERVAL: Duration = Duration::from_secs(30);
const SEED_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where seeds come from and alerts go.
pub struct LimitsService {
    pub limits: Arc<Limits>,
    pub clickhouse: Option<clickhouse::Client>,
    /// Control-plane database URL (alerts); `None`: alerts are only logged.
    pub database_url: Option<String>,
    /// Taken once, at start.
    pub queues: Mutex<Option<Queues>>,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct SeedRow {
    developer_id: String,
    tokens: u64,
    cost: i64,
}

/// The period's usage per developer recorded before `before_ms`.
pub async fn seed_rows(
    client: &clickhouse::Client,
    period: Period,
    before_ms: i64,
) -> Result<Vec<(String, u64, i64)>, clickhouse::error::Error> {
    let hour_ms = before_ms - before_ms.rem_euclid(3_600_000);
    let rows = client
        .query(
            "SELECT developer_id, toUInt64(sum(t)) AS tokens, toInt64(sum(c)) AS cost FROM ( \
               SELECT developer_id, total_tokens AS t, cost_nanos AS c FROM usage_hourly \
               WHERE hour >= toDateTime(?) AND hour < toDateTime(?) \
               UNION ALL \
               SELECT developer_id, toUInt64(total_tokens) AS t, cost_nanos AS c FROM usage_events \
               WHERE ts >= toDateTime(?) AND ts_ms < ? \
             ) GROUP BY developer_id",
        )
        .bind(period.start_ms() / 1000)
        .bind(hour_ms / 1000)
        .bind(hour_ms / 1000)
        .bind(before_ms.max(0) as u64)
        .fetch_all::<SeedRow>()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.developer_id, r.tokens, r.cost))
        .collect())
}

impl LimitsService {
    async fn seed(limits: Arc<Limits>, client: clickhouse::Client) {
        let started = now_ms() as i64;
        let period = limits.quota.period(started);
        let mut wait = Duration::from_millis(500);
        loop {
            match seed_rows(&client, period, started).await {
                Ok(rows) => {
                    for (dev, tokens, cost) in &rows {
                        limits.quota.add_seed(period, dev, *tokens, *cost);
                    }
                    tracing::info!(%period, developers = rows.len(), "quota usage seeded from ClickHouse");
                    limits.metrics.quota_seeded.set(1);
                    limits
                        .seeded
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this period's usage from ClickHouse yet; quotas count from zero until it answers");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(SEED_RETRY_MAX);
                }
            }
        }
    }

    async fn monitor(limits: Arc<Limits>) {
        let Some(redis) = limits.redis.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(MONITOR_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let book = &limits.quota;
            let seeded = limits.seeded.load(std::sync::atomic::Ordering::Relaxed);
            match redis
                .monitor_once(|p, dev| book.totals(p, dev), seeded)
                .await
            {
                Ok(came_back) => {
                    limits.metrics.redis_up.set(1);
                    if came_back {
                        tracing::info!(
                            nodes = redis.nodes(),
                            "Redis reachable: limits are shared by all gateway nodes"
                        );
                    }
                }
                Err(e) => {
                    if redis.mark_down() {
                        limits.metrics.redis_up.set(0);
                        limits.metrics.redis_errors.inc();
                        tracing::warn!(error = %e, nodes = redis.nodes(), "Redis unreachable: limits are decided locally with this node's share until it answers again");
                    }
                }
            }
            limits.metrics.nodes.set(i64::from(redis.nodes()));
        }
    }

    async fn evict(limits: Arc<Limits>) {
        let mut tick = tokio::time::interval(EVICT_INTERVAL);
        loop {
            tick.tick().await;
            limits.local.evict(limits.now_us());
            limits.metrics.entries.set(limits.local.len() as i64);
        }
    }

    async fn deliver(limits: Arc<Limits>, mut rx: Receiver<Alert>, database_url: Option<String>) {
        let store = match database_url {
            Some(url) => match Store::connect(&StoreOptions {
                max_connections: 1,
                ..StoreOptions::new(url)
            })
            .await
            {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "control-plane database unusable: usage alerts are only logged");
                    None
                }
            },
            None => None,
        };
        let mut queue: VecDeque<Alert> = VecDeque::new();
        let mut wait = Duration::from_millis(200);
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(a) => queue.push_back(a),
                    None => return,
                }
            }
            while let Ok(a) = rx.try_recv() {
                queue.push_back(a);
            }
            let Some(alert) = queue.front() else { continue };
            tracing::info!(
                developer_id = %alert.developer_id,
                period = %alert.period,
                threshold_pct = alert.threshold_pct,
                used_tokens = alert.used_tokens,
                quota_tokens = alert.quota_tokens,
                "usage alert"
            );
            let Some(store) = &store else {
                limits
                    .metrics
                    .usage_alerts
                    .with_label_values(&["logged"])
                    .inc();
                queue.pop_front();
                continue;
            };
            let record = aihub_store::usage_alerts::UsageAlert {
                developer_id: alert.developer_id.to_string(),
                period: alert.period.to_string(),
                threshold_pct: i64::from(alert.threshold_pct),
                used_tokens: alert.used_tokens as i64,
                quota_tokens: alert.quota_tokens as i64,
            };
            match aihub_store::usage_alerts::record(store, &record).await {
                Ok(new) => {
                    let result = if new { "recorded" } else { "duplicate" };
                    limits
                        .metrics
                        .usage_alerts
                        .with_label_values(&[result])
                        .inc();
                    queue.pop_front();
                    wait = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::warn!(error = %e, queued = queue.len(), "cannot record a usage alert; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
            while queue.len() > super::ALERT_QUEUE {
                queue.pop_front();
                limits
                    .metrics
                    .usage_alerts
                    .with_label_values(&["dropped"])
                    .inc();
            }
        }
    }
}

#[async_trait]
impl BackgroundService for LimitsService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let limits = &self.limits;
        let mut tasks = Vec::new();
        if let Some(client) = self.clickhouse.clone() {
            tasks.push(tokio::spawn(Self::seed(Arc::clone(limits), client)));
        }
        if let Some(redis) = &limits.redis {
            limits.metrics.redis_up.set(i64::from(redis.is_up()));
            tasks.push(tokio::spawn(Self::monitor(Arc::clone(limits))));
        }
        tasks.push(tokio::spawn(Self::evict(Arc::clone(limits))));
        if let Some(queues) = self.queues.lock().expect("not poisoned").take() {
            // Not aborted at shutdown: it sends the settles of requests still finishing.
            tokio::spawn(Arc::clone(limits).run_settler(queues.settles, shutdown.clone()));
            tasks.push(tokio::spawn(Self::deliver(
                Arc::clone(limits),
                queues.alerts,
                self.database_url.clone(),
            )));
        }
        let _ = shutdown.changed().await;
        if let Some(redis) = &limits.redis {
            redis.leave().await;
        }
        // Alerts still queued get a moment to land.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for t in tasks {
            t.abort();
        }
    }
}
