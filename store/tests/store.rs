//! The store against real SQLite and real PostgreSQL: migrations, accounts, the key lifecycle,
//! the change feed, tokens, sessions, audit and outbox.

use aihub_store::developers::{self, NewDeveloper, OperatorUpdate};
use aihub_store::feed::{self, Cursor};
use aihub_store::keys::{self, KeyUpdate, NewKey};
use aihub_store::testing::{Backend, TestDatabase, BACKENDS};
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
