//! [`Billing`]: invoices from the usage database and the control-plane store.
//!
//! Computing a period's invoices reads the hourly rollup once for every developer and feeds it
//! to one [`Ledger`] per developer. An hour the ledger cannot apply whole (a plan change inside
//! it, or the included tokens running out during it) is fetched as raw rows, in batches for all
//! developers waiting on one, and the ledger resumes; a developer needs at most a few such
//! hours per period. Results are saved as drafts ([`invoices::save_drafts`]) in batches.
//!
//! The background job ([`Billing::run_once`]) creates drafts once a period has closed, refreshes
//! them hourly while late usage may still arrive (`grace_period`), then recomputes and
//! finalizes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aihub_plans::{Period, PlanCatalog};
use aihub_store::invoices::{self, Computed, Invoice, SaveMode, Saved};
use aihub_store::subscriptions::{self, Subscription};
use aihub_store::{Store, StoreError};
use aihub_usage::read::billing as source;
use aihub_usage::sink::ClickHouseConfig;
use rust_decimal::Decimal;
use tokio::sync::Mutex;

use crate::ledger::{round_total, HourModel, Ledger, UsageRow};
use crate::BillingConfig;

/// Why billing failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("usage database: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("unknown developer")]
    UnknownDeveloper,
}

type Result<T, E = BillingError> = std::result::Result<T, E>;

/// Invoices saved per store transaction.
const SAVE_BATCH: usize = 500;

/// The billing engine; cheap to clone.
#[derive(Clone)]
pub struct Billing(Arc<Inner>);

struct Inner {
    store: Store,
    client: clickhouse::Client,
    plans: PlanCatalog,
    config: BillingConfig,
    /// When the background job last refreshed each period's drafts.
    refreshed: Mutex<HashMap<Period, i64>>,
}

/// `GET /developer/billing`: the current period so far, and where it is heading.
#[derive(Debug, Clone)]
pub struct CurrentBilling {
    /// The plan held now.
    pub plan: String,
    pub period: Period,
    /// The period's invoice as if it closed now.
    pub so_far: Computed,
    pub tokens_used: u64,
    /// Included tokens over the period's plan segments (`None`: unlimited).
    pub included_tokens: Option<u64>,
    /// Tokens at the period's end at the average rate so far.
    pub projected_tokens: u64,
    /// The projected invoice subtotal (exact to nine decimals) and total (cents).
    pub projected_subtotal: Decimal,
    pub projected_total: Decimal,
    pub as_of: i64,
}

/// What [`Billing::generate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerateReport {
    /// Developers with a subscription in the period (invoices computed).
    pub developers: usize,
    pub created: usize,
    pub refreshed: usize,
    /// Invoices past draft (or voided), left alone.
    pub kept: usize,
    /// Developer ids with usage in the period but no subscription during it: keys declared only
    /// in a gateway's YAML (no account), or usage dated before the account existed. Not billed.
    pub skipped_without_subscription: usize,
    /// Hours read as raw rows because an hour had to be split.
    pub raw_hours: usize,
}

/// What one background pass did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub generated: Vec<(Period, GenerateReport)>,
    pub finalized: usize,
}

/// A developer's ledger, fed hour by hour, waiting when an hour's raw rows are needed.
struct Job {
    ledger: Ledger,
    hours: Vec<(i64, Vec<HourModel>)>,
    next: usize,
}

impl Job {
    /// Applies hours until done (`None`) or an hour's rows are missing (`Some(hour)`).
    fn run(&mut self, raw: &HashMap<(String, i64), Vec<UsageRow>>, dev: &str) -> Option<i64> {
        while let Some((hour, models)) = self.hours.get(self.next) {
            if !self.ledger.try_hour(*hour, models) {
                let Some(rows) = raw.get(&(dev.to_owned(), *hour)) else {
                    return Some(*hour);
                };
                for r in rows {
                    self.ledger.add_row(r);
                }
            }
            self.next += 1;
        }
        None
    }
}

impl Billing {
    pub fn new(
        store: Store,
        usage: &ClickHouseConfig,
        plans: PlanCatalog,
        config: BillingConfig,
    ) -> Billing {
        Billing(Arc::new(Inner {
            store,
            client: usage.client(),
            plans,
            config,
            refreshed: Mutex::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &BillingConfig {
        &self.0.config
    }

    pub fn plans(&self) -> &PlanCatalog {
        &self.0.plans
    }

    /// Every invoice of `period` (or one developer's) from the usage recorded so far.
    pub async fn compute_all(
        &self,
        period: Period,
        only: Option<&str>,
        report: &mut GenerateReport,
    ) -> Result<Vec<Computed>> {
        let (from, to) = (period.start_ms(), period.end_ms());
        let subs = match only {
            Some(dev) => subscriptions::overlapping(&self.0.store, dev, from, to).await?,
            None => subscriptions::all_overlapping(&self.0.store, from, to).await?,
        };
        let mut by_dev: BTreeMap<String, Vec<Subscription>> = BTreeMap::new();
        for s in subs {
            by_dev.entry(s.developer_id.clone()).or_default().push(s);
        }
        report.developers = by_dev.len();
        let new_job = |dev: &str, subs: &[Subscription]| Job {
            ledger: Ledger::new(dev, period, subs, &self.0.plans),
            hours: Vec::new(),
            next: 0,
        };

        let mut done = Vec::with_capacity(by_dev.len());
        let mut waiting: BTreeMap<String, Job> = BTreeMap::new();
        let mut needed: Vec<(String, i64)> = Vec::new();
        let no_rows = HashMap::new();
        let mut finish = |dev: String, mut job: Job, waiting: &mut BTreeMap<String, Job>| match job
            .run(&no_rows, &dev)
        {
            None => done.push(job.ledger.finish()),
            Some(hour) => {
                needed.push((dev.clone(), hour));
                waiting.insert(dev, job);
            }
        };

        // One pass over the rollup, developer by developer.
        let mut cursor = source::hours(&self.0.client, from, to, only)?;
        // The developer being read; `None` for one without a subscription (rows skipped).
        let mut current: Option<(String, Option<Job>)> = None;
        while let Some(row) = cursor.next().await? {
            if current.as_ref().is_none_or(|(d, _)| *d != row.developer_id) {
                if let Some((dev, Some(job))) = current.take() {
                    finish(dev, job, &mut waiting);
                }
                let job = by_dev
                    .remove(&row.developer_id)
                    .map(|subs| new_job(&row.developer_id, &subs));
                if job.is_none() {
                    report.skipped_without_subscription += 1;
                }
                current = Some((row.developer_id.clone(), job));
            }
            let Some((_, Some(job))) = current.as_mut() else {
                continue;
            };
            let hour = row.hour_ms();
            if job.hours.last().is_none_or(|(h, _)| *h != hour) {
                job.hours.push((hour, Vec::new()));
            }
            job.hours.last_mut().expect("pushed").1.push(row.into());
        }
        if let Some((dev, Some(job))) = current.take() {
            finish(dev, job, &mut waiting);
        }
        // Developers without usage in the period: base fees only.
        for (dev, subs) in std::mem::take(&mut by_dev) {
            finish(dev.clone(), new_job(&dev, &subs), &mut waiting);
        }

        // Hours that had to be split, in rounds (a ledger may stop again at a later plan
        // change or allowance).
        while !needed.is_empty() {
            report.raw_hours += needed.len();
            let mut raw: HashMap<(String, i64), Vec<UsageRow>> =
                needed.iter().map(|p| (p.clone(), Vec::new())).collect();
            for r in source::raw_hours(&self.0.client, &needed).await? {
                let hour = r.ts_ms as i64 / crate::ledger::HOUR_MS * crate::ledger::HOUR_MS;
                if let Some(rows) = raw.get_mut(&(r.developer_id.clone(), hour)) {
                    rows.push(UsageRow::from(&r));
                }
            }
            needed.clear();
            for (dev, mut job) in std::mem::take(&mut waiting) {
                match job.run(&raw, &dev) {
                    None => done.push(job.ledger.finish()),
                    Some(hour) => {
                        needed.push((dev.clone(), hour));
                        waiting.insert(dev, job);
                    }
                }
            }
        }
        done.sort_by(|a, b| a.developer_id.cmp(&b.developer_id));
        Ok(done)
    }

    /// A developer's invoice for `period` from usage so far (not saved).
    pub async fn compute(&self, developer_id: &str, period: Period) -> Result<Computed> {
        let mut report = GenerateReport::default();
        let mut all = self
            .compute_all(period, Some(developer_id), &mut report)
            .await?;
        all.pop().ok_or(BillingError::UnknownDeveloper)
    }

    /// Creates or refreshes the drafts of `period` (every developer with a subscription in it,
    /// or one).
    pub async fn generate(
        &self,
        period: Period,
        only: Option<&str>,
        mode: SaveMode,
    ) -> Result<GenerateReport> {
        let mut report = GenerateReport::default();
        let computed = self.compute_all(period, only, &mut report).await?;
        for batch in computed.chunks(SAVE_BATCH) {
            for saved in invoices::save_drafts(&self.0.store, batch, mode).await? {
                match saved {
                    Saved::Created(_) => report.created += 1,
                    Saved::Refreshed(_) => report.refreshed += 1,
                    Saved::Kept(_) => report.kept += 1,
                }
            }
        }
        Ok(report)
    }

    /// Recomputes a draft from usage one last time, before it is finalized (by [`finalize`]
    /// or by the control plane's operator command, which adds its audit entry to the same
    /// transaction). An invoice past draft is left alone.
    ///
    /// [`finalize`]: Billing::finalize
    pub async fn refresh_draft(&self, invoice_id: &str) -> Result<()> {
        let inv = invoices::by_id(&self.0.store, invoice_id).await?;
        if inv.status == invoices::DRAFT {
            let period = Period::parse(&inv.period)
                .ok_or_else(|| StoreError::Corrupt(format!("invoice period `{}`", inv.period)))?;
            let computed = self.compute(&inv.developer_id, period).await?;
            invoices::save_drafts(&self.0.store, &[computed], SaveMode::Automatic).await?;
        }
        Ok(())
    }

    /// Recomputes a draft from usage and finalizes it. An invoice past draft is returned as
    /// it is; a void one is a conflict.
    pub async fn finalize(&self, invoice_id: &str) -> Result<Invoice> {
        self.refresh_draft(invoice_id).await?;
        let mut tx = self.0.store.begin_write().await?;
        let inv = invoices::finalize(&mut tx, invoice_id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(inv)
    }

    /// Finalizes every draft of `period` (or only `only`'s) as it stands, each in its own
    /// transaction; the number finalized.
    pub async fn finalize_drafts(&self, period: Period, only: Option<&str>) -> Result<usize> {
        let mut n = 0;
        for (id, dev) in invoices::drafts(&self.0.store, &period.to_string()).await? {
            if only.is_some_and(|d| d != dev) {
                continue;
            }
            let mut tx = self.0.store.begin_write().await?;
            invoices::finalize(&mut tx, &id).await?;
            tx.commit().await.map_err(StoreError::from)?;
            n += 1;
        }
        Ok(n)
    }

    /// The current period so far and a projection to its end: usage continues at the
    /// period's average rate so far, and projected overage costs the average list price per
    /// token so far (`docs/billing.md`).
    pub async fn current(&self, developer_id: &str, now_ms: i64) -> Result<CurrentBilling> {
        let period = Period::of_unix_ms(now_ms);
        let (from, to) = (period.start_ms(), period.end_ms());
        let subs = subscriptions::overlapping(&self.0.store, developer_id, from, to).await?;
        let plan = subs
            .last()
            .map(|s| s.plan.clone())
            .ok_or(BillingError::UnknownDeveloper)?;
        let so_far = self.compute(developer_id, period).await?;
        let (_, included) = Ledger::new(developer_id, period, &subs, &self.0.plans).usage();
        let used = so_far.total_tokens.max(0) as u64;
        let elapsed = (now_ms - from).clamp(1, to - from) as u128;
        let projected_tokens = (used as u128 * (to - from) as u128 / elapsed) as u64;
        let mut projected_subtotal = so_far.subtotal;
        let bills_overage = self.0.plans.plan(&plan).overage;
        if let (Some(allowance), true) = (included, bills_overage) {
            let extra = projected_tokens.saturating_sub(allowance.max(used));
            if extra > 0 && used > 0 {
                projected_subtotal +=
                    so_far.usage_cost * Decimal::from(extra) / Decimal::from(used);
            }
        }
        let projected_subtotal = projected_subtotal.round_dp(9);
        Ok(CurrentBilling {
            plan,
            period,
            tokens_used: used,
            included_tokens: included,
            projected_tokens,
            projected_total: round_total(projected_subtotal),
            projected_subtotal,
            so_far,
            as_of: now_ms,
        })
    }

    /// One background pass: for the last closed period, create the drafts, refresh them at most
    /// hourly during the grace window, and once it is over recompute and finalize them; for the
    /// period before, finish drafts left over (an admin API down across the deadline).
    pub async fn run_once(&self, now_ms: i64) -> Result<RunReport> {
        let mut report = RunReport::default();
        let grace = self.0.config.grace_period.as_millis() as i64;
        let last_closed = Period::of_unix_ms(now_ms).prev();
        for period in [last_closed.prev(), last_closed] {
            let drafts = invoices::drafts(&self.0.store, &period.to_string()).await?;
            let invoiced =
                invoices::developers_invoiced(&self.0.store, &period.to_string()).await?;
            let in_grace = now_ms < period.end_ms() + grace;
            let mut refreshed = self.0.refreshed.lock().await;
            let stale = refreshed
                .get(&period)
                .is_none_or(|at| now_ms - at >= 3_600_000);
            // Past the grace window: generate once more if drafts wait (or the period was never
            // generated: the admin API was down all along), then finalize. The period before
            // is only finished (its leftover drafts), never started.
            let needed = if period != last_closed {
                !drafts.is_empty()
            } else if in_grace {
                stale
            } else {
                !drafts.is_empty() || invoiced.is_empty()
            };
            if needed {
                let g = self.generate(period, None, SaveMode::Automatic).await?;
                refreshed.insert(period, now_ms);
                report.generated.push((period, g));
            }
            drop(refreshed);
            if !in_grace {
                report.finalized += self.finalize_drafts(period, None).await?;
            }
        }
        Ok(report)
    }

    /// The store and usage client, for reconciliation.
    pub(crate) fn parts(&self) -> (&Store, &clickhouse::Client, &PlanCatalog) {
        (&self.0.store, &self.0.client, &self.0.plans)
    }
}
