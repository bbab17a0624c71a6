//! Settles: a request's reservation replaced by its real usage, in Redis sent in batches.
//!
//! Decided locally, [`Limits::settle`] settles at once; decided in Redis, it queues a
//! [`SettleJob`] and returns. [`Limits::run_settler`], on the limiter's own thread, waits
//! [`SETTLE_LINGER`] after the first job of a batch (unless a batch is already waiting), takes
//! whatever is queued then (up to [`SETTLE_BATCH`]), sums the settles of each key
//! (`sum_by_key`) and sends them to Redis as one pipeline: under load a round trip carries
//! many settles, and the request path never waits for one nor wakes that thread more than once
//! per batch. The answers (global quota totals) update the node's view and raise usage alerts;
//! a failure keeps the quota usage for the Redis monitor to hand over later. A full queue
//! (Redis far behind) is treated like a failed settle. Once the gateway shuts down, the
//! settler stops lingering and sends every settle as soon as it is queued, until the process
//! ends (requests still finishing in the grace period settle too).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aihub_plans::{Period, PlanCatalog};
use pingora_core::server::ShutdownWatch;
use tokio::sync::mpsc::Receiver;

use super::distributed::{Distributed, RedisDown, SettleArgs, SettleOutcome, Track};
use super::quota::{DevUsage, QuotaRule};
use super::{Admission, Limits};

/// Settles waiting for Redis; beyond this they are counted locally (see module doc).
pub const SETTLE_QUEUE: usize = 65_536;
/// Most settles taken from the queue for one pipeline (fewer calls once summed per key).
pub const SETTLE_BATCH: usize = 1024;
/// How long a batch gathers settles after its first (the delay of a settle, off the request's
/// path: quota totals and token debts reach Redis this much later).
pub const SETTLE_LINGER: Duration = Duration::from_millis(10);

/// One request's settle, with what its answer updates.
pub struct SettleJob {
    pub args: SettleArgs,
    /// The quota counted: rule, the developer's usage entry, period.
    pub quota: Option<(QuotaRule, Arc<DevUsage>, Period)>,
    /// The plans in force when the request ended (their alert thresholds).
    pub plans: Arc<PlanCatalog>,
}

/// What settles of one batch are summed by: key, developer, token limits, quota period.
type GroupKey = (Arc<str>, Arc<str>, (u32, u32), Option<Period>);

/// Sums the settles of each key (same developer, limits and quota period) into its first: a
/// batch sends one script call per key. Token debts and usage add up; the quota seed is the
/// first settle's (the node's totals before all of them), created only if all of them may.
fn sum_by_key(batch: &mut Vec<SettleJob>, groups: &mut HashMap<GroupKey, usize>) {
    if batch.len() < 2 {
        return;
    }
    groups.clear();
    let mut kept = 0;
    for i in 0..batch.len() {
        let a = &batch[i].args;
        let per_minute = |r: Option<super::gcra::Rate>| r.map_or(0, |r| r.per_minute);
        let key = (
            Arc::clone(&a.key_id),
            Arc::clone(&a.dev_id),
            (
                per_minute(a.rates.key_tokens),
                per_minute(a.rates.dev_tokens),
            ),
            a.track.map(|t| t.period),
        );
        match groups.get(&key) {
            Some(&g) => {
                let (debt, usage, track) = (a.debt, a.usage, a.track);
                let plans = Arc::clone(&batch[i].plans);
                let into = &mut batch[g];
                into.args.debt.0 += debt.0;
                into.args.debt.1 += debt.1;
                into.args.usage.0 += usage.0;
                into.args.usage.1 += usage.1;
                if let (Some(t), Some(other)) = (&mut into.args.track, track) {
                    t.seeded &= other.seeded;
                }
                into.plans = plans;
            }
            None => {
                groups.insert(key, kept);
                batch.swap(kept, i);
                kept += 1;
            }
        }
    }
    batch.truncate(kept);
}

impl Limits {
    /// Replaces a request's reservation by its real usage (`tokens`, `cost_nanos`) and counts
    /// it against the developer's quota. Never waits: Redis work runs in a task of its own.
    pub fn settle(
        self: &Arc<Self>,
        adm: Admission,
        tokens: u64,
        cost_nanos: i64,
        plans: &Arc<PlanCatalog>,
    ) {
        let reserved = adm.reserved;
        let key = Arc::clone(&adm.key);
        let quota = adm
            .quota
            .as_ref()
            .map(|c| (c.rule, Arc::clone(&c.dev), c.period));
        let rates = adm.rates;
        let remote = adm.remote;
        drop(adm); // releases the slot and the quota reservation

        // Nothing to do for a request that ended before its reservation (a bad body).
        let nothing_used = reserved == 0 && tokens == 0 && cost_nanos == 0;
        let nothing_to_settle = nothing_used
            || (rates.key_tokens.is_none() && rates.dev_tokens.is_none() && quota.is_none());
        if nothing_to_settle {
            return;
        }
        let Some(redis) = self.redis.as_ref().filter(|_| remote).cloned() else {
            self.local.settle(
                &key.key_id,
                &key.developer_id,
                &rates,
                (reserved, tokens),
                self.now_us(),
            );
            if let Some((rule, dev, period)) = quota {
                let before = dev.tokens.fetch_add(tokens, Ordering::Relaxed);
                dev.cost_nanos.fetch_add(cost_nanos, Ordering::Relaxed);
                if let Some(r) = &self.redis {
                    r.defer(period, &key.developer_id, tokens, cost_nanos);
                }
                self.alert(
                    &key.developer_id,
                    period,
                    rule,
                    before,
                    before + tokens,
                    &plans.alert_thresholds,
                );
            }
            return;
        };
        // Counted here at once (the local view stays current for a fallback), replaced by the
        // global totals when Redis answers.
        let seed = quota.as_ref().map(|(_, dev, _)| {
            let t = dev.tokens.fetch_add(tokens, Ordering::Relaxed);
            let c = dev.cost_nanos.fetch_add(cost_nanos, Ordering::Relaxed);
            (t, c)
        });
        let job = SettleJob {
            args: SettleArgs {
                key_id: Arc::clone(&key.key_id),
                dev_id: Arc::clone(&key.developer_id),
                rates,
                debt: SettleArgs::debts(&rates, reserved, tokens),
                usage: (tokens, cost_nanos),
                track: quota.as_ref().zip(seed).map(|((_, _, p), seed)| Track {
                    period: *p,
                    seed,
                    seeded: self.seeded.load(Ordering::Relaxed),
                }),
            },
            quota,
            plans: Arc::clone(plans),
        };
        if let Err(full) = self.settles.try_send(job) {
            // The queue is full (Redis far behind): count the quota usage for later instead.
            let job = full.into_inner();
            self.finish_settle(&redis, &job, Err(&RedisDown::QueueFull));
        }
    }

    /// Sends queued settles to Redis, a batch per round trip, until the queue closes.
    pub async fn run_settler(
        self: Arc<Self>,
        mut rx: Receiver<SettleJob>,
        shutdown: ShutdownWatch,
    ) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let mut batch = Vec::with_capacity(SETTLE_BATCH);
        let mut args = Vec::with_capacity(SETTLE_BATCH);
        let mut groups = HashMap::new();
        loop {
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            // A backlog of a batch or more is sent at once (no linger under heavy load).
            if !*shutdown.borrow() && rx.len() + 1 < SETTLE_BATCH {
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE_LINGER) => {}
                    _ = stop.changed() => {}
                }
            }
            while batch.len() < SETTLE_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            sum_by_key(&mut batch, &mut groups);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::gcra::Rate;
    use crate::limits::local::Rates;

    fn job(key: &str, used: u64, reserved: u64, seed: u64, seeded: bool) -> SettleJob {
        let rates = Rates {
            key_tokens: Some(Rate::per_minute(1000)),
            dev_tokens: Some(Rate::per_minute(100)),
            ..Rates::default()
        };
        SettleJob {
            args: SettleArgs {
                key_id: key.into(),
                dev_id: "dev".into(),
                rates,
                debt: SettleArgs::debts(&rates, reserved, used),
                usage: (used, used as i64 * 10),
                track: Some(Track {
                    period: Period::of_unix_ms(0),
                    seed: (seed, 0),
                    seeded,
                }),
            },
            quota: None,
            plans: Arc::new(PlanCatalog::builtin()),
        }
    }

    #[test]
    fn a_batch_sends_one_settle_per_key_with_debts_and_usage_summed() {
        let mut batch = vec![
            job("a", 30, 50, 100, true),
            job("b", 5, 5, 130, true),
            // Beyond the developer's window: counted at most one window (100) per request.
            job("a", 400, 50, 135, false),
            job("a", 10, 20, 535, true),
        ];
        sum_by_key(&mut batch, &mut HashMap::new());
        assert_eq!(batch.len(), 2);
        let a = &batch[0].args;
        assert_eq!(&*a.key_id, "a");
        assert_eq!(a.usage, (440, 4400));
        assert_eq!(
            a.debt,
            (
                (30 - 50) + (400 - 50) + (10 - 20),
                (30 - 50) + (100 - 50) + (10 - 20)
            )
        );
        let t = a.track.unwrap();
        // The first settle's seed (the node's totals before all of them); created only if all
        // of them may.
        assert_eq!(t.seed, (100, 0));
        assert!(!t.seeded);
        let b = &batch[1].args;
        assert_eq!((&*b.key_id, b.usage, b.debt), ("b", (5, 50), (0, 0)));
        // A single settle is sent as it is.
        let mut one = vec![job("c", 1, 2, 0, true)];
        sum_by_key(&mut one, &mut HashMap::new());
        assert_eq!(one[0].args.debt, (-1, -1));
    }
}
