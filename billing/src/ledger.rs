//! The invoice ledger: pure arithmetic from a developer's plans and usage to invoice lines. No
//! I/O; invoice generation feeds it hourly rollups (falling back to raw rows where an hour must
//! be split), reconciliation feeds it every raw row, and both must arrive at the same lines.
//!
//! The rules (`docs/billing.md` is the reference):
//! - The period (a calendar month, UTC) is split into **segments**, one per plan held
//!   ([`aihub_store::subscriptions`]). Each segment's base fee and included tokens are the
//!   plan's, **prorated** by the segment's share of the period's milliseconds (fee exact,
//!   included tokens rounded down).
//! - A request belongs to the segment holding its start time (`ts_ms`). Within a segment,
//!   requests consume the included tokens **in time order** (`ts_ms`, then request id); the
//!   request that crosses the allowance is split, its cost divided in proportion to its tokens.
//! - Tokens beyond the allowance are billed at the metered cost (the gateway's list prices,
//!   `cost_nanos`) on plans with `overage: true`, one line per plan segment and model; on plans
//!   without overage they are **waived** (counted, not billed).
//! - Lines keep exact amounts; the invoice total is their sum rounded **once** to cents, half
//!   away from zero ([`round_total`]).

use std::collections::BTreeMap;

use aihub_plans::{Period, PlanCatalog};
use aihub_store::invoices::{Computed, InvoiceLine};
use aihub_store::subscriptions::Subscription;
use aihub_usage::read::billing::{HourRow, RawRow};
use rust_decimal::{Decimal, RoundingStrategy};

pub const HOUR_MS: i64 = 3_600_000;

/// Nano-USD to USD, exactly.
pub fn usd_from_nanos(nanos: i128) -> Decimal {
    Decimal::from_i128_with_scale(nanos, 9)
}

/// The one rounding of an invoice: to cents, half away from zero.
pub fn round_total(amount: Decimal) -> Decimal {
    amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
}

/// One usage row as billing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub ts_ms: i64,
    pub model: String,
    pub tokens: u64,
    pub cost_nanos: i64,
}

/// One model's usage within one hour (a `usage_hourly` group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourModel {
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

impl From<HourRow> for HourModel {
    fn from(r: HourRow) -> HourModel {
        HourModel {
            model: r.model,
            requests: r.requests,
            tokens: r.tokens,
            cost_nanos: r.cost_nanos,
        }
    }
}

impl From<&RawRow> for UsageRow {
    fn from(r: &RawRow) -> UsageRow {
        UsageRow {
            ts_ms: r.ts_ms as i64,
            model: r.model.clone(),
            tokens: u64::from(r.total_tokens),
            cost_nanos: r.cost_nanos,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Overage {
    tokens: u64,
    requests: u64,
    amount: Decimal,
}

#[derive(Debug, Clone)]
struct Segment {
    plan_name: String,
    display_name: String,
    starts_at: i64,
    ends_at: i64,
    /// Prorated base fee; `None` for custom-priced plans.
    base_fee: Option<Decimal>,
    /// Prorated included tokens; `None`: unlimited.
    allowance: Option<u64>,
    overage_billed: bool,
    used: u64,
    overage: BTreeMap<String, Overage>,
}

/// The running computation for one developer and period.
#[derive(Debug, Clone)]
pub struct Ledger {
    developer_id: String,
    period: Period,
    segments: Vec<Segment>,
    requests: u64,
    total_tokens: u64,
    usage_nanos: i128,
    included_tokens: u64,
    overage_tokens: u64,
    waived_tokens: u64,
}

impl Ledger {
    /// Segments from the developer's subscriptions overlapping `period` (oldest first). No
    /// subscription at all means the default plan for the whole period.
    pub fn new(
        developer_id: &str,
        period: Period,
        subscriptions: &[Subscription],
        plans: &PlanCatalog,
    ) -> Ledger {
        let (start, end) = (period.start_ms(), period.end_ms());
        let length = (end - start) as u128;
        let mut spans: Vec<(String, i64, i64)> = subscriptions
            .iter()
            .map(|s| {
                (
                    s.plan.clone(),
                    s.started_at.max(start),
                    s.ended_at.unwrap_or(end).min(end),
                )
            })
            .filter(|(_, a, b)| a < b)
            .collect();
        if spans.is_empty() {
            spans.push((plans.default_plan.clone(), start, end));
        }
        // Usage before the first subscription (an account created mid-period, clock skew)
        // belongs to the first plan; the fee and allowance stay those of the time held.
        let segments = spans
            .into_iter()
            .map(|(name, a, b)| {
                let plan = plans.plan(&name);
                let share = (b - a) as u128;
                Segment {
                    display_name: if plan.display_name.is_empty() {
                        name.clone()
                    } else {
                        plan.display_name.clone()
                    },
                    plan_name: name,
                    starts_at: a,
                    ends_at: b,
                    base_fee: plan.monthly_price_usd.map(|fee| {
                        if share == length {
                            fee
                        } else {
                            fee * Decimal::from(share as i64) / Decimal::from(length as i64)
                        }
                    }),
                    allowance: plan
                        .included_tokens
                        .map(|t| (t as u128 * share / length) as u64),
                    overage_billed: plan.overage,
                    used: 0,
                    overage: BTreeMap::new(),
                }
            })
            .collect();
        Ledger {
            developer_id: developer_id.to_owned(),
            period,
            segments,
            requests: 0,
            total_tokens: 0,
            usage_nanos: 0,
            included_tokens: 0,
            overage_tokens: 0,
            waived_tokens: 0,
        }
    }

    /// The segment holding `ts_ms` (the first or last one for instants outside them all).
    fn segment_of(&self, ts_ms: i64) -> usize {
        self.segments
            .iter()
            .position(|s| ts_ms < s.ends_at)
            .unwrap_or(self.segments.len() - 1)
    }

    /// Applies a whole hour of usage from the rollup, if it can be applied without looking at
    /// its rows: the hour lies within one segment, and it is either wholly inside or wholly
    /// beyond the allowance. Returns `false` (and changes nothing) when the hour's raw rows are
    /// needed: it holds a plan change, or the allowance runs out during it.
    pub fn try_hour(&mut self, hour_start: i64, models: &[HourModel]) -> bool {
        let i = self.segment_of(hour_start);
        let s = &self.segments[i];
        let inside = (hour_start >= s.starts_at || i == 0)
            && (hour_start + HOUR_MS <= s.ends_at || i == self.segments.len() - 1);
        if !inside {
            return false;
        }
        let tokens: u64 = models.iter().map(|m| m.tokens).sum();
        let all_included = s.allowance.is_none_or(|a| s.used + tokens <= a);
        // Strictly beyond: a request starting exactly at the allowance with no tokens is not an
        // overage request (see `add_row`).
        let all_beyond = s.allowance.is_some_and(|a| s.used > a);
        if !all_included && !all_beyond {
            return false;
        }
        for m in models {
            self.count(m.requests, m.tokens, m.cost_nanos as i128);
            let s = &mut self.segments[i];
            s.used += m.tokens;
            if all_included {
                self.included_tokens += m.tokens;
            } else {
                Self::beyond(
                    s,
                    &mut self.overage_tokens,
                    &mut self.waived_tokens,
                    &m.model,
                    m.tokens,
                    m.requests,
                    usd_from_nanos(m.cost_nanos as i128),
                );
            }
        }
        true
    }

    /// Applies one request (rows must come in time order within a segment).
    pub fn add_row(&mut self, row: &UsageRow) {
        self.count(1, row.tokens, row.cost_nanos as i128);
        let i = self.segment_of(row.ts_ms);
        let s = &mut self.segments[i];
        let before = s.used;
        s.used += row.tokens;
        let beyond = match s.allowance {
            None => 0,
            Some(a) => s.used.saturating_sub(a.max(before)),
        };
        self.included_tokens += row.tokens - beyond;
        // A request with tokens beyond the allowance, or one without tokens (a refusal, an
        // error) once the allowance is exceeded, counts on its model's overage line.
        let counts = beyond > 0 || s.allowance.is_some_and(|a| before > a);
        if counts {
            let cost = usd_from_nanos(row.cost_nanos as i128);
            let amount = if beyond == row.tokens {
                cost
            } else {
                cost * Decimal::from(beyond) / Decimal::from(row.tokens)
            };
            Self::beyond(
                s,
                &mut self.overage_tokens,
                &mut self.waived_tokens,
                &row.model,
                beyond,
                1,
                amount,
            );
        }
    }

    fn count(&mut self, requests: u64, tokens: u64, nanos: i128) {
        self.requests += requests;
        self.total_tokens += tokens;
        self.usage_nanos += nanos;
    }

    fn beyond(
        s: &mut Segment,
        overage_tokens: &mut u64,
        waived_tokens: &mut u64,
        model: &str,
        tokens: u64,
        requests: u64,
        amount: Decimal,
    ) {
        if !s.overage_billed {
            *waived_tokens += tokens;
            return;
        }
        *overage_tokens += tokens;
        let o = s.overage.entry(model.to_owned()).or_default();
        o.tokens += tokens;
        o.requests += requests;
        o.amount += amount;
    }

    /// Tokens used so far and the allowance, summed over the segments (`None`: unlimited).
    pub fn usage(&self) -> (u64, Option<u64>) {
        let used = self.segments.iter().map(|s| s.used).sum();
        let allowance = self
            .segments
            .iter()
            .map(|s| s.allowance)
            .try_fold(0u64, |acc, a| a.map(|a| acc + a));
        (used, allowance)
    }

    /// The invoice: per segment a base-fee line, then its overage lines by model name.
    pub fn finish(self) -> Computed {
        let mut lines = Vec::new();
        let whole = |s: &Segment| {
            s.starts_at == self.period.start_ms() && s.ends_at == self.period.end_ms()
        };
        for s in &self.segments {
            let span = span_text(s.starts_at, s.ends_at);
            let (description, amount) = match s.base_fee {
                Some(fee) if whole(s) => (format!("{} plan, {span}", s.display_name), fee),
                Some(fee) => (format!("{} plan, {span} (prorated)", s.display_name), fee),
                None => (
                    format!(
                        "{} plan, {span}: custom pricing, invoiced under contract",
                        s.display_name
                    ),
                    Decimal::ZERO,
                ),
            };
            lines.push(InvoiceLine {
                line_no: lines.len() as i64 + 1,
                kind: "base".into(),
                plan: s.plan_name.clone(),
                model: String::new(),
                description,
                starts_at: s.starts_at,
                ends_at: s.ends_at,
                quantity: 1,
                requests: 0,
                amount,
            });
            for (model, o) in s.overage.iter().filter(|(_, o)| o.tokens > 0) {
                lines.push(InvoiceLine {
                    line_no: lines.len() as i64 + 1,
                    kind: "overage".into(),
                    plan: s.plan_name.clone(),
                    model: model.clone(),
                    description: format!(
                        "{model}: {} tokens beyond the {} plan's included tokens, {span}",
                        o.tokens, s.display_name
                    ),
                    starts_at: s.starts_at,
                    ends_at: s.ends_at,
                    quantity: o.tokens as i64,
                    requests: o.requests as i64,
                    amount: o.amount,
                });
            }
        }
        let subtotal: Decimal = lines.iter().map(|l| l.amount).sum();
        Computed {
            developer_id: self.developer_id,
            period: self.period.to_string(),
            subtotal,
            total: round_total(subtotal),
            total_tokens: self.total_tokens as i64,
            included_tokens: self.included_tokens as i64,
            overage_tokens: self.overage_tokens as i64,
            waived_tokens: self.waived_tokens as i64,
            requests: self.requests as i64,
            usage_cost: usd_from_nanos(self.usage_nanos),
            lines,
        }
    }
}

/// `Nov 1–30` style span text (UTC days, end inclusive).
fn span_text(start: i64, end: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let day = |ms: i64| aihub_plans::period::civil_from_days(ms.div_euclid(86_400_000));
    let (_, m1, d1) = day(start);
    let (_, m2, d2) = day(end - 1);
    let hm = |ms: i64| {
        let s = ms.rem_euclid(86_400_000) / 1000;
        (s / 3600, s / 60 % 60)
    };
    let at = |ms: i64, m: u32, d: u32| match hm(ms) {
        (0, 0) => format!("{} {d}", MONTHS[m as usize - 1]),
        (h, mi) => format!("{} {d} {h:02}:{mi:02}", MONTHS[m as usize - 1]),
    };
    let from = at(start, m1, d1);
    let to = if hm(end) == (0, 0) {
        format!("{} {d2}", MONTHS[m2 as usize - 1])
    } else {
        let (_, m, d) = day(end);
        at(end, m, d)
    };
    format!("{from} – {to} UTC")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
