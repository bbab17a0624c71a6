//! The durable queue and the task lifecycle on real SQLite and PostgreSQL databases: fair,
//! capped claims; a dead worker's leases taken over and its late results dropped; a cancel
//! that ends queued items at once; the completion window's expiry through to an `expired`
//! batch with its error file; validation failures with line numbers.

use std::sync::Arc;

use aihub_store::queue::{self, ItemResult, NewItem, Outcome};
use aihub_store::tasks::{self, NewTask};
use aihub_store::testing::{imported, Backend, TestDatabase, BACKENDS};
use aihub_store::{now_ms, Store};
use aihub_tasks::files::{object_name, FileStore, LocalDir};
use aihub_tasks::stage::{self, Exporter, StageCtx};
use aihub_tasks::TasksConfig;
use serde_json::{json, Value};

struct NoExports;

#[async_trait::async_trait]
impl Exporter for NoExports {
    async fn export(
        &self,
        _: &str,
        _: &Value,
        _: &mut aihub_tasks::files::Writer,
    ) -> Result<(), String> {
        Err("no usage database".into())
    }
}

struct Env {
    _db: TestDatabase,
    store: Store,
    _dir: tempfile::TempDir,
    files: Arc<dyn FileStore>,
}

async fn env(backend: Backend) -> Env {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let files: Arc<dyn FileStore> = Arc::new(LocalDir::new(dir.path()).unwrap());
    Env {
        _db: db,
        store,
        _dir: dir,
        files,
    }
}

fn ctx(e: &Env, owner: &str) -> StageCtx {
    StageCtx {
        store: e.store.clone(),
        files: Arc::clone(&e.files),
        config: TasksConfig::default(),
        exporter: Arc::new(NoExports),
        owner: owner.into(),
    }
}

/// A task in progress with `n` queued items, created directly in the store.
async fn running_task(store: &Store, dev: &str, id: &str, n: i64) {
    let mut tx = store.begin_write().await.unwrap();
    tasks::insert(
        &mut tx,
        &NewTask {
            id,
            developer_id: dev,
            key_id: None,
            kind: tasks::BATCH_GENERATE,
            endpoint: Some("/v1/chat/completions"),
            input: &json!({}),
            metadata: None,
            input_file_id: None,
            expires_at: now_ms() + 86_400_000,
        },
    )
    .await
    .unwrap();
    let bodies: Vec<String> = (0..n).map(|i| format!("{{\"n\":{i}}}")).collect();
    let ids: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let items: Vec<NewItem<'_>> = (0..n as usize)
        .map(|i| NewItem {
            line: i as i64 + 1,
            custom_id: &ids[i],
            body: &bodies[i],
        })
        .collect();
    queue::insert(&mut tx, id, dev, &items).await.unwrap();
    sqlx::query(
        "UPDATE tasks SET status = 'in_progress', total = $2, stage_due_at = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(n)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

fn ok(task: &str, line: i64) -> ItemResult {
    ItemResult {
        task_id: task.into(),
        line,
        outcome: Outcome::Succeeded(format!("{{\"custom_id\":\"c{}\"}}", line - 1)),
    }
}

#[tokio::test]
async fn claims_are_fair_capped_and_taken_over_after_a_dead_lease() {
    for backend in BACKENDS {
        let e = env(backend).await;
        imported(&e.store, "dev_big", "free", 0).await;
        imported(&e.store, "dev_small", "free", 0).await;
        running_task(&e.store, "dev_big", "task_big", 100).await;
        running_task(&e.store, "dev_small", "task_small", 3).await;

        // A developer paused by a rate limit is skipped; a probing one gets one item.
        let probe = queue::claim(
            &e.store,
            "w0",
            now_ms() + 30_000,
            4,
            50,
            &[("dev_big", 1), ("dev_small", 0)],
        )
        .await
        .unwrap();
        assert_eq!(probe.len(), 1, "{backend:?}");
        assert_eq!(probe[0].developer_id, "dev_big");
        let back = ItemResult {
            task_id: probe[0].task_id.clone(),
            line: probe[0].line,
            outcome: Outcome::Retry {
                at: now_ms(),
                counts: false,
            },
        };
        queue::finish(&e.store, "w0", &[back]).await.unwrap();
        // Both developers get items; neither passes the cap of 4 in flight.
        let first = queue::claim(&e.store, "w1", now_ms() + 30_000, 4, 50, &[])
            .await
            .unwrap();
        let per = |list: &[queue::Claimed], dev: &str| {
            list.iter().filter(|c| c.developer_id == dev).count()
        };
        assert_eq!(
            (per(&first, "dev_big"), per(&first, "dev_small")),
            (4, 3),
            "{backend:?}"
        );
        assert!(first.iter().all(|c| c.endpoint == "chat/completions"));
        // At the cap: nothing more for either until something ends.
        let more = queue::claim(&e.store, "w2", now_ms() + 30_000, 4, 50, &[])
            .await
            .unwrap();
        assert_eq!(
            per(&more, "dev_big"),
            0,
            "{backend:?}: the cap holds across workers"
        );
        assert_eq!(per(&more, "dev_small"), 0);

        // A worker that died: its leases expire and another worker takes the items over.
        let dead = queue::claim(&e.store, "dead", now_ms() - 1, 4, 50, &[])
            .await
            .unwrap();
        assert!(
            dead.is_empty(),
            "the cap counts only live leases, and w1's are live"
        );
        sqlx::query("UPDATE task_items SET lease_until = $1 WHERE lease_owner = 'w1'")
            .bind(now_ms() - 1)
            .execute(e.store.pool())
            .await
            .unwrap();
        let taken = queue::claim(&e.store, "w2", now_ms() + 30_000, 4, 50, &[])
            .await
            .unwrap();
        assert_eq!(
            taken.len(),
            7,
            "{backend:?}: every expired lease taken over"
        );
        // The dead worker's late result is dropped; the new holder's is recorded once.
        let late = queue::finish(&e.store, "w1", &[ok("task_small", 1)])
            .await
            .unwrap();
        assert_eq!(late, 0);
        let results: Vec<ItemResult> = (1..=3).map(|l| ok("task_small", l)).collect();
        assert_eq!(queue::finish(&e.store, "w2", &results).await.unwrap(), 3);
        assert_eq!(
            queue::finish(&e.store, "w2", &results).await.unwrap(),
            0,
            "once"
        );
        let t = tasks::get(&e.store, None, "task_small").await.unwrap();
        assert_eq!(
            (t.completed, t.status.as_str()),
            (3, tasks::FINALIZING),
            "{backend:?}"
        );

        // A cancel ends every queued item at once; leased ones finish.
        let mut tx = e.store.begin_write().await.unwrap();
        let (t, _) = tasks::request_cancel(&mut tx, Some("dev_big"), "task_big")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(t.status, tasks::CANCELLING);
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM task_items WHERE task_id = 'task_big' AND next_at IS NOT NULL",
        )
        .fetch_one(e.store.pool())
        .await
        .unwrap();
        assert_eq!(left, 4, "{backend:?}: only w2's four leased items remain");
        assert!(queue::claim(&e.store, "w3", now_ms() + 30_000, 4, 50, &[])
            .await
            .unwrap()
            .is_empty());
        let mut tx = e.store.begin_write().await.unwrap();
        let (_, again) = tasks::request_cancel(&mut tx, None, "task_small")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            again,
            tasks::CancelOutcome::Finished,
            "finalizing is past cancelling"
        );
    }
}

#[tokio::test]
async fn the_completion_window_expires_a_batch() {
    for backend in BACKENDS {
        let e = env(backend).await;
        imported(&e.store, "dev_x", "free", 0).await;
        running_task(&e.store, "dev_x", "batch_x", 5).await;
        let claimed = queue::claim(&e.store, "w", now_ms() + 30_000, 2, 2, &[])
            .await
            .unwrap();
        let done: Vec<ItemResult> = claimed.iter().map(|c| ok(&c.task_id, c.line)).collect();
        queue::finish(&e.store, "w", &done).await.unwrap();
        sqlx::query("UPDATE tasks SET expires_at = 0 WHERE id = 'batch_x'")
            .execute(e.store.pool())
            .await
            .unwrap();
        assert_eq!(stage::expire(&e.store, 10).await.unwrap(), 1);
        let due = tasks::claim_stage(&e.store, "w", now_ms() + 30_000, 4)
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "{backend:?}");
        stage::run(&ctx(&e, "w"), &due[0]).await.unwrap();
        let t = tasks::get(&e.store, None, "batch_x").await.unwrap();
        assert_eq!(t.status, tasks::EXPIRED, "{backend:?}");
        assert_eq!((t.completed, t.failed, t.total), (2, 3, 5));
        let errors =
            aihub_store::files::get(&e.store, "dev_x", t.error_file_id.as_deref().unwrap())
                .await
                .unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            &mut e.files.open(&errors.location).await.unwrap(),
            &mut text,
        )
        .await
        .unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(lines
            .iter()
            .all(|l| l["error"]["code"] == "batch_expired" && l["response"].is_null()));
        assert_eq!(lines[0]["custom_id"], "c2", "line order");
        // Its `task.failed` event is in the outbox with the batch's status.
        let events = aihub_store::outbox::for_developer(&e.store, "dev_x")
            .await
            .unwrap();
        let end = events
            .iter()
            .find(|ev| ev.event_type == "task.failed")
            .unwrap();
        assert_eq!(
            end.payload["data"]["status"], "failed",
            "a seed task shows the seed status"
        );
    }
}

#[tokio::test]
async fn invalid_input_fails_the_batch_with_line_numbers() {
    for backend in BACKENDS {
        let e = env(backend).await;
        imported(&e.store, "dev_v", "free", 0).await;
        let good = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}});
        let text = format!(
            "{good}\nnot json\n{}\n",
            json!({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}})
        );
        let mut w = e
            .files
            .create(&object_name("dev_v", "file-in"), 1 << 20)
            .await
            .unwrap();
        w.write(text.as_bytes()).await.unwrap();
        let written = w.commit().await.unwrap();
        let mut tx = e.store.begin_write().await.unwrap();
        aihub_store::files::insert(
            &mut tx,
            &aihub_store::files::FileRecord {
                id: "file-in".into(),
                developer_id: "dev_v".into(),
                purpose: "batch".into(),
                filename: "in.jsonl".into(),
                bytes: written.bytes as i64,
                sha256: written.sha256,
                location: object_name("dev_v", "file-in"),
                created_at: now_ms(),
                expires_at: None,
            },
        )
        .await
        .unwrap();
        tasks::insert(
            &mut tx,
            &NewTask {
                id: "batch_v",
                developer_id: "dev_v",
                key_id: None,
                kind: tasks::OPENAI_BATCH,
                endpoint: Some("/v1/chat/completions"),
                input: &json!({}),
                metadata: None,
                input_file_id: Some("file-in"),
                expires_at: now_ms() + 86_400_000,
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let due = tasks::claim_stage(&e.store, "w", now_ms() + 30_000, 4)
            .await
            .unwrap();
        stage::run(&ctx(&e, "w"), &due[0]).await.unwrap();
        let t = tasks::get(&e.store, None, "batch_v").await.unwrap();
        assert_eq!(t.status, tasks::FAILED, "{backend:?}");
        assert_eq!(t.total, 0);
        let errors = t.errors.unwrap();
        let got: Vec<(String, i64)> = errors
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["code"].as_str().unwrap().to_owned(),
                    e["line"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("invalid_json_line".to_owned(), 2),
                ("invalid_url".to_owned(), 3)
            ]
        );
        let batch = aihub_tasks::openai::batch_object(
            &tasks::get(&e.store, None, "batch_v").await.unwrap(),
        );
        assert_eq!(batch["errors"]["object"], "list");
        assert_eq!(batch["errors"]["data"][0]["line"], 2);
        assert!(batch["failed_at"].as_i64().is_some());
    }
}

#[tokio::test]
async fn retention_removes_the_bytes_of_expired_and_deleted_files() {
    for backend in BACKENDS {
        let e = env(backend).await;
        imported(&e.store, "dev_r", "free", 0).await;
        let now = now_ms();
        for (id, expires) in [
            ("file-old", Some(now - 1)),
            ("file-new", Some(now + 60_000)),
            ("file-gone", None),
        ] {
            let location = object_name("dev_r", id);
            let mut w = e.files.create(&location, 1 << 10).await.unwrap();
            w.write(b"{}\n").await.unwrap();
            let written = w.commit().await.unwrap();
            let mut tx = e.store.begin_write().await.unwrap();
            aihub_store::files::insert(
                &mut tx,
                &aihub_store::files::FileRecord {
                    id: id.into(),
                    developer_id: "dev_r".into(),
                    purpose: "batch".into(),
                    filename: format!("{id}.jsonl"),
                    bytes: written.bytes as i64,
                    sha256: written.sha256,
                    location,
                    created_at: now,
                    expires_at: expires,
                },
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        // Deleted by its owner: the record goes at once, the bytes with the sweep.
        aihub_store::files::mark_deleted(&e.store, "dev_r", "file-gone")
            .await
            .unwrap();
        assert_eq!(
            stage::sweep_files(&e.store, &*e.files, 100).await.unwrap(),
            2,
            "{backend:?}"
        );
        for id in ["file-old", "file-gone"] {
            assert!(
                e.files.open(&object_name("dev_r", id)).await.is_err(),
                "{id}'s bytes"
            );
            assert!(
                aihub_store::files::get(&e.store, "dev_r", id)
                    .await
                    .is_err(),
                "{id} is gone"
            );
        }
        assert!(e
            .files
            .open(&object_name("dev_r", "file-new"))
            .await
            .is_ok());
        assert_eq!(
            stage::sweep_files(&e.store, &*e.files, 100).await.unwrap(),
            0,
            "nothing twice"
        );
    }
}
