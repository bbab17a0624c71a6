//! Reconciliation, the "double entry" of billing: every invoice of a period is computed again
//! from the **raw** usage rows (every row, in time order, through the same ledger rules, without
//! the hourly rollup generation uses) and compared with what was saved, field by field and line
//! by line. It also checks that the hourly rollup holds exactly the raw rows' totals, and that
//! every developer with a subscription in the period has an invoice.
//!
//! `aihub billing reconcile --period YYYY-MM` prints the [`ReconcileReport`] and exits non-zero
//! unless it is clean.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use aihub_plans::Period;
use aihub_store::invoices::{self, Computed, Invoice, InvoiceLine};
use aihub_store::subscriptions::{self, Subscription};
use rust_decimal::Decimal;

use crate::engine::{Billing, BillingError};
use crate::ledger::Ledger;
use crate::source::{self, Totals};

/// One value that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub what: String,
    pub stored: String,
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
}

#[derive(Debug, Clone)]
pub struct ReconcileReport {
    pub period: Period,
    /// Invoices checked (not void).
    pub invoices: usize,
    /// Raw rows read.
    pub rows: u64,
    /// Sum of the checked invoices' totals.
    pub invoiced_total: Decimal,
    /// Developers whose invoice for the period was voided and not reissued (shown for
    /// information: an operator decided).
    pub voided: Vec<String>,
    /// Developer ids with usage but no subscription in the period, and their requests (not
    /// billed; shown for information).
    pub without_subscription: Vec<(String, u64)>,
    pub problems: Vec<Problem>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every invoice of `period`.
pub async fn reconcile(billing: &Billing, period: Period) -> Result<ReconcileReport, BillingError> {
    let (store, client, plans) = billing.parts();
    let (from, to) = (period.start_ms(), period.end_ms());
    let mut stored: HashMap<String, (Invoice, Vec<InvoiceLine>)> =
        invoices::for_period(store, &period.to_string())
            .await?
            .into_iter()
            .map(|(i, l)| (i.developer_id.clone(), (i, l)))
            .collect();
    let mut report = ReconcileReport {
        period,
        invoices: stored.len(),
        rows: 0,
        invoiced_total: stored.values().map(|(i, _)| i.total).sum(),
        voided: Vec::new(),
        without_subscription: Vec::new(),
        problems: Vec::new(),
    };
    let voided: std::collections::HashSet<String> =
        invoices::developers_invoiced(store, &period.to_string())
            .await?
            .into_iter()
            .filter(|(_, status)| status == invoices::VOID)
            .map(|(dev, _)| dev)
            .collect();
    let mut subs: BTreeMap<String, Vec<Subscription>> = BTreeMap::new();
    for s in subscriptions::all_overlapping(store, from, to).await? {
        subs.entry(s.developer_id.clone()).or_default().push(s);
    }
    let mut raw_totals: BTreeMap<String, Totals> = BTreeMap::new();
    let mut no_account = Vec::new();
    let mut check = |computed: Computed, report: &mut ReconcileReport| match stored
        .remove(&computed.developer_id)
    {
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
            ledger.add_row(&row.usage());
        }
    }
    if let Some((_, Some(ledger))) = current.take() {
        check(ledger.finish(), &mut report);
    }
    for (dev, s) in subs {
        check(Ledger::new(&dev, period, &s, plans).finish(), &mut report);
    }
    // Invoices left over belong to developers without a subscription in the period: their
    // recomputation is the default plan's.
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

    report.without_subscription = no_account
        .into_iter()
        .map(|d| {
            let n = raw_totals.get(&d).map_or(0, |t| t.requests);
            (d, n)
        })
        .collect();
    let mut rollup: BTreeMap<String, Totals> = source::rollup_totals(client, from, to, None)
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

/// The differences between a saved invoice and a recomputed one.
pub fn compare(inv: &Invoice, lines: &[InvoiceLine], c: &Computed) -> Vec<Diff> {
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
    field("subtotal", dec(inv.subtotal), dec(c.subtotal));
    field("total", dec(inv.total), dec(c.total));
    field("usage cost", dec(inv.usage_cost), dec(c.usage_cost));
    field("requests", inv.requests.to_string(), c.requests.to_string());
    field(
        "tokens",
        inv.total_tokens.to_string(),
        c.total_tokens.to_string(),
    );
    field(
        "included tokens",
        inv.included_tokens.to_string(),
        c.included_tokens.to_string(),
    );
    field(
        "overage tokens",
        inv.overage_tokens.to_string(),
        c.overage_tokens.to_string(),
    );
    field(
        "waived tokens",
        inv.waived_tokens.to_string(),
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
    let mine: BTreeMap<_, _> = lines.iter().map(|l| (key(l), l)).collect();
    let theirs: BTreeMap<_, _> = c.lines.iter().map(|l| (key(l), l)).collect();
    let mut keys: Vec<_> = mine.keys().chain(theirs.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (a, b) = (mine.get(&k).copied(), theirs.get(&k).copied());
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
        writeln!(
            f,
            "period {}: {} invoices (total {} USD), {} raw usage rows",
            self.period,
            self.invoices,
            self.invoiced_total.normalize(),
            self.rows
        )?;
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
            }
        }
        if self.problems.is_empty() {
            writeln!(f, "OK: every invoice matches the raw usage records")
        } else {
            writeln!(f, "{} problem(s) found", self.problems.len())
        }
    }
}
