//! Settles of requests decided in Redis, sent in batches.
//!
//! [`super::Limits::settle`] queues a [`SettleJob`] and returns; [`Limits::run_settler`] takes
//! whatever is queued (up to [`SETTLE_BATCH`]) and sends it to Redis as one pipeline, so under
//! load a round trip carries many settles. The answers (global quota totals) update the node's
//! view and raise usage alerts; a failure keeps the quota usage for the Redis monitor to hand
//! over later. A full queue (Redis far behind) is treated like a failed settle.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use aihub_plans::{Period, PlanCatalog};
use tokio::sync::mpsc::Receiver;

use super::distributed::{Distributed, RedisDown, SettleArgs, SettleOutcome};
use super::quota::{DevUsage, QuotaRule};
use super::Limits;

/// Settles waiting for Redis; beyond this they are counted locally (see module doc).
pub const SETTLE_QUEUE: usize = 65_536;
/// Most settles in one pipeline.
pub const SETTLE_BATCH: usize = 256;

/// One request's settle, with what its answer updates.
pub struct SettleJob {
    pub args: SettleArgs,
    /// The quota counted: rule, the developer's usage entry, period.
    pub quota: Option<(QuotaRule, Arc<DevUsage>, Period)>,
    /// The plans in force when the request ended (their alert thresholds).
    pub plans: Arc<PlanCatalog>,
}

impl Limits {
    /// Sends queued settles to Redis, a batch per round trip, until the queue closes.
    pub async fn run_settler(self: Arc<Self>, mut rx: Receiver<SettleJob>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let mut batch = Vec::with_capacity(SETTLE_BATCH);
        let mut args = Vec::with_capacity(SETTLE_BATCH);
        loop {
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            while batch.len() < SETTLE_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            args.extend(batch.iter().map(|j| j.args.clone()));
            match redis.settle_batch(&args).await {
                Ok(outcomes) => {
                    for (job, outcome) in batch.iter().zip(outcomes) {
                        self.finish_settle(&redis, job, Ok(outcome));
                    }
                }
                Err(e) => {
                    for job in &batch {
                        self.finish_settle(&redis, job, Err(&e));
                    }
                }
            }
            batch.clear();
            args.clear();
        }
    }

    /// Applies a settle's answer: the developer's global totals (and alerts), or, when it did
    /// not reach Redis, keeps the quota usage for later.
    pub(crate) fn finish_settle(
        &self,
        redis: &Distributed,
        job: &SettleJob,
        outcome: Result<SettleOutcome, &RedisDown>,
    ) {
        let Some((rule, dev, period)) = &job.quota else {
            if let Err(e) = outcome {
                self.redis_failed(redis, e);
            }
            return;
        };
        let (tokens, cost) = job.args.usage;
        let dev_id = &job.args.dev_id;
        let (before, after) = match outcome {
            Ok(SettleOutcome::Counted(s)) => {
                dev.tokens.store(s.after, Ordering::Relaxed);
                dev.cost_nanos.store(s.cost, Ordering::Relaxed);
                dev.global.store(true, Ordering::Relaxed);
                (s.before, s.after)
            }
            Ok(SettleOutcome::Untracked) => return,
            Ok(SettleOutcome::NotSeeded) | Err(_) => {
                if let Err(e) = outcome {
                    self.redis_failed(redis, e);
                }
                redis.defer(*period, dev_id, tokens, cost);
                let after = dev.tokens.load(Ordering::Relaxed);
                (after.saturating_sub(tokens), after)
            }
        };
        self.alert(
            dev_id,
            *period,
            *rule,
            before,
            after,
            &job.plans.alert_thresholds,
        );
    }
}
