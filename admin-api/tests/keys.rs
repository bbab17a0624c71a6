//! API keys and operator tools over real HTTP, on SQLite and PostgreSQL: the key lifecycle,
//! outbox events, isolation between developers, validation, operators, and the OpenAPI
//! document matching the routes.

mod common;

use aihub_store::testing::BACKENDS;
use common::{error_of, TestApi, ADMIN_EMAIL, PASSWORD};
use serde_json::{json, Value};

fn event_types(events: &[aihub_store::outbox::OutboxEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

#[tokio::test]
async fn key_lifecycle() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let ada = api.signed_up("ada@example.com").await;
        let (s, created) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({
                    "name": " ci key ",
                    "permissions": {"models": ["gpt-4o*"], "endpoints": ["chat/completions"]},
                    "rate_limit_rpm": 600,
                    "ip_allowlist": ["10.1.2.3/8", "::1"],
                })),
            )
            .await;
        assert_eq!(s, 201, "{created}");
        let key = created["key"].as_str().unwrap();
        aihub_apikey::check(key).unwrap();
        let view = &created["api_key"];
        let id = view["id"].as_str().unwrap().to_owned();
        assert_eq!(view["name"], "ci key");
        assert_eq!(view["status"], "active");
        assert_eq!(view["ip_allowlist"], json!(["10.0.0.0/8", "::1/128"]));
        let (_, mapped) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "mapped", "ip_allowlist": ["::ffff:192.0.2.7"]})),
            )
            .await;
        // Stored as the gateway compares it: IPv4-mapped addresses as IPv4.
        assert_eq!(mapped["api_key"]["ip_allowlist"], json!(["192.0.2.7/32"]));
        let mapped_id = mapped["api_key"]["id"].as_str().unwrap();
        api.call(
            "DELETE",
            &format!("/developer/keys/{mapped_id}"),
            Some(&ada),
            None,
        )
        .await;
        assert!(key.starts_with(view["prefix"].as_str().unwrap().trim_end_matches('…')));
        // Default expiry: 365 days.
        let expires = view["expires_at"].as_str().unwrap();
        let at = humantime::parse_rfc3339_weak(expires).unwrap();
        let days = at
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            .as_secs()
            / 86_400;
        assert!((364..=365).contains(&days), "{expires}");

        // The list never shows the key or its hash.
        let (s, list) = api.call("GET", "/developer/keys", Some(&ada), None).await;
        assert_eq!(s, 200);
        assert_eq!(list["data"].as_array().unwrap().len(), 1);
        let text = list.to_string();
        assert!(!text.contains(key) && !text.contains(&aihub_apikey::KeyHash::of(key).to_hex()));

        let (s, upd) = api
            .call(
                "PUT",
                &format!("/developer/keys/{id}"),
                Some(&ada),
                Some(json!({"name": "renamed", "rate_limit_rpm": null, "expires_at": null, "active": false})),
            )
            .await;
        assert_eq!(s, 200, "{upd}");
        assert_eq!(
            (upd["name"].as_str(), upd["status"].as_str()),
            (Some("renamed"), Some("disabled"))
        );
        assert!(upd["rate_limit_rpm"].is_null() && upd["expires_at"].is_null());

        // Rotation with a grace period: both keys listed, the old one expiring.
        let (s, rot) = api
            .call(
                "POST",
                &format!("/developer/keys/{id}/regenerate"),
                Some(&ada),
                Some(json!({"grace_period_seconds": 3600})),
            )
            .await;
        assert_eq!(s, 201, "{rot}");
        let new_id = rot["api_key"]["id"].as_str().unwrap().to_owned();
        assert_ne!(rot["key"].as_str().unwrap(), key);
        assert_eq!(rot["api_key"]["permissions"], view["permissions"]);
        assert_eq!(rot["previous"]["rotated_to"], new_id.as_str());
        assert!(rot["previous"]["expires_at"].is_string());
        // An empty body means no grace: the old key expires now.
        let (s, rot2) = api
            .call(
                "POST",
                &format!("/developer/keys/{new_id}/regenerate"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(s, 201, "{rot2}");
        assert_eq!(rot2["previous"]["status"], "expired");
        let (s, b) = api
            .call(
                "POST",
                &format!("/developer/keys/{id}/regenerate"),
                Some(&ada),
                Some(json!({"grace_period_seconds": 99_999_999})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("grace_period_seconds"))
        );

        let (s, _) = api
            .call("DELETE", &format!("/developer/keys/{id}"), Some(&ada), None)
            .await;
        assert_eq!(s, 204);
        let (s, _) = api
            .call("DELETE", &format!("/developer/keys/{id}"), Some(&ada), None)
            .await;
        assert_eq!(s, 404);
        let (_, list) = api.call("GET", "/developer/keys", Some(&ada), None).await;
        assert_eq!(list["data"].as_array().unwrap().len(), 2);
        let (_, all) = api
            .call(
                "GET",
                "/developer/keys?include_revoked=true&limit=2",
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(
            (
                all["data"].as_array().unwrap().len(),
                all["has_more"].as_bool()
            ),
            (2, Some(true))
        );
        let last = all["data"][1]["id"].as_str().unwrap();
        let (_, rest) = api
            .call(
                "GET",
                &format!("/developer/keys?include_revoked=true&after={last}"),
                Some(&ada),
                None,
            )
            .await;
        assert_eq!(
            (
                rest["data"].as_array().unwrap().len(),
                rest["has_more"].as_bool()
            ),
            (2, Some(false))
        );

        // Outbox: one event per change, in order, in the webhook shape.
        let me = &api.call("GET", "/developer/me", Some(&ada), None).await.1;
        let events =
            aihub_store::outbox::for_developer(&api.state.store, me["id"].as_str().unwrap())
                .await
                .unwrap();
        assert_eq!(
            event_types(&events),
            [
                "api_key.created",
                "api_key.created",
                "api_key.deleted",
                "api_key.rotated",
                "api_key.rotated",
                "api_key.deleted"
            ]
        );
        let p = &events[0].payload;
        assert!(p["id"].as_str().unwrap().starts_with("evt_") && p["created_at"].is_string());
        assert_eq!(p["data"]["key_id"], id.as_str());
        assert!(api.assert_events_conform().await >= 4);
    }
}

#[tokio::test]
async fn developers_cannot_reach_each_others_keys() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let ada = api.signed_up("ada@example.com").await;
        let bob = api.signed_up("bob@example.com").await;
        let (_, created) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "mine"})),
            )
            .await;
        let id = created["api_key"]["id"].as_str().unwrap();
        for (method, path, body) in [
            ("GET", format!("/developer/keys/{id}"), None),
            (
                "PUT",
                format!("/developer/keys/{id}"),
                Some(json!({"name": "stolen"})),
            ),
            ("DELETE", format!("/developer/keys/{id}"), None),
            ("POST", format!("/developer/keys/{id}/regenerate"), None),
            ("GET", format!("/developer/keys?after={id}"), None),
        ] {
            let (s, b) = api.call(method, &path, Some(&bob), body).await;
            assert!(s == 404 || s == 422, "{method} {path}: {s} {b}");
        }
        let (_, list) = api.call("GET", "/developer/keys", Some(&bob), None).await;
        assert!(list["data"].as_array().unwrap().is_empty());
        // Nor the operator area.
        let (s, b) = api.call("GET", "/admin/developers", Some(&bob), None).await;
        assert_eq!((s, error_of(&b).1.as_str()), (403, "operator_only"));
    }
}

#[tokio::test]
async fn key_validation() {
    for backend in BACKENDS {
        let api = TestApi::start_with(backend, |c| c.keys.max_per_developer = 2).await;
        let ada = api.signed_up("ada@example.com").await;
        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({
                    "name": "",
                    "permissions": {"models": ["gpt*4"], "endpoints": []},
                    "rate_limit_rpm": 0,
                    "expires_in_days": 5000,
                    "ip_allowlist": ["300.1.1.1"],
                })),
            )
            .await;
        assert_eq!(s, 422, "{b}");
        let fields: Vec<&str> = b["error"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "name",
                "permissions.models[0]",
                "permissions.endpoints",
                "rate_limit_rpm",
                "ip_allowlist[0]",
                "expires_in_days"
            ]
        );
        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "x", "expires_in_days": 3, "never_expires": true})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("expires_in_days"))
        );
        let (s, k) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "forever", "never_expires": true})),
            )
            .await;
        assert_eq!(s, 201);
        assert!(k["api_key"]["expires_at"].is_null());
        let id = k["api_key"]["id"].as_str().unwrap();
        let (s, b) = api
            .call(
                "PUT",
                &format!("/developer/keys/{id}"),
                Some(&ada),
                Some(json!({"expires_at": "2001-01-01T00:00:00Z"})),
            )
            .await;
        assert_eq!((s, b["error"]["param"].as_str()), (422, Some("expires_at")));
        let (s, _) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "two"})),
            )
            .await;
        assert_eq!(s, 201);
        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "three"})),
            )
            .await;
        assert_eq!((s, error_of(&b).1.as_str()), (403, "key_limit_reached"));
    }
}

#[tokio::test]
async fn operators() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let ada = api.signed_up("ada@example.com").await;
        let (_, me) = api.call("GET", "/developer/me", Some(&ada), None).await;
        let ada_id = me["id"].as_str().unwrap().to_owned();
        api.call(
            "POST",
            "/developer/keys",
            Some(&ada),
            Some(json!({"name": "k"})),
        )
        .await;

        let (s, list) = api
            .call("GET", "/admin/developers?q=ADA", Some(&op), None)
            .await;
        assert_eq!(s, 200);
        assert_eq!(
            (list["total"].as_i64(), list["data"][0]["id"].as_str()),
            (Some(1), Some(ada_id.as_str()))
        );
        let (s, _) = api
            .call("GET", "/admin/developers?limit=0", Some(&op), None)
            .await;
        assert_eq!(s, 422);

        let (s, b) = api
            .call(
                "PUT",
                &format!("/admin/developers/{ada_id}"),
                Some(&op),
                Some(json!({"plan": "pro", "api_quota_limit": 5000, "api_rate_limit": 120})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            (b["plan"].as_str(), b["api_quota_limit"].as_i64()),
            (Some("pro"), Some(5000))
        );
        let (s, b) = api
            .call(
                "PUT",
                &format!("/admin/developers/{ada_id}"),
                Some(&op),
                Some(json!({"plan": "platinum"})),
            )
            .await;
        assert_eq!((s, b["error"]["param"].as_str()), (422, Some("plan")));

        // Disabling ends the developer's sessions and blocks sign-in.
        let (s, b) = api
            .call(
                "PUT",
                &format!("/admin/developers/{ada_id}"),
                Some(&op),
                Some(json!({"active": false})),
            )
            .await;
        assert_eq!((s, b["active"].as_bool()), (200, Some(false)));
        let (s, _) = api.call("GET", "/developer/me", Some(&ada), None).await;
        assert_eq!(s, 401);
        let (s, b) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": "ada@example.com", "password": PASSWORD})),
            )
            .await;
        assert_eq!((s, error_of(&b).1.as_str()), (403, "account_disabled"));

        let (s, keys) = api
            .call(
                "GET",
                &format!("/admin/developers/{ada_id}/keys"),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(s, 200);
        let key_id = keys["data"][0]["id"].as_str().unwrap();
        let (s, _) = api
            .call("DELETE", &format!("/admin/keys/{key_id}"), Some(&op), None)
            .await;
        assert_eq!(s, 204);

        let (s, b) = api
            .call(
                "POST",
                "/admin/developers",
                Some(&op),
                Some(
                    json!({"email": "ada@example.com", "password": PASSWORD, "full_name": "Again"}),
                ),
            )
            .await;
        assert_eq!((s, error_of(&b).1.as_str()), (409, "conflict"));
        let (s, b) = api
            .call(
                "POST",
                "/admin/developers",
                Some(&op),
                Some(
                    json!({"email": "corp@example.com", "password": PASSWORD, "full_name": "Corp",
                            "developer_type": "enterprise", "plan": "enterprise"}),
                ),
            )
            .await;
        assert_eq!((s, b["email_verified"].as_bool()), (201, Some(true)));

        // Operators cannot lock themselves out.
        let (_, op_me) = api.call("GET", "/developer/me", Some(&op), None).await;
        let (s, _) = api
            .call(
                "PUT",
                &format!("/admin/developers/{}", op_me["id"].as_str().unwrap()),
                Some(&op),
                Some(json!({"active": false})),
            )
            .await;
        assert_eq!(s, 422);

        let (s, audit) = api.call("GET", "/admin/audit", Some(&op), None).await;
        assert_eq!(s, 200);
        let actions: Vec<&str> = audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            [
                "developer.create",
                "api_key.revoke",
                "developer.update",
                "developer.update",
                "operator.bootstrap"
            ]
        );
        let (_, mine) = api
            .call(
                "GET",
                &format!("/admin/audit?target_id={ada_id}"),
                Some(&op),
                None,
            )
            .await;
        assert_eq!(mine["data"].as_array().unwrap().len(), 2);
    }
}

/// Every operation in the OpenAPI document is served by a route (no 404 "unknown URL", no
/// 405), and the operational endpoints answer.
#[tokio::test]
async fn openapi_document_matches_routes() {
    let api = TestApi::start(aihub_store::testing::Backend::Sqlite).await;
    let (s, doc) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, _) in item.as_object().unwrap() {
            let concrete = path.replace("{id}", "key_doesnotexist");
            let (s, b): (u16, Value) = api
                .call(&method.to_uppercase(), &concrete, None, None)
                .await;
            assert_ne!(s, 405, "{method} {path} is documented but not routed");
            if s == 404 {
                assert_ne!(
                    error_of(&b).1,
                    "unknown_url",
                    "{method} {path} is documented but not routed"
                );
            }
            operations += 1;
        }
    }
    assert_eq!(operations, 61, "the document lists {operations} operations");
    // And the reverse: the router built by `api()` documents exactly these routes.
    let (_, generated) = aihub_admin::api();
    assert_eq!(generated.paths.paths.len(), paths.len());

    let docs = api.http.get(api.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status().as_u16(), 200);
    assert!(docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    for p in ["/healthz", "/readyz", "/metrics", "/docs/app.js"] {
        assert_eq!(
            api.http
                .get(api.url(p))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{p}"
        );
    }
    let metrics = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("aihub_admin_requests_total"));
}

/// Ten concurrent creates against a cap of three: exactly three keys, on both stores.
#[tokio::test]
async fn key_cap_holds_under_concurrency() {
    for backend in BACKENDS {
        let api = TestApi::start_with(backend, |c| c.keys.max_per_developer = 3).await;
        let ada = api.signed_up("racer@example.com").await;
        let attempts = (0..10).map(|i| {
            api.call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": format!("k{i}")})),
            )
        });
        let results = futures_util::future::join_all(attempts).await;
        let created = results.iter().filter(|(s, _)| *s == 201).count();
        let refused = results
            .iter()
            .filter(|(s, b)| *s == 403 && b["error"]["code"] == "key_limit_reached")
            .count();
        let statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
        assert_eq!((created, refused), (3, 7), "{backend:?}: {statuses:?}");
    }
}

/// RFC 3339 of now + `ms` (negative: the past).
fn in_ms(ms: i64) -> String {
    aihub_store::outbox::rfc3339_ms(aihub_store::now_ms() + ms)
}

const DAY_MS: i64 = 86_400_000;

/// A key's expiry stays within the platform's maximum lifetime, at creation and on update (one
/// rule), and an expired key stays expired.
#[tokio::test]
async fn expiry_stays_within_the_platform_maximum() {
    for backend in BACKENDS {
        // The default maximum: 3650 days, as creation has always enforced.
        let api = TestApi::start(backend).await;
        let ada = api.signed_up("ada@example.com").await;
        let (_, k) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "a"})),
            )
            .await;
        let id = k["api_key"]["id"].as_str().unwrap().to_owned();
        let path = format!("/developer/keys/{id}");
        let (s, b) = api
            .call(
                "PUT",
                &path,
                Some(&ada),
                Some(json!({"expires_at": in_ms(3651 * DAY_MS)})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("expires_at")),
            "{b}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("3650 days"),
            "{b}"
        );
        let (s, b) = api
            .call(
                "PUT",
                &path,
                Some(&ada),
                Some(json!({"expires_at": "9999-12-31T00:00:00Z"})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("expires_at")),
            "{b}"
        );
        let (s, b) = api
            .call(
                "PUT",
                &path,
                Some(&ada),
                Some(json!({"expires_at": in_ms(3649 * DAY_MS)})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "b", "expires_in_days": 3651})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("expires_in_days")),
            "{b}"
        );

        // An expired key: neither extended nor made never-expiring; other fields still change.
        let (_, k) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&ada),
                Some(json!({"name": "old"})),
            )
            .await;
        let old = k["api_key"]["id"].as_str().unwrap().to_owned();
        let mut conn = api.state.store.pool().acquire().await.unwrap();
        let update = aihub_store::keys::KeyUpdate {
            expires_at: Some(Some(aihub_store::now_ms() - 1_000)),
            ..Default::default()
        };
        aihub_store::keys::update(&mut conn, None, &old, &update)
            .await
            .unwrap();
        drop(conn);
        let old_path = format!("/developer/keys/{old}");
        for revive in [
            json!({"expires_at": null}),
            json!({"expires_at": in_ms(DAY_MS)}),
            json!({"expires_at": in_ms(DAY_MS), "active": true}),
        ] {
            let (s, b) = api
                .call("PUT", &old_path, Some(&ada), Some(revive.clone()))
                .await;
            assert_eq!(
                (s, b["error"]["param"].as_str()),
                (422, Some("expires_at")),
                "{revive}: {b}"
            );
            assert!(
                b["error"]["message"].as_str().unwrap().contains("expired"),
                "{b}"
            );
        }
        let (s, b) = api
            .call(
                "PUT",
                &old_path,
                Some(&ada),
                Some(json!({"name": "old, renamed", "active": true})),
            )
            .await;
        assert_eq!(
            (s, b["status"].as_str(), b["name"].as_str()),
            (200, Some("expired"), Some("old, renamed")),
            "{b}"
        );
        let (_, b) = api.call("GET", &old_path, Some(&ada), None).await;
        assert_eq!(b["status"], "expired");

        // A platform with a 30-day maximum and no never-expiring keys.
        let api = TestApi::start_with(backend, |c| {
            c.keys.max_lifetime = std::time::Duration::from_secs(30 * 86_400);
            c.keys.default_expiry =
                aihub_admin::config::KeyExpiry::After(std::time::Duration::from_secs(7 * 86_400));
            c.keys.allow_never_expires = false;
        })
        .await;
        let bob = api.signed_up("bob@example.com").await;
        let create =
            |body: serde_json::Value| api.call("POST", "/developer/keys", Some(&bob), Some(body));
        let (s, b) = create(json!({"name": "x", "expires_in_days": 31})).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("expires_in_days")),
            "{b}"
        );
        assert!(
            b["error"]["message"].as_str().unwrap().contains("30 days"),
            "{b}"
        );
        let (s, b) = create(json!({"name": "x", "never_expires": true})).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("never_expires")),
            "{b}"
        );
        let (s, k) = create(json!({"name": "x", "expires_in_days": 30})).await;
        assert_eq!(s, 201, "{k}");
        let (s, k) = create(json!({"name": "y"})).await;
        assert_eq!(s, 201, "{k}");
        let at =
            humantime::parse_rfc3339_weak(k["api_key"]["expires_at"].as_str().unwrap()).unwrap();
        let days = at
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            .as_secs()
            / 86_400;
        assert_eq!(days, 6, "the default 7 days");
        let path = format!("/developer/keys/{}", k["api_key"]["id"].as_str().unwrap());
        for (body, ok) in [
            (json!({"expires_at": in_ms(31 * DAY_MS)}), false),
            (json!({"expires_at": null}), false),
            (json!({"expires_at": in_ms(29 * DAY_MS)}), true),
        ] {
            let (s, b) = api.call("PUT", &path, Some(&bob), Some(body.clone())).await;
            if ok {
                assert_eq!(s, 200, "{body}: {b}");
            } else {
                assert_eq!(
                    (s, b["error"]["param"].as_str()),
                    (422, Some("expires_at")),
                    "{body}: {b}"
                );
            }
        }
    }
}
