//! Async tasks and OpenAI batches (`tasks`): their lifecycle, counts and task-level work.
//!
//! One lifecycle serves every kind, with OpenAI's batch statuses: `validating` (the input is
//! read and expanded into items, or an export runs) → `in_progress` (items run, see
//! [`crate::queue`]) → `finalizing` (output and error files written) → `completed`, `failed`,
//! `expired`; a cancel goes through `cancelling` to `cancelled`. The seed's task statuses
//! (`pending|running|completed|failed|cancelled`) are derived from it ([`seed_status`]).
//!
//! Task-level work (validation, an export, finalizing) is due when `stage_due_at` is set and is
//! leased like items: [`claim_stage`] hands a due task to one worker until its lease ends; a
//! worker that dies leaves it to the next. [`finish`] ends a task and writes its
//! `task.completed|failed|cancelled` event in the same transaction.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::{now_ms, outbox, Dialect, Result, Store, StoreError};

pub const VALIDATING: &str = "validating";
pub const IN_PROGRESS: &str = "in_progress";
pub const FINALIZING: &str = "finalizing";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";
pub const EXPIRED: &str = "expired";
pub const CANCELLING: &str = "cancelling";
pub const CANCELLED: &str = "cancelled";

/// Kinds of task.
pub const OPENAI_BATCH: &str = "openai_batch";
pub const BATCH_GENERATE: &str = "batch_generate";
pub const USAGE_EXPORT: &str = "usage_export";

/// The seed's status of a lifecycle status.
pub fn seed_status(status: &str) -> &'static str {
    match status {
        VALIDATING => "pending",
        IN_PROGRESS | FINALIZING | CANCELLING => "running",
        COMPLETED => "completed",
        CANCELLED => "cancelled",
        _ => "failed",
    }
}

/// Lifecycle statuses matching a seed status filter.
pub fn statuses_of_seed(seed: &str) -> Option<&'static [&'static str]> {
    Some(match seed {
        "pending" => &[VALIDATING],
        "running" => &[IN_PROGRESS, FINALIZING, CANCELLING],
        "completed" => &[COMPLETED],
        "failed" => &[FAILED, EXPIRED],
        "cancelled" => &[CANCELLED],
        _ => return None,
    })
}

/// Whether a status is final.
pub fn is_final(status: &str) -> bool {
    matches!(status, COMPLETED | FAILED | EXPIRED | CANCELLED)
}

/// A task or batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub id: String,
    pub developer_id: String,
    pub key_id: Option<String>,
    pub kind: String,
    pub endpoint: Option<String>,
    pub status: String,
    /// What the task was asked to do (its request, JSON).
    pub input: serde_json::Value,
    pub metadata: Option<serde_json::Value>,
    pub input_file_id: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    /// Validation errors (`[{code, message, param, line}]`).
    pub errors: Option<serde_json::Value>,
    /// Why the task failed.
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub expires_at: i64,
    pub cancel_requested_at: Option<i64>,
}

impl Task {
    /// Percent of items ended (0–100); 100 once finished.
    pub fn progress(&self) -> i64 {
        if self.finished_at.is_some() {
            100
        } else if self.total == 0 {
            0
        } else {
            ((self.completed + self.failed) * 100 / self.total).min(99)
        }
    }
}

pub(crate) const COLUMNS: &str = "id, developer_id, key_id, kind, endpoint, status, input, \
    metadata, input_file_id, output_file_id, error_file_id, total, completed, failed, errors, \
    error, created_at, updated_at, in_progress_at, finalizing_at, finished_at, expires_at, \
    cancel_requested_at";

fn json(r: &sqlx::any::AnyRow, col: &str) -> Result<Option<serde_json::Value>> {
    let text: Option<String> = r.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<Task> {
    Ok(Task {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        key_id: r.try_get("key_id")?,
        kind: r.try_get("kind")?,
        endpoint: r.try_get("endpoint")?,
        status: r.try_get("status")?,
        input: json(r, "input")?.unwrap_or(serde_json::Value::Null),
        metadata: json(r, "metadata")?,
        input_file_id: r.try_get("input_file_id")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        total: r.try_get("total")?,
        completed: r.try_get("completed")?,
        failed: r.try_get("failed")?,
        errors: json(r, "errors")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        in_progress_at: r.try_get("in_progress_at")?,
        finalizing_at: r.try_get("finalizing_at")?,
        finished_at: r.try_get("finished_at")?,
        expires_at: r.try_get("expires_at")?,
        cancel_requested_at: r.try_get("cancel_requested_at")?,
    })
}

/// What creating a task records.
pub struct NewTask<'a> {
    pub id: &'a str,
    pub developer_id: &'a str,
    pub key_id: Option<&'a str>,
    pub kind: &'a str,
    pub endpoint: Option<&'a str>,
    pub input: &'a serde_json::Value,
    pub metadata: Option<&'a serde_json::Value>,
    pub input_file_id: Option<&'a str>,
    pub expires_at: i64,
}

/// Creates a task in `validating`, its first stage due now.
pub async fn insert(conn: &mut AnyConnection, t: &NewTask<'_>) -> Result<Task> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO tasks (id, developer_id, key_id, kind, endpoint, status, input, metadata, \
         input_file_id, total, completed, failed, created_at, updated_at, expires_at, \
         stage_due_at) VALUES ($1, $2, $3, $4, $5, 'validating', $6, $7, $8, 0, 0, 0, $9, $9, \
         $10, $9)",
    )
    .bind(t.id)
    .bind(t.developer_id)
    .bind(t.key_id)
    .bind(t.kind)
    .bind(t.endpoint)
    .bind(t.input.to_string())
    .bind(t.metadata.map(|m| m.to_string()))
    .bind(t.input_file_id)
    .bind(now)
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    get_on(conn, None, t.id).await
}

/// A task; with `developer_id`, only that developer's (`NotFound` otherwise).
pub async fn get(store: &Store, developer_id: Option<&str>, id: &str) -> Result<Task> {
    let mut conn = store.pool().acquire().await?;
    get_on(&mut conn, developer_id, id).await
}

pub async fn get_on(
    conn: &mut AnyConnection,
    developer_id: Option<&str>,
    id: &str,
) -> Result<Task> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM tasks WHERE id = $1 AND ($2 IS NULL OR developer_id = $2)"
    ))
    .bind(id)
    .bind(developer_id)
    .fetch_one(conn)
    .await?;
    from_row(&row)
}

/// Which tasks a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    /// One developer's; `None`: everyone's (operators).
    pub developer_id: Option<&'a str>,
    /// Kinds shown (empty: all).
    pub kinds: &'a [&'a str],
    /// Lifecycle statuses shown (empty: all).
    pub statuses: &'a [&'a str],
    /// Page cursor: tasks created before this id (ids are time-ordered).
    pub before: Option<&'a str>,
    pub limit: i64,
}

/// Tasks, newest first.
pub async fn list(store: &Store, f: &Filter<'_>) -> Result<Vec<Task>> {
    let mut sql = format!(
        "SELECT {COLUMNS} FROM tasks WHERE ($1 IS NULL OR developer_id = $1) \
         AND ($2 IS NULL OR id < $2)"
    );
    let mut n = 3;
    for (col, values) in [("kind", f.kinds), ("status", f.statuses)] {
        if !values.is_empty() {
            let ph: Vec<String> = (n..n + values.len()).map(|i| format!("${i}")).collect();
            sql.push_str(&format!(" AND {col} IN ({})", ph.join(", ")));
            n += values.len();
        }
    }
    sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT ${n}"));
    let mut q = sqlx::query(&sql).bind(f.developer_id).bind(f.before);
    for v in f.kinds.iter().chain(f.statuses) {
        q = q.bind(*v);
    }
    let rows = q.bind(f.limit).fetch_all(store.pool()).await?;
    rows.iter().map(from_row).collect()
}

/// Unfinished tasks per developer, for the per-developer cap on open tasks.
pub async fn count_open(conn: &mut AnyConnection, developer_id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks WHERE developer_id = $1 AND finished_at IS NULL",
    )
    .bind(developer_id)
    .fetch_one(conn)
    .await?)
}

/// What a cancel request changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Now cancelling (or already was).
    Cancelling,
    /// Already finished: nothing to cancel.
    Finished,
}

/// Requests a task's cancellation: queued items end `cancelled` now (no new item starts),
/// running ones finish; finalization is due at once when nothing runs.
pub async fn request_cancel(
    conn: &mut AnyConnection,
    developer_id: Option<&str>,
    id: &str,
) -> Result<(Task, CancelOutcome)> {
    let task = get_on(conn, developer_id, id).await?;
    if is_final(&task.status) || task.status == FINALIZING {
        return Ok((task, CancelOutcome::Finished));
    }
    if task.status == CANCELLING {
        return Ok((task, CancelOutcome::Cancelling));
    }
    let now = now_ms();
    sqlx::query(
        "UPDATE task_items SET status = 'cancelled', next_at = NULL, lease_owner = NULL, \
         lease_until = NULL, finished_at = $2 WHERE task_id = $1 AND next_at IS NOT NULL \
         AND (lease_until IS NULL OR lease_until < $2)",
    )
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let running: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM task_items WHERE task_id = $1 AND next_at IS NOT NULL",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    // A task still validating is finalized by its stage worker, which sees the request.
    let stage_due = (running == 0).then_some(now);
    sqlx::query(
        "UPDATE tasks SET status = 'cancelling', cancel_requested_at = $2, updated_at = $2, \
         stage_due_at = COALESCE(stage_due_at, $3) WHERE id = $1",
    )
    .bind(id)
    .bind(now)
    .bind(stage_due)
    .execute(&mut *conn)
    .await?;
    Ok((get_on(conn, None, id).await?, CancelOutcome::Cancelling))
}

/// Leases up to `limit` tasks whose task-level work is due to `owner` until `lease_until`.
pub async fn claim_stage(
    store: &Store,
    owner: &str,
    lease_until: i64,
    limit: i64,
) -> Result<Vec<Task>> {
    let now = now_ms();
    let lock = match store.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    let mut tx = store.begin_write().await?;
    let ids: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT id FROM tasks WHERE stage_due_at <= $1 \
         AND (lease_until IS NULL OR lease_until < $1) ORDER BY stage_due_at LIMIT $2{lock}"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in &ids {
        sqlx::query("UPDATE tasks SET lease_owner = $1, lease_until = $2 WHERE id = $3")
            .bind(owner)
            .bind(lease_until)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        out.push(get_on(&mut tx, None, id).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Checks that `owner` still holds a task's stage lease (inside the transaction that acts on
/// it): `Conflict` when another worker took it over.
pub async fn check_lease(conn: &mut AnyConnection, id: &str, owner: &str) -> Result<()> {
    let held: Option<String> = sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    if held.as_deref() != Some(owner) {
        return Err(StoreError::Conflict(format!("{id}: lease lost")));
    }
    Ok(())
}

/// The input was expanded into `total` items (already inserted in this transaction): the task
/// runs. A task cancelled meanwhile goes straight to finalizing.
pub async fn start_running(
    conn: &mut AnyConnection,
    id: &str,
    owner: &str,
    total: i64,
) -> Result<()> {
    check_lease(conn, id, owner).await?;
    let now = now_ms();
    sqlx::query(
        "UPDATE tasks SET status = CASE WHEN cancel_requested_at IS NULL THEN 'in_progress' \
         ELSE status END, total = $2, in_progress_at = $3, updated_at = $3, \
         stage_due_at = CASE WHEN cancel_requested_at IS NULL AND $2 > 0 THEN NULL ELSE $3 END, \
         lease_owner = NULL, lease_until = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(total)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if total > 0 {
        // Items of a task cancelled while it validated never start.
        sqlx::query(
            "UPDATE task_items SET status = 'cancelled', next_at = NULL, finished_at = $2 \
             WHERE task_id = $1 AND next_at IS NOT NULL AND EXISTS (SELECT 1 FROM tasks \
             WHERE id = $1 AND cancel_requested_at IS NOT NULL)",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Task-level work went wrong in a way worth another try later (e.g. the file store is
/// down): the lease ends and the stage is due again at `retry_at`.
pub async fn retry_stage(store: &Store, id: &str, owner: &str, retry_at: i64) -> Result<()> {
    sqlx::query(
        "UPDATE tasks SET stage_due_at = $3, lease_owner = NULL, lease_until = NULL \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(retry_at)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Marks every running task whose items all ended as due for finalizing (`in_progress` →
/// `finalizing`; `cancelling` stays). Returns how many.
pub async fn mark_drained(conn: &mut AnyConnection, ids: &[&str]) -> Result<u64> {
    let now = now_ms();
    let mut n = 0;
    for id in ids {
        n += sqlx::query(
            "UPDATE tasks SET status = CASE WHEN status = 'in_progress' THEN 'finalizing' \
             ELSE status END, finalizing_at = $2, updated_at = $2, stage_due_at = $2 \
             WHERE id = $1 AND status IN ('in_progress', 'cancelling') AND stage_due_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM task_items WHERE task_id = $1 AND next_at IS NOT NULL)",
        )
        .bind(*id)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    Ok(n)
}

/// Unfinished tasks past their completion window, up to `limit` (the expiry sweep).
pub async fn past_window(store: &Store, now: i64, limit: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tasks WHERE finished_at IS NULL AND expires_at < $1 \
         AND status = 'in_progress' AND error IS NULL LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(store.pool())
    .await?)
}

/// How a task ends.
#[derive(Debug, Clone, Default)]
pub struct Ending<'a> {
    pub status: &'a str,
    pub output_file_id: Option<&'a str>,
    pub error_file_id: Option<&'a str>,
    pub errors: Option<&'a serde_json::Value>,
    pub error: Option<&'a str>,
}

/// Ends a task (final status, files, counts recomputed from its items) and writes its
/// `task.*` event, in the caller's transaction. `owner` must hold the stage lease.
pub async fn finish(
    conn: &mut AnyConnection,
    id: &str,
    owner: &str,
    e: &Ending<'_>,
) -> Result<Task> {
    check_lease(conn, id, owner).await?;
    let now = now_ms();
    sqlx::query(
        "UPDATE tasks SET status = $2, output_file_id = $3, error_file_id = $4, errors = $5, \
         error = $6, finished_at = $7, updated_at = $7, stage_due_at = NULL, lease_owner = NULL, \
         lease_until = NULL, \
         completed = (SELECT COUNT(*) FROM task_items WHERE task_id = $1 AND status = 'succeeded'), \
         failed = (SELECT COUNT(*) FROM task_items WHERE task_id = $1 \
           AND status IN ('failed', 'expired')), \
         finalizing_at = COALESCE(finalizing_at, $7) WHERE id = $1",
    )
    .bind(id)
    .bind(e.status)
    .bind(e.output_file_id)
    .bind(e.error_file_id)
    .bind(e.errors.map(|v| v.to_string()))
    .bind(e.error)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let task = get_on(conn, None, id).await?;
    let event = match e.status {
        COMPLETED => "task.completed",
        CANCELLED => "task.cancelled",
        _ => "task.failed",
    };
    let status = if task.kind == OPENAI_BATCH {
        task.status.as_str()
    } else {
        seed_status(&task.status)
    };
    outbox::enqueue(
        conn,
        event,
        Some(&task.developer_id),
        serde_json::json!({
            "task_id": task.id,
            "task_type": task.kind,
            "status": status,
            "error": task.error,
        }),
    )
    .await?;
    Ok(task)
}

/// Extends the stage leases `owner` holds (its heartbeat).
pub async fn heartbeat(store: &Store, owner: &str, lease_until: i64) -> Result<u64> {
    Ok(
        sqlx::query("UPDATE tasks SET lease_until = $1 WHERE lease_owner = $2")
            .bind(lease_until)
            .bind(owner)
            .execute(store.pool())
            .await?
            .rows_affected(),
    )
}
