//! Webhooks over real HTTP, on SQLite and PostgreSQL, to real receivers on loopback (the test
//! configuration allows `127.0.0.0/8`; production refuses it): delivery of platform events
//! signed both ways, the event history and catalogue, test events, retries with
//! `Retry-After`, 410, disabling after the failure window (event and mail), redelivery, the
//! SSRF guard, and isolation of a hanging receiver.

mod common;

use std::time::Duration;

use aihub_store::testing::{Backend, BACKENDS};
use aihub_webhooks::signature;
use aihub_webhooks::testing::{Receiver, Reply};
use common::{error_of, TestApi};
use serde_json::{json, Value};

/// An API whose webhooks may reach loopback over plain http, with a fast retry schedule.
async fn api(backend: Backend, tweak: impl FnOnce(&mut aihub_admin::AdminConfig)) -> TestApi {
    TestApi::start_with(backend, |c| {
        c.webhooks.allow_http = true;
        c.webhooks.allow_networks = vec!["127.0.0.0/8".parse().unwrap()];
        c.webhooks.poll_interval = Duration::from_millis(20);
        c.webhooks.retry_schedule = [0, 200, 300, 400].map(Duration::from_millis).to_vec();
        tweak(c);
    })
    .await
}

async fn create_hook(api: &TestApi, token: &str, body: Value) -> Value {
    let (s, b) = api
        .call("POST", "/developer/webhooks", Some(token), Some(body))
        .await;
    assert_eq!(s, 201, "{b}");
    b
}

async fn new_key(api: &TestApi, token: &str, name: &str) -> Value {
    let (s, b) = api
        .call(
            "POST",
            "/developer/keys",
            Some(token),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b
}

/// Polls the endpoint's delivery log until `done` holds (10 s at most).
async fn deliveries_until(
    api: &TestApi,
    token: &str,
    hook: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    for _ in 0..200 {
        let (s, b) = api
            .call(
                "GET",
                &format!("/developer/webhooks/{hook}/deliveries?limit=100"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let list = b["data"].as_array().unwrap().clone();
        if done(&list) {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("deliveries of {hook} did not settle");
}

/// Asks for a `webhook.test` event to endpoint `id`; returns the status.
async fn send_test(api: &TestApi, token: &str, id: &str) -> u16 {
    api.call(
        "POST",
        &format!("/developer/webhooks/{id}/test"),
        Some(token),
        None,
    )
    .await
    .0
}

/// Reads the endpoint until it is disabled (5 s at most); returns its last view.
async fn until_disabled(api: &TestApi, token: &str, id: &str) -> Value {
    let mut hook = Value::Null;
    for _ in 0..100 {
        hook = api
            .call(
                "GET",
                &format!("/developer/webhooks/{id}"),
                Some(token),
                None,
            )
            .await
            .1;
        if hook["active"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook
}

#[tokio::test]
async fn events_are_delivered_signed_both_ways_and_logged() {
    for backend in BACKENDS {
        let api = api(backend, |_| {}).await;
        let rx = Receiver::start().await;
        let other = Receiver::start().await;
        let ada = api.signed_up("ada@example.com").await;
        let hook = create_hook(
            &api,
            &ada,
            json!({"url": rx.url("/hooks"), "event_types": ["api_key.*"], "description": "ci"}),
        )
        .await;
        let secret = hook["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("whsec_"));
        assert_eq!(hook["max_retries"], 3);
        assert_eq!(hook["active"], true);
        let id = hook["id"].as_str().unwrap().to_owned();
        // Only invoices: gets nothing of what follows.
        let inv = create_hook(
            &api,
            &ada,
            json!({"url": other.url("/inv"), "event_types": ["invoice.*"]}),
        )
        .await;
        // The secret is never shown again.
        let (_, got) = api
            .call(
                "GET",
                &format!("/developer/webhooks/{id}"),
                Some(&ada),
                None,
            )
            .await;
        assert!(got.get("secret").is_none(), "{got}");
        let (_, list) = api
            .call("GET", "/developer/webhooks", Some(&ada), None)
            .await;
        assert_eq!(list["data"].as_array().unwrap().len(), 2);

        let key = new_key(&api, &ada, "prod").await;
        let got = rx.wait_for(1, Duration::from_secs(5)).await;
        let r = &got[0];
        assert_eq!(r.path, "/hooks");
        let body = r.json();
        assert_eq!(body["type"], "api_key.created");
        assert_eq!(body["data"]["key_id"], key["api_key"]["id"]);
        aihub_webhooks::catalogue::conforms(&body).unwrap();
        assert_eq!(r.header("x-aihub-event"), "api_key.created");
        assert_eq!(r.header("webhook-id"), body["id"].as_str().unwrap());
        assert_eq!(r.header("content-type"), "application/json");
        signature::verify_aihub(&secret, r.header("x-aihub-signature"), &r.body).unwrap();
        let now = aihub_store::now_ms() / 1000;
        signature::verify_standard(
            &secret,
            r.header("webhook-id"),
            r.header("webhook-timestamp"),
            r.header("webhook-signature"),
            &r.body,
            now,
            300,
        )
        .unwrap();

        // The log: one delivery, succeeded at the first attempt, with the answer.
        let log = deliveries_until(&api, &ada, &id, |l| {
            l.first().is_some_and(|d| d["status"] == "succeeded")
        })
        .await;
        let d = &log[0];
        assert_eq!(d["event_type"], "api_key.created");
        assert_eq!(d["attempts"], 1);
        let a = &d["attempt_log"][0];
        assert_eq!(
            (a["attempt"].as_i64(), a["status_code"].as_i64()),
            (Some(1), Some(200))
        );
        assert_eq!(a["response_body"], "{\"ok\":true}");
        assert!(a["latency_ms"].as_i64().unwrap() >= 0);

        // The event history and one event.
        let (s, events) = api
            .call("GET", "/developer/events?type=api_key.*", Some(&ada), None)
            .await;
        assert_eq!(s, 200, "{events}");
        assert_eq!(events["data"][0], body);
        let (s, one) = api
            .call(
                "GET",
                &format!("/developer/events/{}", body["id"].as_str().unwrap()),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!((s, &one), (200, &body));
        let (s, e) = api
            .call("GET", "/developer/events?type=nope", Some(&ada), None)
            .await;
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (422, Some("type")),
            "{e}"
        );

        // A test event goes to that endpoint only.
        let (s, t) = api
            .call(
                "POST",
                &format!("/developer/webhooks/{id}/test"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 202, "{t}");
        let got = rx.wait_for(2, Duration::from_secs(5)).await;
        assert_eq!(got[1].json()["type"], "webhook.test");
        assert_eq!(got[1].json()["data"]["endpoint_id"], id.as_str());

        // Rotation: both secrets sign until the grace period ends.
        let (s, rotated) = api
            .call(
                "POST",
                &format!("/developer/webhooks/{id}/rotate-secret"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 200, "{rotated}");
        let new_secret = rotated["secret"].as_str().unwrap().to_owned();
        assert_ne!(new_secret, secret);
        assert!(rotated["previous_secret_expires_at"].is_string());
        let kid = key["api_key"]["id"].as_str().unwrap();
        let (s, _) = api
            .call(
                "DELETE",
                &format!("/developer/keys/{kid}"),
                Some(&ada),
                None,
            )
            .await;
        assert!(s == 200 || s == 204);
        let got = rx.wait_for(3, Duration::from_secs(5)).await;
        let r = &got[2];
        assert_eq!(r.json()["type"], "api_key.deleted");
        for s in [&secret, &new_secret] {
            signature::verify_aihub(s, r.header("x-aihub-signature"), &r.body).unwrap();
            signature::verify_standard(
                s,
                r.header("webhook-id"),
                r.header("webhook-timestamp"),
                r.header("webhook-signature"),
                &r.body,
                now,
                300,
            )
            .unwrap();
        }
        assert_eq!(other.count(), 0, "the invoice endpoint got key events");

        // Another developer sees none of it.
        let bob = api.signed_up("bob@example.com").await;
        let (s, _) = api
            .call(
                "GET",
                &format!("/developer/webhooks/{id}"),
                Some(&bob),
                None,
            )
            .await;
        assert_eq!(s, 404);
        let (_, events) = api.call("GET", "/developer/events", Some(&bob), None).await;
        assert_eq!(events["data"], json!([]));

        // Delete: gone from the list, the log stays readable.
        let inv_id = inv["id"].as_str().unwrap();
        let (s, _) = api
            .call(
                "DELETE",
                &format!("/developer/webhooks/{inv_id}"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 204);
        let (_, list) = api
            .call("GET", "/developer/webhooks", Some(&ada), None)
            .await;
        assert_eq!(list["data"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn validation_and_the_ssrf_guard() {
    // Production rules: https only, no private addresses.
    let api = TestApi::start_with(Backend::Sqlite, |c| {
        c.webhooks.poll_interval = Duration::from_millis(20);
    })
    .await;
    let ada = api.signed_up("ada@example.com").await;
    for (url, types, field) in [
        ("http://example.com/h", json!(["*"]), "url"),
        ("https://127.0.0.1/h", json!(["*"]), "url"),
        (
            "https://169.254.169.254/latest/meta-data",
            json!(["*"]),
            "url",
        ),
        ("https://[::ffff:127.0.0.1]/h", json!(["*"]), "url"),
        ("https://10.0.0.8/h", json!(["*"]), "url"),
        ("https://user:pw@example.com/h", json!(["*"]), "url"),
        ("https://example.com/h", json!([]), "event_types"),
        (
            "https://example.com/h",
            json!(["invoice.paid"]),
            "event_types",
        ),
        ("https://example.com/h", json!(["tas.*"]), "event_types"),
    ] {
        let (s, b) = api
            .call(
                "POST",
                "/developer/webhooks",
                Some(&ada),
                Some(json!({"url": url, "event_types": types})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some(field)),
            "{url} {types}: {b}"
        );
    }
    let (s, b) = api
        .call(
            "POST",
            "/developer/webhooks",
            Some(&ada),
            Some(json!({"url": "https://example.com/h", "event_types": ["*"], "max_retries": 8})),
        )
        .await;
    assert_eq!(
        (s, error_of(&b).1.as_str()),
        (422, "validation_failed"),
        "{b}"
    );
    assert_eq!(b["error"]["param"], "max_retries");

    // A name that resolves to loopback passes registration and is refused at connect time.
    let hook = create_hook(
        &api,
        &ada,
        json!({"url": "https://localhost:9/h", "event_types": ["webhook.test"], "max_retries": 0}),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    assert_eq!(send_test(&api, &ada, id).await, 202);
    let log = deliveries_until(&api, &ada, id, |l| {
        l.first().is_some_and(|d| d["status"] == "failed")
    })
    .await;
    let err = log[0]["attempt_log"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("refused") && err.contains("127.0.0.1"),
        "{err}"
    );

    // The catalogue is public and complete.
    let (s, types) = api
        .call("GET", "/developer/webhooks/event-types", None, None)
        .await;
    assert_eq!(s, 200);
    let names: Vec<&str> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for n in [
        "api_key.created",
        "api.usage_alert",
        "invoice.created",
        "task.completed",
        "webhook.disabled",
    ] {
        assert!(names.contains(&n), "{n}");
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let api = api(Backend::Sqlite, |_| {}).await;
    let rx = Receiver::start().await;
    rx.then(Reply::status(302).header("location", "http://169.254.169.254/latest/meta-data"));
    let ada = api.signed_up("ada@example.com").await;
    let hook = create_hook(
        &api,
        &ada,
        json!({"url": rx.url("/r"), "event_types": ["webhook.test"], "max_retries": 0}),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    send_test(&api, &ada, id).await;
    let log = deliveries_until(&api, &ada, id, |l| {
        l.first().is_some_and(|d| d["status"] == "failed")
    })
    .await;
    let a = &log[0]["attempt_log"][0];
    assert_eq!(a["status_code"], 302);
    assert!(a["error"]
        .as_str()
        .unwrap()
        .contains("redirects are not followed"));
    assert_eq!(rx.count(), 1);
}

#[tokio::test]
async fn retries_retry_after_410_and_redelivery() {
    for backend in BACKENDS {
        let api = api(backend, |_| {}).await;
        let rx = Receiver::start().await;
        // Fails twice (the second with Retry-After: 1), then answers.
        rx.script([
            Reply::status(500),
            Reply::status(503).header("retry-after", "1"),
        ]);
        let ada = api.signed_up("ada@example.com").await;
        let hook = create_hook(
            &api,
            &ada,
            json!({"url": rx.url("/h"), "event_types": ["webhook.test"]}),
        )
        .await;
        let id = hook["id"].as_str().unwrap().to_owned();
        send_test(&api, &ada, &id).await;
        let got = rx.wait_for(3, Duration::from_secs(10)).await;
        // Same event every time.
        assert!(got
            .iter()
            .all(|r| r.header("webhook-id") == got[0].header("webhook-id")));
        let gap1 = got[1].at - got[0].at;
        let gap2 = got[2].at - got[1].at;
        assert!(gap1 >= Duration::from_millis(150), "{gap1:?}");
        assert!(
            gap2 >= Duration::from_millis(950),
            "Retry-After ignored: {gap2:?}"
        );
        let log = deliveries_until(&api, &ada, &id, |l| {
            l.first().is_some_and(|d| d["status"] == "succeeded")
        })
        .await;
        let codes: Vec<i64> = log[0]["attempt_log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status_code"].as_i64().unwrap())
            .collect();
        assert_eq!(codes, vec![500, 503, 200]);

        // Redelivery: one more attempt of the same event.
        let did = log[0]["id"].as_str().unwrap();
        let (s, b) = api
            .call(
                "POST",
                &format!("/developer/deliveries/{did}/redeliver"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 202, "{b}");
        let got = rx.wait_for(4, Duration::from_secs(5)).await;
        assert_eq!(got[3].header("webhook-id"), got[0].header("webhook-id"));

        // 410 Gone: the endpoint is disabled at once, with an event and a mail.
        rx.script([Reply::status(410)]);
        send_test(&api, &ada, &id).await;
        rx.wait_for(5, Duration::from_secs(5)).await;
        let hook = until_disabled(&api, &ada, &id).await;
        assert_eq!(hook["active"], false, "{hook}");
        assert!(hook["disabled_reason"].as_str().unwrap().contains("410"));
        let (_, ev) = api
            .call(
                "GET",
                "/developer/events?type=webhook.disabled",
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(ev["data"][0]["data"]["endpoint_id"], id.as_str());
        let mut mailed = false;
        for _ in 0..100 {
            if api
                .find_mail("ada@example.com", "webhook endpoint was disabled")
                .is_some()
            {
                mailed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(mailed, "no mail about the disabled endpoint");
        // A disabled endpoint takes no tests nor redeliveries until enabled again.
        assert_eq!(send_test(&api, &ada, &id).await, 409);
        let (s, _) = api
            .call(
                "POST",
                &format!("/developer/deliveries/{did}/redeliver"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 409);
        let (s, b) = api
            .call(
                "PUT",
                &format!("/developer/webhooks/{id}"),
                Some(&ada),
                Some(json!({"active": true})),
            )
            .await;
        assert_eq!((s, &b["active"]), (200, &json!(true)), "{b}");
    }
}

#[tokio::test]
async fn an_endpoint_failing_past_the_window_is_disabled() {
    let api = api(Backend::Sqlite, |c| {
        c.webhooks.disable_after = Duration::from_secs(1);
        c.webhooks.retry_schedule = [0, 400, 400, 400, 400, 400, 400, 400]
            .map(Duration::from_millis)
            .to_vec();
    })
    .await;
    let rx = Receiver::start().await;
    rx.then(Reply::status(500));
    let ada = api.signed_up("ada@example.com").await;
    let hook = create_hook(
        &api,
        &ada,
        json!({"url": rx.url("/h"), "event_types": ["*"], "max_retries": 7}),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    send_test(&api, &ada, id).await;
    let hook = until_disabled(&api, &ada, id).await;
    assert_eq!(hook["active"], false, "{hook}");
    assert!(
        hook["disabled_reason"].as_str().unwrap().contains("failed"),
        "{hook}"
    );
    // Its pending delivery ended; no more attempts arrive.
    let n = rx.count();
    assert!((3..=5).contains(&n), "{n} attempts");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(rx.count(), n);
    let (_, ev) = api
        .call(
            "GET",
            "/developer/events?type=webhook.disabled",
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(ev["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_hanging_receiver_does_not_delay_others() {
    let api = api(Backend::Sqlite, |c| {
        c.webhooks.timeout = Duration::from_secs(3);
        c.webhooks.lease = Duration::from_secs(6);
        c.webhooks.per_endpoint_concurrency = 4;
    })
    .await;
    let slow = Receiver::start().await;
    slow.then(Reply::status(200).delay(Duration::from_secs(30)));
    let fast = Receiver::start().await;
    let ada = api.signed_up("ada@example.com").await;
    let bob = api.signed_up("bob@example.com").await;
    create_hook(
        &api,
        &ada,
        json!({"url": slow.url("/slow"), "event_types": ["api_key.*"]}),
    )
    .await;
    create_hook(
        &api,
        &bob,
        json!({"url": fast.url("/fast"), "event_types": ["api_key.*"]}),
    )
    .await;
    // Ada's events queue behind a receiver that never answers in time; Bob's flow.
    for i in 0..20 {
        new_key(&api, &ada, &format!("a{i}")).await;
    }
    let mut waits = Vec::new();
    for i in 0..20 {
        let sent = std::time::Instant::now();
        new_key(&api, &bob, &format!("b{i}")).await;
        fast.wait_for(i + 1, Duration::from_secs(5)).await;
        waits.push(sent.elapsed());
    }
    waits.sort();
    let p95 = waits[18];
    assert!(
        p95 < Duration::from_millis(500),
        "p95 {p95:?} behind a hanging receiver"
    );
    assert!(
        slow.count() <= 4,
        "{} in flight to one endpoint",
        slow.count()
    );
}

#[tokio::test]
async fn two_admin_nodes_share_the_backlog_on_postgres() {
    let a = api(Backend::Postgres, |_| {}).await;
    let url = a.db.url.clone();
    let b = api(Backend::Postgres, move |c| c.database.url = url).await;
    let rx = Receiver::start().await;
    rx.then(Reply::status(200).delay(Duration::from_millis(5)));
    let ada = a.signed_up("ada@example.com").await;
    create_hook(
        &a,
        &ada,
        json!({"url": rx.url("/h"), "event_types": ["api.usage_alert"]}),
    )
    .await;
    let store = a.state.store.clone();
    let dev = aihub_store::developers::by_email(&store, "ada@example.com")
        .await
        .unwrap()
        .expect("signed up")
        .id;
    const N: usize = 400;
    let mut tx = store.begin_write().await.unwrap();
    for i in 0..N {
        aihub_store::outbox::enqueue(&mut tx, "api.usage_alert", Some(&dev), json!({"n": i}))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let got = rx.wait_for(N, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: std::collections::HashSet<String> = rx
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_owned())
        .collect();
    assert_eq!(ids.len(), N);
    assert_eq!(
        rx.count(),
        N,
        "an event was delivered twice by the two nodes"
    );
    // Both nodes did part of the work.
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT lease_owner FROM webhook_deliveries WHERE lease_owner IS NOT NULL",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let attempts = |api: &TestApi| {
        let text = api.state.metrics.registry.gather();
        text.iter()
            .find(|f| f.name() == "aihub_webhook_attempts_total")
            .map(|f| {
                f.get_metric()
                    .iter()
                    .map(|m| m.get_counter().get_value())
                    .sum::<f64>()
            })
            .unwrap_or(0.0)
    };
    let (na, nb) = (attempts(&a), attempts(&b));
    assert_eq!(na + nb, N as f64, "{owners:?}");
    assert!(na > 0.0 && nb > 0.0, "one node did everything: {na} / {nb}");
    drop(got);
}

#[tokio::test]
async fn usage_alerts_are_mailed_and_shown_on_the_dashboard() {
    let api = api(Backend::Sqlite, |_| {}).await;
    let _ada = api.signed_up("ada@example.com").await;
    let store = api.state.store.clone();
    let dev = aihub_store::developers::by_email(&store, "ada@example.com")
        .await
        .unwrap()
        .expect("signed up")
        .id;
    // As a gateway records it (another process: the engine finds it by polling).
    let period = aihub_plans::Period::of_unix_ms(aihub_store::now_ms()).to_string();
    aihub_store::usage_alerts::record(
        &store,
        &aihub_store::usage_alerts::UsageAlert {
            developer_id: dev.clone(),
            period,
            threshold_pct: 80,
            used_tokens: 80_500,
            quota_tokens: 100_000,
        },
    )
    .await
    .unwrap();
    let mut mail = None;
    for _ in 0..100 {
        mail = api.find_mail("ada@example.com", "80% of your monthly quota");
        if mail.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mail = mail.expect("the usage alert was mailed");
    assert!(mail.contains("80500 of 1000"), "{mail}");
}

#[tokio::test]
async fn disabling_an_endpoint_mid_attempt_schedules_nothing_more() {
    let api = api(Backend::Sqlite, |c| {
        c.webhooks.timeout = Duration::from_secs(2);
        c.webhooks.lease = Duration::from_secs(4);
    })
    .await;
    let rx = Receiver::start().await;
    // The first attempt hangs, then fails; the endpoint is disabled meanwhile.
    rx.then(Reply::status(500).delay(Duration::from_millis(800)));
    let ada = api.signed_up("ada@example.com").await;
    let hook = create_hook(
        &api,
        &ada,
        json!({"url": rx.url("/h"), "event_types": ["webhook.test"], "max_retries": 3}),
    )
    .await;
    let id = hook["id"].as_str().unwrap().to_owned();
    assert_eq!(send_test(&api, &ada, &id).await, 202);
    rx.wait_for(1, Duration::from_secs(5)).await;
    let (s, _) = api
        .call(
            "PUT",
            &format!("/developer/webhooks/{id}"),
            Some(&ada),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(s, 200);
    let log = deliveries_until(&api, &ada, &id, |l| {
        l.first()
            .is_some_and(|d| d["attempts"] == 1 && d["status"] == "failed")
    })
    .await;
    assert_eq!(log[0]["next_attempt_at"], Value::Null);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(rx.count(), 1, "a disabled endpoint was sent a retry");
}
