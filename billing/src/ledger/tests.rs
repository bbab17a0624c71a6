use std::str::FromStr;

use super::*;

fn plans() -> PlanCatalog {
    PlanCatalog::builtin()
}

fn nov() -> Period {
    Period::parse("2026-11").unwrap()
}

fn sub(plan: &str, from: i64, to: Option<i64>) -> Subscription {
    Subscription {
        id: format!("sub_{plan}_{from}"),
        developer_id: "dev_a".into(),
        plan: plan.into(),
        started_at: from,
        ended_at: to,
        changed_by: None,
    }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn row(ts_ms: i64, model: &str, tokens: u64, cost_nanos: i64) -> UsageRow {
    UsageRow {
        ts_ms,
        model: model.into(),
        tokens,
        cost_nanos,
    }
}

#[test]
fn overage_starts_with_the_request_that_crosses_the_allowance() {
    let p = nov();
    let mut l = Ledger::new("dev_a", p, &[sub("developer", 0, None)], &plans());
    let t0 = p.start_ms();
    // 60k + 30k tokens are included; the third request crosses 100k by 20k of its 30k.
    l.add_row(&row(t0 + 1, "gpt-4o", 60_000, 900_000_001));
    l.add_row(&row(t0 + 2, "gpt-4o-mini", 30_000, 4_500_000));
    l.add_row(&row(t0 + 3, "gpt-4o", 30_000, 450_000_000));
    l.add_row(&row(t0 + 4, "gpt-4o-mini", 1_000, 150_001));
    let c = l.finish();
    assert_eq!(c.lines.len(), 3);
    assert_eq!(
        (c.lines[0].kind.as_str(), c.lines[0].amount),
        ("base", d("29"))
    );
    assert_eq!(c.lines[0].description, "Developer plan, Nov 1 – Nov 30 UTC");
    let o = &c.lines[1];
    assert_eq!(
        (o.model.as_str(), o.quantity, o.requests),
        ("gpt-4o", 20_000, 1)
    );
    assert_eq!(o.amount, d("0.3")); // 0.45 × 20/30
    let o = &c.lines[2];
    assert_eq!((o.model.as_str(), o.quantity), ("gpt-4o-mini", 1_000));
    assert_eq!(o.amount, d("0.000150001"));
    assert_eq!(c.subtotal, d("29.300150001"));
    assert_eq!(c.total, d("29.30"));
    assert_eq!(
        (
            c.total_tokens,
            c.included_tokens,
            c.overage_tokens,
            c.waived_tokens
        ),
        (121_000, 100_000, 21_000, 0)
    );
    assert_eq!(c.usage_cost, d("1.354650002"));
    assert_eq!(c.requests, 4);
}

#[test]
fn a_plan_change_prorates_fee_and_allowance_by_time() {
    let p = nov();
    let change = p.start_ms() + 9 * 86_400_000; // Nov 10, 00:00
    let subs = [sub("developer", 0, Some(change)), sub("pro", change, None)];
    let mut l = Ledger::new("dev_a", p, &subs, &plans());
    // Developer part: 9/30 of 100k = 30k included; 40k used → 10k overage.
    l.add_row(&row(change - 10, "gpt-4o", 40_000, 600_000_000));
    // Pro part: 21/30 of 1M = 700k included; 700,001 used → 1 token overage.
    l.add_row(&row(change, "gpt-4o", 700_001, 7_000_010_000));
    let c = l.finish();
    let base: Vec<_> = c.lines.iter().filter(|l| l.kind == "base").collect();
    assert_eq!(base[0].amount, d("8.7")); // 29 × 9/30
    assert_eq!(base[1].amount, d("69.3")); // 99 × 21/30
    assert!(base[1].description.contains("prorated"));
    assert_eq!(
        base[1].description,
        "Pro plan, Nov 10 – Nov 30 UTC (prorated)"
    );
    let over: Vec<_> = c.lines.iter().filter(|l| l.kind == "overage").collect();
    assert_eq!(
        (over[0].plan.as_str(), over[0].quantity),
        ("developer", 10_000)
    );
    assert_eq!(over[0].amount, d("0.15"));
    assert_eq!((over[1].plan.as_str(), over[1].quantity), ("pro", 1));
    assert_eq!(over[1].amount, d("0.00001"));
    assert_eq!(c.subtotal, d("78.15001"));
    assert_eq!(c.total, d("78.15"));
}

#[test]
fn free_plans_waive_what_they_do_not_bill_and_custom_plans_cost_nothing_here() {
    let p = nov();
    let mut l = Ledger::new("dev_a", p, &[sub("free", 0, None)], &plans());
    l.add_row(&row(p.start_ms(), "gpt-4o", 1_500, 22_500_000));
    let c = l.finish();
    assert_eq!(
        (c.included_tokens, c.waived_tokens, c.overage_tokens),
        (1_000, 500, 0)
    );
    assert_eq!(c.lines.len(), 1);
    assert_eq!(c.total, Decimal::ZERO);

    let mut l = Ledger::new("dev_a", p, &[sub("enterprise", 0, None)], &plans());
    l.add_row(&row(p.start_ms(), "gpt-4o", 5_000_000, 75_000_000_000));
    let c = l.finish();
    assert_eq!(c.lines.len(), 1);
    assert!(c.lines[0].description.contains("custom pricing"));
    assert_eq!((c.total, c.included_tokens), (Decimal::ZERO, 5_000_000));
}

#[test]
fn the_total_is_rounded_once_half_away_from_zero() {
    assert_eq!(round_total(d("0.005")), d("0.01"));
    assert_eq!(round_total(d("0.004999999999")), d("0.00"));
    assert_eq!(round_total(d("29.125")), d("29.13"));
    assert_eq!(round_total(d("29.135")), d("29.14"));
    // Three lines of 0.004 each: rounding per line would give 0.00; once gives 0.01.
    let p = nov();
    let mut l = Ledger::new("dev_a", p, &[sub("developer", 0, None)], &plans());
    l.add_row(&row(p.start_ms(), "a", 100_000, 0));
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        l.add_row(&row(p.start_ms() + 1 + i as i64, m, 10, 4_000_000));
    }
    let c = l.finish();
    assert_eq!(c.subtotal, d("29.012"));
    assert_eq!(c.total, d("29.01"));
}

/// Hours applied from the rollup, with raw rows only where `try_hour` refuses, give exactly the
/// invoice of applying every row: what generation does versus what reconciliation does.
#[test]
fn hourly_application_matches_row_by_row() {
    let p = nov();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..50 {
        let change =
            p.start_ms() + (next() % (29 * 24)) as i64 * HOUR_MS + (next() % 3_600_000) as i64;
        let plans_pair = [("free", "developer"), ("developer", "pro"), ("pro", "free")][case % 3];
        let subs = [
            sub(plans_pair.0, 0, Some(change)),
            sub(plans_pair.1, change, None),
        ];
        let mut rows: Vec<UsageRow> = (0..2_000)
            .map(|_| {
                let tokens = next() % 3_000;
                row(
                    p.start_ms() + (next() % (p.end_ms() - p.start_ms()) as u64) as i64,
                    ["m1", "m2", "m3"][(next() % 3) as usize],
                    tokens,
                    (tokens * (1 + next() % 40_000)) as i64,
                )
            })
            .collect();
        rows.sort_by_key(|r| r.ts_ms);
        let mut exact = Ledger::new("dev_a", p, &subs, &plans());
        for r in &rows {
            exact.add_row(r);
        }
        let mut hourly = Ledger::new("dev_a", p, &subs, &plans());
        let mut raw_hours = 0;
        for hour_rows in rows.chunk_by(|a, b| a.ts_ms / HOUR_MS == b.ts_ms / HOUR_MS) {
            let hour = hour_rows[0].ts_ms / HOUR_MS * HOUR_MS;
            let mut models: BTreeMap<&str, HourModel> = BTreeMap::new();
            for r in hour_rows {
                let m = models.entry(&r.model).or_insert(HourModel {
                    model: r.model.clone(),
                    requests: 0,
                    tokens: 0,
                    cost_nanos: 0,
                });
                m.requests += 1;
                m.tokens += r.tokens;
                m.cost_nanos += r.cost_nanos;
            }
            let models: Vec<HourModel> = models.into_values().collect();
            if !hourly.try_hour(hour, &models) {
                raw_hours += 1;
                for r in hour_rows {
                    hourly.add_row(r);
                }
            }
        }
        assert!(raw_hours <= 3, "case {case}: {raw_hours} hours needed rows");
        assert_eq!(hourly.finish(), exact.finish(), "case {case}");
    }
}
