//! Billing over real HTTP with a real store (SQLite and PostgreSQL) and a real ClickHouse:
//! invoice figures on known usage (included tokens, overage, a prorated plan change made
//! through `PUT /developer/billing/plan`), idempotent generation (twice and concurrently), the
//! lifecycle (finalize, payments with their outbox event, void, reissue), the printable HTML
//! (escaped), the current period's view, and isolation: a developer never reads another's
//! invoices or billing, and operator endpoints refuse developers.

mod common;

use std::time::Duration;

use aihub_plans::Period;
use aihub_store::testing::{Backend, BACKENDS};
use aihub_store::{audit, outbox, subscriptions};
use aihub_usage::testing::usage_row as record;
use common::{error_of, TestApi, ADMIN_EMAIL, PASSWORD};
use serde_json::{json, Value};

const HOUR: i64 = 3_600_000;

async fn me(api: &TestApi, token: &str) -> String {
    let (s, b) = api.call("GET", "/developer/me", Some(token), None).await;
    assert_eq!(s, 200, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

/// Moves a subscription in time (tests place plan changes inside a closed period).
async fn set_span(api: &TestApi, sub_id: &str, start: i64, end: Option<i64>) {
    sqlx::query("UPDATE subscriptions SET started_at = $2, ended_at = $3 WHERE id = $1")
        .bind(sub_id)
        .bind(start)
        .bind(end)
        .execute(api.state.store.pool())
        .await
        .unwrap();
}

async fn events(api: &TestApi, dev: &str, kind: &str) -> Vec<Value> {
    outbox::for_developer(&api.state.store, dev)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == kind)
        .map(|e| e.payload["data"].clone())
        .collect()
}

/// GET as text with an optional `Accept`; returns status, content type, CSP and body.
async fn get_text(
    api: &TestApi,
    path: &str,
    token: &str,
    accept: Option<&str>,
) -> (u16, String, String, String) {
    let mut req = api.http.get(api.url(path)).bearer_auth(token);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (ct, csp) = (header("content-type"), header("content-security-policy"));
    (resp.status().as_u16(), ct, csp, resp.text().await.unwrap())
}

fn line_summary(inv: &Value) -> Vec<(String, String, String, i64, String)> {
    inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().to_owned(),
                l["plan"].as_str().unwrap().to_owned(),
                l["model"].as_str().unwrap_or("").to_owned(),
                l["quantity"].as_i64().unwrap(),
                l["amount_usd"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn s5(a: &str, b: &str, c: &str, q: i64, amount: &str) -> (String, String, String, i64, String) {
    (a.into(), b.into(), c.into(), q, amount.into())
}

async fn invoices_end_to_end(backend: Backend) {
    let api = TestApi::start_with_usage(backend, |_| {}).await;
    let op = api.login(ADMIN_EMAIL, PASSWORD).await;
    let ada = api.signed_up("ada@example.com").await;
    let bob = api.signed_up("bob@example.com").await;
    let ada_id = me(&api, &ada).await;
    let bob_id = me(&api, &bob).await;
    let store = &api.state.store;

    // Self-service plan changes: priced plans only.
    for (plan, needle) in [("enterprise", "custom pricing"), ("gold", "must be one of")] {
        let (s, b) = api
            .call(
                "PUT",
                "/developer/billing/plan",
                Some(&ada),
                Some(json!({ "plan": plan })),
            )
            .await;
        assert_eq!(s, 422, "{b}");
        assert_eq!(b["error"]["param"], "plan");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(needle),
            "{b}"
        );
    }
    let (s, b) = api
        .call(
            "PUT",
            "/developer/billing/plan",
            Some(&ada),
            Some(json!({"plan": "developer"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["plan"]["name"], "developer");
    assert_eq!(b["plan"]["monthly_price_usd"], "29.00");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (s, b) = api
        .call(
            "PUT",
            "/developer/billing/plan",
            Some(&ada),
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["plan"]["name"], "pro");
    let (_, mine) = api.call("GET", "/developer/me", Some(&ada), None).await;
    assert_eq!(mine["plan"], "pro");
    let subs = subscriptions::overlapping(store, &ada_id, 0, i64::MAX)
        .await
        .unwrap();
    let plans: Vec<&str> = subs.iter().map(|s| s.plan.as_str()).collect();
    assert_eq!(plans, ["free", "developer", "pro"]);
    assert_eq!(subs[2].changed_by.as_deref(), Some(ada_id.as_str()));
    let changes = audit::list(store, Some(&ada_id), None, 10).await.unwrap();
    assert_eq!(
        changes
            .iter()
            .filter(|a| a.action == "billing.plan_change")
            .count(),
        2
    );

    // Place the change in the middle of last month: Developer for its first half, Pro after.
    let p = Period::of_unix_ms(aihub_store::now_ms()).prev();
    let (start, end) = (p.start_ms(), p.end_ms());
    let mid = start + (end - start) / 2;
    set_span(&api, &subs[0].id, start - 5 * 86_400_000, Some(start)).await;
    set_span(&api, &subs[1].id, start, Some(mid)).await;
    set_span(&api, &subs[2].id, mid, None).await;

    // Known usage. Developer half: 50,000 included tokens (100k prorated); the third request
    // crosses them by 5,000 of its 10,000 tokens, the fourth is all overage. Pro half: 500,000
    // included, 100,000 used. Bob's usage must not show anywhere near Ada's.
    let now = aihub_store::now_ms();
    let this_month = Period::of_unix_ms(now).start_ms();
    api.ch()
        .insert(&[
            record(&ada_id, start + HOUR, "gpt-4o", 30_000, 450_000_000),
            record(&ada_id, start + 2 * HOUR, "gpt-4o-mini", 15_000, 2_250_000),
            record(&ada_id, start + 3 * HOUR, "gpt-4o", 10_000, 150_000_001),
            record(&ada_id, start + 4 * HOUR, "gpt-4o-mini", 2_000, 300_001),
            record(&ada_id, mid + HOUR, "gpt-4o", 100_000, 1_500_000_000),
            record(&bob_id, start + HOUR, "gpt-4o", 7_777, 111_111),
            // This month so far.
            record(
                &ada_id,
                (now - 1_000).max(this_month),
                "gpt-4o",
                1_000,
                15_000_000,
            ),
            record(
                &ada_id,
                (now - 500).max(this_month),
                "gpt-4o-mini",
                2_000,
                300_000,
            ),
        ])
        .await;

    // Generate: closed periods only, operators only.
    let period = p.to_string();
    let current = Period::of_unix_ms(now).to_string();
    for (body, field) in [
        (json!({"period": current}), "period"),
        (json!({"period": "2026-13"}), "period"),
        (
            json!({"period": period, "developer_id": "dev_nope"}),
            "developer_id",
        ),
    ] {
        let (s, b) = api
            .call("POST", "/admin/invoices/generate", Some(&op), Some(body))
            .await;
        assert_eq!(s, 422, "{b}");
        assert_eq!(b["error"]["param"], field);
    }
    let gen = json!({ "period": period });
    let (s, b) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(gen.clone()),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // Ada is the only account holding a plan last month.
    assert_eq!(
        (b["developers"].as_u64(), b["created"].as_u64()),
        (Some(1), Some(1)),
        "{b}"
    );
    // (Bob's usage last month predates his account's subscription: not invoiced.)
    // Again, and four at once: still one invoice.
    let (s, b) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(gen.clone()),
        )
        .await;
    assert_eq!(
        (s, b["created"].as_u64(), b["refreshed"].as_u64()),
        (200, Some(0), Some(1))
    );
    let racers: Vec<_> = (0..4)
        .map(|_| {
            api.call(
                "POST",
                "/admin/invoices/generate",
                Some(&op),
                Some(gen.clone()),
            )
        })
        .collect();
    for (s, b) in futures_util::future::join_all(racers).await {
        assert_eq!((s, b["created"].as_u64()), (200, Some(0)), "{b}");
    }
    let (s, list) = api
        .call(
            "GET",
            &format!("/admin/invoices?period={period}"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(s, 200, "{list}");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{list}");
    assert_eq!(data[0]["developer_id"], ada_id.as_str());
    assert_eq!(data[0]["status"], "draft");
    let id = data[0]["id"].as_str().unwrap().to_owned();

    // The figures.
    let (s, inv) = api
        .call("GET", &format!("/admin/invoices/{id}"), Some(&op), None)
        .await;
    assert_eq!(s, 200, "{inv}");
    assert_eq!(
        line_summary(&inv),
        [
            s5("base", "developer", "", 1, "14.50"),
            s5("overage", "developer", "gpt-4o", 5_000, "0.0750000005"),
            s5("overage", "developer", "gpt-4o-mini", 2_000, "0.000300001"),
            s5("base", "pro", "", 1, "49.50"),
        ]
    );
    assert!(inv["lines"][0]["description"]
        .as_str()
        .unwrap()
        .contains("prorated"));
    assert_eq!(inv["lines"][1]["requests"], 1);
    assert_eq!(inv["subtotal_usd"], "64.0753000015");
    assert_eq!(inv["total_usd"], "64.08");
    assert_eq!(inv["amount_due_usd"], "64.08");
    assert_eq!(
        (
            inv["total_tokens"].as_i64(),
            inv["included_tokens"].as_i64(),
            inv["overage_tokens"].as_i64(),
            inv["requests"].as_i64()
        ),
        (Some(157_000), Some(150_000), Some(7_000), Some(5))
    );
    assert_eq!(inv["usage_cost_usd"], "2.102550002");
    assert_eq!(inv["payments"], json!([]));

    // Drafts are invisible to their developer.
    let (s, mine) = api
        .call("GET", "/developer/invoices", Some(&ada), None)
        .await;
    assert_eq!((s, mine["data"].as_array().unwrap().len()), (200, 0));
    let (s, _) = api
        .call(
            "GET",
            &format!("/developer/invoices/{id}"),
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // A draft takes no payment.
    let pay = |amount: &str, reference: &str| json!({"amount_usd": amount, "reference": reference, "received_at": "2026-01-02T03:04:05Z"});
    let pay_path = format!("/admin/invoices/{id}/payments");
    let (s, b) = api
        .call("POST", &pay_path, Some(&op), Some(pay("10.00", "TR-1")))
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("finalize it first"));

    // Finalize: open, once; the developer sees it now.
    let (s, fin) = api
        .call(
            "POST",
            &format!("/admin/invoices/{id}/finalize"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(s, 200, "{fin}");
    assert_eq!(fin["status"], "open");
    assert_eq!(fin["total_usd"], "64.08");
    assert!(fin["finalized_at"].is_string());
    let (s, again) = api
        .call(
            "POST",
            &format!("/admin/invoices/{id}/finalize"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!((s, &again["finalized_at"]), (200, &fin["finalized_at"]));
    assert_eq!(events(&api, &ada_id, "invoice.finalized").await.len(), 1);
    let (_, mine) = api
        .call("GET", "/developer/invoices", Some(&ada), None)
        .await;
    assert_eq!(mine["data"][0]["id"], id.as_str());
    let (s, mine) = api
        .call(
            "GET",
            &format!("/developer/invoices/{id}"),
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(s, 200, "{mine}");
    assert_eq!(line_summary(&mine), line_summary(&inv));

    // Payments: validated, idempotent by reference, paid once covered.
    for (body, field) in [
        (pay("64.09", "TR-x"), "amount_usd"),
        (pay("0", "TR-x"), "amount_usd"),
        (pay("1.001", "TR-x"), "amount_usd"),
        (pay("12,50", "TR-x"), "amount_usd"),
        (pay("1.00", ""), "reference"),
        (
            json!({"amount_usd": "1.00", "reference": "r", "provider": "stripe"}),
            "provider",
        ),
        (
            json!({"amount_usd": "1.00", "reference": "r", "received_at": "yesterday"}),
            "received_at",
        ),
    ] {
        let (s, b) = api.call("POST", &pay_path, Some(&op), Some(body)).await;
        assert_eq!(s, 422, "{b}");
        assert_eq!(b["error"]["param"], field, "{b}");
    }
    let (s, b) = api
        .call("POST", &pay_path, Some(&op), Some(pay("64.09", "TR-x")))
        .await;
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than the amount due (64.08 USD)"),
        "{s} {b}"
    );
    let (s, first) = api
        .call("POST", &pay_path, Some(&op), Some(pay("50.00", "TR-1")))
        .await;
    assert_eq!(s, 201, "{first}");
    assert_eq!(first["payment"]["amount_usd"], "50.00");
    assert_eq!(first["payment"]["provider"], "manual");
    assert_eq!(first["payment"]["received_at"], "2026-01-02T03:04:05.000Z");
    assert_eq!(first["invoice"]["status"], "open");
    assert_eq!(first["invoice"]["amount_due_usd"], "14.08");
    let (s, again) = api
        .call("POST", &pay_path, Some(&op), Some(pay("50.00", "TR-1")))
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["payment"]["id"], first["payment"]["id"]);
    assert_eq!(again["invoice"]["amount_paid_usd"], "50.00");
    let (s, b) = api
        .call("POST", &pay_path, Some(&op), Some(pay("14.08", "TR-1")))
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another payment"));
    let (s, rest) = api
        .call("POST", &pay_path, Some(&op), Some(pay("14.08", "TR-2")))
        .await;
    assert_eq!(s, 201, "{rest}");
    assert_eq!(rest["invoice"]["status"], "paid");
    assert_eq!(rest["invoice"]["amount_due_usd"], "0.00");
    assert!(rest["invoice"]["paid_at"].is_string());
    assert_eq!(rest["invoice"]["payments"].as_array().unwrap().len(), 2);
    let (s, b) = api
        .call("POST", &pay_path, Some(&op), Some(pay("0.01", "TR-3")))
        .await;
    assert_eq!(s, 409);
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already paid"));
    let paid_events = events(&api, &ada_id, "billing.payment").await;
    assert_eq!(paid_events.len(), 2, "{paid_events:?}");
    assert_eq!(
        paid_events[0],
        json!({
            "invoice_id": id, "payment_id": first["payment"]["id"], "amount": "50.00",
            "currency": "USD", "provider": "manual", "reference": "TR-1",
            "invoice_status": "open", "amount_due": "14.08",
        })
    );
    assert_eq!(paid_events[1]["invoice_status"], "paid");
    // A paid invoice cannot be voided.
    let (s, b) = api
        .call(
            "POST",
            &format!("/admin/invoices/{id}/void"),
            Some(&op),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    // The developer sees the payments, not who recorded them.
    let (_, mine) = api
        .call(
            "GET",
            &format!("/developer/invoices/{id}"),
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(mine["status"], "paid");
    assert_eq!(mine["payments"].as_array().unwrap().len(), 2);
    assert!(mine["payments"][0].get("recorded_by").is_none());

    // Every operator write is in the audit log.
    let trail = audit::list(store, Some(&id), None, 20).await.unwrap();
    let mut actions: Vec<&str> = trail.iter().map(|a| a.action.as_str()).collect();
    actions.sort();
    assert_eq!(
        actions,
        ["invoice.finalize", "invoice.payment", "invoice.payment"]
    );
    let generated = audit::list(store, Some(&period), None, 20).await.unwrap();
    assert_eq!(generated.len(), 6);
    assert!(generated.iter().all(|a| a.action == "invoice.generate"));

    // Revenue of the period.
    let (s, rev) = api
        .call(
            "GET",
            &format!("/admin/billing/revenue?period={period}"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(s, 200, "{rev}");
    assert_eq!(
        (&rev["invoices"], &rev["subtotal_usd"], &rev["total_usd"]),
        (&json!(1), &json!("64.0753000015"), &json!("64.08"))
    );
    assert_eq!(
        (&rev["amount_paid_usd"], &rev["outstanding_usd"]),
        (&json!("64.08"), &json!("0.00"))
    );
    let plans: Vec<(&str, &str, &str)> = rev["by_plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["plan"].as_str().unwrap(),
                p["base_fees_usd"].as_str().unwrap(),
                p["overage_usd"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        plans,
        [
            ("pro", "49.50", "0.00"),
            ("developer", "14.50", "0.0753000015")
        ]
    );
    let models: Vec<(&str, &str)> = rev["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap(),
                m["overage_usd"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [("gpt-4o", "0.0750000005"), ("gpt-4o-mini", "0.000300001")]
    );
    let (s, _) = api
        .call("GET", "/admin/billing/revenue?period=May", Some(&op), None)
        .await;
    assert_eq!(s, 422);

    // The printable invoice: HTML on request or by `Accept`, everything escaped.
    let (s, _) = api
        .call(
            "PUT",
            "/developer/me",
            Some(&ada),
            Some(
                json!({"full_name": "<script>alert(1)</script>", "company_name": "A & B \"Ltd\""}),
            ),
        )
        .await;
    assert_eq!(s, 200);
    let path = format!("/developer/invoices/{id}");
    let (s, ct, csp, page) = get_text(&api, &format!("{path}?format=html"), &ada, None).await;
    assert_eq!(s, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert_eq!(csp, "default-src 'none'; style-src 'unsafe-inline'");
    assert!(!page.contains("<script"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains("A &amp; B &quot;Ltd&quot;"));
    assert!(page.contains("ada@example.com"));
    for figure in [
        id.as_str(),
        period.as_str(),
        "14.50",
        "0.0750000005",
        "64.0753000015",
        "64.08",
        "0.00",
        "TR-1",
        "paid",
        "5,000 tokens",
    ] {
        assert!(page.contains(figure), "{figure} missing");
    }
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let (s, ct, _, page2) = get_text(&api, &path, &ada, Some(browser)).await;
    assert_eq!((s, ct.starts_with("text/html")), (200, true));
    assert_eq!(page2, page);
    let (s, ct, _, _) = get_text(&api, &path, &ada, Some("application/json")).await;
    assert_eq!((s, ct.starts_with("application/json")), (200, true));
    let (s, ct, _, _) = get_text(&api, &format!("{path}?format=html"), &op, None).await;
    assert_eq!(s, 404, "an operator's own invoice list is theirs too: {ct}");
    let (s, ct, _, _) = get_text(
        &api,
        &format!("/admin/invoices/{id}?format=html"),
        &op,
        None,
    )
    .await;
    assert_eq!((s, ct.starts_with("text/html")), (200, true));
    let (s, _, _, _) = get_text(&api, &format!("{path}?format=pdf"), &ada, None).await;
    assert_eq!(s, 422);

    // The current period so far: Pro for the whole month, 3,000 tokens used.
    let (s, _) = api
        .call(
            "PUT",
            "/developer/me",
            Some(&ada),
            Some(json!({"monthly_spend_cap_usd": "50"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, cur) = api
        .call("GET", "/developer/billing", Some(&ada), None)
        .await;
    assert_eq!(s, 200, "{cur}");
    assert_eq!(cur["plan"]["name"], "pro");
    assert_eq!(cur["plan"]["display_name"], "Pro");
    assert_eq!(cur["period"]["name"], current.as_str());
    assert_eq!(cur["period"]["starts_at"].as_str().unwrap()[..7], current);
    assert_eq!(cur["usage"]["tokens_used"], 3_000);
    assert_eq!(cur["usage"]["requests"], 2);
    assert_eq!(cur["usage"]["included_tokens"], 1_000_000);
    assert_eq!(cur["usage"]["remaining_tokens"], 997_000);
    assert_eq!(cur["cost_so_far"]["total_usd"], "99.00");
    assert_eq!(cur["cost_so_far"]["overage_usd"], "0.00");
    assert_eq!(cur["cost_so_far"]["lines"].as_array().unwrap().len(), 1);
    assert!(cur["projected"]["tokens"].as_u64().unwrap() >= 3_000);
    let projected: f64 = cur["projected"]["total_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(projected >= 99.0, "{cur}");
    assert_eq!(cur["monthly_spend_cap_usd"], "50.00");
    assert!(cur["as_of"].is_string());

    // Isolation: Bob sees none of it, and no operator endpoint.
    let (s, cur) = api
        .call("GET", "/developer/billing", Some(&bob), None)
        .await;
    assert_eq!(s, 200, "{cur}");
    assert_eq!(
        (
            cur["plan"]["name"].as_str(),
            cur["usage"]["tokens_used"].as_u64()
        ),
        (Some("free"), Some(0))
    );
    let (_, list) = api
        .call("GET", "/developer/invoices", Some(&bob), None)
        .await;
    assert_eq!(list["data"], json!([]));
    for path in [
        format!("/developer/invoices/{id}"),
        format!("/developer/invoices/{id}?format=html"),
    ] {
        let (s, b) = api.call("GET", &path, Some(&bob), None).await;
        assert_eq!(s, 404, "{path}: {b}");
        assert_eq!(error_of(&b).1, "not_found");
    }
    let (s, _, _, page) = get_text(
        &api,
        &format!("/developer/invoices/{id}"),
        &bob,
        Some("text/html"),
    )
    .await;
    assert_eq!(s, 404);
    assert!(!page.contains("64.08"));
    let body = json!({"reason": "x", "period": period, "amount_usd": "1.00", "reference": "r"});
    for (method, path, body) in [
        ("GET", "/admin/invoices".to_owned(), None),
        ("GET", format!("/admin/invoices/{id}"), None),
        (
            "GET",
            format!("/admin/billing/revenue?period={period}"),
            None,
        ),
        (
            "POST",
            "/admin/invoices/generate".to_owned(),
            Some(json!({"period": period})),
        ),
        ("POST", format!("/admin/invoices/{id}/finalize"), None),
        (
            "POST",
            format!("/admin/invoices/{id}/void"),
            Some(json!({"reason": "x"})),
        ),
        (
            "POST",
            format!("/admin/invoices/{id}/payments"),
            Some(body.clone()),
        ),
    ] {
        let (s, b) = api.call(method, &path, Some(&bob), body.clone()).await;
        assert_eq!(
            (s, error_of(&b).1.as_str()),
            (403, "operator_only"),
            "{method} {path}"
        );
        let (s, _) = api.call(method, &path, None, body).await;
        assert_eq!(s, 401, "{method} {path}");
    }
    for path in ["/developer/billing", "/developer/invoices"] {
        assert_eq!(api.call("GET", path, None, None).await.0, 401);
    }
    // Nothing Bob tried changed anything.
    assert_eq!(events(&api, &ada_id, "billing.payment").await.len(), 2);
    assert!(api.assert_events_conform().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoices_end_to_end_on_both_backends() {
    for backend in BACKENDS {
        invoices_end_to_end(backend).await;
    }
}

async fn void_and_reissue(backend: Backend) {
    let api = TestApi::start_with_usage(backend, |_| {}).await;
    let op = api.login(ADMIN_EMAIL, PASSWORD).await;
    let cy = api.signed_up("cy@example.com").await;
    let cy_id = me(&api, &cy).await;
    let (s, _) = api
        .call(
            "PUT",
            "/developer/billing/plan",
            Some(&cy),
            Some(json!({"plan": "developer"})),
        )
        .await;
    assert_eq!(s, 200);
    // Developer plan all of last month, no usage: the base fee only.
    let p = Period::of_unix_ms(aihub_store::now_ms()).prev();
    let subs = subscriptions::overlapping(&api.state.store, &cy_id, 0, i64::MAX)
        .await
        .unwrap();
    set_span(
        &api,
        &subs[0].id,
        p.start_ms() - 86_400_000,
        Some(p.start_ms() - 1),
    )
    .await;
    set_span(&api, &subs[1].id, p.start_ms() - 1, None).await;
    let period = p.to_string();
    let gen = |reissue: bool| json!({"period": period, "developer_id": cy_id, "reissue": reissue});

    let (s, g) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(gen(false)),
        )
        .await;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["created"], 1);
    assert_eq!(g["invoice"]["total_usd"], "29.00");
    let first = g["invoice"]["id"].as_str().unwrap().to_owned();

    // Void the draft: a reason is required; the developer never sees it.
    let void_path = format!("/admin/invoices/{first}/void");
    let (s, b) = api
        .call("POST", &void_path, Some(&op), Some(json!({"reason": "  "})))
        .await;
    assert_eq!((s, b["error"]["param"].as_str()), (422, Some("reason")));
    let (s, v) = api
        .call(
            "POST",
            &void_path,
            Some(&op),
            Some(json!({"reason": "wrong <plan>"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["void_reason"].as_str()),
        (Some("void"), Some("wrong <plan>"))
    );
    assert_eq!(v["amount_due_usd"], "0.00");
    let (s, again) = api
        .call(
            "POST",
            &void_path,
            Some(&op),
            Some(json!({"reason": "twice"})),
        )
        .await;
    assert_eq!(
        (s, again["void_reason"].as_str()),
        (200, Some("wrong <plan>"))
    );
    let (s, b) = api
        .call(
            "POST",
            &format!("/admin/invoices/{first}/finalize"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("void"));
    let (s, b) = api
        .call(
            "POST",
            &format!("/admin/invoices/{first}/payments"),
            Some(&op),
            Some(json!({"amount_usd": "1.00", "reference": "r"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    let (_, list) = api
        .call("GET", "/developer/invoices", Some(&cy), None)
        .await;
    assert_eq!(list["data"], json!([]));
    assert!(events(&api, &cy_id, "invoice.voided").await.is_empty());

    // Generating again leaves the voided period alone; a reissue creates a new draft.
    let (_, g) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(gen(false)),
        )
        .await;
    assert_eq!(
        (g["created"].as_u64(), g["kept"].as_u64()),
        (Some(0), Some(1)),
        "{g}"
    );
    assert!(g["invoice"].is_null());
    let (_, g) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(gen(true)),
        )
        .await;
    assert_eq!(g["created"], 1, "{g}");
    let second = g["invoice"]["id"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    let (_, fin) = api
        .call(
            "POST",
            &format!("/admin/invoices/{second}/finalize"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(fin["status"], "open");

    // Voiding an open invoice: the developer is told (event) and sees it as void.
    let (s, v) = api
        .call(
            "POST",
            &format!("/admin/invoices/{second}/void"),
            Some(&op),
            Some(json!({"reason": "goodwill"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let voided = events(&api, &cy_id, "invoice.voided").await;
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0]["invoice_id"], second.as_str());
    let (_, list) = api
        .call("GET", "/developer/invoices", Some(&cy), None)
        .await;
    let seen: Vec<(&str, &str)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), i["status"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [(second.as_str(), "void")]);
    let (s, _, _, page) = get_text(
        &api,
        &format!("/developer/invoices/{second}?format=html"),
        &cy,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(page.contains("This invoice is void") && page.contains("goodwill"));

    // Operator listing with filters.
    let (s, all) = api
        .call(
            "GET",
            &format!("/admin/invoices?developer_id={cy_id}&status=void"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["data"].as_array().unwrap().len(), 2);
    let (s, b) = api
        .call("GET", "/admin/invoices?status=late", Some(&op), None)
        .await;
    assert_eq!((s, b["error"]["param"].as_str()), (422, Some("status")));
    let (s, b) = api
        .call("GET", "/admin/invoices?limit=0", Some(&op), None)
        .await;
    assert_eq!((s, b["error"]["param"].as_str()), (422, Some("limit")));
    let (s, _) = api
        .call("GET", "/admin/invoices/inv_nope", Some(&op), None)
        .await;
    assert_eq!(s, 404);
    let trail = audit::list(&api.state.store, Some(&second), None, 10)
        .await
        .unwrap();
    let mut actions: Vec<&str> = trail.iter().map(|a| a.action.as_str()).collect();
    actions.sort();
    assert_eq!(actions, ["invoice.finalize", "invoice.void"]);
    assert!(api.assert_events_conform().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn void_and_reissue_on_both_backends() {
    for backend in BACKENDS {
        void_and_reissue(backend).await;
    }
}

/// Without a usage database, what needs usage answers 503 and changes nothing; the rest works.
#[tokio::test]
async fn billing_without_clickhouse() {
    let api = TestApi::start(Backend::Sqlite).await;
    let op = api.login(ADMIN_EMAIL, PASSWORD).await;
    let dev = api.signed_up("nousage@example.com").await;
    let (s, b) = api
        .call("GET", "/developer/billing", Some(&dev), None)
        .await;
    assert_eq!((s, error_of(&b).1.as_str()), (503, "usage_unavailable"));
    let (s, _) = api
        .call(
            "PUT",
            "/developer/billing/plan",
            Some(&dev),
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_eq!(s, 503);
    let (_, me) = api.call("GET", "/developer/me", Some(&dev), None).await;
    assert_eq!(me["plan"], "free");
    let last = Period::of_unix_ms(aihub_store::now_ms()).prev().to_string();
    let (s, _) = api
        .call(
            "POST",
            "/admin/invoices/generate",
            Some(&op),
            Some(json!({"period": last})),
        )
        .await;
    assert_eq!(s, 503);
    let (s, b) = api.call("GET", "/admin/invoices", Some(&op), None).await;
    assert_eq!((s, b["data"].clone()), (200, json!([])));
    let (s, b) = api
        .call("GET", "/admin/billing/revenue", Some(&op), None)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["period"]["name"].as_str(), b["total_usd"].as_str()),
        (Some(last.as_str()), Some("0.00"))
    );
    let (s, _) = api
        .call("GET", "/developer/invoices", Some(&dev), None)
        .await;
    assert_eq!(s, 200);
}
