//! The store against real SQLite and real PostgreSQL: migrations, accounts, the key lifecycle,
//! the change feed (limits included), tokens, sessions, audit, outbox and usage alerts.

use aihub_store::developers::{self, NewDeveloper, OperatorUpdate};
use aihub_store::feed::{self, Cursor};
use aihub_store::keys::{self, KeyUpdate, NewKey};
use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
use aihub_store::usage_alerts::{self, UsageAlert};
use aihub_store::{auth, migrations, outbox, settings, Store, StoreError};

async fn developer(store: &Store, email: &str) -> developers::Developer {
    aihub_store::testing::developer(store, email).await
}

fn new_key(dev: &str, hash: &str) -> NewKey {
    NewKey {
        id: aihub_store::new_id("key_"),
        developer_id: dev.into(),
        name: "k".into(),
        key_hash: hash.into(),
        key_prefix: "ahub_dev_ab".into(),
        models: vec!["*".into()],
        endpoints: vec!["*".into()],
        ip_allowlist: vec![],
        rate_limit_rpm: None,
        rate_limit_tpm: None,
        expires_at: None,
    }
}

async fn all_changes(store: &Store, cursor: &mut Cursor) -> Vec<feed::KeyState> {
    let mut out = Vec::new();
    loop {
        let page = feed::changes_since(store, cursor, false, 2).await.unwrap();
        if page.is_empty() {
            return out;
        }
        let last = page.last().unwrap();
        *cursor = Cursor {
            seq: last.change_seq,
            id: last.id.clone(),
        };
        out.extend(page);
    }
}

async fn lifecycle(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    // Re-running migrations applies nothing.
    assert!(migrations::migrate(&store).await.unwrap().is_empty());

    let ada = developer(&store, "Ada@Example.com").await;
    assert_eq!(ada.email, "ada@example.com");
    let mut conn = store.pool().acquire().await.unwrap();
    let dup = developers::insert(
        &mut conn,
        &NewDeveloper {
            email: "ADA@example.com".into(),
            ..dev_template()
        },
    )
    .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    drop(conn);

    let head0 = feed::head(&store).await.unwrap();
    let mut tx = store.begin_write().await.unwrap();
    let k1 = keys::insert(&mut tx, &new_key(&ada.id, "h1"))
        .await
        .unwrap();
    let k2 = keys::insert(&mut tx, &new_key(&ada.id, "h2"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(feed::head(&store).await.unwrap(), head0 + 2);

    let mut cursor = Cursor::default();
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|k| k.active && !k.deleted));

    // Update, then revoke: each appears on the feed once more.
    let mut tx = store.begin_write().await.unwrap();
    let upd = KeyUpdate {
        models: Some(vec!["gpt-4o*".into()]),
        expires_at: Some(Some(4_000_000_000_000)),
        ..Default::default()
    };
    let k1u = keys::update(&mut tx, Some(&ada.id), &k1.id, &upd)
        .await
        .unwrap();
    assert_eq!(k1u.models, vec!["gpt-4o*"]);
    keys::revoke(&mut tx, Some(&ada.id), &k2.id).await.unwrap();
    tx.commit().await.unwrap();
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].expires_at, Some(4_000_000_000_000));
    assert!(seen[1].deleted);
    // What a gateway's initial load sizes its maps for: live keys, developers.
    assert_eq!(feed::live_keys(&store).await.unwrap(), (1, 1));

    // Another developer cannot see or touch Ada's keys.
    let bob = developer(&store, "bob@example.com").await;
    assert!(matches!(
        keys::get(&store, Some(&bob.id), &k1.id).await,
        Err(StoreError::NotFound)
    ));
    let mut tx = store.begin_write().await.unwrap();
    assert!(matches!(
        keys::revoke(&mut tx, Some(&bob.id), &k1.id).await,
        Err(StoreError::NotFound)
    ));
    drop(tx);

    // Disabling the developer puts every live key on the feed as inactive.
    let mut tx = store.begin_write().await.unwrap();
    let d = developers::operator_update(
        &mut tx,
        &ada.id,
        &OperatorUpdate {
            active: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(!d.is_active());
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].active && seen[0].id == k1.id);

    // Rotation keeps the old key until the grace period ends and links it to the new one.
    let mut tx = store.begin_write().await.unwrap();
    let (old, new) = keys::rotate(&mut tx, Some(&ada.id), &k1.id, &new_key(&ada.id, "h3"), 99)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(old.expires_at, Some(99));
    assert_eq!(old.rotated_to.as_deref(), Some(new.id.as_str()));
    // A key is rotated once.
    let mut tx = store.begin_write().await.unwrap();
    let again = keys::rotate(
        &mut tx,
        Some(&ada.id),
        &k1.id,
        &new_key(&ada.id, "h4"),
        i64::MAX,
    )
    .await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
    drop(tx);

    let listed = keys::list(&store, &ada.id, false, 10, None).await.unwrap();
    assert_eq!(listed.len(), 2);
    let page1 = keys::list(&store, &ada.id, true, 2, None).await.unwrap();
    let last = page1.last().unwrap();
    let page2 = keys::list(&store, &ada.id, true, 2, Some((last.created_at, &last.id)))
        .await
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 3);

    feed::record_last_used(&store, &[(new.id.clone(), 500), (old.id.clone(), 7)])
        .await
        .unwrap();
    feed::record_last_used(&store, &[(new.id.clone(), 400)])
        .await
        .unwrap();
    assert_eq!(
        keys::get(&store, None, &new.id).await.unwrap().last_used_at,
        Some(500)
    );

    // Email tokens are single-use and purpose-bound.
    let mut tx = store.begin_write().await.unwrap();
    auth::create_email_token(&mut tx, "t1", &ada.id, auth::VERIFY_EMAIL, i64::MAX)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    assert_eq!(
        auth::consume_email_token(&mut conn, "t1", auth::RESET_PASSWORD)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        auth::consume_email_token(&mut conn, "t1", auth::VERIFY_EMAIL)
            .await
            .unwrap()
            .as_deref(),
        Some(ada.id.as_str())
    );
    assert_eq!(
        auth::consume_email_token(&mut conn, "t1", auth::VERIFY_EMAIL)
            .await
            .unwrap(),
        None
    );
    drop(conn);

    auth::create_session(&store, "s1", &ada.id, i64::MAX, None, None)
        .await
        .unwrap();
    assert_eq!(
        developers::by_live_session(&store, "s1")
            .await
            .unwrap()
            .map(|d| d.id),
        Some(ada.id.clone())
    );
    auth::revoke_session(&store, "s1").await.unwrap();
    assert!(developers::by_live_session(&store, "s1")
        .await
        .unwrap()
        .is_none());

    let mut tx = store.begin_write().await.unwrap();
    outbox::enqueue(
        &mut tx,
        outbox::API_KEY_CREATED,
        Some(&ada.id),
        serde_json::json!({"k": 1}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let events = outbox::for_developer(&store, &ada.id).await.unwrap();
    assert_eq!(events[0].payload["type"], "api_key.created");

    let (found, total) = developers::search(&store, Some("BOB@"), 10, 0)
        .await
        .unwrap();
    assert_eq!((found.len(), total), (1, 1));

    let a = settings::get_or_init(&store, "jwt", "first").await.unwrap();
    let b = settings::get_or_init(&store, "jwt", "second")
        .await
        .unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("first", "first"));
    store.close().await;
}

fn dev_template() -> NewDeveloper {
    NewDeveloper {
        email: String::new(),
        password_hash: "x".into(),
        full_name: "X".into(),
        company_name: None,
        developer_type: "individual".into(),
        role: developers::ROLE_DEVELOPER.into(),
        plan: "free".into(),
        verified: false,
    }
}

#[tokio::test]
async fn lifecycle_on_both_backends() {
    for backend in BACKENDS {
        lifecycle(backend).await;
    }
}

/// What gateways enforce travels on the feed: the key's own limits and its developer's plan,
/// overrides and spend cap; changing any of the developer's puts all their keys on the feed.
async fn limits_on_the_feed(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ada = developer(&store, "ada@example.com").await;
    let bob = developer(&store, "bob@example.com").await;
    let mut tx = store.begin_write().await.unwrap();
    let k1 = keys::insert(
        &mut tx,
        &NewKey {
            rate_limit_rpm: Some(60),
            rate_limit_tpm: Some(5000),
            ..new_key(&ada.id, "h1")
        },
    )
    .await
    .unwrap();
    let k2 = keys::insert(&mut tx, &new_key(&ada.id, "h2"))
        .await
        .unwrap();
    keys::insert(&mut tx, &new_key(&bob.id, "h3"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (k1.rate_limit_rpm, k1.rate_limit_tpm),
        (Some(60), Some(5000))
    );
    let mut cursor = Cursor::default();
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!(seen.len(), 3);
    let s1 = seen.iter().find(|k| k.id == k1.id).unwrap();
    assert_eq!(
        (s1.rate_limit_rpm, s1.rate_limit_tpm),
        (Some(60), Some(5000))
    );
    assert_eq!(s1.plan, "free");
    assert_eq!(
        (
            s1.dev_rate_limit_rpm,
            s1.dev_rate_limit_tpm,
            s1.dev_quota_tokens,
            s1.spend_cap_nanos
        ),
        (None, None, None, None)
    );

    // The key's tokens-per-minute limit changes and clears like its requests-per-minute.
    let mut tx = store.begin_write().await.unwrap();
    let u = KeyUpdate {
        rate_limit_tpm: Some(Some(7000)),
        ..Default::default()
    };
    let k1u = keys::update(&mut tx, None, &k1.id, &u).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (k1u.rate_limit_rpm, k1u.rate_limit_tpm),
        (Some(60), Some(7000))
    );
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!((seen.len(), seen[0].rate_limit_tpm), (1, Some(7000)));
    let mut tx = store.begin_write().await.unwrap();
    let u = KeyUpdate {
        rate_limit_tpm: Some(None),
        ..Default::default()
    };
    assert_eq!(
        keys::update(&mut tx, None, &k1.id, &u)
            .await
            .unwrap()
            .rate_limit_tpm,
        None
    );
    tx.commit().await.unwrap();
    all_changes(&store, &mut cursor).await;

    // A plan or limit change puts all of Ada's keys (and only hers) on the feed.
    let mut tx = store.begin_write().await.unwrap();
    let d = developers::operator_update(
        &mut tx,
        &ada.id,
        &OperatorUpdate {
            plan: Some("pro".into()),
            api_rate_limit: Some(Some(120)),
            api_token_rate_limit: Some(Some(90_000)),
            api_quota_limit: Some(Some(5_000_000)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (d.plan.as_str(), d.api_token_rate_limit),
        ("pro", Some(90_000))
    );
    let seen = all_changes(&store, &mut cursor).await;
    let mut ids: Vec<&str> = seen.iter().map(|k| k.id.as_str()).collect();
    ids.sort();
    let mut expected = vec![k1.id.as_str(), k2.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    for k in &seen {
        assert_eq!(k.plan, "pro");
        assert_eq!(
            (
                k.dev_rate_limit_rpm,
                k.dev_rate_limit_tpm,
                k.dev_quota_tokens
            ),
            (Some(120), Some(90_000), Some(5_000_000))
        );
    }

    // Each override on its own, and clearing one, is a change too.
    for u in [
        OperatorUpdate {
            api_token_rate_limit: Some(None),
            ..Default::default()
        },
        OperatorUpdate {
            api_quota_limit: Some(None),
            ..Default::default()
        },
        OperatorUpdate {
            api_rate_limit: Some(None),
            ..Default::default()
        },
    ] {
        let mut tx = store.begin_write().await.unwrap();
        developers::operator_update(&mut tx, &ada.id, &u)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(all_changes(&store, &mut cursor).await.len(), 2, "{u:?}");
    }

    // A role change is nothing gateways see: no key moves.
    let mut tx = store.begin_write().await.unwrap();
    let u = OperatorUpdate {
        role: Some(developers::ROLE_ADMIN.into()),
        ..Default::default()
    };
    developers::operator_update(&mut tx, &ada.id, &u)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(all_changes(&store, &mut cursor).await.is_empty());

    // The spend cap: set, then cleared, each time on the feed.
    let mut tx = store.begin_write().await.unwrap();
    let d = developers::set_spend_cap(&mut tx, &ada.id, Some(50_000_000_000))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(d.monthly_spend_cap_nanos, Some(50_000_000_000));
    let seen = all_changes(&store, &mut cursor).await;
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|k| k.spend_cap_nanos == Some(50_000_000_000) && k.dev_quota_tokens.is_none()));
    let mut tx = store.begin_write().await.unwrap();
    developers::set_spend_cap(&mut tx, &ada.id, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let seen = all_changes(&store, &mut cursor).await;
    assert!(seen.len() == 2 && seen.iter().all(|k| k.spend_cap_nanos.is_none()));
    let mut tx = store.begin_write().await.unwrap();
    assert!(matches!(
        developers::set_spend_cap(&mut tx, "dev_nobody", Some(1)).await,
        Err(StoreError::NotFound)
    ));
    drop(tx);

    // Rotation stores the limits the caller copied into the new key.
    let mut tx = store.begin_write().await.unwrap();
    let next = NewKey {
        rate_limit_tpm: Some(4000),
        ..new_key(&ada.id, "h4")
    };
    let (_, new) = keys::rotate(&mut tx, None, &k2.id, &next, i64::MAX)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(new.rate_limit_tpm, Some(4000));
    store.close().await;
}

#[tokio::test]
async fn limits_on_the_feed_on_both_backends() {
    for backend in BACKENDS {
        limits_on_the_feed(backend).await;
    }
}

fn alert(dev: &str, threshold_pct: i64) -> UsageAlert {
    UsageAlert {
        developer_id: dev.into(),
        period: "2026-11".into(),
        threshold_pct,
        used_tokens: 800 + threshold_pct,
        quota_tokens: 1000,
    }
}

/// An alert is raised once per developer, period and threshold, with one outbox event, even
/// when several gateway nodes report it at the same moment.
async fn usage_alerts_once(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ada = developer(&store, "ada@example.com").await;
    assert!(usage_alerts::record(&store, &alert(&ada.id, 80))
        .await
        .unwrap());
    assert!(!usage_alerts::record(&store, &alert(&ada.id, 80))
        .await
        .unwrap());
    // Another period is another alert.
    let next_month = UsageAlert {
        period: "2026-12".into(),
        ..alert(&ada.id, 80)
    };
    assert!(usage_alerts::record(&store, &next_month).await.unwrap());

    // Eight nodes at once.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let a = alert(&ada.id, 100);
            tokio::spawn(async move { usage_alerts::record(&store, &a).await })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        if r.await.unwrap().unwrap() {
            won += 1;
        }
    }
    assert_eq!(won, 1, "{backend:?}");

    let alerts = usage_alerts::for_developer(&store, &ada.id).await.unwrap();
    let keys: Vec<(&str, i64)> = alerts
        .iter()
        .map(|a| (a.period.as_str(), a.threshold_pct))
        .collect();
    assert_eq!(keys, [("2026-11", 80), ("2026-11", 100), ("2026-12", 80)]);
    assert_eq!(alerts[0], alert(&ada.id, 80));

    let events = outbox::for_developer(&store, &ada.id).await.unwrap();
    assert_eq!(events.len(), 3, "{backend:?}");
    assert!(events
        .iter()
        .all(|e| e.event_type == outbox::API_USAGE_ALERT));
    let p = &events[0].payload;
    assert_eq!(p["type"], "api.usage_alert");
    assert_eq!(
        p["data"],
        serde_json::json!({
            "developer_id": ada.id,
            "period": "2026-11",
            "threshold_percent": 80,
            "used_tokens": 880,
            "quota_tokens": 1000,
        })
    );
    let hundred = events
        .iter()
        .filter(|e| e.payload["data"]["threshold_percent"] == 100)
        .count();
    assert_eq!(hundred, 1);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_alerts_once_on_both_backends() {
    for backend in BACKENDS {
        usage_alerts_once(backend).await;
    }
}

/// A database created by the first release (migration 1 only, with an account and a key)
/// gains the new columns, empty, and the alerts table; running again applies nothing.
async fn upgrade_from_v1(backend: Backend) {
    use sqlx::Executor;
    let db = TestDatabase::new(backend).await;
    let store = Store::connect(&aihub_store::StoreOptions::new(&db.url))
        .await
        .unwrap();
    let serial = match backend {
        Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Backend::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    store
        .pool()
        .execute(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
             applied_at BIGINT NOT NULL)",
        )
        .await
        .unwrap();
    let v1 = &migrations::MIGRATIONS[0];
    assert_eq!(v1.version, 1);
    for stmt in v1.statements {
        store
            .pool()
            .execute(stmt.replace("{serial}", serial).as_str())
            .await
            .unwrap();
    }
    store
        .pool()
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) \
             VALUES (1, 'accounts_keys_outbox', 0)",
        )
        .await
        .unwrap();
    store
        .pool()
        .execute(
            "INSERT INTO developers (id, email, password_hash, full_name, developer_type, \
             created_at, updated_at) VALUES ('dev_old', 'old@example.com', 'x', 'Old', \
             'individual', 0, 0)",
        )
        .await
        .unwrap();
    store
        .pool()
        .execute(
            "INSERT INTO api_keys (id, developer_id, name, key_hash, key_prefix, models, \
             endpoints, ip_allowlist, rate_limit_rpm, created_at, updated_at, change_seq) \
             VALUES ('key_old', 'dev_old', 'k', 'h', 'p', '[\"*\"]', '[\"*\"]', '[]', 30, 0, 0, 1)",
        )
        .await
        .unwrap();

    assert_eq!(migrations::migrate(&store).await.unwrap(), vec![2, 3, 4, 5]);
    assert!(migrations::migrate(&store).await.unwrap().is_empty());
    // v5: the task queue and files replace V1's placeholder.
    for table in ["tasks", "task_items", "files"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    assert!(sqlx::query("SELECT 1 FROM async_tasks")
        .fetch_optional(store.pool())
        .await
        .is_err());
    // v4: the webhook tables replace V1's placeholder.
    for table in [
        "webhook_endpoints",
        "webhook_deliveries",
        "webhook_attempts",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    assert!(sqlx::query("SELECT 1 FROM webhook_configs")
        .fetch_optional(store.pool())
        .await
        .is_err());
    // v3: the existing account has held its plan since it was created.
    let subs = aihub_store::subscriptions::overlapping(&store, "dev_old", 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(
        (subs[0].plan.as_str(), subs[0].started_at, subs[0].ended_at),
        ("free", 0, None)
    );
    let seen = feed::changes_since(&store, &Cursor::default(), true, 10)
        .await
        .unwrap();
    assert_eq!(seen.len(), 1);
    let k = &seen[0];
    assert_eq!((k.rate_limit_rpm, k.rate_limit_tpm), (Some(30), None));
    assert_eq!(k.plan, "free");
    assert_eq!((k.dev_rate_limit_tpm, k.spend_cap_nanos), (None, None));
    let dev = developers::by_id(&store, "dev_old").await.unwrap();
    assert_eq!(
        (dev.api_token_rate_limit, dev.monthly_spend_cap_nanos),
        (None, None)
    );
    assert!(usage_alerts::record(&store, &alert("dev_old", 80))
        .await
        .unwrap());
    store.close().await;
}

#[tokio::test]
async fn upgrade_from_v1_on_both_backends() {
    for backend in BACKENDS {
        upgrade_from_v1(backend).await;
    }
}
