//! A running `aihub admin` (the control plane's HTTP API and the portal) on a port the OS picks,
//! with the file mail transport in a temporary directory and a bootstrap operator
//! (`ops@aihub.test`, [`PASSWORD`]); helpers for the JSON API's sign-up journey.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{client, BIN};

/// Every test account's password (and the bootstrap operator's).
pub const PASSWORD: &str = "correct horse battery staple";

/// A running `aihub admin`.
pub struct Admin {
    child: Child,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    /// The admin's stderr (RUST_LOG=debug).
    pub log: std::path::PathBuf,
    /// The file mail transport's directory.
    pub mail: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Admin {
    pub fn start(database_url: &str, extra: &str) -> Admin {
        Self::start_at("127.0.0.1:0", database_url, extra)
    }

    /// Like [`Admin::start`], listening on `listen` (a port chosen before, e.g. for a gateway
    /// that must know it).
    pub fn start_at(listen: &str, database_url: &str, extra: &str) -> Admin {
        Self::start_with_env(listen, database_url, extra, &[])
    }

    /// Like [`Admin::start_at`], with extra environment variables (e.g. `LD_PRELOAD`).
    pub fn start_with_env(
        listen: &str,
        database_url: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Admin {
        let dir = tempfile::tempdir().unwrap();
        let mail = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.yaml");
        // Task files in the test's own folder unless the test configures tasks itself.
        let tasks = if extra.contains("tasks:") {
            String::new()
        } else {
            format!(
                "tasks: {{files_dir: \"{}\"}}\n",
                dir.path().join("files").display()
            )
        };
        // Mail goes to files in `mail` unless the test configures email itself.
        let email = if extra.contains("email:") {
            String::new()
        } else {
            format!(
                "email: {{transport: {{kind: file, dir: \"{}\"}}}}\n",
                mail.path().display()
            )
        };
        let auth = if extra.contains("auth:") {
            ""
        } else {
            "auth: {argon2_memory_kib: 8192, argon2_iterations: 1}\n"
        };
        std::fs::write(
            &path,
            format!(
                "listen: {listen}\ndatabase: {{url: \"{database_url}\"}}\n{email}{auth}\
                 bootstrap_admin: {{email: ops@aihub.test, password_env: AIHUB_TEST_OPS_PASSWORD}}\n{tasks}{extra}"
            ),
        )
        .unwrap();
        let log = dir.path().join("admin.log");
        let mut child = Command::new(BIN)
            .args(["admin", "--config"])
            .arg(&path)
            .env("AIHUB_TEST_OPS_PASSWORD", PASSWORD)
            .env("RUST_LOG", "debug")
            .env_remove("AIHUB_DATABASE_URL")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn aihub admin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected admin output: {line:?}"))
            .to_owned();
        Admin {
            child,
            base,
            log,
            mail,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = client().request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The token on the line after "paste this token" in the newest mail to `to`.
    pub async fn mail_token(&self, to: &str) -> String {
        for _ in 0..200 {
            for entry in std::fs::read_dir(self.mail.path()).unwrap().flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                if text.contains(&format!("To: {to}")) {
                    let mut lines = text.lines();
                    while let Some(l) = lines.next() {
                        if l.contains("paste this token") {
                            return lines.next().unwrap().trim().to_owned();
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no mail to {to}");
    }

    pub async fn login(&self, email: &str) -> String {
        let (s, b) = self
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b["access_token"].as_str().unwrap().to_owned()
    }

    /// Register → mail → verify → login, over HTTP.
    pub async fn sign_up(&self, email: &str) -> String {
        let (s, _) = self
            .call(
                "POST",
                "/developer/register",
                None,
                Some(json!({"email": email, "password": PASSWORD, "full_name": "E2E"})),
            )
            .await;
        assert_eq!(s, 202);
        let token = self.mail_token(email).await;
        let (s, _) = self
            .call(
                "POST",
                "/developer/verify-email",
                None,
                Some(json!({"token": token})),
            )
            .await;
        assert_eq!(s, 200);
        self.login(email).await
    }

    pub async fn create_key(&self, session: &str, body: Value) -> (String, String) {
        let (s, b) = self
            .call("POST", "/developer/keys", Some(session), Some(body))
            .await;
        assert_eq!(s, 201, "{b}");
        (
            b["key"].as_str().unwrap().to_owned(),
            b["api_key"]["id"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
