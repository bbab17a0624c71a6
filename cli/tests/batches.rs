//! OpenAI batches and async tasks end to end, black-box: the real `aihub gateway` and
//! `aihub admin` (SQLite and PostgreSQL control planes), the mock upstream, a fresh ClickHouse
//! database per test. The official `openai` Python SDK runs a batch unchanged; workers killed
//! with SIGKILL are taken over with every item exactly once in the output and in ClickHouse;
//! cancellation stops new items within a second; an exhausted quota and a revoked key end
//! their batches' remaining items; other developers' ids are 404; the seed's task API runs
//! `batch_generate` and `usage_export`; a 10,000-item batch completes.

mod common;

use std::time::{Duration, Instant};

use aihub_store::testing::{Backend, TestDatabase};
use common::admin::Admin;
use common::*;
use serde_json::{json, Value};

/// A whole platform for one test.
struct Stack {
    ch: TestDb,
    /// A key declared in the gateway's YAML (no account in the control plane).
    yaml_key: TestKey,
    _store_db: TestDatabase,
    database_url: String,
    _mock: Mock,
    gw: Gateway,
    admins: Vec<Admin>,
    admin_port: u16,
    admin_extra: String,
    _files: tempfile::TempDir,
    _wal: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// `tasks` is extra YAML inside the admin's `tasks:` section (indented by the caller).
    async fn start(
        backend: Backend,
        mock_args: &[&str],
        tasks: &str,
        plans: Option<&str>,
    ) -> Stack {
        let store_db = TestDatabase::new(backend).await;
        // The admin node migrates too; the gateway starts first and needs the schema.
        store_db.store().await;
        let ch = TestDb::new();
        let mock = Mock::start(mock_args);
        let files = tempfile::tempdir().unwrap();
        let wal = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_port();
        let yaml_key = key("yaml", &[]);
        let mut limits = String::new();
        let mut plans_line = String::new();
        if let Some(p) = plans {
            let path = dir.path().join("plans.yaml");
            std::fs::write(&path, p).unwrap();
            limits = format!("limits:\n  plans_file: \"{}\"\n", path.display());
            plans_line = format!("plans_file: \"{}\"\n", path.display());
        }
        let gw = Gateway::start(
            &format!(
                "{}{}{}{}",
                config(
                    &[upstream("m", &[mock.base_url()], &[])],
                    &[("demo", "m", None)],
                    &[&yaml_key]
                ),
                ch.metering_yaml(wal.path(), &[]),
                common::control_plane(
                    &store_db.url,
                    &[
                        "poll_interval: 50ms",
                        &format!("admin_url: \"http://127.0.0.1:{admin_port}\"")
                    ]
                ),
                limits
            ),
            &[],
        );
        let admin_extra = format!(
            "clickhouse: {{url: \"{}\", database: {}}}\n{plans_line}\
             tasks:\n  gateway_url: \"{}\"\n  files_dir: \"{}\"\n  lease: 3s\n  poll_interval: 50ms\n{tasks}",
            ch.url,
            ch.name,
            gw.url("").trim_end_matches('/'),
            files.path().display()
        );
        let mut stack = Stack {
            ch,
            yaml_key,
            database_url: store_db.url.clone(),
            _store_db: store_db,
            _mock: mock,
            gw,
            admins: Vec::new(),
            admin_port,
            admin_extra,
            _files: files,
            _wal: wal,
            _dir: dir,
        };
        stack.start_admin(true);
        stack
    }

    /// Starts an admin node: on the port the gateway forwards to (`primary`) or on any port
    /// (a second worker node).
    fn start_admin(&mut self, primary: bool) {
        let listen = if primary {
            format!("127.0.0.1:{}", self.admin_port)
        } else {
            "127.0.0.1:0".to_owned()
        };
        let admin = Admin::start_at(&listen, &self.database_url, &self.admin_extra);
        self.admins.push(admin);
    }

    fn admin(&self) -> &Admin {
        &self.admins[0]
    }

    /// A verified developer with a key; waits until the gateway knows the key and the secret.
    async fn developer(&self, email: &str) -> (String, String, String) {
        let session = self.admin().sign_up(email).await;
        let (key, key_id) = self
            .admin()
            .create_key(&session, json!({"name": "batch"}))
            .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.gw.get(&key, "/v1/batches").await;
            if r.status() == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never served /v1/batches: {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (session, key, key_id)
    }

    async fn upload(&self, key: &str, jsonl: &str) -> String {
        let boundary = "aihubboundary7f3a";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
        );
        let v = admitted(|| {
            client()
                .post(self.gw.url("/v1/files"))
                .bearer_auth(key)
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body.clone())
        })
        .await;
        v["id"].as_str().unwrap().to_owned()
    }

    async fn create_batch(&self, key: &str, file_id: &str) -> String {
        let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let v = admitted(|| self.gw.post(key, "/v1/batches").json(&body)).await;
        v["id"].as_str().unwrap().to_owned()
    }

    async fn batch(&self, key: &str, id: &str) -> Value {
        self.gw
            .get(key, &format!("/v1/batches/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Polls until the batch has a final status.
    async fn finished(&self, key: &str, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let b = self.batch(key, id).await;
            if matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "expired" | "cancelled")
            ) {
                return b;
            }
            assert!(Instant::now() < deadline, "batch not finished: {b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until at least `n` items ended.
    async fn ended_at_least(&self, key: &str, id: &str, n: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let b = self.batch(key, id).await;
            let c = &b["request_counts"];
            if c["completed"].as_i64().unwrap_or(0) + c["failed"].as_i64().unwrap_or(0) >= n {
                return b;
            }
            assert!(Instant::now() < deadline, "batch stalled: {b}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A file's lines (JSON).
    async fn lines(&self, key: &str, file_id: &Value) -> Vec<Value> {
        let Some(id) = file_id.as_str() else {
            return Vec::new();
        };
        let r = self.gw.get(key, &format!("/v1/files/{id}/content")).await;
        assert_eq!(r.status(), 200);
        r.text()
            .await
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `(rows, distinct request ids, rows with status 200)` of a batch in ClickHouse, once the
    /// count has been stable for a second.
    async fn usage_of(&self, batch_id: &str) -> (u64, u64, u64) {
        let q =
            |what: &str| format!("SELECT {what} FROM usage_events WHERE batch_id = '{batch_id}'");
        let mut last = u64::MAX;
        for _ in 0..40 {
            let n = self.ch.number(&q("count()")).await as u64;
            if n == last {
                break;
            }
            last = n;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (
            last,
            self.ch.number(&q("uniqExact(request_id)")).await as u64,
            self.ch.number(&q("countIf(status = 200)")).await as u64,
        )
    }
}

/// Sends the request until the gateway admits it (a rate-limited developer, in one test, waits
/// its limit out); asserts a 200 and returns the body.
async fn admitted(request: impl Fn() -> reqwest::RequestBuilder) -> Value {
    loop {
        let r = request().send().await.unwrap();
        if r.status() == 429 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{v}");
        return v;
    }
}

/// Polls `GET /developer/tasks/{id}` until the task completed (30 s at most).
async fn task_completed(a: &Admin, session: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, t) = a
            .call(
                "GET",
                &format!("/developer/tasks/{id}"),
                Some(session),
                None,
            )
            .await;
        if t["status"] == "completed" {
            return t;
        }
        assert!(Instant::now() < deadline, "{t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn jsonl(n: usize, model: &str) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": format!("item {i}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn custom_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn sdk_round_trip(backend: Backend) {
    let stack = Stack::start(backend, &[], "", None).await;
    let (_, key, _) = stack.developer("sdk@example.com").await;
    let python = test_tool("AIHUB_TEST_PYTHON", "python3");
    let (script, base) = (repo_root().join("e2e/batch_sdk.py"), stack.gw.url("/v1"));
    let (py, k) = (python.clone(), key.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&py)
            .arg(script)
            .args([&base, &k, "demo", "6"])
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{python}: {e} (source deploy/local/test-tools.sh)"));
    assert!(
        out.status.success(),
        "the SDK script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(
        seen["counts"],
        json!({"total": 7, "completed": 6, "failed": 1})
    );
    assert_eq!(seen["metadata"], json!({"purpose": "sdk test"}));
    assert!(seen["completed_at"].as_i64().unwrap() > 1_700_000_000);
    let ids: Vec<String> = (0..6).map(|i| format!("req-{i}")).collect();
    assert_eq!(
        seen["output_custom_ids"],
        json!(ids),
        "output in input order"
    );
    assert_eq!(seen["output_statuses"], json!([200]));
    assert_eq!(seen["output_first_body"]["object"], "chat.completion");
    let errors = seen["error_lines"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "req-bad");
    assert_eq!(errors[0]["response"]["status_code"], 404);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["code"],
        "model_not_found"
    );
    for flag in ["listed", "file_listed", "deleted"] {
        assert_eq!(seen[flag], true, "{flag}: {seen}");
    }
    assert_eq!(seen["missing"], 404);
    assert_eq!(seen["cancel_finished"], 409);
    assert_eq!(seen["after_delete"], 404);

    // One usage row per item, with the batch's id and the request id of the output line.
    let batch_id = seen["batch_id"].as_str().unwrap();
    assert_eq!(stack.usage_of(batch_id).await, (7, 7, 6));
    for rid in seen["output_request_ids"].as_array().unwrap() {
        let q = format!(
            "SELECT count() FROM usage_events WHERE batch_id = '{batch_id}' AND toString(request_id) = '{}'",
            rid.as_str().unwrap()
        );
        assert_eq!(stack.ch.number(&q).await as u64, 1, "{rid}");
    }

    // Another developer sees none of it.
    let (_, other, _) = stack.developer("other@example.com").await;
    let b = stack.batch(&key, batch_id).await;
    for path in [
        format!("/v1/batches/{batch_id}"),
        format!("/v1/files/{}", b["output_file_id"].as_str().unwrap()),
        format!(
            "/v1/files/{}/content",
            b["output_file_id"].as_str().unwrap()
        ),
    ] {
        expect_error(stack.gw.get(&other, &path).await, 404, "not_found").await;
    }
    let r = stack
        .gw
        .post(&other, &format!("/v1/batches/{batch_id}/cancel"))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found").await;
    let list: Value = stack
        .gw
        .get(&other, "/v1/batches")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]));
    let files: Value = stack
        .gw
        .get(&other, "/v1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(files["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_sqlite() {
    sdk_round_trip(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_postgres() {
    sdk_round_trip(Backend::Postgres).await;
}

/// Kills (SIGKILL) a worker node mid-batch; the batch completes with every item exactly once
/// in the output and in ClickHouse. PostgreSQL: a second node takes the dead one's items over.
/// SQLite: the node restarts and takes its own dead leases over.
async fn takeover(backend: Backend) {
    let mut stack = Stack::start(
        backend,
        &["--latency", "100ms"],
        "  per_developer_concurrency: 16\n",
        None,
    )
    .await;
    if backend == Backend::Postgres {
        stack.start_admin(false);
    }
    let (_, key, _) = stack.developer("kill@example.com").await;
    let file = stack.upload(&key, &jsonl(300, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    let b = stack.ended_at_least(&key, &id, 60).await;
    assert_eq!(b["status"], "in_progress", "{b}");
    signal(stack.admins[0].pid(), "KILL");
    let killed_at = Instant::now();
    if backend == Backend::Sqlite {
        // The gateway forwards to this port: the restarted node serves the API again.
        let dead = stack.admins.remove(0);
        drop(dead);
        stack.start_admin(true);
    } else {
        // The survivor works on; API calls go through the gateway to the dead node's port,
        // so status is read from the database meanwhile.
    }
    let b = if backend == Backend::Sqlite {
        stack.finished(&key, &id, Duration::from_secs(120)).await
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        let store =
            aihub_store::Store::connect(&aihub_store::StoreOptions::new(&stack.database_url))
                .await
                .unwrap();
        loop {
            let t = aihub_store::tasks::get(&store, None, &id).await.unwrap();
            if t.finished_at.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "batch not finished: {t:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stack.admins.remove(0);
        stack.start_admin(true);
        stack.finished(&key, &id, Duration::from_secs(20)).await
    };
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 300, "completed": 300, "failed": 0})
    );
    assert!(
        killed_at.elapsed() > Duration::from_secs(2),
        "the dead leases were waited out"
    );
    let out = stack.lines(&key, &b["output_file_id"]).await;
    let expected: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    assert_eq!(
        custom_ids(&out),
        expected,
        "every item exactly once, in order"
    );
    assert!(b["error_file_id"].is_null());
    assert_eq!(
        stack.usage_of(&id).await,
        (300, 300, 300),
        "one usage row per item"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_taken_over_sqlite() {
    takeover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_taken_over_by_another_node_postgres() {
    takeover(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_new_items_within_a_second() {
    let stack = Stack::start(
        Backend::Sqlite,
        &["--latency", "200ms"],
        "  per_developer_concurrency: 4\n",
        None,
    )
    .await;
    let (_, key, _) = stack.developer("cancel@example.com").await;
    let file = stack.upload(&key, &jsonl(400, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    stack.ended_at_least(&key, &id, 12).await;
    let r = stack
        .gw
        .post(&key, &format!("/v1/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"], "cancelling");
    assert!(b["cancelling_at"].as_i64().is_some());
    // Items in flight at the cancel finish within the mock's 200 ms; nothing starts after.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let q = format!("SELECT count() FROM usage_events WHERE batch_id = '{id}'");
    let settled = stack.ch.number(&q).await as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = stack.ch.number(&q).await as u64;
    assert_eq!(settled, later, "no item started after the cancel");
    let b = stack.finished(&key, &id, Duration::from_secs(20)).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    let done = b["request_counts"]["completed"].as_i64().unwrap();
    assert!((12..60).contains(&done), "{b}");
    assert_eq!(b["request_counts"]["total"], 400);
    assert_eq!(
        stack.lines(&key, &b["output_file_id"]).await.len() as i64,
        done
    );
    assert_eq!(later as i64, done, "rows = items that ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_quota_fails_the_remaining_items() {
    let plans =
        "default_plan: free\nplans:\n  free:\n    included_tokens: 120\n    overage: false\n";
    let stack = Stack::start(
        Backend::Sqlite,
        &[],
        "  per_developer_concurrency: 1\n",
        Some(plans),
    )
    .await;
    let (_, key, _) = stack.developer("quota@example.com").await;
    let file = stack.upload(&key, &jsonl(30, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    let b = stack.finished(&key, &id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let c = &b["request_counts"];
    let (ok, failed) = (
        c["completed"].as_i64().unwrap(),
        c["failed"].as_i64().unwrap(),
    );
    assert!(ok >= 1 && failed >= 1 && ok + failed == 30, "{b}");
    let errors = stack.lines(&key, &b["error_file_id"]).await;
    assert_eq!(errors.len() as i64, failed);
    for e in &errors {
        let code = e["response"]["body"]["error"]["code"]
            .as_str()
            .or(e["error"]["code"].as_str());
        assert_eq!(code, Some("insufficient_quota"), "{e}");
    }
    let out = stack.lines(&key, &b["output_file_id"]).await;
    let mut all = custom_ids(&out);
    all.extend(custom_ids(&errors));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 30, "every item once, in one file or the other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_its_batch() {
    let stack = Stack::start(
        Backend::Sqlite,
        &["--latency", "100ms"],
        "  per_developer_concurrency: 4\n",
        None,
    )
    .await;
    let (session, key, key_id) = stack.developer("revoke@example.com").await;
    let file = stack.upload(&key, &jsonl(300, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    // Read as another key of the same developer: the batch's own key is about to go.
    let (reader, _) = stack
        .admin()
        .create_key(&session, json!({"name": "reader"}))
        .await;
    stack.ended_at_least(&key, &id, 8).await;
    let (s, _) = stack
        .admin()
        .call(
            "DELETE",
            &format!("/developer/keys/{key_id}"),
            Some(&session),
            None,
        )
        .await;
    assert!(s == 200 || s == 204, "{s}");
    let b = stack.finished(&reader, &id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "failed", "{b}");
    let c = &b["request_counts"];
    assert!(c["completed"].as_i64().unwrap() < 300, "{b}");
    assert_eq!(
        c["completed"].as_i64().unwrap() + c["failed"].as_i64().unwrap(),
        300
    );
    let errors = stack.lines(&reader, &b["error_file_id"]).await;
    assert!(errors.iter().all(|e| {
        let code = e["response"]["body"]["error"]["code"]
            .as_str()
            .or(e["error"]["code"].as_str())
            .unwrap_or("");
        code == "invalid_api_key" || code == "api_key_disabled"
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_tasks_generate_and_export() {
    let stack = Stack::start(Backend::Sqlite, &[], "", None).await;
    let (session, key, _) = stack.developer("tasks@example.com").await;
    let a = stack.admin();
    let (s, t) = a
        .call(
            "POST",
            "/developer/tasks",
            Some(&session),
            Some(json!({"type": "batch_generate", "model": "demo", "prompts": ["a", "b", "c"], "options": {"max_tokens": 8}})),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    assert_eq!(t["status"], "pending");
    let id = t["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("task_"));
    let t = task_completed(a, &session, &id).await;
    assert_eq!(t["progress"], 100);
    assert_eq!(
        t["counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    let result = client()
        .get(format!("{}{}", a.base, t["result_url"].as_str().unwrap()))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    let text = result.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(custom_ids(&lines), ["item-1", "item-2", "item-3"]);
    assert_eq!(lines[0]["response"]["status_code"], 200);
    assert_eq!(
        stack.usage_of(&id).await,
        (3, 3, 3),
        "metered with the task's id"
    );

    // A usage export of this month, as CSV.
    let (s, t) = a
        .call(
            "POST",
            "/developer/tasks",
            Some(&session),
            Some(json!({"type": "usage_export"})),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let export = t["id"].as_str().unwrap().to_owned();
    let t = task_completed(a, &session, &export).await;
    let csv = client()
        .get(format!("{}{}", a.base, t["result_url"].as_str().unwrap()))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("request_id,timestamp,key_id,"), "{csv}");
    assert_eq!(
        csv.lines().count(),
        4,
        "header and the three generated requests: {csv}"
    );

    // Listing, filters, a finished task's cancel, bad input, the events.
    let (_, list) = a
        .call(
            "GET",
            "/developer/tasks?status=completed",
            Some(&session),
            None,
        )
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let (_, list) = a
        .call(
            "GET",
            "/developer/tasks?type=usage_export",
            Some(&session),
            None,
        )
        .await;
    assert_eq!(list["data"][0]["id"], export.as_str());
    let (s, e) = a
        .call(
            "POST",
            &format!("/developer/tasks/{id}/cancel"),
            Some(&session),
            None,
        )
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, e) = a
        .call(
            "POST",
            "/developer/tasks",
            Some(&session),
            Some(json!({"type": "batch_generate", "model": "demo"})),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("validation_failed")),
        "{e}"
    );
    let (s, _) = a
        .call("GET", "/developer/tasks?status=nope", Some(&session), None)
        .await;
    assert_eq!(s, 422);
    let (_, events) = a
        .call(
            "GET",
            "/developer/events?type=task.completed",
            Some(&session),
            None,
        )
        .await;
    let tasks: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["task_id"].as_str().unwrap())
        .collect();
    assert!(
        tasks.contains(&id.as_str()) && tasks.contains(&export.as_str()),
        "{events}"
    );
    let (_, events) = a
        .call("GET", "/developer/events?limit=100", Some(&session), None)
        .await;
    for e in events["data"].as_array().unwrap() {
        aihub_webhooks::catalogue::conforms(e).unwrap_or_else(|m| panic!("{m}: {e}"));
    }
    // Another developer's task is not there.
    let other = a.sign_up("tasks-other@example.com").await;
    let (s, _) = a
        .call("GET", &format!("/developer/tasks/{id}"), Some(&other), None)
        .await;
    assert_eq!(s, 404);
    let _ = key;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_items() {
    let stack = Stack::start(
        Backend::Sqlite,
        &[],
        "  concurrency: 64\n  per_developer_concurrency: 64\n",
        None,
    )
    .await;
    let (_, key, _) = stack.developer("big@example.com").await;
    // About 3.5 MB: past axum's default 2 MB body limit, which uploads do not have.
    let padding = "x".repeat(200);
    let input: String = (0..10_000)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "demo", "messages": [{"role": "user", "content": format!("item {i} {padding}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(input.len() > 3_000_000);
    let file = stack.upload(&key, &input).await;
    let started = Instant::now();
    let id = stack.create_batch(&key, &file).await;
    let b = stack.finished(&key, &id, Duration::from_secs(600)).await;
    let took = started.elapsed();
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 10000, "completed": 10000, "failed": 0})
    );
    let out = stack.lines(&key, &b["output_file_id"]).await;
    assert_eq!(out.len(), 10_000);
    assert_eq!(stack.usage_of(&id).await, (10_000, 10_000, 10_000));
    eprintln!(
        "10,000 items in {took:?} ({:.0} items/s, debug build)",
        10_000.0 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_big_batch_does_not_starve_another_developer() {
    let stack = Stack::start(
        Backend::Sqlite,
        &["--latency", "100ms"],
        "  concurrency: 16\n  per_developer_concurrency: 8\n",
        None,
    )
    .await;
    let (_, big, _) = stack.developer("big-batch@example.com").await;
    let (_, small, _) = stack.developer("small-batch@example.com").await;
    let file = stack.upload(&big, &jsonl(1000, "demo")).await;
    let big_id = stack.create_batch(&big, &file).await;
    stack.ended_at_least(&big, &big_id, 16).await;
    let file = stack.upload(&small, &jsonl(16, "demo")).await;
    let started = Instant::now();
    let small_id = stack.create_batch(&small, &file).await;
    let b = stack
        .finished(&small, &small_id, Duration::from_secs(30))
        .await;
    let took = started.elapsed();
    assert_eq!(b["status"], "completed");
    // 16 items at 8 in flight and 100 ms each: about 0.2 s of work; waiting behind the big
    // batch's 1,000 items would take more than 6 s.
    assert!(
        took < Duration::from_secs(4),
        "the small batch waited {took:?}"
    );
    let big_now = stack.batch(&big, &big_id).await;
    assert_eq!(big_now["status"], "in_progress", "{big_now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_as_openai_does() {
    let stack = Stack::start(Backend::Sqlite, &[], "  max_file_bytes: 2000\n", None).await;
    let (_, key, _) = stack.developer("checks@example.com").await;
    let file = stack.upload(&key, &jsonl(3, "demo")).await;
    let create = |body: Value| {
        let (gw, key) = (&stack.gw, &key);
        async move {
            gw.post(key, "/v1/batches")
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    for (body, param) in [
        (
            json!({"input_file_id": file, "endpoint": "/v1/images/generations", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"k": 1}}),
            "metadata",
        ),
    ] {
        let e = expect_error(create(body).await, 422, "validation_failed").await;
        assert_eq!(e["param"], param, "{e}");
    }
    // Uploads: the size limit (413), the purpose, an empty file.
    let r = client()
        .post(stack.gw.url("/v1/files"))
        .bearer_auth(&key)
        .header("content-type", "multipart/form-data; boundary=b")
        .body(format!(
            "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n{}\r\n--b--\r\n",
            jsonl(40, "demo")
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "file_too_large").await;
    let r = client()
        .post(stack.gw.url("/v1/files"))
        .bearer_auth(&key)
        .header("content-type", "multipart/form-data; boundary=b")
        .body("--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n{}\r\n--b--\r\n")
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 422, "validation_failed").await;
    assert_eq!(e["param"], "purpose");
    // A key declared in the gateway's YAML has no account to own files.
    let r = stack.gw.get(&stack.yaml_key.key, "/v1/files").await;
    let e = expect_error(r, 403, "permission_denied").await;
    assert!(
        e["message"].as_str().unwrap().contains("developer portal"),
        "{e}"
    );
    // The admin's internal routes refuse anyone but the gateway.
    let r = client()
        .get(format!("{}/internal/v1/files", stack.admin().base))
        .header("x-aihub-key-id", "key_x")
        .header("x-aihub-developer-id", "dev_x")
        .header("x-aihub-identity-ts", aihub_store::now_ms().to_string())
        .header("x-aihub-identity-sig", "00".repeat(32))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_internal_identity").await;
    // A file that fails validation: the batch fails with line numbers, as OpenAI reports.
    let bad = format!("{}\n{{broken\n", jsonl(1, "demo"));
    let file = stack.upload(&key, &bad).await;
    let id = stack.create_batch(&key, &file).await;
    let b = stack.finished(&key, &id, Duration::from_secs(20)).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["errors"]["data"][0]["line"], 2);
    assert_eq!(b["errors"]["data"][0]["code"], "invalid_json_line");
    assert_eq!(b["request_counts"]["total"], 0);
}

/// The same journey with files in an S3-compatible bucket (moto's S3 server on loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_with_files_in_s3() {
    let moto = test_tool("AIHUB_TEST_MOTO", "moto_server");
    let port = free_port();
    let mut child = std::process::Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{moto}: {e} (source deploy/local/test-tools.sh)"));
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client()
        .put(format!("{url}/batch-files"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin process inherits these (the credentials never go into YAML).
    std::env::set_var("AIHUB_S3_ACCESS_KEY_ID", "test-key");
    std::env::set_var("AIHUB_S3_SECRET_ACCESS_KEY", "test-secret");
    let s3 = format!(
        "  s3: {{bucket: batch-files, endpoint: \"{url}\", allow_http: true, prefix: aihub}}\n"
    );
    let stack = Stack::start(Backend::Sqlite, &[], &s3, None).await;
    let (_, key, _) = stack.developer("s3@example.com").await;
    let file = stack.upload(&key, &jsonl(5, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    let b = stack.finished(&key, &id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let out = stack.lines(&key, &b["output_file_id"]).await;
    assert_eq!(custom_ids(&out), ["c0", "c1", "c2", "c3", "c4"]);
    // The bytes are in the bucket, under the prefix and the developer.
    let listing = client()
        .get(format!("{url}/batch-files?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let output = b["output_file_id"].as_str().unwrap();
    assert!(listing.contains(&format!("/{file}</Key>")), "{listing}");
    assert!(listing.contains(&format!("/{output}</Key>")), "{listing}");
    assert!(listing.contains("<Key>aihub/dev_"), "{listing}");
    // Deleting a file removes its object.
    let r = client()
        .delete(stack.gw.url(&format!("/v1/files/{file}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listing = client()
        .get(format!("{url}/batch-files?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains(&format!("/{file}</Key>")), "{listing}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_show_and_cancel_with_the_cli() {
    let stack = Stack::start(
        Backend::Sqlite,
        &["--latency", "200ms"],
        "  per_developer_concurrency: 1\n",
        None,
    )
    .await;
    let (_, key, _) = stack.developer("cli-ops@example.com").await;
    let file = stack.upload(&key, &jsonl(50, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    stack.ended_at_least(&key, &id, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("admin.yaml");
    std::fs::write(
        &config,
        format!("database: {{url: \"{}\"}}\n", stack.database_url),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let aihub = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .args(["--admin-config", &config])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = aihub(&[
        "tasks",
        "list",
        "--developer",
        "cli-ops@example.com",
        "--type",
        "openai_batch",
    ]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "in_progress");
    let (code, _, err) = aihub(&["tasks", "list", "--status", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown status `nope`"), "{err}");
    let (code, out, err) = aihub(&["tasks", "cancel", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("cancelling {id}")), "{out}");
    let b = stack.finished(&key, &id, Duration::from_secs(20)).await;
    assert_eq!(b["status"], "cancelled");
    let (code, out, _) = aihub(&["tasks", "show", &id]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["status"],
        "cancelled"
    );
    let (code, _, err) = aihub(&["tasks", "cancel", &id]);
    assert_ne!(code, 0, "a finished batch cannot be cancelled");
    assert!(
        err.contains("Cannot cancel a batch with status cancelled"),
        "{err}"
    );
    // The operator's cancel is in the audit log, as the CLI.
    let store = aihub_store::Store::connect(&aihub_store::StoreOptions::new(&stack.database_url))
        .await
        .unwrap();
    let audit = aihub_store::audit::list(&store, Some(&id), None, 10)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].actor_id.as_str(), audit[0].action.as_str()),
        ("cli", "task.cancel")
    );
}

/// A batch on a rate-limited plan waits the limit out (`Retry-After`) instead of failing, and
/// its developer is paused meanwhile instead of hammering the gateway with refused attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_batch_waits_instead_of_failing() {
    let plans = "default_plan: free\nplans:\n  free:\n    overage: true\n    requests_per_minute: 60\n    request_burst: 2\n";
    let stack = Stack::start(
        Backend::Sqlite,
        &[],
        "  per_developer_concurrency: 8\n",
        Some(plans),
    )
    .await;
    let (_, key, _) = stack.developer("limited@example.com").await;
    let file = stack.upload(&key, &jsonl(6, "demo")).await;
    let id = stack.create_batch(&key, &file).await;
    // Polled in the database: polling through the gateway would spend the developer's limit.
    let store = aihub_store::Store::connect(&aihub_store::StoreOptions::new(&stack.database_url))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = loop {
        let t = aihub_store::tasks::get(&store, None, &id).await.unwrap();
        if t.finished_at.is_some() {
            break t;
        }
        assert!(Instant::now() < deadline, "{t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(t.status, "completed", "{t:?}");
    assert_eq!((t.total, t.completed, t.failed), (6, 6, 0));
    let q = format!(
        "SELECT countIf(status = 200), countIf(status = 429) FROM usage_events WHERE batch_id = '{id}'"
    );
    let mut counts = String::new();
    for _ in 0..40 {
        counts = stack.ch.query(&q).await;
        if counts.starts_with("6\t") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused: u64 = counts.trim().split('\t').nth(1).unwrap().parse().unwrap();
    assert!(counts.starts_with("6\t"), "{counts}");
    // The setup's calls spent the burst, so the first claim of all six meets the limit; from
    // then on the answers' rate-limit headers pace the items (one per second) and nothing more
    // is refused. Without the pacing, every retry round refused all but one (21 refusals).
    let rows = stack
        .ch
        .query(&format!(
            "SELECT ts_ms, status, error_type FROM usage_events WHERE batch_id = '{id}' ORDER BY ts_ms"
        ))
        .await;
    eprintln!("{refused} refused attempts:\n{rows}");
    assert!(refused <= 6, "{refused} refused attempts:\n{rows}");
}
