//! Billing in the store against real SQLite and real PostgreSQL: the subscription history,
//! idempotent drafts (sequential and concurrent), draft refresh, the invoice state machine
//! (finalize, void, payments), payment idempotency, overpayment, the `billing.payment` event
//! and the revenue report.

use std::str::FromStr;

use aihub_store::developers::{self, OperatorUpdate};
use aihub_store::invoices::{self, Computed, InvoiceFilter, InvoiceLine, SaveMode, Saved};
use aihub_store::payments::{self, NewPayment, PaymentError};
use aihub_store::subscriptions;
use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
use aihub_store::{audit, outbox, Store, StoreError};
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn line(no: i64, kind: &str, plan: &str, model: &str, tokens: i64, amount: &str) -> InvoiceLine {
    InvoiceLine {
        line_no: no,
        kind: kind.into(),
        plan: plan.into(),
        model: model.into(),
        description: format!("{kind} {plan} {model}"),
        starts_at: 1_793_491_200_000,
        ends_at: 1_796_083_200_000,
        quantity: if kind == "base" { 1 } else { tokens },
        requests: if kind == "base" { 0 } else { 3 },
        amount: d(amount),
    }
}

/// An invoice for `dev` in 2026-10 with the given lines.
fn computed(dev: &str, lines: Vec<InvoiceLine>) -> Computed {
    let subtotal: Decimal = lines.iter().map(|l| l.amount).sum();
    let overage: i64 = lines
        .iter()
        .filter(|l| l.kind == "overage")
        .map(|l| l.quantity)
        .sum();
    Computed {
        developer_id: dev.into(),
        period: "2026-10".into(),
        subtotal,
        total: subtotal
            .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero),
        total_tokens: 100_000 + overage,
        included_tokens: 100_000,
        overage_tokens: overage,
        waived_tokens: 0,
        requests: 10,
        usage_cost: d("1.5"),
        lines,
    }
}

fn standard(dev: &str) -> Computed {
    computed(
        dev,
        vec![
            line(1, "base", "developer", "", 0, "29"),
            line(2, "overage", "developer", "gpt-4o", 20_000, "0.3"),
            line(
                3,
                "overage",
                "developer",
                "gpt-4o-mini",
                1_000,
                "0.000150001",
            ),
        ],
    )
}

fn manual(invoice_id: &str, reference: &str, amount: &str) -> NewPayment {
    NewPayment {
        invoice_id: invoice_id.into(),
        provider: "manual".into(),
        reference: reference.into(),
        amount: d(amount),
        currency: "USD".into(),
        received_at: 1_796_100_000_000,
        recorded_by: Some("dev_operator".into()),
        ip: Some("192.0.2.1".into()),
    }
}

async fn events(store: &Store, dev: &str, kind: &str) -> Vec<serde_json::Value> {
    outbox::for_developer(store, dev)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == kind)
        .map(|e| e.payload)
        .collect()
}

fn conflict_message(e: PaymentError) -> String {
    match e {
        PaymentError::Store(StoreError::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn invalid_field(e: PaymentError) -> (&'static str, String) {
    match e {
        PaymentError::Invalid { field, message } => (field, message),
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

fn created_id(saved: &[Saved]) -> String {
    match &saved[0] {
        Saved::Created(id) => id.clone(),
        other => panic!("expected a new draft, got {other:?}"),
    }
}

async fn subscription_history(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    // An account created a day ago, so every change below is in the past of the last one.
    let t0 = aihub_store::now_ms() - 86_400_000;
    let dev = aihub_store::testing::imported(&store, "dev_subs", "free", t0).await;
    let t0 = dev.created_at;
    let mut tx = store.begin_write().await.unwrap();
    assert!(
        subscriptions::switch(&mut tx, &dev.id, "developer", t0 + 1_000, Some("op"))
            .await
            .unwrap()
    );
    // Same plan again: nothing.
    assert!(
        !subscriptions::switch(&mut tx, &dev.id, "developer", t0 + 1_500, None)
            .await
            .unwrap()
    );
    assert!(
        subscriptions::switch(&mut tx, &dev.id, "pro", t0 + 2_000, None)
            .await
            .unwrap()
    );
    // A second change in the same millisecond replaces the first (no zero-length span).
    assert!(
        subscriptions::switch(&mut tx, &dev.id, "free", t0 + 2_000, None)
            .await
            .unwrap()
    );
    // A change dated before the current plan began is moved to its start, replacing it too.
    assert!(
        subscriptions::switch(&mut tx, &dev.id, "pro", t0 + 10, None)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let mut tx = store.begin_write().await.unwrap();
    developers::lock(&mut tx, &dev.id).await.unwrap();
    let u = OperatorUpdate {
        plan: Some("developer".into()),
        changed_by: Some("op_2".into()),
        ..Default::default()
    };
    let after = developers::operator_update(&mut tx, &dev.id, &u)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(after.plan, "developer");

    let subs = subscriptions::overlapping(&store, &dev.id, 0, i64::MAX)
        .await
        .unwrap();
    let plans: Vec<&str> = subs.iter().map(|s| s.plan.as_str()).collect();
    assert_eq!(plans, ["free", "developer", "pro", "developer"], "{subs:?}");
    assert_eq!(subs[0].started_at, t0);
    for pair in subs.windows(2) {
        assert_eq!(
            pair[0].ended_at,
            Some(pair[1].started_at),
            "a gap or overlap: {subs:?}"
        );
        assert!(pair[0].started_at < pair[1].started_at);
    }
    assert_eq!(subs[1].changed_by.as_deref(), Some("op"));
    assert_eq!(subs[2].started_at, t0 + 2_000);
    assert_eq!(subs.last().unwrap().ended_at, None);
    assert_eq!(subs.last().unwrap().changed_by.as_deref(), Some("op_2"));
    // Undoing the last change in its own millisecond: the plan before simply continues.
    let last = subs.last().unwrap().started_at;
    let mut tx = store.begin_write().await.unwrap();
    assert!(subscriptions::switch(&mut tx, &dev.id, "pro", last, None)
        .await
        .unwrap());
    tx.commit().await.unwrap();
    let subs = subscriptions::overlapping(&store, &dev.id, 0, i64::MAX)
        .await
        .unwrap();
    let plans: Vec<&str> = subs.iter().map(|s| s.plan.as_str()).collect();
    assert_eq!(plans, ["free", "developer", "pro"], "{subs:?}");
    assert_eq!(subs[2].ended_at, None);
    // A window inside the history sees only what overlaps it.
    let mid = subscriptions::overlapping(&store, &dev.id, t0 + 1_000, t0 + 1_001)
        .await
        .unwrap();
    assert_eq!(mid.len(), 1);
    assert_eq!(mid[0].plan, "developer");
}

#[tokio::test]
async fn subscription_history_on_both_backends() {
    for backend in BACKENDS {
        subscription_history(backend).await;
    }
}

async fn drafts_are_idempotent(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = aihub_store::testing::developer(&store, "drafts@example.com").await;
    let first = invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Automatic)
        .await
        .unwrap();
    let id = created_id(&first);
    let again = invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Automatic)
        .await
        .unwrap();
    assert_eq!(again, vec![Saved::Refreshed(id.clone())]);
    let all = invoices::list(&store, &InvoiceFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let inv = &all[0];
    assert_eq!(
        (inv.status.as_str(), inv.subtotal, inv.total),
        ("draft", d("29.300150001"), d("29.30"))
    );
    assert_eq!(invoices::lines(&store, &id).await.unwrap().len(), 3);

    // A refresh replaces the amounts and the lines.
    let refreshed = computed(
        &dev.id,
        vec![
            line(1, "base", "developer", "", 0, "29"),
            line(2, "overage", "developer", "o1", 5_000, "1.125"),
        ],
    );
    invoices::save_drafts(&store, &[refreshed], SaveMode::Automatic)
        .await
        .unwrap();
    let inv = invoices::by_id(&store, &id).await.unwrap();
    assert_eq!(
        (inv.subtotal, inv.total, inv.overage_tokens),
        (d("30.125"), d("30.13"), 5_000)
    );
    let lines = invoices::lines(&store, &id).await.unwrap();
    let models: Vec<&str> = lines.iter().map(|l| l.model.as_str()).collect();
    assert_eq!(models, ["", "o1"]);
    assert_eq!(lines[1].amount, d("1.125"));

    // Concurrently, from 8 tasks, for another developer: one invoice.
    let other = aihub_store::testing::developer(&store, "race@example.com").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let c = standard(&other.id);
        tasks.push(tokio::spawn(async move {
            invoices::save_drafts(&store, &[c], SaveMode::Automatic).await
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap().unwrap().pop().unwrap() {
            Saved::Created(_) => created += 1,
            Saved::Refreshed(_) => {}
            Saved::Kept(k) => panic!("kept {k}"),
        }
    }
    assert_eq!(created, 1);
    let filter = InvoiceFilter {
        developer_id: Some(other.id.clone()),
        ..Default::default()
    };
    let theirs = invoices::list(&store, &filter, 100).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        invoices::lines(&store, &theirs[0].id).await.unwrap().len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drafts_are_idempotent_on_both_backends() {
    for backend in BACKENDS {
        drafts_are_idempotent(backend).await;
    }
}

async fn lifecycle(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dev = aihub_store::testing::developer(&store, "life@example.com").await;
    let id = created_id(
        &invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Automatic)
            .await
            .unwrap(),
    );

    // A draft takes no payment.
    let e = payments::record_payment(&store, &manual(&id, "TR-1", "10.00"))
        .await
        .unwrap_err();
    assert!(conflict_message(e).contains("finalize it first"));
    // Voiding a draft: no event (the developer never saw it); automatic generation leaves the
    // period alone, a reissue creates a new draft.
    let mut tx = store.begin_write().await.unwrap();
    let (void, changed) = invoices::void(&mut tx, &id, "wrong plan").await.unwrap();
    tx.commit().await.unwrap();
    assert!(changed);
    assert_eq!(
        (void.status.as_str(), void.void_reason.as_deref()),
        ("void", Some("wrong plan"))
    );
    assert!(void.voided_at.is_some());
    let mut tx = store.begin_write().await.unwrap();
    let (_, changed) = invoices::void(&mut tx, &id, "again").await.unwrap();
    tx.commit().await.unwrap();
    assert!(!changed);
    assert!(events(&store, &dev.id, invoices::INVOICE_VOIDED)
        .await
        .is_empty());
    let kept = invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Automatic)
        .await
        .unwrap();
    assert_eq!(kept, vec![Saved::Kept(id.clone())]);
    let reissued = invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Reissue)
        .await
        .unwrap();
    let id = created_id(&reissued);
    let e = payments::record_payment(&store, &manual(&void.id, "TR-0", "1.00"))
        .await
        .unwrap_err();
    assert!(conflict_message(e).contains("void"));

    // Finalize: open, once.
    let mut tx = store.begin_write().await.unwrap();
    let open = invoices::finalize(&mut tx, &id).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(open.status, "open");
    let mut tx = store.begin_write().await.unwrap();
    assert_eq!(invoices::finalize(&mut tx, &id).await.unwrap(), open);
    tx.commit().await.unwrap();
    assert_eq!(
        events(&store, &dev.id, invoices::INVOICE_FINALIZED)
            .await
            .len(),
        1
    );

    // Invalid payments.
    for (amount, field, needle) in [
        ("0", "amount", "more than zero"),
        ("-5", "amount", "more than zero"),
        ("1.005", "amount", "cents"),
        ("29.31", "amount", "more than the amount due (29.30 USD)"),
    ] {
        let e = payments::record_payment(&store, &manual(&id, "TR-bad", amount))
            .await
            .unwrap_err();
        let (f, m) = invalid_field(e);
        assert_eq!(f, field);
        assert!(m.contains(needle), "{amount}: {m}");
    }
    let mut eur = manual(&id, "TR-eur", "1.00");
    eur.currency = "EUR".into();
    assert_eq!(
        invalid_field(payments::record_payment(&store, &eur).await.unwrap_err()).0,
        "currency"
    );
    assert_eq!(
        invalid_field(
            payments::record_payment(&store, &manual(&id, "  ", "1.00"))
                .await
                .unwrap_err()
        )
        .0,
        "reference"
    );
    let missing = payments::record_payment(&store, &manual("inv_nope", "TR-x", "1.00")).await;
    assert!(matches!(
        missing,
        Err(PaymentError::Store(StoreError::NotFound))
    ));

    // A partial payment.
    let first = payments::record_payment(&store, &manual(&id, "TR-1", "10.00"))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(
        (first.invoice.status.as_str(), first.invoice.amount_paid),
        ("open", d("10.00"))
    );
    assert_eq!(first.payment.amount, d("10.00"));
    assert_eq!(first.payment.developer_id, dev.id);
    // The same reference again: the same payment, nothing new.
    let again = payments::record_payment(&store, &manual(&id, "TR-1", "10.00"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.payment, first.payment);
    assert_eq!(again.invoice.amount_paid, d("10.00"));
    // The same reference for another amount, or another invoice: refused.
    let e = payments::record_payment(&store, &manual(&id, "TR-1", "11.00"))
        .await
        .unwrap_err();
    assert!(conflict_message(e).contains("another payment"));
    let e = payments::record_payment(&store, &manual(&void.id, "TR-1", "10.00"))
        .await
        .unwrap_err();
    assert!(conflict_message(e).contains("another payment"));
    // The same reference at another provider is another payment (here: more than due).
    let mut elsewhere = manual(&id, "TR-1", "19.31");
    elsewhere.provider = "stripe".into();
    assert_eq!(
        invalid_field(
            payments::record_payment(&store, &elsewhere)
                .await
                .unwrap_err()
        )
        .0,
        "amount"
    );

    // An invoice with payments cannot be voided.
    let mut tx = store.begin_write().await.unwrap();
    let e = invoices::void(&mut tx, &id, "x").await.unwrap_err();
    drop(tx);
    assert!(matches!(e, StoreError::Conflict(m) if m.contains("payments")));

    // The rest, from 8 tasks at once with one reference: one payment, paid.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let p = manual(&id, "TR-2", "19.30");
        tasks.push(tokio::spawn(async move {
            payments::record_payment(&store, &p).await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        created += r.created as usize;
        assert_eq!(r.invoice.status, "paid");
    }
    assert_eq!(created, 1);
    let paid = invoices::by_id(&store, &id).await.unwrap();
    assert_eq!(
        (paid.status.as_str(), paid.amount_paid),
        ("paid", d("29.30"))
    );
    assert!(paid.paid_at.is_some());
    let e = payments::record_payment(&store, &manual(&id, "TR-3", "0.01"))
        .await
        .unwrap_err();
    assert!(conflict_message(e).contains("already paid"));
    let mut tx = store.begin_write().await.unwrap();
    let e = invoices::void(&mut tx, &id, "x").await.unwrap_err();
    drop(tx);
    assert!(matches!(e, StoreError::Conflict(m) if m.contains("paid")));

    let list = payments::payments_for(&store, &id).await.unwrap();
    let refs: Vec<&str> = list.iter().map(|p| p.reference.as_str()).collect();
    assert_eq!(refs, ["TR-1", "TR-2"]);

    // Exactly one event per payment, with the invoice's state after it.
    let evs = events(&store, &dev.id, payments::BILLING_PAYMENT).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    let data = &evs[0]["data"];
    assert_eq!(data["invoice_id"], id.as_str());
    assert_eq!(data["payment_id"], first.payment.id.as_str());
    assert_eq!(
        (data["amount"].as_str(), data["currency"].as_str()),
        (Some("10.00"), Some("USD"))
    );
    assert_eq!(
        (data["provider"].as_str(), data["reference"].as_str()),
        (Some("manual"), Some("TR-1"))
    );
    assert_eq!(
        (data["invoice_status"].as_str(), data["amount_due"].as_str()),
        (Some("open"), Some("19.30"))
    );
    let data = &evs[1]["data"];
    assert_eq!(
        (data["invoice_status"].as_str(), data["amount_due"].as_str()),
        (Some("paid"), Some("0.00"))
    );
    // And one audit entry per payment recorded by someone.
    let trail = audit::list(&store, Some(&id), None, 10).await.unwrap();
    assert_eq!(trail.len(), 2);
    assert!(trail
        .iter()
        .all(|a| a.action == "invoice.payment" && a.actor_id == "dev_operator"));

    // Voiding an open invoice without payments: an event, since the developer saw it.
    let other = aihub_store::testing::developer(&store, "void@example.com").await;
    let oid = created_id(
        &invoices::save_drafts(&store, &[standard(&other.id)], SaveMode::Automatic)
            .await
            .unwrap(),
    );
    let mut tx = store.begin_write().await.unwrap();
    invoices::finalize(&mut tx, &oid).await.unwrap();
    let (v, _) = invoices::void(&mut tx, &oid, "duplicate").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(v.status, "void");
    let evs = events(&store, &other.id, invoices::INVOICE_VOIDED).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["data"]["reason"], "duplicate");
    // Developers see finalized invoices only (a voided draft never was).
    let seen = invoices::issued_for(&store, &dev.id, 10).await.unwrap();
    assert_eq!(
        seen.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert_eq!(
        invoices::issued_for(&store, &other.id, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // A free invoice is paid on finalization.
    let free = aihub_store::testing::developer(&store, "free@example.com").await;
    let fid = created_id(
        &invoices::save_drafts(
            &store,
            &[computed(
                &free.id,
                vec![line(1, "base", "free", "", 0, "0")],
            )],
            SaveMode::Automatic,
        )
        .await
        .unwrap(),
    );
    let mut tx = store.begin_write().await.unwrap();
    let f = invoices::finalize(&mut tx, &fid).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(f.status, "paid");

    // Revenue of the period: the paid invoice and the free one; the void ones left out.
    let r = invoices::revenue(&store, "2026-10").await.unwrap();
    assert_eq!(r.invoices, 2);
    assert_eq!((r.subtotal, r.total), (d("29.300150001"), d("29.30")));
    assert_eq!((r.amount_paid, r.outstanding), (d("29.30"), d("0")));
    let statuses: Vec<(&str, i64)> = r
        .by_status
        .iter()
        .map(|s| (s.status.as_str(), s.invoices))
        .collect();
    assert_eq!(statuses, [("paid", 2), ("void", 2)]);
    let plans: Vec<(&str, Decimal, Decimal, i64)> = r
        .by_plan
        .iter()
        .map(|p| (p.plan.as_str(), p.base_fees, p.overage, p.invoices))
        .collect();
    assert_eq!(
        plans,
        [
            ("developer", d("29"), d("0.300150001"), 1),
            ("free", d("0"), d("0"), 1)
        ]
    );
    let models: Vec<(&str, Decimal, i64)> = r
        .by_model
        .iter()
        .map(|m| (m.model.as_str(), m.overage, m.overage_tokens))
        .collect();
    assert_eq!(
        models,
        [
            ("gpt-4o", d("0.3"), 20_000),
            ("gpt-4o-mini", d("0.000150001"), 1_000)
        ]
    );
    let sum: Decimal = r.by_plan.iter().map(|p| p.base_fees + p.overage).sum();
    assert_eq!(sum, r.subtotal);
    assert_eq!(
        invoices::revenue(&store, "2020-01").await.unwrap().invoices,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_on_both_backends() {
    for backend in BACKENDS {
        lifecycle(backend).await;
    }
}

/// An open invoice with something due, for an outstanding-amount check.
#[tokio::test]
async fn outstanding_counts_open_invoices() {
    for backend in BACKENDS {
        let db = TestDatabase::new(backend).await;
        let store = db.store().await;
        let dev = aihub_store::testing::developer(&store, "owe@example.com").await;
        let id = created_id(
            &invoices::save_drafts(&store, &[standard(&dev.id)], SaveMode::Automatic)
                .await
                .unwrap(),
        );
        let mut tx = store.begin_write().await.unwrap();
        invoices::finalize(&mut tx, &id).await.unwrap();
        tx.commit().await.unwrap();
        let mut p = manual(&id, "T-9", "0.30");
        p.recorded_by = None;
        let r = payments::record_payment(&store, &p).await.unwrap();
        assert!(r.created);
        // Booked by the provider itself: no audit entry.
        assert!(audit::list(&store, Some(&id), None, 10)
            .await
            .unwrap()
            .is_empty());
        let rev = invoices::revenue(&store, "2026-10").await.unwrap();
        assert_eq!((rev.amount_paid, rev.outstanding), (d("0.30"), d("29.00")));
    }
}

/// The current month's usage is not complete: its invoice cannot be finalized yet.
#[tokio::test]
async fn an_open_period_cannot_be_finalized() {
    for backend in BACKENDS {
        let db = TestDatabase::new(backend).await;
        let store = db.store().await;
        let dev = aihub_store::testing::developer(&store, "early@example.com").await;
        let mut c = standard(&dev.id);
        c.period = aihub_plans::Period::of_unix_ms(aihub_store::now_ms()).to_string();
        let id = created_id(
            &invoices::save_drafts(&store, &[c], SaveMode::Automatic)
                .await
                .unwrap(),
        );
        let mut tx = store.begin_write().await.unwrap();
        let e = invoices::finalize(&mut tx, &id).await.unwrap_err();
        drop(tx);
        assert!(
            matches!(&e, StoreError::Conflict(m) if m.contains("has not ended")),
            "{e:?}"
        );
        assert_eq!(invoices::by_id(&store, &id).await.unwrap().status, "draft");
    }
}
