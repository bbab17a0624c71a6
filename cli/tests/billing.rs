//! Billing end to end, black-box: requests through the real gateway are metered into a fresh
//! ClickHouse database; `aihub billing generate` invoices them from a real SQLite store; and
//! `aihub billing reconcile` proves the invoice from the raw records, then catches a tampered
//! row (exit code 1 and a readable diff).

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

    // The key's developer (`dev_bill`) has an account on the tiny plan since last month.
    let store_db = TestDatabase::new(Backend::Sqlite).await;
    let store = store_db.store().await;
    let now = aihub_store::now_ms();
    let period = aihub_plans::Period::of_unix_ms(now);
    aihub_store::testing::imported(&store, "dev_bill", "tiny", period.start_ms() - 86_400_000)
        .await;

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

    let (code, out, _) = aihub(&[
        "billing",
        "reconcile",
        "--period",
        &p,
        "--admin-config",
        admin,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: every invoice matches"), "{out}");
    assert!(out.contains("1 invoices"), "{out}");

    // Tamper with one raw row (a mutation: the rollup keeps the original).
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
            metered + 7_000,
            WAIT
        )
        .await,
        metered + 7_000
    );
    let (code, out, _) = aihub(&[
        "billing",
        "reconcile",
        "--period",
        &p,
        "--admin-config",
        admin,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("MISMATCH invoice {}", inv.id)),
        "{out}"
    );
    assert!(out.contains("usage cost"), "{out}");
    assert!(out.contains("ROLLUP dev_bill"), "{out}");
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
