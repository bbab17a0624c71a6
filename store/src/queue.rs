//! The durable item queue of tasks and batches (`task_items`).
//!
//! An item is runnable while `next_at` is set and due. [`claim`] leases runnable items to one
//! worker until a deadline, fairly: developers with runnable items take turns, each capped at
//! `per_developer` items in flight across every worker (PostgreSQL: `FOR UPDATE SKIP LOCKED`,
//! so workers on several nodes never claim the same row; SQLite: one writer at a time). A
//! worker renews its leases by [`heartbeat`]; one that dies leaves its items to the next claim
//! once the lease expires. [`finish`] records results only for items the worker still holds
//! (a result from a worker whose lease was taken over is dropped: exactly one result line per
//! item), updates the task's counts and marks tasks whose items all ended for finalizing.

use sqlx::{AnyConnection, Row};

use crate::{now_ms, tasks, Dialect, Result, Store};

pub const QUEUED: &str = "queued";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";
pub const EXPIRED: &str = "expired";
pub const CANCELLED: &str = "cancelled";

/// An item to insert.
pub struct NewItem<'a> {
    pub line: i64,
    pub custom_id: &'a str,
    /// The request body (JSON text).
    pub body: &'a str,
}

/// Inserts a task's items, queued and due now, in multi-row statements.
pub async fn insert(
    conn: &mut AnyConnection,
    task_id: &str,
    developer_id: &str,
    items: &[NewItem<'_>],
) -> Result<()> {
    let now = now_ms();
    // 5 parameters per row; stay far below SQLite's 32,766-parameter limit.
    for chunk in items.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO task_items (task_id, developer_id, next_at, line, custom_id, body, \
             status, attempts) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = 4 + i * 3;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "($1, $2, $3, ${b}, ${}, ${}, 'queued', 0)",
                b + 1,
                b + 2
            ));
        }
        let mut q = sqlx::query(&sql).bind(task_id).bind(developer_id).bind(now);
        for it in chunk {
            q = q.bind(it.line).bind(it.custom_id).bind(it.body);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A leased item with what running it needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task_id: String,
    pub line: i64,
    pub developer_id: String,
    pub custom_id: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i64,
    /// The path after `/v1/` the item is sent to.
    pub endpoint: String,
    /// The hex sha256 of the key the task runs as; `None` when the key is gone (deleted).
    pub key_hash: Option<String>,
    pub task_expires_at: i64,
}

/// Leases up to `limit` runnable items to `owner` until `lease_until`: developers take turns
/// (the one with the fewest items in flight first), each capped at `per_developer` items in
/// flight across all workers, or at the cap `caps` names for them (0: skipped, e.g. while
/// rate limited; 1: probing whether the limit has passed).
pub async fn claim(
    store: &Store,
    owner: &str,
    lease_until: i64,
    per_developer: i64,
    limit: i64,
    caps: &[(&str, i64)],
) -> Result<Vec<Claimed>> {
    let now = now_ms();
    let lock = match store.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    let mut tx = store.begin_write().await?;
    // Developers with due items and how many of theirs are in flight now.
    let rows = sqlx::query(
        "SELECT developer_id, \
           SUM(CASE WHEN lease_until >= $1 THEN 1 ELSE 0 END) AS running, \
           SUM(CASE WHEN next_at <= $1 AND (lease_until IS NULL OR lease_until < $1) \
             THEN 1 ELSE 0 END) AS due \
         FROM task_items WHERE next_at IS NOT NULL GROUP BY developer_id",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut devs: Vec<(String, i64)> = Vec::new();
    for r in &rows {
        let running: i64 = r.try_get::<Option<i64>, _>("running")?.unwrap_or(0);
        let due: i64 = r.try_get::<Option<i64>, _>("due")?.unwrap_or(0);
        let developer: String = r.try_get("developer_id")?;
        let cap = caps
            .iter()
            .find(|(d, _)| *d == developer)
            .map_or(per_developer, |(_, c)| *c);
        if (cap - running).min(due) > 0 {
            devs.push((developer, cap - running));
        }
    }
    // The developers with the most room first (the fewest of their items in flight).
    devs.sort_by_key(|(_, room)| -*room);
    let mut budget = limit;
    let mut keys: Vec<(String, i64)> = Vec::new();
    for (dev, room) in &devs {
        if budget <= 0 {
            break;
        }
        // Up to the developer's room under the cap, within what is left of this claim.
        let take = (*room).min(budget).max(0);
        if take == 0 {
            continue;
        }
        let picked = sqlx::query(&format!(
            "SELECT task_id, line FROM task_items WHERE developer_id = $1 AND next_at <= $2 \
             AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_at, task_id, line \
             LIMIT $3{lock}"
        ))
        .bind(dev)
        .bind(now)
        .bind(take)
        .fetch_all(&mut *tx)
        .await?;
        for r in &picked {
            keys.push((r.try_get("task_id")?, r.try_get("line")?));
        }
        budget -= picked.len() as i64;
    }
    // One statement per task (a claim is mostly one batch's items).
    let mut out = Vec::with_capacity(keys.len());
    let mut by_task: Vec<(&str, Vec<i64>)> = Vec::new();
    for (task_id, line) in &keys {
        match by_task.iter_mut().find(|(t, _)| *t == task_id.as_str()) {
            Some((_, lines)) => lines.push(*line),
            None => by_task.push((task_id.as_str(), vec![*line])),
        }
    }
    for (task_id, lines) in &by_task {
        let sql = format!(
            "UPDATE task_items SET lease_owner = $1, lease_until = $2, status = 'running' \
             WHERE task_id = $3 AND line IN ({}) \
             RETURNING task_id, line, developer_id, custom_id, body, attempts",
            (4..4 + lines.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(*task_id);
        for line in lines {
            q = q.bind(*line);
        }
        for r in q.fetch_all(&mut *tx).await? {
            out.push(Claimed {
                task_id: r.try_get("task_id")?,
                line: r.try_get("line")?,
                developer_id: r.try_get("developer_id")?,
                custom_id: r.try_get("custom_id")?,
                body: r.try_get("body")?,
                attempts: r.try_get("attempts")?,
                endpoint: String::new(),
                key_hash: None,
                task_expires_at: 0,
            });
        }
    }
    out.sort_by(|a, b| (&a.task_id, a.line).cmp(&(&b.task_id, b.line)));
    // What the items' tasks say: endpoint, key, window.
    let mut task_ids: Vec<&str> = out.iter().map(|c| c.task_id.as_str()).collect();
    task_ids.sort_unstable();
    task_ids.dedup();
    let mut info = Vec::with_capacity(task_ids.len());
    for id in task_ids {
        let r = sqlx::query(
            "SELECT t.endpoint, t.expires_at, k.key_hash FROM tasks t \
             LEFT JOIN api_keys k ON k.id = t.key_id AND k.deleted_at IS NULL WHERE t.id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let endpoint: Option<String> = r.try_get("endpoint")?;
        info.push((
            id.to_owned(),
            endpoint.unwrap_or_default(),
            r.try_get::<i64, _>("expires_at")?,
            r.try_get::<Option<String>, _>("key_hash")?,
        ));
    }
    tx.commit().await?;
    for c in &mut out {
        if let Some((_, endpoint, expires, hash)) = info.iter().find(|i| i.0 == c.task_id) {
            c.endpoint = endpoint.trim_start_matches("/v1/").to_owned();
            c.task_expires_at = *expires;
            c.key_hash = hash.clone();
        }
    }
    Ok(out)
}

/// Extends the leases of the items `owner` holds; returns how many.
pub async fn heartbeat(store: &Store, owner: &str, lease_until: i64) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE task_items SET lease_until = $1 WHERE lease_owner = $2 AND next_at IS NOT NULL",
    )
    .bind(lease_until)
    .bind(owner)
    .execute(store.pool())
    .await?
    .rows_affected())
}

/// What became of one item.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Answered 2xx: its output line.
    Succeeded(String),
    /// Answered with an error: its error line.
    Failed(String),
    /// Not done: back in the queue from `at`; `counts`: the try counts towards the item's
    /// attempts (a transient failure), else it does not (a rate limit waited out).
    Retry { at: i64, counts: bool },
    /// Not started: its task is cancelling.
    Cancelled,
}

/// One item's result.
#[derive(Debug, Clone)]
pub struct ItemResult {
    pub task_id: String,
    pub line: i64,
    pub outcome: Outcome,
}

/// Records results of items `owner` still holds, in one transaction; updates their tasks'
/// counts and marks tasks whose items all ended for finalizing. Returns how many results were
/// recorded (a result for an item taken over by another worker is dropped).
pub async fn finish(store: &Store, owner: &str, results: &[ItemResult]) -> Result<usize> {
    if results.is_empty() {
        return Ok(0);
    }
    let now = now_ms();
    let mut tx = store.begin_write().await?;
    let mut recorded = 0;
    let mut touched: Vec<(&str, i64, i64)> = Vec::new();
    for r in results {
        let (status, result, next_at, tried) = match &r.outcome {
            Outcome::Succeeded(line) => (SUCCEEDED, Some(line.as_str()), None, 1),
            Outcome::Failed(line) => (FAILED, Some(line.as_str()), None, 1),
            Outcome::Retry { at, counts } => (QUEUED, None, Some(*at), i64::from(*counts)),
            Outcome::Cancelled => (CANCELLED, None, None, 0),
        };
        let n = sqlx::query(
            "UPDATE task_items SET status = $1, result = $2, next_at = $3, \
             attempts = attempts + $8, lease_owner = NULL, lease_until = NULL, \
             finished_at = CASE WHEN $3 IS NULL THEN $4 ELSE NULL END \
             WHERE task_id = $5 AND line = $6 AND lease_owner = $7 AND next_at IS NOT NULL",
        )
        .bind(status)
        .bind(result)
        .bind(next_at)
        .bind(now)
        .bind(&r.task_id)
        .bind(r.line)
        .bind(owner)
        .bind(tried)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            continue;
        }
        recorded += 1;
        let (ok, bad) = match status {
            SUCCEEDED => (1, 0),
            FAILED => (0, 1),
            _ => (0, 0),
        };
        match touched.iter_mut().find(|t| t.0 == r.task_id) {
            Some(t) => {
                t.1 += ok;
                t.2 += bad;
            }
            None => touched.push((&r.task_id, ok, bad)),
        }
    }
    for (id, ok, bad) in &touched {
        if ok + bad > 0 {
            sqlx::query(
                "UPDATE tasks SET completed = completed + $2, failed = failed + $3, \
                 updated_at = $4 WHERE id = $1",
            )
            .bind(*id)
            .bind(*ok)
            .bind(*bad)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            progress_event(&mut tx, id, ok + bad).await?;
        }
    }
    let ids: Vec<&str> = touched.iter().map(|t| t.0).collect();
    tasks::mark_drained(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(recorded)
}

/// Writes a `task.progress` event when the items just ended (`delta`) carried a task across a
/// tenth of its total (10 %, 20 %, … 90 %; the end has its own event).
async fn progress_event(conn: &mut AnyConnection, task_id: &str, delta: i64) -> Result<()> {
    let r = sqlx::query(
        "SELECT developer_id, kind, status, total, completed, failed FROM tasks WHERE id = $1",
    )
    .bind(task_id)
    .fetch_one(&mut *conn)
    .await?;
    let total: i64 = r.try_get("total")?;
    let completed: i64 = r.try_get("completed")?;
    let failed: i64 = r.try_get("failed")?;
    let ended = completed + failed;
    if total == 0 || ended >= total {
        return Ok(());
    }
    let tenth = |n: i64| n * 10 / total;
    if tenth(ended) == tenth(ended - delta) {
        return Ok(());
    }
    let developer: String = r.try_get("developer_id")?;
    let kind: String = r.try_get("kind")?;
    let status: String = r.try_get("status")?;
    let status = if kind == tasks::OPENAI_BATCH {
        status
    } else {
        tasks::seed_status(&status).to_owned()
    };
    crate::outbox::enqueue(
        conn,
        "task.progress",
        Some(&developer),
        serde_json::json!({
            "task_id": task_id,
            "task_type": kind,
            "status": status,
            "progress": ended * 100 / total,
            "total": total,
            "completed": completed,
            "failed": failed,
        }),
    )
    .await?;
    Ok(())
}

/// Ends every queued (unleased) item of a task with `status` (`failed` or `expired`) and the
/// `{code, message}` error; records `reason` as the task's error when given (the task stops:
/// key revoked, window passed). Items running elsewhere finish. Returns how many items ended.
pub async fn end_remaining(
    conn: &mut AnyConnection,
    task_id: &str,
    status: &str,
    code: &str,
    message: &str,
    reason: Option<&str>,
) -> Result<u64> {
    let now = now_ms();
    let error = serde_json::json!({"code": code, "message": message}).to_string();
    let n = sqlx::query(
        "UPDATE task_items SET status = $2, error = $3, next_at = NULL, lease_owner = NULL, \
         lease_until = NULL, finished_at = $4 WHERE task_id = $1 AND next_at IS NOT NULL \
         AND (lease_until IS NULL OR lease_until < $4)",
    )
    .bind(task_id)
    .bind(status)
    .bind(&error)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE tasks SET failed = failed + $2, updated_at = $3, error = COALESCE(error, $4) \
         WHERE id = $1",
    )
    .bind(task_id)
    .bind(n as i64)
    .bind(now)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    tasks::mark_drained(conn, &[task_id]).await?;
    Ok(n)
}

/// One ended item, as the finalizer writes it.
#[derive(Debug, Clone)]
pub struct Ended {
    pub line: i64,
    pub custom_id: String,
    pub status: String,
    /// The output or error line recorded by the worker.
    pub result: Option<String>,
    /// `{code, message}` of an item that never got an answer.
    pub error: Option<String>,
}

/// A task's ended items after `after_line`, in line order, up to `limit` (the finalizer pages).
pub async fn ended(
    store: &Store,
    task_id: &str,
    after_line: i64,
    limit: i64,
) -> Result<Vec<Ended>> {
    let rows = sqlx::query(
        "SELECT line, custom_id, status, result, error FROM task_items \
         WHERE task_id = $1 AND line > $2 ORDER BY line LIMIT $3",
    )
    .bind(task_id)
    .bind(after_line)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Ended {
                line: r.try_get("line")?,
                custom_id: r.try_get("custom_id")?,
                status: r.try_get("status")?,
                result: r.try_get("result")?,
                error: r.try_get("error")?,
            })
        })
        .collect()
}

/// Queue depth: items runnable now and items in flight (for metrics).
pub async fn depth(store: &Store) -> Result<(i64, i64)> {
    let now = now_ms();
    let r = sqlx::query(
        "SELECT SUM(CASE WHEN lease_until >= $1 THEN 1 ELSE 0 END) AS running, \
         SUM(CASE WHEN lease_until IS NULL OR lease_until < $1 THEN 1 ELSE 0 END) AS queued \
         FROM task_items WHERE next_at IS NOT NULL",
    )
    .bind(now)
    .fetch_one(store.pool())
    .await?;
    Ok((
        r.try_get::<Option<i64>, _>("queued")?.unwrap_or(0),
        r.try_get::<Option<i64>, _>("running")?.unwrap_or(0),
    ))
}

/// Tasks with runnable items that a cancel or a stop reached: the ids of unfinished tasks with
/// `cancel_requested_at` set (workers drop claimed items of these before sending them).
pub async fn cancelling(store: &Store) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tasks WHERE cancel_requested_at IS NOT NULL AND finished_at IS NULL",
    )
    .fetch_all(store.pool())
    .await?)
}
