//! Reconciliation, the "double entry" of billing: every invoice of a period is computed again
//! from the **raw** usage rows (every row, in time order, through the same ledger rules, without
//! the hourly rollup generation uses) and compared with what was saved, field by field and line
//! by line. It also checks that the hourly rollup holds exactly the raw rows' totals, and that
//! every developer with a subscription in the period has an invoice.
//!
//! A period that has not closed has no invoices yet (drafts are made when it closes): its raw
//! rows are compared with the live computation instead — the invoices as if the period closed
//! now, computed as generation would (rollup, split hours), the figures `GET /developer/billing`
//! shows. Usage arriving during the check can make the reads differ for a moment (rows not yet
//! in one of them, the rollup a moment behind the rows), so an open period's check is repeated,
//! a second apart, until the row count held still throughout and the result is clean or the
//! same differences show twice, at most [`OPEN_ATTEMPTS`] times.
//!
//! `aihub billing reconcile --period YYYY-MM` prints the [`ReconcileReport`] and exits non-zero
//! unless it is clean.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use aihub_plans::Period;
use aihub_store::invoices::{self, Computed, Invoice, InvoiceLine};
use aihub_store::subscriptions::{self, Subscription};
use rust_decimal::Decimal;

use aihub_usage::read::billing as source;
use aihub_usage::read::totals::{self, Totals};

use crate::engine::{Billing, BillingError, GenerateReport};
use crate::ledger::{Ledger, UsageRow};

/// At most this many checks of an open period, a second apart, while its usage changes during
/// the check or its differences have not shown twice.
pub const OPEN_ATTEMPTS: usize = 3;

/// One value that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub what: String,
    /// The saved invoice's value (the live computation's, for an open period).
    pub stored: String,
    /// The value the raw rows give.
    pub recomputed: String,
}

/// A mismatch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The saved invoice differs from the one the raw rows give.
    Invoice {
        invoice_id: String,
        developer_id: String,
        status: String,
        diffs: Vec<Diff>,
    },
    /// A developer with a subscription in the period has no invoice.
    MissingInvoice {
        developer_id: String,
        requests: i64,
        total: Decimal,
    },
    /// The hourly rollup's totals differ from the raw rows'.
    Rollup {
        developer_id: String,
        raw: Totals,
        rollup: Totals,
    },
    /// An open period: the live computation (the invoice as if the period closed now) differs
    /// from the one the raw rows give.
    Live {
        developer_id: String,
        diffs: Vec<Diff>,
    },
}

/// How an open period was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPeriod {
    /// When the check ran (unix ms).
    pub as_of: i64,
    /// Drafts generated before the period closed (`aihub billing generate`): not compared; the
    /// background job refreshes them once the period has closed.
    pub early_drafts: usize,
    /// `false`: usage kept arriving during every attempt, so differences may be rows that one
    /// read saw and the other did not.
    pub settled: bool,
}

#[derive(Debug, Clone)]
pub struct ReconcileReport {
    pub period: Period,
    /// Invoices checked (not void); for an open period, the developers computed live.
    pub invoices: usize,
    /// Raw rows read.
    pub rows: u64,
    /// Sum of the checked invoices' totals (live totals for an open period).
    pub invoiced_total: Decimal,
    /// Developers whose invoice for the period was voided and not reissued (shown for
    /// information: an operator decided).
    pub voided: Vec<String>,
    /// Developer ids with usage but no subscription in the period, and their requests (not
    /// billed; shown for information).
    pub without_subscription: Vec<(String, u64)>,
    /// `Some` when the period had not closed: there were no invoices to check, the raw rows were
    /// compared with the live computation.
    pub open: Option<OpenPeriod>,
    pub problems: Vec<Problem>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What the invoices recomputed from the raw rows are compared with.
enum Reference {
    /// A closed period: the saved invoices (not void) by developer, and the developers whose
    /// invoice was voided.
    Saved {
        stored: HashMap<String, (Invoice, Vec<InvoiceLine>)>,
        voided: HashSet<String>,
    },
    /// An open period: the live computation by developer.
    Live(HashMap<String, Computed>),
}

/// Checks every invoice of `period`: the saved ones once it has closed, the live computation
/// while it is open.
pub async fn reconcile(billing: &Billing, period: Period) -> Result<ReconcileReport, BillingError> {
    reconcile_at(billing, period, aihub_store::now_ms()).await
}

/// [`reconcile`] as of `now_ms` (unix ms): a period that has not ended by then is open.
pub async fn reconcile_at(
    billing: &Billing,
    period: Period,
    now_ms: i64,
) -> Result<ReconcileReport, BillingError> {
    let (store, client, _) = billing.parts();
    let (from, to) = (period.start_ms(), period.end_ms());
    let name = period.to_string();
    if to <= now_ms {
        let stored: HashMap<String, (Invoice, Vec<InvoiceLine>)> =
            invoices::for_period(store, &name)
                .await?
                .into_iter()
                .map(|(i, l)| (i.developer_id.clone(), (i, l)))
                .collect();
        let voided = invoices::developers_invoiced(store, &name)
            .await?
            .into_iter()
            .filter(|(_, status)| status == invoices::VOID)
            .map(|(dev, _)| dev)
            .collect();
        let subs = subscriptions::all_overlapping(store, from, to).await?;
        return check(billing, period, Reference::Saved { stored, voided }, subs).await;
    }

    let early_drafts = invoices::drafts(store, &name).await?.len();
    let mut attempt = 0;
    let mut before: Option<Vec<Problem>> = None;
    loop {
        attempt += 1;
        let rows_before = totals::raw_count(client, from, to).await?;
        let subs = subscriptions::all_overlapping(store, from, to).await?;
        let live: HashMap<String, Computed> = billing
            .compute_all(period, None, &mut GenerateReport::default())
            .await?
            .into_iter()
            .map(|c| (c.developer_id.clone(), c))
            .collect();
        let mut report = check(billing, period, Reference::Live(live), subs.clone()).await?;
        let settled = report.rows == rows_before
            && totals::raw_count(client, from, to).await? == rows_before
            && subscriptions::all_overlapping(store, from, to).await? == subs;
        // With the rows held still, a clean result is final, and so are differences found twice.
        let confirmed = report.is_clean() || before.as_ref() == Some(&report.problems);
        if (settled && confirmed) || attempt == OPEN_ATTEMPTS {
            report.open = Some(OpenPeriod {
                as_of: now_ms,
                early_drafts,
                settled,
            });
            return Ok(report);
        }
        before = settled.then(|| report.problems.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One pass over the raw rows: every developer's invoice recomputed and compared with
/// `reference`, then the rollup's totals with the raw rows'. `all_subs`: the period's
/// subscriptions.
async fn check(
    billing: &Billing,
    period: Period,
    mut reference: Reference,
    all_subs: Vec<Subscription>,
) -> Result<ReconcileReport, BillingError> {
    let (_, client, plans) = billing.parts();
    let (from, to) = (period.start_ms(), period.end_ms());
    let (invoices, invoiced_total) = match &reference {
        Reference::Saved { stored, .. } => {
            (stored.len(), stored.values().map(|(i, _)| i.total).sum())
        }
        Reference::Live(live) => (live.len(), live.values().map(|c| c.total).sum()),
    };
    let mut report = ReconcileReport {
        period,
        invoices,
        rows: 0,
        invoiced_total,
        voided: Vec::new(),
        without_subscription: Vec::new(),
        open: None,
        problems: Vec::new(),
    };
    let mut subs: BTreeMap<String, Vec<Subscription>> = BTreeMap::new();
    for s in all_subs {
        subs.entry(s.developer_id.clone()).or_default().push(s);
    }
    let mut raw_totals: BTreeMap<String, Totals> = BTreeMap::new();
    let mut no_account = Vec::new();
    let mut check = |computed: Computed, report: &mut ReconcileReport| match &mut reference {
        Reference::Saved { stored, voided } => match stored.remove(&computed.developer_id) {
            Some((inv, lines)) => {
                let diffs = compare(&inv, &lines, &computed);
                if !diffs.is_empty() {
                    report.problems.push(Problem::Invoice {
                        invoice_id: inv.id,
                        developer_id: inv.developer_id,
                        status: inv.status,
                        diffs,
                    });
                }
            }
            None if voided.contains(&computed.developer_id) => {
                report.voided.push(computed.developer_id)
            }
            None => report.problems.push(Problem::MissingInvoice {
                developer_id: computed.developer_id,
                requests: computed.requests,
                total: computed.total,
            }),
        },
        Reference::Live(live) => {
            let diffs = match live.remove(&computed.developer_id) {
                Some(l) => compare_live(&l, &computed),
                None => vec![Diff {
                    what: "invoice".to_owned(),
                    stored: "(not computed)".to_owned(),
                    recomputed: format!("{} USD", computed.total.normalize()),
                }],
            };
            if !diffs.is_empty() {
                report.problems.push(Problem::Live {
                    developer_id: computed.developer_id,
                    diffs,
                });
            }
        }
    };

    let mut cursor = source::all_rows(client, from, to, None)?;
    let mut current: Option<(String, Option<Ledger>)> = None;
    while let Some(row) = cursor.next().await? {
        report.rows += 1;
        if current.as_ref().is_none_or(|(d, _)| *d != row.developer_id) {
            if let Some((_, Some(ledger))) = current.take() {
                check(ledger.finish(), &mut report);
            }
            let ledger = subs
                .remove(&row.developer_id)
                .map(|s| Ledger::new(&row.developer_id, period, &s, plans));
            if ledger.is_none() {
                no_account.push(row.developer_id.clone());
            }
            current = Some((row.developer_id.clone(), ledger));
        }
        let t = raw_totals.entry(row.developer_id.clone()).or_default();
        t.requests += 1;
        t.tokens += row.total_tokens as u64;
        t.cost_nanos += row.cost_nanos;
        if let Some((_, Some(ledger))) = current.as_mut() {
            ledger.add_row(&UsageRow::from(&row));
        }
    }
    if let Some((_, Some(ledger))) = current.take() {
        check(ledger.finish(), &mut report);
    }
    for (dev, s) in subs {
        check(Ledger::new(&dev, period, &s, plans).finish(), &mut report);
    }
    // Invoices (or live computations) left over belong to developers without a subscription in
    // the period: their recomputation is the default plan's.
    match reference {
        Reference::Saved { stored, .. } => {
            for (dev, (inv, lines)) in stored {
                let computed = Ledger::new(&dev, period, &[], plans).finish();
                let diffs = compare(&inv, &lines, &computed);
                if !diffs.is_empty() {
                    report.problems.push(Problem::Invoice {
                        invoice_id: inv.id,
                        developer_id: dev,
                        status: inv.status,
                        diffs,
                    });
                }
            }
        }
        Reference::Live(live) => {
            for (dev, l) in live {
                let diffs = compare_live(&l, &Ledger::new(&dev, period, &[], plans).finish());
                if !diffs.is_empty() {
                    report.problems.push(Problem::Live {
                        developer_id: dev,
                        diffs,
                    });
                }
            }
        }
    }

    report.without_subscription = no_account
        .into_iter()
        .map(|d| {
            let n = raw_totals.get(&d).map_or(0, |t| t.requests);
            (d, n)
        })
        .collect();
    let mut rollup: BTreeMap<String, Totals> = totals::hourly_rollup(client, from, to, None)
        .await?
        .into_iter()
        .map(|t| (t.developer_id.clone(), t))
        .collect();
    for (dev, mut raw) in raw_totals {
        raw.developer_id = dev.clone();
        let r = rollup.remove(&dev).unwrap_or_else(|| Totals {
            developer_id: dev.clone(),
            ..Totals::default()
        });
        if (r.requests, r.tokens, r.cost_nanos) != (raw.requests, raw.tokens, raw.cost_nanos) {
            report.problems.push(Problem::Rollup {
                developer_id: dev.clone(),
                raw: raw.clone(),
                rollup: r,
            });
        }
    }
    for (dev, r) in rollup {
        report.problems.push(Problem::Rollup {
            developer_id: dev.clone(),
            raw: Totals {
                developer_id: dev,
                ..Totals::default()
            },
            rollup: r,
        });
    }
    Ok(report)
}

/// An invoice's figures, saved or computed.
struct Figures<'a> {
    subtotal: Decimal,
    total: Decimal,
    usage_cost: Decimal,
    requests: i64,
    total_tokens: i64,
    included_tokens: i64,
    overage_tokens: i64,
    waived_tokens: i64,
    lines: &'a [InvoiceLine],
}

impl<'a> Figures<'a> {
    fn saved(i: &Invoice, lines: &'a [InvoiceLine]) -> Figures<'a> {
        Figures {
            subtotal: i.subtotal,
            total: i.total,
            usage_cost: i.usage_cost,
            requests: i.requests,
            total_tokens: i.total_tokens,
            included_tokens: i.included_tokens,
            overage_tokens: i.overage_tokens,
            waived_tokens: i.waived_tokens,
            lines,
        }
    }

    fn computed(c: &'a Computed) -> Figures<'a> {
        Figures {
            subtotal: c.subtotal,
            total: c.total,
            usage_cost: c.usage_cost,
            requests: c.requests,
            total_tokens: c.total_tokens,
            included_tokens: c.included_tokens,
            overage_tokens: c.overage_tokens,
            waived_tokens: c.waived_tokens,
            lines: &c.lines,
        }
    }
}

/// The differences between a saved invoice and a recomputed one.
pub fn compare(inv: &Invoice, lines: &[InvoiceLine], c: &Computed) -> Vec<Diff> {
    diff(&Figures::saved(inv, lines), &Figures::computed(c))
}

/// The differences between the live computation of an open period's invoice and the one
/// recomputed from the raw rows (each [`Diff`]'s `stored` is the live value).
pub fn compare_live(live: &Computed, c: &Computed) -> Vec<Diff> {
    diff(&Figures::computed(live), &Figures::computed(c))
}

fn diff(mine: &Figures<'_>, c: &Figures<'_>) -> Vec<Diff> {
    let mut diffs = Vec::new();
    let mut field = |what: &str, stored: String, recomputed: String| {
        if stored != recomputed {
            diffs.push(Diff {
                what: what.to_owned(),
                stored,
                recomputed,
            });
        }
    };
    let dec = |d: Decimal| d.normalize().to_string();
    field("subtotal", dec(mine.subtotal), dec(c.subtotal));
    field("total", dec(mine.total), dec(c.total));
    field("usage cost", dec(mine.usage_cost), dec(c.usage_cost));
    field(
        "requests",
        mine.requests.to_string(),
        c.requests.to_string(),
    );
    field(
        "tokens",
        mine.total_tokens.to_string(),
        c.total_tokens.to_string(),
    );
    field(
        "included tokens",
        mine.included_tokens.to_string(),
        c.included_tokens.to_string(),
    );
    field(
        "overage tokens",
        mine.overage_tokens.to_string(),
        c.overage_tokens.to_string(),
    );
    field(
        "waived tokens",
        mine.waived_tokens.to_string(),
        c.waived_tokens.to_string(),
    );
    let key = |l: &InvoiceLine| (l.kind.clone(), l.plan.clone(), l.model.clone(), l.starts_at);
    let show = |l: Option<&InvoiceLine>| match l {
        None => "(no line)".to_owned(),
        Some(l) => format!(
            "{} tokens, {} requests, {} USD",
            l.quantity,
            l.requests,
            l.amount.normalize()
        ),
    };
    let ours: BTreeMap<_, _> = mine.lines.iter().map(|l| (key(l), l)).collect();
    let theirs: BTreeMap<_, _> = c.lines.iter().map(|l| (key(l), l)).collect();
    let mut keys: Vec<_> = ours.keys().chain(theirs.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (a, b) = (ours.get(&k).copied(), theirs.get(&k).copied());
        let same = match (a, b) {
            (Some(a), Some(b)) => {
                (a.quantity, a.requests, a.amount) == (b.quantity, b.requests, b.amount)
            }
            _ => false,
        };
        if !same {
            let what = if k.0 == "base" {
                format!("line base fee ({})", k.1)
            } else {
                format!("line overage {} ({})", k.2, k.1)
            };
            diffs.push(Diff {
                what,
                stored: show(a),
                recomputed: show(b),
            });
        }
    }
    diffs
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.open.is_some() {
            writeln!(
                f,
                "period {} is open (it closes when {} begins, UTC); its invoices are drafted then.\n\
                 Comparing the raw usage rows with the live computation: the invoices as if the \
                 period closed now.",
                self.period,
                self.period.next()
            )?;
            writeln!(
                f,
                "period {} (open): {} developers computed live (total {} USD so far), {} raw usage rows",
                self.period,
                self.invoices,
                self.invoiced_total.normalize(),
                self.rows
            )?;
        } else {
            writeln!(
                f,
                "period {}: {} invoices (total {} USD), {} raw usage rows",
                self.period,
                self.invoices,
                self.invoiced_total.normalize(),
                self.rows
            )?;
        }
        for p in &self.problems {
            match p {
                Problem::Invoice {
                    invoice_id,
                    developer_id,
                    status,
                    diffs,
                } => {
                    writeln!(f, "MISMATCH invoice {invoice_id} ({status}) of {developer_id}:")?;
                    for d in diffs {
                        writeln!(
                            f,
                            "  {:<32} stored {:<40} recomputed {}",
                            d.what, d.stored, d.recomputed
                        )?;
                    }
                }
                Problem::MissingInvoice {
                    developer_id,
                    requests,
                    total,
                } => writeln!(
                    f,
                    "MISSING invoice for {developer_id}: {requests} requests, {total} USD recomputed"
                )?,
                Problem::Rollup {
                    developer_id,
                    raw,
                    rollup,
                } => writeln!(
                    f,
                    "ROLLUP {developer_id}: raw rows {} requests, {} tokens, {} nano-USD; usage_hourly {} requests, {} tokens, {} nano-USD",
                    raw.requests, raw.tokens, raw.cost_nanos, rollup.requests, rollup.tokens, rollup.cost_nanos
                )?,
                Problem::Live {
                    developer_id,
                    diffs,
                } => {
                    writeln!(
                        f,
                        "MISMATCH live computation of {developer_id} (the invoice as if the period closed now):"
                    )?;
                    for d in diffs {
                        writeln!(
                            f,
                            "  {:<32} live {:<42} raw rows {}",
                            d.what, d.stored, d.recomputed
                        )?;
                    }
                }
            }
        }
        if self.open.as_ref().is_some_and(|o| !o.settled) {
            writeln!(
                f,
                "note: usage kept arriving during the check ({OPEN_ATTEMPTS} attempts), so the two \
                 reads may differ by rows in flight: run it again, or once the period has closed"
            )?;
        }
        match (self.problems.is_empty(), self.open.is_some()) {
            (true, false) => writeln!(f, "OK: every invoice matches the raw usage records"),
            (true, true) => writeln!(f, "OK: the live computation matches the raw usage records"),
            (false, _) => writeln!(f, "{} problem(s) found", self.problems.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use aihub_plans::PlanCatalog;

    use super::*;

    #[test]
    fn an_open_periods_report_compares_with_the_live_computation() {
        let period = Period {
            year: 2026,
            month: 5,
        };
        let live = Ledger::new("dev_a", period, &[], &PlanCatalog::builtin()).finish();
        assert!(compare_live(&live, &live).is_empty());
        let mut raw = live.clone();
        raw.usage_cost += Decimal::new(7, 6);
        raw.requests += 1;
        let diffs = compare_live(&live, &raw);
        let what: Vec<&str> = diffs.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(what, ["usage cost", "requests"]);

        let mut report = ReconcileReport {
            period,
            invoices: 1,
            rows: 3,
            invoiced_total: live.total,
            voided: Vec::new(),
            without_subscription: Vec::new(),
            open: Some(OpenPeriod {
                as_of: period.start_ms() + 1,
                early_drafts: 0,
                settled: true,
            }),
            problems: Vec::new(),
        };
        let text = report.to_string();
        assert!(
            text.contains("period 2026-05 is open (it closes when 2026-06 begins, UTC)"),
            "{text}"
        );
        assert!(text.contains("1 developers computed live"), "{text}");
        assert!(
            text.contains("OK: the live computation matches the raw usage records"),
            "{text}"
        );
        assert!(
            !text.contains("MISSING") && !text.contains("note:"),
            "{text}"
        );

        report.problems.push(Problem::Live {
            developer_id: "dev_a".into(),
            diffs,
        });
        report.open.as_mut().unwrap().settled = false;
        let text = report.to_string();
        assert!(
            text.contains("MISMATCH live computation of dev_a"),
            "{text}"
        );
        assert!(text.contains("raw rows 0.000007"), "{text}");
        assert!(
            text.contains("usage kept arriving during the check"),
            "{text}"
        );
        assert!(text.contains("1 problem(s) found"), "{text}");
    }
}
