//! Plans and limits over real HTTP, on SQLite and PostgreSQL: the public plan list (built-in and
//! from a plans file), effective limits and the spend cap on `/developer/me`, per-key token
//! limits, and operator changes reaching gateways through the change feed.

mod common;

use aihub_store::feed::{self, Cursor, KeyState};
use aihub_store::testing::BACKENDS;
use aihub_store::Store;
use common::{TestApi, ADMIN_EMAIL, PASSWORD};
use serde_json::{json, Value};

/// The feed's rows changed after `head`, as a gateway would read them.
async fn changes_after(store: &Store, head: i64) -> Vec<KeyState> {
    let cursor = Cursor {
        seq: head,
        id: String::new(),
    };
    let rows = feed::changes_since(store, &cursor, false, 1000)
        .await
        .unwrap();
    rows.into_iter().filter(|k| k.change_seq > head).collect()
}

fn param(body: &Value) -> Option<&str> {
    body["error"]["param"].as_str()
}

async fn my_id(api: &TestApi, token: &str) -> String {
    let (_, me) = api.call("GET", "/developer/me", Some(token), None).await;
    me["id"].as_str().unwrap().to_owned()
}

async fn create_key(api: &TestApi, token: &str, body: Value) -> Value {
    let (s, b) = api
        .call("POST", "/developer/keys", Some(token), Some(body))
        .await;
    assert_eq!(s, 201, "{b}");
    b["api_key"].clone()
}

#[tokio::test]
async fn plans_are_public_and_limits_show_on_me() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let (s, plans) = api.call("GET", "/plans", None, None).await;
        assert_eq!(s, 200, "{plans}");
        assert_eq!(plans["default_plan"], "free");
        assert_eq!(plans["alert_thresholds"], json!([80, 100]));
        let names: Vec<&str> = plans["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        // By price; the custom-priced plan last.
        assert_eq!(names, ["free", "developer", "pro", "enterprise"]);
        assert_eq!(
            plans["data"][0],
            json!({
                "name": "free",
                "display_name": "Free",
                "monthly_price_usd": "0.00",
                "included_tokens": 1000,
                "overage": false,
                "limits": {
                    "requests_per_minute": 20,
                    "request_burst": 20,
                    "tokens_per_minute": 10000,
                    "max_concurrent_requests": 5,
                },
            })
        );
        assert_eq!(plans["data"][1]["monthly_price_usd"], "29.00");
        assert_eq!(plans["data"][1]["overage"], true);
        let enterprise = &plans["data"][3];
        assert!(enterprise["monthly_price_usd"].is_null());
        assert!(enterprise["included_tokens"].is_null());
        assert!(enterprise["limits"]["requests_per_minute"].is_null());

        // A new account is on the default plan, and sees what applies to it.
        let ada = api.signed_up("ada@example.com").await;
        let (s, me) = api.call("GET", "/developer/me", Some(&ada), None).await;
        assert_eq!(s, 200);
        assert_eq!(me["plan"], "free");
        assert!(me["monthly_spend_cap_usd"].is_null() && me["api_token_rate_limit"].is_null());
        assert_eq!(
            me["limits"],
            json!({
                "plan": "free",
                "requests_per_minute": 20,
                "tokens_per_minute": 10000,
                "max_concurrent_requests": 5,
                "monthly_included_tokens": 1000,
                "monthly_quota_tokens": 1000,
                "overage": false,
                "monthly_spend_cap_usd": null,
            })
        );
    }
}

#[tokio::test]
async fn plans_come_from_the_plans_file() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plans.yaml");
        std::fs::write(
            &file,
            "default_plan: starter\n\
             alert_thresholds: [50, 90]\n\
             plans:\n\
             \x20 starter: {included_tokens: 500, overage: false, requests_per_minute: 7}\n\
             \x20 gold: {display_name: Gold, monthly_price_usd: 10, overage: true}\n",
        )
        .unwrap();
        let api = TestApi::start_with(backend, |c| {
            c.plans = aihub_plans::PlanCatalog::load(&file).unwrap()
        })
        .await;
        let (_, plans) = api.call("GET", "/plans", None, None).await;
        assert_eq!(plans["default_plan"], "starter");
        assert_eq!(plans["alert_thresholds"], json!([50, 90]));
        assert_eq!(plans["data"][0]["name"], "gold");
        assert_eq!(plans["data"][0]["monthly_price_usd"], "10.00");
        assert_eq!(plans["data"][1]["display_name"], "starter");
        assert!(plans["data"][1]["monthly_price_usd"].is_null());

        let ada = api.signed_up("ada@example.com").await;
        let (_, me) = api.call("GET", "/developer/me", Some(&ada), None).await;
        assert_eq!(me["plan"], "starter");
        assert_eq!(me["limits"]["requests_per_minute"], 7);
        assert!(me["limits"]["tokens_per_minute"].is_null());
        // The operator, bootstrapped without an `enterprise` plan, is on the default plan.
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let (_, op_me) = api.call("GET", "/developer/me", Some(&op), None).await;
        assert_eq!(op_me["plan"], "starter");
        // Only the file's plans can be assigned.
        let id = my_id(&api, &ada).await;
        let (s, b) = api
            .call(
                "PUT",
                &format!("/admin/developers/{id}"),
                Some(&op),
                Some(json!({"plan": "pro"})),
            )
            .await;
        assert_eq!((s, param(&b)), (422, Some("plan")), "{b}");
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gold, starter"));
        let (s, b) = api
            .call(
                "PUT",
                &format!("/admin/developers/{id}"),
                Some(&op),
                Some(json!({"plan": "gold"})),
            )
            .await;
        assert_eq!((s, b["limits"]["overage"].as_bool()), (200, Some(true)));
    }
}

#[tokio::test]
async fn spend_cap_set_clear_and_invalid() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let ada = api.signed_up("ada@example.com").await;
        let id = my_id(&api, &ada).await;
        let key = create_key(&api, &ada, json!({"name": "k"})).await;
        let store = &api.state.store;

        let head = feed::head(store).await.unwrap();
        let (s, me) = api
            .call(
                "PUT",
                "/developer/me",
                Some(&ada),
                Some(json!({"monthly_spend_cap_usd": "50.00", "full_name": "Ada L"})),
            )
            .await;
        assert_eq!(s, 200, "{me}");
        assert_eq!(
            (
                me["monthly_spend_cap_usd"].as_str(),
                me["full_name"].as_str()
            ),
            (Some("50.00"), Some("Ada L"))
        );
        // The free plan refuses usage past its tokens: no overage, so no cap applies yet.
        assert!(me["limits"]["monthly_spend_cap_usd"].is_null());
        // The gateways learn of it: the developer's keys are on the feed with the cap.
        let seen = changes_after(store, head).await;
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].id, key["id"].as_str().unwrap());
        assert_eq!(seen[0].spend_cap_nanos, Some(50_000_000_000));

        // On a plan that bills overage, the cap applies.
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let (s, _) = api
            .call(
                "PUT",
                &format!("/admin/developers/{id}"),
                Some(&op),
                Some(json!({"plan": "developer"})),
            )
            .await;
        assert_eq!(s, 200);
        let (_, me) = api.call("GET", "/developer/me", Some(&ada), None).await;
        assert_eq!(me["limits"]["monthly_spend_cap_usd"], "50.00");
        assert_eq!(me["limits"]["overage"], true);

        // Precision down to micro-dollars; stored in nano-USD.
        let (s, me) = api
            .call(
                "PUT",
                "/developer/me",
                Some(&ada),
                Some(json!({"monthly_spend_cap_usd": "0.125"})),
            )
            .await;
        assert_eq!(
            (s, me["monthly_spend_cap_usd"].as_str()),
            (200, Some("0.125"))
        );
        let dev = aihub_store::developers::by_id(store, &id).await.unwrap();
        assert_eq!(dev.monthly_spend_cap_nanos, Some(125_000_000));

        // Invalid amounts name the field and change nothing.
        for bad in [
            json!("-1"),
            json!("1.0000001"),
            json!("fifty"),
            json!("1e3"),
            json!(50),
            json!("2000000000"),
        ] {
            let (s, b) = api
                .call(
                    "PUT",
                    "/developer/me",
                    Some(&ada),
                    Some(json!({ "monthly_spend_cap_usd": bad })),
                )
                .await;
            assert_eq!(
                (s, param(&b)),
                (422, Some("monthly_spend_cap_usd")),
                "{bad}: {b}"
            );
        }
        let dev = aihub_store::developers::by_id(store, &id).await.unwrap();
        assert_eq!(dev.monthly_spend_cap_nanos, Some(125_000_000));

        // A profile change alone does not touch the keys.
        let head = feed::head(store).await.unwrap();
        let (s, _) = api
            .call(
                "PUT",
                "/developer/me",
                Some(&ada),
                Some(json!({"company_name": "Analytical"})),
            )
            .await;
        assert_eq!(s, 200);
        assert!(changes_after(store, head).await.is_empty());

        // `null` clears the cap, on the feed too.
        let (s, me) = api
            .call(
                "PUT",
                "/developer/me",
                Some(&ada),
                Some(json!({"monthly_spend_cap_usd": null})),
            )
            .await;
        assert_eq!(s, 200);
        assert!(
            me["monthly_spend_cap_usd"].is_null()
                && me["limits"]["monthly_spend_cap_usd"].is_null()
        );
        assert_eq!(me["company_name"], "Analytical");
        let seen = changes_after(store, head).await;
        assert!(seen.len() == 1 && seen[0].spend_cap_nanos.is_none());
    }
}

#[tokio::test]
async fn keys_have_token_limits() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let ada = api.signed_up("ada@example.com").await;
        let head = feed::head(&api.state.store).await.unwrap();
        let key = create_key(
            &api,
            &ada,
            json!({"name": "k", "rate_limit_rpm": 60, "rate_limit_tpm": 5000}),
        )
        .await;
        assert_eq!(
            (
                key["rate_limit_rpm"].as_i64(),
                key["rate_limit_tpm"].as_i64()
            ),
            (Some(60), Some(5000))
        );
        let id = key["id"].as_str().unwrap().to_owned();
        let seen = changes_after(&api.state.store, head).await;
        assert_eq!(
            (seen[0].rate_limit_rpm, seen[0].rate_limit_tpm),
            (Some(60), Some(5000))
        );
        let plain = create_key(&api, &ada, json!({"name": "plain"})).await;
        assert!(plain["rate_limit_tpm"].is_null());

        for bad in [json!(0), json!(-5), json!(1_000_000_001)] {
            let (s, b) = api
                .call(
                    "POST",
                    "/developer/keys",
                    Some(&ada),
                    Some(json!({"name": "x", "rate_limit_tpm": bad})),
                )
                .await;
            assert_eq!((s, param(&b)), (422, Some("rate_limit_tpm")), "{bad}: {b}");
            let (s, b) = api
                .call(
                    "PUT",
                    &format!("/developer/keys/{id}"),
                    Some(&ada),
                    Some(json!({ "rate_limit_tpm": bad })),
                )
                .await;
            assert_eq!((s, param(&b)), (422, Some("rate_limit_tpm")), "{bad}: {b}");
        }

        let path = format!("/developer/keys/{id}");
        let (s, upd) = api
            .call(
                "PUT",
                &path,
                Some(&ada),
                Some(json!({"rate_limit_tpm": 7000})),
            )
            .await;
        assert_eq!((s, upd["rate_limit_tpm"].as_i64()), (200, Some(7000)));
        assert_eq!(upd["rate_limit_rpm"], 60);
        // Regeneration keeps the key's limits.
        let (s, rot) = api
            .call("POST", &format!("{path}/regenerate"), Some(&ada), None)
            .await;
        assert_eq!(s, 201, "{rot}");
        assert_eq!(
            (
                rot["api_key"]["rate_limit_rpm"].as_i64(),
                rot["api_key"]["rate_limit_tpm"].as_i64()
            ),
            (Some(60), Some(7000))
        );
        let new_id = rot["api_key"]["id"].as_str().unwrap();
        let (s, upd) = api
            .call(
                "PUT",
                &format!("/developer/keys/{new_id}"),
                Some(&ada),
                Some(json!({"rate_limit_tpm": null})),
            )
            .await;
        assert_eq!(s, 200);
        assert!(upd["rate_limit_tpm"].is_null());
        assert_eq!(upd["rate_limit_rpm"], 60);
        let (_, got) = api
            .call(
                "GET",
                &format!("/developer/keys/{new_id}"),
                Some(&ada),
                None,
            )
            .await;
        assert!(got["rate_limit_tpm"].is_null());
    }
}

#[tokio::test]
async fn operator_changes_reach_the_feed() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let op = api.login(ADMIN_EMAIL, PASSWORD).await;
        let ada = api.signed_up("ada@example.com").await;
        let bob = api.signed_up("bob@example.com").await;
        let id = my_id(&api, &ada).await;
        let k1 = create_key(&api, &ada, json!({"name": "a", "rate_limit_tpm": 5000})).await;
        let k2 = create_key(&api, &ada, json!({"name": "b"})).await;
        create_key(&api, &bob, json!({"name": "c"})).await;
        let store = &api.state.store;
        let path = format!("/admin/developers/{id}");

        let head = feed::head(store).await.unwrap();
        let (s, b) = api
            .call(
                "PUT",
                &path,
                Some(&op),
                Some(json!({"plan": "pro", "api_rate_limit": 100, "api_token_rate_limit": 90000})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["api_token_rate_limit"], 90000);
        assert_eq!(
            (
                b["limits"]["plan"].as_str(),
                b["limits"]["requests_per_minute"].as_i64(),
                b["limits"]["tokens_per_minute"].as_i64(),
                b["limits"]["monthly_quota_tokens"].as_i64()
            ),
            (Some("pro"), Some(100), Some(90000), Some(1_000_000))
        );
        // Both of Ada's keys (and none of Bob's) carry the new plan and limits.
        let mut seen = changes_after(store, head).await;
        seen.sort_by(|a, b| a.id.cmp(&b.id));
        let mut expected = vec![
            k1["id"].as_str().unwrap().to_owned(),
            k2["id"].as_str().unwrap().to_owned(),
        ];
        expected.sort();
        assert_eq!(
            seen.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
            expected
        );
        for k in &seen {
            assert_eq!(k.plan, "pro");
            assert_eq!(
                (
                    k.dev_rate_limit_rpm,
                    k.dev_rate_limit_tpm,
                    k.dev_quota_tokens
                ),
                (Some(100), Some(90000), None)
            );
            assert!(k.active);
        }
        let s1 = seen
            .iter()
            .find(|k| k.id == k1["id"].as_str().unwrap())
            .unwrap();
        assert_eq!(s1.rate_limit_tpm, Some(5000));

        // A quota override alone, and clearing the token limit, are changes too.
        let head = feed::head(store).await.unwrap();
        let (s, b) = api
            .call(
                "PUT",
                &path,
                Some(&op),
                Some(json!({"api_quota_limit": 5000, "api_token_rate_limit": null})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["limits"]["tokens_per_minute"], 1_000_000);
        let seen = changes_after(store, head).await;
        assert_eq!(seen.len(), 2);
        assert!(seen
            .iter()
            .all(|k| k.dev_quota_tokens == Some(5000) && k.dev_rate_limit_tpm.is_none()));

        // A role change is nothing gateways enforce.
        let head = feed::head(store).await.unwrap();
        let (s, _) = api
            .call("PUT", &path, Some(&op), Some(json!({"role": "developer"})))
            .await;
        assert_eq!(s, 200);
        assert!(changes_after(store, head).await.is_empty());

        // Per-minute overrides are positive.
        for (field, bad) in [
            ("api_token_rate_limit", json!(0)),
            ("api_token_rate_limit", json!(2_000_000_000)),
            ("api_rate_limit", json!(0)),
            ("api_quota_limit", json!(-1)),
        ] {
            let (s, b) = api
                .call("PUT", &path, Some(&op), Some(json!({ field: bad })))
                .await;
            assert_eq!((s, param(&b)), (422, Some(field)), "{b}");
        }

        // The audit entry records the token limit too.
        let (_, audit) = api
            .call(
                "GET",
                &format!("/admin/audit?target_id={id}"),
                Some(&op),
                None,
            )
            .await;
        let details = &audit["data"].as_array().unwrap().last().unwrap()["details"];
        assert_eq!(details["api_token_rate_limit"], 90000);

        // An unknown developer: 404, and nothing is audited.
        let (s, _) = api
            .call(
                "PUT",
                "/admin/developers/dev_nobody",
                Some(&op),
                Some(json!({"plan": "pro"})),
            )
            .await;
        assert_eq!(s, 404);
        let (_, audit) = api
            .call("GET", "/admin/audit?target_id=dev_nobody", Some(&op), None)
            .await;
        assert!(audit["data"].as_array().unwrap().is_empty());
    }
}
