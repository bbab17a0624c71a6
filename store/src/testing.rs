//! Fresh databases for tests: a SQLite file in a temporary folder, or a new PostgreSQL database
//! on the local server (`AIHUB_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped when the value is dropped.

use std::time::Duration;

use sqlx::Executor;

use crate::developers::{self, Developer, NewDeveloper};
use crate::{Store, StoreOptions};

/// Which databases the store tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

pub struct TestDatabase {
    pub url: String,
    pg_admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

fn admin_url() -> String {
    std::env::var("AIHUB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        let name = format!("aihub_t_{}", uuid::Uuid::now_v7().simple());
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/aihub.db", dir.path().display());
                TestDatabase {
                    url,
                    pg_admin_url: None,
                    name,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = admin_url();
                let store = Store::connect(&StoreOptions::new(&admin))
                    .await
                    .expect("postgres url");
                store
                    .pool()
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create test database (is PostgreSQL running on 127.0.0.1:5432?)");
                store.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                let url = format!("{base}/{name}");
                TestDatabase {
                    url,
                    pg_admin_url: Some(admin),
                    name,
                    _dir: None,
                }
            }
        }
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> Store {
        let mut opts = StoreOptions::new(&self.url);
        opts.acquire_timeout = Duration::from_secs(10);
        let store = Store::connect(&opts).await.expect("connect");
        crate::migrations::migrate(&store).await.expect("migrate");
        store
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(admin) = self.pg_admin_url.take() else {
            return;
        };
        let name = self.name.clone();
        // Drop may run inside a runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(store) = Store::connect(&StoreOptions::new(&admin)).await {
                        let _ = store
                            .pool()
                            .execute(
                                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                            )
                            .await;
                        store.close().await;
                    }
                });
            }
        })
        .join();
    }
}

/// A verified developer account with `email` (panics on failure: for tests).
pub async fn developer(store: &Store, email: &str) -> Developer {
    let mut tx = store.begin_write().await.expect("begin");
    let dev = developers::insert(
        &mut tx,
        &NewDeveloper {
            email: email.into(),
            password_hash: "x".into(),
            full_name: "Test Developer".into(),
            company_name: None,
            developer_type: "individual".into(),
            role: developers::ROLE_DEVELOPER.into(),
            plan: "free".into(),
            verified: true,
        },
    )
    .await
    .expect("insert developer");
    tx.commit().await.expect("commit");
    dev
}

/// A verified account with a given id, plan and creation time (its first subscription starts
/// then), as imports and benchmarks create them (panics on failure: for tests).
pub async fn imported(store: &Store, id: &str, plan: &str, created_at: i64) -> Developer {
    let mut tx = store.begin_write().await.expect("begin");
    let dev = developers::import(
        &mut tx,
        id,
        created_at,
        &NewDeveloper {
            email: format!("{id}@example.com"),
            password_hash: "x".into(),
            full_name: id.into(),
            company_name: None,
            developer_type: "individual".into(),
            role: developers::ROLE_DEVELOPER.into(),
            plan: plan.into(),
            verified: true,
        },
    )
    .await
    .expect("import developer");
    tx.commit().await.expect("commit");
    dev
}
