//! The control plane end to end, black-box: real `aihub admin` and `aihub gateway` processes
//! sharing a fresh database (SQLite and PostgreSQL), the mock upstream, real HTTP.
//!
//! register → verification mail → verify → login → create key → call the gateway → revoke →
//! refused within 1 s; rotation grace; permissions (model, endpoint, IP) at the gateway;
//! developer disabled by an operator; two gateways and Redis with PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
use common::admin::{Admin, PASSWORD};
use common::{chat, config, control_plane, expect_error, upstream, Gateway, Mock};
use serde_json::{json, Value};

fn gateway_for(mock: &Mock, database_url: &str, extra: &[&str]) -> Gateway {
    let body = config(
        &[upstream("mock", &[mock.base_url()], &[])],
        &[("demo", "mock", None), ("gpt-4o", "mock", None)],
        &[],
    ) + &control_plane(database_url, extra);
    Gateway::start(&body, &[])
}

/// Polls until the gateway answers `status` for `key`; returns how long it took.
async fn until_status(gw: &Gateway, key: &str, status: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = gw.get(key, "/v1/models").await.status().as_u16();
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "gateway still answers {got}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn developer_journey_through_the_gateway() {
    for backend in BACKENDS {
        let db = TestDatabase::new(backend).await;
        let admin = Admin::start(&db.url, "");
        let mock = Mock::start(&[]);
        let gw = gateway_for(&mock, &db.url, &[]);

        let session = admin.sign_up("journey@example.com").await;
        let (key, id) = admin.create_key(&session, json!({"name": "e2e"})).await;
        // Nothing secret reaches the admin API's log, even at debug level.
        let verify_token = admin.mail_token("journey@example.com").await;
        let mut log = String::new();
        for _ in 0..100 {
            log = std::fs::read_to_string(&admin.log).unwrap();
            if log.contains("path=/developer/keys") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(log.contains("path=/developer/keys"), "access log missing");
        for secret in [
            key.as_str(),
            session.as_str(),
            PASSWORD,
            verify_token.as_str(),
        ] {
            assert!(!log.contains(secret), "a secret is in the admin log");
        }
        until_status(&gw, &key, 200, SECOND).await;
        let resp = gw.chat(&key, &chat("demo")).await;
        assert_eq!(resp.status().as_u16(), 200);
        let body: Value = resp.json().await.unwrap();
        assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

        let (s, _) = admin
            .call(
                "DELETE",
                &format!("/developer/keys/{id}"),
                Some(&session),
                None,
            )
            .await;
        assert_eq!(s, 204);
        let took = until_status(&gw, &key, 401, SECOND).await;
        eprintln!("{backend:?}: revocation took {took:?}");
        expect_error(gw.chat(&key, &chat("demo")).await, 401, "invalid_api_key").await;

        // Rotation: the old key keeps working through the grace period, then stops.
        let (old_key, old_id) = admin
            .create_key(&session, json!({"name": "rotating"}))
            .await;
        until_status(&gw, &old_key, 200, SECOND).await;
        let (s, rot) = admin
            .call(
                "POST",
                &format!("/developer/keys/{old_id}/regenerate"),
                Some(&session),
                Some(json!({"grace_period_seconds": 2})),
            )
            .await;
        assert_eq!(s, 201, "{rot}");
        let new_key = rot["key"].as_str().unwrap();
        until_status(&gw, new_key, 200, SECOND).await;
        assert_eq!(
            gw.get(&old_key, "/v1/models").await.status().as_u16(),
            200,
            "grace period"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        expect_error(
            gw.chat(&old_key, &chat("demo")).await,
            401,
            "api_key_expired",
        )
        .await;
        assert_eq!(gw.chat(new_key, &chat("demo")).await.status().as_u16(), 200);

        // Expiry changed through the API takes effect too: disable, then enable.
        let rid = rot["api_key"]["id"].as_str().unwrap();
        admin
            .call(
                "PUT",
                &format!("/developer/keys/{rid}"),
                Some(&session),
                Some(json!({"active": false})),
            )
            .await;
        until_status(&gw, new_key, 401, SECOND).await;
        admin
            .call(
                "PUT",
                &format!("/developer/keys/{rid}"),
                Some(&session),
                Some(json!({"active": true})),
            )
            .await;
        until_status(&gw, new_key, 200, SECOND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_enforced_at_the_gateway() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let admin = Admin::start(&db.url, "");
    let mock = Mock::start(&[]);
    let gw = gateway_for(&mock, &db.url, &[]);
    let session = admin.sign_up("perms@example.com").await;

    let (narrow, _) = admin
        .create_key(
            &session,
            json!({"name": "narrow", "permissions": {"models": ["demo"], "endpoints": ["chat/completions"]}}),
        )
        .await;
    let (remote_only, _) = admin
        .create_key(
            &session,
            json!({"name": "office", "ip_allowlist": ["10.0.0.0/8"]}),
        )
        .await;
    let (local_only, _) = admin
        .create_key(
            &session,
            json!({"name": "local", "ip_allowlist": ["127.0.0.1"]}),
        )
        .await;
    until_status(&gw, &local_only, 200, SECOND).await;

    assert_eq!(gw.chat(&narrow, &chat("demo")).await.status().as_u16(), 200);
    expect_error(
        gw.chat(&narrow, &chat("gpt-4o")).await,
        403,
        "permission_denied",
    )
    .await;
    let emb = gw
        .post(&narrow, "/v1/embeddings")
        .json(&json!({"model": "demo", "input": "hi"}))
        .send()
        .await
        .unwrap();
    expect_error(emb, 403, "permission_denied").await;
    expect_error(
        gw.chat(&remote_only, &chat("demo")).await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert_eq!(
        gw.chat(&local_only, &chat("demo")).await.status().as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_disables_a_developer() {
    for backend in BACKENDS {
        let db = TestDatabase::new(backend).await;
        let admin = Admin::start(&db.url, "");
        let mock = Mock::start(&[]);
        let gw = gateway_for(&mock, &db.url, &[]);
        let session = admin.sign_up("disable-me@example.com").await;
        let (k1, _) = admin.create_key(&session, json!({"name": "one"})).await;
        let (k2, _) = admin.create_key(&session, json!({"name": "two"})).await;
        until_status(&gw, &k2, 200, SECOND).await;

        let op = admin.login("ops@aihub.test").await;
        let (_, me) = admin
            .call("GET", "/developer/me", Some(&session), None)
            .await;
        let dev = me["id"].as_str().unwrap();
        let (s, _) = admin
            .call(
                "PUT",
                &format!("/admin/developers/{dev}"),
                Some(&op),
                Some(json!({"active": false})),
            )
            .await;
        assert_eq!(s, 200);
        until_status(&gw, &k1, 401, SECOND).await;
        expect_error(gw.chat(&k2, &chat("demo")).await, 401, "api_key_disabled").await;

        admin
            .call(
                "PUT",
                &format!("/admin/developers/{dev}"),
                Some(&op),
                Some(json!({"active": true})),
            )
            .await;
        until_status(&gw, &k1, 200, SECOND).await;
        until_status(&gw, &k2, 200, SECOND).await;
    }
}

/// Two gateway processes and one admin API on PostgreSQL, pushed through Redis (with a poll
/// interval too long to matter): both gateways refuse a revoked key within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_see_a_revocation_within_a_second() {
    let redis =
        std::env::var("AIHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let db = TestDatabase::new(Backend::Postgres).await;
    let admin = Admin::start(&db.url, &format!("redis: {{url: \"{redis}\"}}\n"));
    let mock = Mock::start(&[]);
    let extra = [
        format!("redis_url: \"{redis}\""),
        "poll_interval: 30s".into(),
        "push_poll_interval: 30s".into(),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let gw1 = gateway_for(&mock, &db.url, &extra);
    let gw2 = gateway_for(&mock, &db.url, &extra);
    // Both subscriptions are live once each gateway has logged it (or give them a moment).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let session = admin.sign_up("multi@example.com").await;
    for round in 0..3 {
        let (key, id) = admin
            .create_key(&session, json!({"name": format!("k{round}")}))
            .await;
        until_status(&gw1, &key, 200, SECOND).await;
        until_status(&gw2, &key, 200, SECOND).await;
        let (s, _) = admin
            .call(
                "DELETE",
                &format!("/developer/keys/{id}"),
                Some(&session),
                None,
            )
            .await;
        assert_eq!(s, 204);
        let (a, b) = tokio::join!(
            until_status(&gw1, &key, 401, SECOND),
            until_status(&gw2, &key, 401, SECOND)
        );
        eprintln!("round {round}: gateway 1 after {a:?}, gateway 2 after {b:?}");
    }
}

/// `aihub keys create|list|revoke` open the service layer only: no migrations, no operator
/// bootstrap (its password variable is unset here, which would stop `aihub admin`), no jobs.
#[tokio::test]
async fn key_commands_run_without_the_admin_server() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let store = db.store().await;
    let dev = aihub_store::testing::developer(&store, "cli@example.com").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("admin.yaml");
    std::fs::write(
        &config,
        format!(
            "database: {{url: \"{}\"}}\n\
             email: {{transport: {{kind: file, dir: \"{}\"}}}}\n\
             bootstrap_admin: {{email: ops@aihub.test, password_env: AIHUB_TEST_UNSET_PASSWORD}}\n",
            db.url,
            dir.path().display()
        ),
    )
    .unwrap();
    let aihub = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .arg("keys")
            .args(args)
            .env("AIHUB_ADMIN_CONFIG", &config)
            .env_remove("AIHUB_TEST_UNSET_PASSWORD")
            .env_remove("AIHUB_DATABASE_URL")
            .output()
            .expect("run aihub");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "aihub keys {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let created = aihub(&["create", "--developer", "cli@example.com", "--name", "ci"]);
    let key = created.lines().nth(1).unwrap();
    assert!(key.starts_with("ahub_"), "{created}");
    let listed: Value = serde_json::from_str(&aihub(&["list", "--developer", &dev.id])).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["name"], "ci");
    assert_eq!(listed[0]["status"], "active");
    assert!(aihub(&["revoke", &id]).contains(&format!("revoked {id}")));
    // Audited as the CLI; no operator account was bootstrapped.
    let log = aihub_store::audit::list(&store, Some(&id), None, 10)
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.actor_id.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [("cli", "api_key.revoke"), ("cli", "api_key.create")]
    );
    assert!(aihub_store::developers::by_email(&store, "ops@aihub.test")
        .await
        .unwrap()
        .is_none());
}
