//! Billing end to end, black-box: requests through the real gateway are metered into a fresh
//! ClickHouse database; `aihub billing reconcile` checks the open month against the live
//! computation (no invoices exist yet: clean, exit 0); `aihub billing generate` invoices a
//! closed month from a real SQLite store and `reconcile` proves that invoice from the raw records
//! (and reports it missing before); a tampered row is caught (exit code 1 and a readable diff).

mod common;

use std::process::Command;
use std::time::Duration;

use aihub_store::invoices;
use aihub_store::testing::{Backend, TestDatabase};
use common::*;
use rust_decimal::Decimal;

const WAIT: Duration = Duration::from_secs(20);

/// A plan small enough for a handful of requests to go past its included tokens.
const PLANS: &str = "default_plan: tiny
plans:
  tiny:
    display_name: Tiny
    monthly_price_usd: 1
    included_tokens: 100
    overage: true
";

fn aihub(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_proves_invoices_and_catches_a_tampered_row() {
    let db = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mock = Mock::start(&[]);
    let k = key("bill", &[]);
    let gw = Gateway::start(
        &format!(
            "{}{}",
            config(
                &[upstream("m", &[mock.base_url()], &[])],
                &[("gpt-4o", "m", None), ("gpt-4o-mini", "m", None)],
                &[&k]
            ),
            db.metering_yaml(wal.path(), &[])
        ),
        &[],
    );

    // The key's developer (`dev_bill`) has an account on the tiny plan since before last month.
    let store_db = TestDatabase::new(Backend::Sqlite).await;
    let store = store_db.store().await;
    let now = aihub_store::now_ms();
    let period = aihub_plans::Period::of_unix_ms(now);
    let last = period.prev();
    aihub_store::testing::imported(&store, "dev_bill", "tiny", last.start_ms() - 86_400_000).await;

    for i in 0..12 {
        let model = if i % 3 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
        let resp = gw.chat(&k.key, &chat(model)).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        db.wait_for("SELECT count() FROM usage_events", 12, WAIT)
            .await,
        12
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plans.yaml"), PLANS).unwrap();
    let admin = dir.path().join("admin.yaml");
    std::fs::write(
        &admin,
        format!(
            "database: {{url: \"{}\"}}\nclickhouse: {{url: \"{}\", database: {}}}\n\
             plans_file: plans.yaml\nbilling: {{enabled: false}}\n",
            store_db.url, db.url, db.name
        ),
    )
    .unwrap();
    let admin = admin.to_str().unwrap();
    let p = period.to_string();
    let reconcile = |period: &str| {
        aihub(&[
            "billing",
            "reconcile",
            "--period",
            period,
            "--admin-config",
            admin,
        ])
    };

    // This month is open: no invoice exists yet, so the raw rows are compared with the live
    // computation (the invoice as if the month closed now), not reported as missing invoices.
    let (code, out, err) = reconcile(&p);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("period {p} is open")), "{out}");
    assert!(out.contains("1 developers computed live"), "{out}");
    assert!(out.contains("12 raw usage rows"), "{out}");
    assert!(
        out.contains("OK: the live computation matches the raw usage records"),
        "{out}"
    );
    assert!(!out.contains("MISSING"), "{out}");

    // Drafts generated early are not compared (they would be stale as usage goes on).
    let (code, out, err) = aihub(&[
        "billing",
        "generate",
        "--period",
        &p,
        "--admin-config",
        admin,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 developers, 1 created"), "{out}");

    // The invoice: 1 USD, then every token past the first 100 at its metered price.
    let inv = &invoices::list(&store, &Default::default(), 10)
        .await
        .unwrap()[0];
    let metered: i128 = db.number("SELECT sum(cost_nanos) FROM usage_events").await;
    let tokens = db
        .number("SELECT sum(total_tokens) FROM usage_events")
        .await;
    assert!(tokens > 100, "the requests must pass the included tokens");
    assert_eq!(inv.usage_cost, Decimal::from_i128_with_scale(metered, 9));
    assert_eq!(inv.total_tokens as i128, tokens);
    assert_eq!(inv.overage_tokens as i128, tokens - 100);
    assert!(inv.subtotal > Decimal::ONE && inv.subtotal < Decimal::ONE + inv.usage_cost);
    let (code, out, _) = reconcile(&p);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: the live computation matches"), "{out}");
    assert!(out.contains("note: 1 draft invoice(s)"), "{out}");

    // Last month (closed): usage recorded then, but no invoice generated yet — missing.
    let l = last.to_string();
    let rows: Vec<String> = (0..3i64)
        .map(|i| {
            let ts_ms = last.start_ms() + 3_600_000 + i * 60_000;
            format!(
                "(toUUID('00000000-0000-4000-8000-00000000000{i}'), toDateTime({}), {ts_ms}, \
                 'dev_bill', 'bill', 'gpt-4o', 80, {}, 200)",
                ts_ms / 1000,
                80 * 15_000
            )
        })
        .collect();
    db.query(&format!(
        "INSERT INTO usage_events (request_id, ts, ts_ms, developer_id, key_id, model, \
         total_tokens, cost_nanos, status) VALUES {}",
        rows.join(", ")
    ))
    .await;
    let (code, out, _) = reconcile(&l);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISSING invoice for dev_bill"), "{out}");
    assert!(!out.contains("is open"), "{out}");
    let (code, out, err) = aihub(&[
        "billing",
        "generate",
        "--period",
        &l,
        "--admin-config",
        admin,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = reconcile(&l);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: every invoice matches"), "{out}");
    assert!(out.contains("1 invoices"), "{out}");
    assert!(out.contains("3 raw usage rows"), "{out}");

    // Tamper with one raw row of this month (a mutation: the rollup keeps the original).
    let metered_all: i128 = db.number("SELECT sum(cost_nanos) FROM usage_events").await;
    let request_id = db
        .query("SELECT toString(request_id) FROM usage_events ORDER BY ts_ms DESC LIMIT 1")
        .await
        .trim()
        .to_owned();
    db.query(&format!(
        "ALTER TABLE usage_events UPDATE cost_nanos = cost_nanos + 7000 WHERE request_id = '{request_id}'"
    ))
    .await;
    assert_eq!(
        db.wait_for(
            "SELECT sum(cost_nanos) FROM usage_events",
            metered_all + 7_000,
            WAIT
        )
        .await,
        metered_all + 7_000
    );
    // The live computation reads the tampered row too (its hour is split: the included tokens
    // run out in it); the rollup keeps the original.
    let (code, out, _) = reconcile(&p);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "ROLLUP dev_bill: raw rows 12 requests, {tokens} tokens, {} nano-USD; \
             usage_hourly 12 requests, {tokens} tokens, {metered} nano-USD",
            metered + 7_000
        )),
        "{out}"
    );
    assert!(out.contains("problem(s) found"), "{out}");

    // Bad input is refused clearly.
    let (code, _, err) = aihub(&[
        "billing",
        "reconcile",
        "--period",
        "2026-13",
        "--admin-config",
        admin,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("expected YYYY-MM"), "{err}");
}
