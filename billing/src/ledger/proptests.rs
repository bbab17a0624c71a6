//! Property test of the ledger: for generated usage (any plans held in turn, token counts that
//! cross the allowances, rows in several hours), feeding it hourly rollups, with raw rows for
//! the hours it must split (as invoice generation does), gives exactly the invoice of every raw
//! row in order (as reconciliation does), and its totals are the raw rows' sums.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const PLANS: [&str; 4] = ["free", "developer", "pro", "enterprise"];

/// Plans held in turn: (plan, start offset in the period), sorted; each ends at the next start.
fn subscriptions(period: Period, held: &[(usize, i64)]) -> Vec<Subscription> {
    let mut held = held.to_vec();
    held.sort_by_key(|h| h.1);
    let starts: Vec<i64> = held.iter().map(|h| period.start_ms() + h.1).collect();
    held.iter()
        .enumerate()
        .map(|(i, &(plan, _))| Subscription {
            id: format!("sub_{i}"),
            developer_id: "dev_a".into(),
            plan: PLANS[plan].into(),
            started_at: starts[i],
            ended_at: starts.get(i + 1).copied(),
            changed_by: None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hourly_rollups_give_the_invoice_of_the_raw_rows(
        held in prop::collection::vec((0usize..4, 0i64..30 * 86_400_000), 0..3),
        generated in prop::collection::vec(
            (0i64..6 * HOUR_MS, 0usize..3, 0u64..60_000, 0i64..2_000_000_000),
            0..60,
        ),
        base_hour in 0i64..700,
    ) {
        let period = Period::parse("2026-11").unwrap();
        let subs = subscriptions(period, &held);
        let plans = PlanCatalog::builtin();
        let start = period.start_ms() + base_hour * HOUR_MS;
        let mut rows: Vec<UsageRow> = generated
            .iter()
            .map(|&(offset, model, tokens, cost)| UsageRow {
                ts_ms: (start + offset).min(period.end_ms() - 1),
                model: format!("m{model}"),
                tokens,
                cost_nanos: cost,
            })
            .collect();
        rows.sort_by_key(|r| r.ts_ms);

        let mut raw = Ledger::new("dev_a", period, &subs, &plans);
        for r in &rows {
            raw.add_row(r);
        }
        let raw = raw.finish();

        // The rollup: (hour, model) groups, models in name order, as `usage_hourly` is read.
        let mut hours: BTreeMap<i64, BTreeMap<String, HourModel>> = BTreeMap::new();
        for r in &rows {
            let hour = r.ts_ms - (r.ts_ms - period.start_ms()).rem_euclid(HOUR_MS);
            let m = hours.entry(hour).or_default().entry(r.model.clone()).or_insert(HourModel {
                model: r.model.clone(),
                requests: 0,
                tokens: 0,
                cost_nanos: 0,
            });
            m.requests += 1;
            m.tokens += r.tokens;
            m.cost_nanos += r.cost_nanos;
        }
        let mut rolled = Ledger::new("dev_a", period, &subs, &plans);
        for (hour, models) in &hours {
            let models: Vec<HourModel> = models.values().cloned().collect();
            if !rolled.try_hour(*hour, &models) {
                for r in rows.iter().filter(|r| r.ts_ms >= *hour && r.ts_ms < hour + HOUR_MS) {
                    rolled.add_row(r);
                }
            }
        }
        let rolled = rolled.finish();
        prop_assert_eq!(&rolled, &raw);

        let tokens: u64 = rows.iter().map(|r| r.tokens).sum();
        let cost: i128 = rows.iter().map(|r| r.cost_nanos as i128).sum();
        prop_assert_eq!(raw.requests, rows.len() as i64);
        prop_assert_eq!(raw.total_tokens, tokens as i64);
        prop_assert_eq!(raw.usage_cost, usd_from_nanos(cost));
        prop_assert_eq!(
            raw.included_tokens + raw.overage_tokens + raw.waived_tokens,
            tokens as i64
        );
        let lines: Decimal = raw.lines.iter().map(|l| l.amount).sum();
        prop_assert_eq!(raw.subtotal, lines);
        prop_assert_eq!(raw.total, round_total(lines));
    }
}
