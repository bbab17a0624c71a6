//! A real admin API on a loopback port over a fresh SQLite or PostgreSQL database, a reqwest
//! client, and helpers that read the mail folder.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aihub_admin::config::EmailTransport;
use aihub_admin::{AdminConfig, AppState};
use aihub_store::testing::{Backend, TestDatabase};
use aihub_usage::testing::TestClickHouse;
use serde_json::{json, Value};

pub struct TestApi {
    pub base: String,
    pub http: reqwest::Client,
    pub state: AppState,
    pub mail_dir: PathBuf,
    _mail: tempfile::TempDir,
    pub db: TestDatabase,
    /// The ClickHouse usage database, for APIs started with [`TestApi::start_with_usage`].
    pub usage: Option<TestClickHouse>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

pub const PASSWORD: &str = "correct horse battery staple";
pub const ADMIN_EMAIL: &str = "ops@aihub.test";

impl TestApi {
    pub async fn start(backend: Backend) -> TestApi {
        TestApi::start_with(backend, |_| {}).await
    }

    /// An API reading usage from a fresh ClickHouse database (`self.usage`), with background
    /// billing off (tests run it explicitly).
    pub async fn start_with_usage(
        backend: Backend,
        tweak: impl FnOnce(&mut AdminConfig),
    ) -> TestApi {
        let ch = TestClickHouse::new().await;
        let config = ch.config.clone();
        let mut api = TestApi::start_with(backend, move |c| {
            c.clickhouse = Some(config);
            c.billing.enabled = false;
            tweak(c);
        })
        .await;
        api.usage = Some(ch);
        api
    }

    /// The usage database of an API started with [`TestApi::start_with_usage`].
    pub fn ch(&self) -> &TestClickHouse {
        self.usage.as_ref().expect("started with start_with_usage")
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut AdminConfig)) -> TestApi {
        let db = TestDatabase::new(backend).await;
        let mail = tempfile::tempdir().unwrap();
        let mut config = AdminConfig::default();
        config.database.url = db.url.clone();
        config.email.transport = EmailTransport::File {
            dir: mail.path().to_owned(),
        };
        config.auth.argon2_memory_kib = 8192;
        config.auth.argon2_iterations = 1;
        config.public_url = "http://portal.test".into();
        // Task files in the test's own folder; no gateway for task items (port 9: discard).
        config.tasks.files_dir = mail.path().join("files");
        config.tasks.gateway_url = "http://127.0.0.1:9".into();
        std::env::set_var("AIHUB_TEST_ADMIN_PASSWORD", PASSWORD);
        config.bootstrap_admin = Some(aihub_admin::config::BootstrapAdmin {
            email: ADMIN_EMAIL.into(),
            password_env: "AIHUB_TEST_ADMIN_PASSWORD".into(),
        });
        tweak(&mut config);
        let front = aihub_admin::listener::Front::try_new(&config.server).expect("listener");
        let state = AppState::new(config).await.expect("admin state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            aihub_admin::serve(listener, front, served, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestApi {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            state,
            mail_dir: mail.path().to_owned(),
            _mail: mail,
            db,
            usage: None,
            shutdown: Some(tx),
        }
    }

    /// Every event in the outbox has its catalogue entry's shape (`GET
    /// /developer/webhooks/event-types`): the envelope and every `data` field with its type.
    /// Returns how many events were checked.
    pub async fn assert_events_conform(&self) -> usize {
        let bodies: Vec<String> = sqlx::query_scalar("SELECT payload FROM outbox ORDER BY id")
            .fetch_all(self.state.store.pool())
            .await
            .unwrap();
        for b in &bodies {
            let v: Value = serde_json::from_str(b).unwrap();
            aihub_webhooks::catalogue::conforms(&v).unwrap_or_else(|e| panic!("{e}: {v}"));
        }
        bodies.len()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; returns status and JSON body (`Null` when empty or not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The token in the newest mail to `to` whose subject contains `subject`; waits for it.
    pub async fn mail_token(&self, to: &str, subject: &str) -> String {
        for _ in 0..100 {
            if let Some(t) = self.find_mail(to, subject).and_then(|m| token_in(&m)) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no mail to {to} about {subject}");
    }

    /// The newest mail to `to` whose subject contains `subject`.
    pub fn find_mail(&self, to: &str, subject: &str) -> Option<String> {
        let mut mails: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&self.mail_dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((e.metadata().ok()?.modified().ok()?, text))
            })
            .filter(|(_, m)| m.contains(&format!("To: {to}")) && m.contains(subject))
            .collect();
        mails.sort_by_key(|(t, _)| *t);
        mails.pop().map(|(_, m)| m)
    }

    pub fn mail_count(&self, to: &str) -> usize {
        std::fs::read_dir(&self.mail_dir)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                    .filter(|m| m.contains(&format!("To: {to}")))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Registers, verifies by mail and logs in; returns the access token.
    pub async fn signed_up(&self, email: &str) -> String {
        let (s, _) = self
            .call(
                "POST",
                "/developer/register",
                None,
                Some(json!({"email": email, "password": PASSWORD, "full_name": "Test Dev"})),
            )
            .await;
        assert_eq!(s, 202);
        let token = self.mail_token(email, "Verify").await;
        let (s, b) = self
            .call(
                "POST",
                "/developer/verify-email",
                None,
                Some(json!({ "token": token })),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        self.login(email, PASSWORD).await
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let (s, b) = self
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The token printed on the line after "paste this token" in a mail.
pub fn token_in(mail: &str) -> Option<String> {
    let mut lines = mail.lines();
    while let Some(l) = lines.next() {
        if l.contains("paste this token") {
            return lines.next().map(|t| t.trim().to_owned());
        }
    }
    None
}

/// Asserts the OpenAI error shape and returns `(type, code)`.
pub fn error_of(body: &Value) -> (String, String) {
    let e = &body["error"];
    assert!(e["message"].is_string(), "no error message in {body}");
    (
        e["type"].as_str().unwrap().to_owned(),
        e["code"].as_str().unwrap().to_owned(),
    )
}
