//! The service over real databases: SQLite always, PostgreSQL (`AIHUB_TEST_POSTGRES_URL`) in
//! the `_postgres` variants.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aihub_store::testing::{self, Backend, TestDatabase};
use aihub_store::{audit, outbox, Store};

use crate::keys::{CreateKey, ListKeys, UpdateKey};
use crate::{Actor, Config, Control, Error, KeyRules};

async fn control(db: &TestDatabase, rules: KeyRules) -> (Store, Control) {
    let store = db.store().await;
    let control = Control::new(
        store.clone(),
        Config {
            keys: rules,
            ..Config::default()
        },
    );
    (store, control)
}

fn named(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        ..Default::default()
    }
}

async fn key_lifecycle(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let (store, control) = control(&db, KeyRules::default()).await;
    let counted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&counted);
    let control = control.with_events(Arc::new(move |_| {
        seen.fetch_add(1, Ordering::Relaxed);
    }));
    let dev = testing::developer(&store, "keys@example.com").await;

    // A developer's own key: event, no audit entry.
    let created = control
        .create_key(&Actor::developer(&dev), &dev.id, named("  first "))
        .await
        .unwrap();
    assert!(created.key.starts_with("ahub_"));
    assert_eq!(created.api_key.name, "first");
    assert!(created.api_key.expires_at.is_some(), "default lifetime");
    // The CLI's: audited as `cli`.
    let cli = control
        .create_key(&Actor::Cli, &dev.id, named("cli"))
        .await
        .unwrap();
    let entries = audit::list(&store, Some(&cli.api_key.id), None, 10)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].actor_id, "cli");
    assert_eq!(entries[0].action, "api_key.create");
    assert!(audit::list(&store, Some(&created.api_key.id), None, 10)
        .await
        .unwrap()
        .is_empty());

    let page = control
        .list_keys(
            &dev.id,
            ListKeys {
                limit: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.keys.len(), 1);
    assert!(page.has_more);

    // Update: disable, then an expiry past the maximum is refused, naming the field.
    let off = control
        .update_key(
            &dev.id,
            &created.api_key.id,
            UpdateKey {
                active: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(off.disabled_at.is_some());
    let too_far = control
        .update_key(
            &dev.id,
            &created.api_key.id,
            UpdateKey {
                expires_at: Some(Some("2999-01-01T00:00:00Z".into())),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(too_far, Err(Error::Invalid(f)) if f[0].field == "expires_at"));

    // Regenerate once; a second regeneration of the same key conflicts.
    let rotated = control
        .regenerate_key(&dev, &cli.api_key.id, 60)
        .await
        .unwrap();
    assert_eq!(
        rotated.previous.rotated_to.as_deref(),
        Some(rotated.api_key.id.as_str())
    );
    assert!(matches!(
        control.regenerate_key(&dev, &cli.api_key.id, 0).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        control.regenerate_key(&dev, &rotated.api_key.id, 10 * 86_400).await,
        Err(Error::Invalid(f)) if f[0].field == "grace_period_seconds"
    ));

    // An operator revokes: audited with their address; a second revoke finds nothing.
    let by = Actor::Operator {
        id: "dev_operator",
        ip: Some("192.0.2.1"),
    };
    control
        .revoke_key(&by, None, &created.api_key.id)
        .await
        .unwrap();
    let entries = audit::list(&store, Some(&created.api_key.id), None, 10)
        .await
        .unwrap();
    assert_eq!(entries[0].action, "api_key.revoke");
    assert_eq!(entries[0].ip.as_deref(), Some("192.0.2.1"));
    assert!(matches!(
        control.revoke_key(&by, None, &created.api_key.id).await,
        Err(Error::NotFound)
    ));

    let kinds: Vec<String> = outbox::for_developer(&store, &dev.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        kinds,
        [
            "api_key.created",
            "api_key.created",
            "api_key.rotated",
            "api_key.deleted"
        ]
    );
    assert_eq!(counted.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn key_lifecycle_sqlite() {
    key_lifecycle(Backend::Sqlite).await;
}

#[tokio::test]
async fn key_lifecycle_postgres() {
    key_lifecycle(Backend::Postgres).await;
}

#[tokio::test]
async fn key_rules_cap_verification_and_validation() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let rules = KeyRules {
        max_per_developer: 1,
        allow_never_expires: false,
        ..KeyRules::default()
    };
    let (store, control) = control(&db, rules).await;
    let dev = testing::developer(&store, "cap@example.com").await;
    let by = Actor::developer(&dev);

    let bad = CreateKey {
        name: String::new(),
        rate_limit_rpm: Some(0),
        ip_allowlist: vec!["not-an-ip".into()],
        never_expires: true,
        ..Default::default()
    };
    let Err(Error::Invalid(fields)) = control.create_key(&by, &dev.id, bad).await else {
        panic!("expected invalid fields");
    };
    let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        names,
        ["name", "rate_limit_rpm", "ip_allowlist[0]", "never_expires"]
    );

    control
        .create_key(&by, &dev.id, named("one"))
        .await
        .unwrap();
    assert!(matches!(
        control.create_key(&by, &dev.id, named("two")).await,
        Err(Error::Forbidden("key_limit_reached", _))
    ));

    let mut unverified = dev.clone();
    unverified.email_verified_at = None;
    assert!(matches!(
        control
            .create_key(&Actor::developer(&unverified), &dev.id, named("x"))
            .await,
        Err(Error::Forbidden("email_not_verified", _))
    ));
}

async fn account_lifecycle(backend: Backend) {
    use crate::accounts::{Registered, Registration, TokenPurpose, UpdateProfile};

    let db = TestDatabase::new(backend).await;
    let (store, control) = control(&db, KeyRules::default()).await;
    let r = Registration {
        email: "Ada@Example.com".into(),
        password: "correct horse battery".into(),
        full_name: "Ada".into(),
        company_name: None,
        developer_type: None,
    };
    r.check().unwrap();
    let Registered::Created { developer, token } =
        control.register(r.clone(), "hash".into()).await.unwrap()
    else {
        panic!("expected a new account");
    };
    assert_eq!(developer.email, "ada@example.com");
    assert!(!developer.is_verified());
    assert!(matches!(
        control.register(r, "hash".into()).await.unwrap(),
        Registered::Existing(_)
    ));

    assert!(matches!(
        control.verify_email("bogus").await,
        Err(Error::Invalid(f)) if f[0].field == "token"
    ));
    control.verify_email(&token).await.unwrap();
    // Single use.
    assert!(control.verify_email(&token).await.is_err());

    let session = control
        .open_session(
            &developer.id,
            std::time::Duration::from_secs(60),
            None,
            None,
        )
        .await
        .unwrap();
    let reset = control
        .issue_email_token(&developer.id, TokenPurpose::ResetPassword)
        .await
        .unwrap();
    let owner = control.reset_token_owner(&reset).await.unwrap();
    assert_eq!(owner.id, developer.id);
    control
        .reset_password(&reset, &owner.id, "new-hash")
        .await
        .unwrap();
    assert!(control
        .reset_password(&reset, &owner.id, "again")
        .await
        .is_err());
    assert!(
        aihub_store::developers::by_live_session(&store, &session)
            .await
            .unwrap()
            .is_none(),
        "a reset ends every session"
    );

    let bad = UpdateProfile {
        full_name: Some(String::new()),
        monthly_spend_cap_usd: Some(Some("-1".into())),
        ..Default::default()
    };
    let Err(Error::Invalid(fields)) = control.update_profile(&developer.id, bad).await else {
        panic!("expected invalid fields");
    };
    assert_eq!(fields.len(), 2);
    let dev = control
        .update_profile(
            &developer.id,
            UpdateProfile {
                monthly_spend_cap_usd: Some(Some("50.00".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(dev.monthly_spend_cap_nanos, Some(50_000_000_000));
}

#[tokio::test]
async fn account_lifecycle_sqlite() {
    account_lifecycle(Backend::Sqlite).await;
}

#[tokio::test]
async fn account_lifecycle_postgres() {
    account_lifecycle(Backend::Postgres).await;
}

#[test]
fn field_rules() {
    use crate::accounts::{check_email, check_password, parse_usd_nanos};
    assert!(check_email("a@b.example").is_ok());
    assert!(check_email("not an email").is_err());
    assert!(check_password("password12", "a@b.c").is_err());
    assert!(check_password("correct horse battery", "ada@x.io").is_ok());
    assert_eq!(parse_usd_nanos("0.5"), Ok(500_000_000));
}

async fn operator_commands(backend: Backend) {
    use crate::operators::{AccountChange, AuditSearch, NewAccount, Search};

    let db = TestDatabase::new(backend).await;
    let (store, control) = control(&db, KeyRules::default()).await;
    let by = Actor::Operator {
        id: "dev_op",
        ip: Some("192.0.2.9"),
    };
    let bad = NewAccount {
        email: "x".into(),
        password: "short".into(),
        plan: Some("platinum".into()),
        ..Default::default()
    };
    let Err(Error::Invalid(fields)) = control.check_new_account(&bad) else {
        panic!("expected invalid fields");
    };
    let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(names, ["email", "password", "full_name", "plan"]);

    let new = NewAccount {
        email: "Corp@Example.com".into(),
        password: "correct horse battery".into(),
        full_name: "Corp".into(),
        ..Default::default()
    };
    control.check_new_account(&new).unwrap();
    let dev = control
        .create_account(&by, new.clone(), "hash".into())
        .await
        .unwrap();
    assert!(dev.is_verified());
    assert_eq!(dev.email, "corp@example.com");
    assert!(matches!(
        control.create_account(&by, new, "hash".into()).await,
        Err(Error::Conflict(_))
    ));

    let session = control
        .open_session(&dev.id, std::time::Duration::from_secs(60), None, None)
        .await
        .unwrap();
    let off = control
        .update_account(
            &by,
            &dev.id,
            AccountChange {
                active: Some(false),
                api_rate_limit: Some(Some(600)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!off.is_active());
    assert_eq!(off.api_rate_limit, Some(600));
    assert!(aihub_store::developers::by_live_session(&store, &session)
        .await
        .unwrap()
        .is_none());
    // Operators cannot disable themselves.
    let me = Actor::Operator {
        id: &dev.id,
        ip: None,
    };
    assert!(matches!(
        control
            .update_account(
                &me,
                &dev.id,
                AccountChange {
                    active: Some(false),
                    ..Default::default()
                }
            )
            .await,
        Err(Error::Invalid(f)) if f[0].field == "active"
    ));

    let (rows, total) = control
        .search_developers(Search {
            q: Some("corp".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((rows.len(), total), (1, 1));
    let log = control
        .audit_log(AuditSearch {
            target_id: Some(dev.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["developer.update", "developer.create"]);
    assert!(log.iter().all(|e| e.actor_id == "dev_op"));

    // Bootstrap: a new operator once, then nothing to do.
    let id = control
        .bootstrap_operator("ops@example.com", "hash".into(), "free".into())
        .await
        .unwrap()
        .expect("created");
    assert!(control
        .bootstrap_operator("ops@example.com", "hash".into(), "free".into())
        .await
        .unwrap()
        .is_none());
    let log = audit::list(&store, Some(&id), None, 10).await.unwrap();
    assert_eq!(log[0].actor_id, "bootstrap");
}

#[tokio::test]
async fn operator_commands_sqlite() {
    operator_commands(Backend::Sqlite).await;
}

#[tokio::test]
async fn operator_commands_postgres() {
    operator_commands(Backend::Postgres).await;
}

async fn plan_change(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let (store, control) = control(&db, KeyRules::default()).await;
    let dev = testing::developer(&store, "plans@example.com").await;
    assert!(matches!(
        control.change_plan(&dev, None, "platinum").await,
        Err(Error::Invalid(f)) if f[0].field == "plan"
    ));
    assert!(matches!(
        control.change_plan(&dev, None, "enterprise").await,
        Err(Error::Invalid(f)) if f[0].message.contains("custom pricing")
    ));
    let same = control.change_plan(&dev, None, "free").await.unwrap();
    assert_eq!(same.plan, "free");
    // A change in the account's first millisecond would replace its first span (by design):
    // let the clock move so the history has two.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let pro = control
        .change_plan(&dev, Some("198.51.100.7"), "pro")
        .await
        .unwrap();
    assert_eq!(pro.plan, "pro");
    let log = audit::list(&store, Some(&dev.id), None, 10).await.unwrap();
    assert_eq!(log.len(), 1, "only the real change is audited");
    assert_eq!(log[0].action, "billing.plan_change");
    assert_eq!(log[0].actor_id, dev.id);
    assert_eq!(log[0].ip.as_deref(), Some("198.51.100.7"));
    let history = aihub_store::subscriptions::overlapping(&store, &dev.id, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].ended_at, Some(history[1].started_at));

    assert!(matches!(
        control
            .void_invoice(&Actor::Cli, "inv_missing", " ")
            .await,
        Err(Error::Invalid(f)) if f[0].field == "reason"
    ));
    assert!(matches!(
        control
            .void_invoice(&Actor::Cli, "inv_missing", "typo")
            .await,
        Err(Error::NotFound)
    ));
}

#[tokio::test]
async fn plan_change_sqlite() {
    plan_change(Backend::Sqlite).await;
}

#[tokio::test]
async fn plan_change_postgres() {
    plan_change(Backend::Postgres).await;
}
