//! Billing against real services: a fresh ClickHouse database and a fresh SQLite or PostgreSQL
//! store per test. Invoices are checked against sums computed here independently (plain loops
//! over the inserted records, `Decimal` arithmetic), then against reconciliation.

use std::str::FromStr;
use std::time::Duration;

use aihub_billing::reconcile::{self, Problem};
use aihub_billing::{Billing, BillingConfig};
use aihub_plans::{Period, PlanCatalog};
use aihub_store::invoices::{self, SaveMode};
use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
use aihub_store::{subscriptions, Store};
use aihub_usage::testing::usage_row as record;
use aihub_usage::testing::TestClickHouse;
use aihub_usage::UsageRecord;
use rust_decimal::Decimal;

const HOUR: i64 = 3_600_000;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn usd(nanos: i128) -> Decimal {
    Decimal::from_i128_with_scale(nanos, 9)
}

/// The period before the current one: closed.
fn last_month() -> Period {
    Period::of_unix_ms(aihub_store::now_ms()).prev()
}

async fn account(store: &Store, id: &str, plan: &str, created_at: i64) {
    aihub_store::testing::imported(store, id, plan, created_at).await;
}

async fn switch_plan(store: &Store, id: &str, plan: &str, at: i64) {
    let mut tx = store.begin_write().await.unwrap();
    subscriptions::switch(&mut tx, id, plan, at, Some("test"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Deterministic pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Setup {
    store: Store,
    ch: TestClickHouse,
    billing: Billing,
    period: Period,
    _db: TestDatabase,
}

async fn setup(backend: Backend, config: BillingConfig) -> Setup {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ch = TestClickHouse::new().await;
    let billing = Billing::new(store.clone(), &ch.config, PlanCatalog::builtin(), config);
    Setup {
        store,
        billing,
        ch,
        period: last_month(),
        _db: db,
    }
}

/// Expected overage of one developer on one plan for the whole period, computed plainly:
/// rows in time order, the first `included` tokens free, the crossing row split.
fn expected_overage(rows: &[UsageRecord], included: u64) -> (u64, Decimal) {
    let mut rows: Vec<&UsageRecord> = rows.iter().collect();
    rows.sort_by_key(|r| (r.ts_ms, r.request_id));
    let (mut used, mut tokens, mut amount) = (0u64, 0u64, Decimal::ZERO);
    for r in rows {
        let t = r.total_tokens as u64;
        let free = included.saturating_sub(used).min(t);
        used += t;
        let over = t - free;
        if over > 0 {
            tokens += over;
            amount += usd(r.cost_nanos as i128) * Decimal::from(over) / Decimal::from(t);
        }
    }
    (tokens, amount)
}

async fn invoices_match_independent_sums(backend: Backend) {
    let s = setup(backend, BillingConfig::default()).await;
    let p = s.period;
    let (start, end) = (p.start_ms(), p.end_ms());
    account(&s.store, "dev_a", "developer", start - 86_400_000).await;
    account(&s.store, "dev_b", "developer", start - 86_400_000).await;
    account(&s.store, "dev_c", "free", start - 86_400_000).await;
    account(&s.store, "dev_quiet", "pro", start - 86_400_000).await;
    // dev_b moves to Pro 10 days and 37 minutes in, mid-hour.
    let change = start + 10 * 86_400_000 + 37 * 60_000;
    switch_plan(&s.store, "dev_b", "pro", change).await;

    let mut rng = Rng(42);
    let mut rows = Vec::new();
    for (dev, n) in [
        ("dev_a", 3_000),
        ("dev_b", 3_000),
        ("dev_c", 200),
        ("dev_ghost", 50),
    ] {
        for _ in 0..n {
            let ts = start + (rng.next() % (end - start) as u64) as i64;
            let tokens = (rng.next() % 1_500) as u32 * (rng.next() % 2) as u32;
            let model = ["gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"][(rng.next() % 3) as usize];
            rows.push(record(
                dev,
                ts,
                model,
                tokens,
                tokens as i64 * (1 + (rng.next() % 15_000) as i64),
            ));
        }
    }
    // Rows just outside the period belong to other invoices.
    rows.push(record("dev_a", start - 1, "gpt-4o", 1_000, 1_000_000));
    rows.push(record("dev_a", end, "gpt-4o", 1_000, 1_000_000));
    s.ch.insert(&rows).await;
    let in_period = |dev: &str| -> Vec<UsageRecord> {
        rows.iter()
            .filter(|r| r.developer_id == dev && (start..end).contains(&(r.ts_ms as i64)))
            .cloned()
            .collect()
    };

    // Generate twice, then four times at once: one invoice per developer.
    let first = s
        .billing
        .generate(p, None, SaveMode::Automatic)
        .await
        .unwrap();
    assert_eq!((first.developers, first.created), (4, 4));
    assert_eq!(first.skipped_without_subscription, 1);
    let again = s
        .billing
        .generate(p, None, SaveMode::Automatic)
        .await
        .unwrap();
    assert_eq!((again.created, again.refreshed), (0, 4));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let b = s.billing.clone();
            tokio::spawn(async move { b.generate(p, None, SaveMode::Automatic).await.unwrap() })
        })
        .collect();
    for r in runs {
        assert_eq!(r.await.unwrap().created, 0);
    }
    let all = invoices::list(&s.store, &Default::default(), 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 4);

    let invoice = |dev: &str| {
        let inv = all.iter().find(|i| i.developer_id == dev).unwrap().clone();
        let store = s.store.clone();
        async move {
            let lines = invoices::lines(&store, &inv.id).await.unwrap();
            (inv, lines)
        }
    };

    // dev_a: Developer plan all month: $29 + overage beyond 100,000 tokens.
    let a_rows = in_period("dev_a");
    let (inv, lines) = invoice("dev_a").await;
    let cost: i128 = a_rows.iter().map(|r| r.cost_nanos as i128).sum();
    let tokens: u64 = a_rows.iter().map(|r| r.total_tokens as u64).sum();
    assert_eq!(inv.usage_cost, usd(cost));
    assert_eq!(inv.total_tokens as u64, tokens);
    assert_eq!(inv.requests as usize, a_rows.len());
    let (over_tokens, over_amount) = expected_overage(&a_rows, 100_000);
    assert!(over_tokens > 0, "the test data must cross the allowance");
    assert_eq!(inv.overage_tokens as u64, over_tokens);
    assert_eq!(inv.subtotal, d("29") + over_amount);
    assert_eq!(
        inv.total,
        (d("29") + over_amount)
            .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    );
    let by_model: Decimal = lines
        .iter()
        .filter(|l| l.kind == "overage")
        .map(|l| l.amount)
        .sum();
    assert_eq!(by_model, over_amount);

    // dev_b: prorated by milliseconds held, each part with its prorated allowance.
    let b_rows = in_period("dev_b");
    let (inv, lines) = invoice("dev_b").await;
    let len = Decimal::from(end - start);
    let dev_part = Decimal::from(change - start) / len;
    let pro_part = Decimal::from(end - change) / len;
    let base: Vec<_> = lines.iter().filter(|l| l.kind == "base").collect();
    assert_eq!(base.len(), 2);
    assert_eq!(
        base[0].amount,
        d("29") * Decimal::from(change - start) / len
    );
    assert_eq!(base[1].amount, d("99") * Decimal::from(end - change) / len);
    let allowance = |included: u64, from: i64, to: i64| {
        (included as u128 * (to - from) as u128 / (end - start) as u128) as u64
    };
    let before: Vec<_> = b_rows
        .iter()
        .filter(|r| (r.ts_ms as i64) < change)
        .cloned()
        .collect();
    let after: Vec<_> = b_rows
        .iter()
        .filter(|r| (r.ts_ms as i64) >= change)
        .cloned()
        .collect();
    let (t1, a1) = expected_overage(&before, allowance(100_000, start, change));
    let (t2, a2) = expected_overage(&after, allowance(1_000_000, change, end));
    assert_eq!(inv.overage_tokens as u64, t1 + t2);
    assert_eq!(inv.subtotal, base[0].amount + base[1].amount + a1 + a2);
    assert!(dev_part + pro_part == Decimal::ONE);

    // dev_c: Free: nothing billed, the excess waived.
    let (inv, _) = invoice("dev_c").await;
    let c_tokens: u64 = in_period("dev_c")
        .iter()
        .map(|r| r.total_tokens as u64)
        .sum();
    assert_eq!(inv.total, Decimal::ZERO);
    assert_eq!(inv.waived_tokens as u64, c_tokens.saturating_sub(1_000));

    // dev_quiet: no usage, the base fee.
    let (inv, lines) = invoice("dev_quiet").await;
    assert_eq!((inv.total, inv.requests, lines.len()), (d("99.00"), 0, 1));

    // Reconciliation from the raw rows agrees.
    let report = reconcile::reconcile(&s.billing, p).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.invoices, 4);
    assert_eq!(
        report.without_subscription,
        vec![("dev_ghost".to_owned(), 50)]
    );

    // A voided invoice that was not reissued is an operator's decision, not a missing one.
    let (quiet, _) = invoice("dev_quiet").await;
    let mut tx = s.store.begin_write().await.unwrap();
    invoices::void(&mut tx, &quiet.id, "waived").await.unwrap();
    tx.commit().await.unwrap();
    let report = reconcile::reconcile(&s.billing, p).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.voided, vec!["dev_quiet".to_owned()]);

    // Tamper with one raw row of dev_a beyond the allowance: reconciliation names it.
    let victim = a_rows.iter().max_by_key(|r| r.ts_ms).unwrap();
    s.ch.execute(&format!(
        "ALTER TABLE usage_events UPDATE cost_nanos = cost_nanos + 1000000 WHERE request_id = '{}'",
        victim.request_id
    ))
    .await;
    for _ in 0..100 {
        let now: Vec<i64> =
            s.ch.client()
                .query(&format!(
                    "SELECT cost_nanos FROM usage_events WHERE request_id = '{}'",
                    victim.request_id
                ))
                .fetch_all()
                .await
                .unwrap();
        if now == [victim.cost_nanos + 1_000_000] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = reconcile::reconcile(&s.billing, p).await.unwrap();
    assert!(!report.is_clean());
    let text = report.to_string();
    assert!(text.contains("MISMATCH invoice"), "{text}");
    assert!(text.contains("dev_a"), "{text}");
    assert!(text.contains("usage cost"), "{text}");
    assert!(text.contains("ROLLUP dev_a"), "{text}");
    assert!(report.problems.iter().all(|p| match p {
        Problem::Invoice { developer_id, .. } | Problem::Rollup { developer_id, .. } =>
            developer_id == "dev_a",
        Problem::MissingInvoice { .. } | Problem::Live { .. } => false,
    }));
}

#[tokio::test]
async fn invoices_match_independent_sums_on_both_backends() {
    for backend in BACKENDS {
        invoices_match_independent_sums(backend).await;
    }
}

/// Usage arriving late, inside the grace window, lands on the closed period's invoice when it
/// is finalized; usage after finalization does not change it (reconciliation reports it).
async fn late_usage(backend: Backend) {
    let config = BillingConfig {
        grace_period: Duration::from_secs(3 * 3600),
        ..BillingConfig::default()
    };
    let s = setup(backend, config).await;
    let p = s.period;
    let (start, end) = (p.start_ms(), p.end_ms());
    account(&s.store, "dev_a", "developer", start - 86_400_000).await;
    account(&s.store, "dev_free", "free", start - 86_400_000).await;
    s.ch.insert(&[record(
        "dev_a",
        start + HOUR,
        "gpt-4o",
        100_000,
        1_500_000_000,
    )])
    .await;

    // An hour after the period closed: drafts.
    let r = s.billing.run_once(end + HOUR).await.unwrap();
    assert_eq!(r.finalized, 0);
    let drafts = invoices::drafts(&s.store, &p.to_string()).await.unwrap();
    assert_eq!(drafts.len(), 2);
    let (id, _) = drafts.iter().find(|(_, d)| d == "dev_a").unwrap().clone();
    assert_eq!(
        invoices::by_id(&s.store, &id).await.unwrap().total,
        d("29.00")
    );

    // A gateway's write-ahead log delivers a request of the closed period late; another of
    // the new period arrives too.
    s.ch.insert(&[
        record("dev_a", end - 1, "gpt-4o", 1_000, 15_000_000),
        record("dev_a", end, "gpt-4o", 5_000, 75_000_000),
    ])
    .await;
    // Past the grace window: recomputed and finalized.
    let r = s.billing.run_once(end + 4 * HOUR).await.unwrap();
    assert_eq!(r.finalized, 2);
    let inv = invoices::by_id(&s.store, &id).await.unwrap();
    assert_eq!(inv.status, "open");
    assert_eq!(inv.overage_tokens, 1_000);
    assert_eq!(inv.subtotal, d("29.015"));
    assert_eq!(inv.total, d("29.02")); // half away from zero
                                       // The free developer owes nothing: paid at once.
    let free = invoices::list(
        &s.store,
        &invoices::InvoiceFilter {
            developer_id: Some("dev_free".into()),
            ..Default::default()
        },
        10,
    )
    .await
    .unwrap();
    assert_eq!(free[0].status, "paid");
    // One `invoice.finalized` event each.
    let events = aihub_store::outbox::for_developer(&s.store, "dev_a")
        .await
        .unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "invoice.finalized")
            .count(),
        1
    );
    let r = s.billing.run_once(end + 5 * HOUR).await.unwrap();
    assert_eq!((r.finalized, r.generated.len()), (0, 0));
    assert!(reconcile::reconcile(&s.billing, p)
        .await
        .unwrap()
        .is_clean());

    // Too late: the invoice stays as finalized; reconciliation shows the difference.
    s.ch.insert(&[record("dev_a", end - 2, "gpt-4o", 10, 150_000)])
        .await;
    s.billing.run_once(end + 6 * HOUR).await.unwrap();
    assert_eq!(
        invoices::by_id(&s.store, &id).await.unwrap().overage_tokens,
        1_000
    );
    let report = reconcile::reconcile(&s.billing, p).await.unwrap();
    assert!(!report.is_clean());
    assert!(report.to_string().contains("overage tokens"), "{report}");
}

#[tokio::test]
async fn late_usage_on_both_backends() {
    for backend in BACKENDS {
        late_usage(backend).await;
    }
}

/// The current period: cost so far and a linear projection.
#[tokio::test]
async fn current_period_projection() {
    let s = setup(Backend::Sqlite, BillingConfig::default()).await;
    let now = aihub_store::now_ms();
    let p = Period::of_unix_ms(now);
    account(&s.store, "dev_a", "developer", p.start_ms() - 86_400_000).await;
    s.ch.insert(&[record(
        "dev_a",
        p.start_ms(),
        "gpt-4o",
        150_000,
        2_250_000_000,
    )])
    .await;
    // Half the period gone: twice the usage projected.
    let half = p.start_ms() + (p.end_ms() - p.start_ms()) / 2;
    let c = s.billing.current("dev_a", half).await.unwrap();
    assert_eq!(
        (c.plan.as_str(), c.tokens_used, c.included_tokens),
        ("developer", 150_000, Some(100_000))
    );
    assert_eq!(c.so_far.subtotal, d("29.75")); // 29 + 50k of 150k tokens' 2.25
    assert_eq!(c.projected_tokens, 300_000);
    // 150,000 more tokens at 0.000015 USD each.
    assert_eq!(c.projected_subtotal, d("32"));
    assert_eq!(c.projected_total, d("32.00"));
    assert!(matches!(
        s.billing.current("dev_nobody", half).await,
        Err(aihub_billing::BillingError::UnknownDeveloper)
    ));
}
