//! Webhook deliveries: one row per (endpoint, event), with its attempts. The delivery engine
//! (`aihub-webhooks`) works in three batched steps, each one transaction:
//!
//! 1. [`fan_out`]: claims undispatched outbox events in id order (`FOR UPDATE SKIP LOCKED` on
//!    PostgreSQL, so several admin nodes share them; SQLite's write lock serializes), inserts a
//!    delivery per subscribed active endpoint (`ON CONFLICT DO NOTHING`: at most one per
//!    endpoint and event) and marks the events dispatched.
//! 2. [`claim`]: leases due deliveries to one worker until a deadline; a worker that dies
//!    leaves rows that any worker takes over once the lease expires (at-least-once).
//! 3. [`finish`]: records attempts, schedules the next attempt or ends the delivery, keeps the
//!    endpoint's run of failures and disables it (with a `webhook.disabled` event) when told.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::outbox::{self, OutboxEvent};
use crate::webhooks::{self, Endpoint};
use crate::{new_id, now_ms, Dialect, Result, Store, StoreError};

pub const PENDING: &str = "pending";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";

/// A delivery, as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub id: String,
    pub endpoint_id: String,
    pub developer_id: String,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
}

const COLUMNS: &str = "id, endpoint_id, developer_id, event_id, event_type, status, attempts, \
    max_attempts, next_attempt_at, last_status_code, last_error, created_at, updated_at, \
    completed_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Delivery> {
    Ok(Delivery {
        id: r.try_get("id")?,
        endpoint_id: r.try_get("endpoint_id")?,
        developer_id: r.try_get("developer_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_status_code: r.try_get("last_status_code")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        completed_at: r.try_get("completed_at")?,
    })
}

/// `$first, $first+1, …` for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Claims up to `limit` undispatched events, creates their deliveries and marks them
/// dispatched, in one transaction. Returns the events (oldest first) and how many deliveries
/// were created.
pub async fn fan_out(store: &Store, limit: i64) -> Result<(Vec<OutboxEvent>, usize)> {
    let mut tx = store.begin_write().await?;
    let lock = match store.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    let rows = sqlx::query(&format!(
        "SELECT id, event_id, event_type, developer_id, payload, created_at, dispatched_at \
         FROM outbox WHERE dispatched_at IS NULL ORDER BY id LIMIT $1{lock}"
    ))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let events: Vec<OutboxEvent> = rows.iter().map(outbox::from_row).collect::<Result<_>>()?;
    let mut devs: Vec<&str> = events
        .iter()
        .filter_map(|e| e.developer_id.as_deref())
        .collect();
    devs.sort_unstable();
    devs.dedup();
    let mut endpoints: Vec<Endpoint> = Vec::new();
    if !devs.is_empty() {
        let sql = format!(
            "SELECT {} FROM webhook_endpoints WHERE deleted_at IS NULL AND disabled_at IS NULL \
             AND developer_id IN ({})",
            webhooks::COLUMNS,
            placeholders(1, devs.len())
        );
        let mut q = sqlx::query(&sql);
        for d in &devs {
            q = q.bind(*d);
        }
        for r in q.fetch_all(&mut *tx).await? {
            endpoints.push(webhooks::from_row(&r)?);
        }
    }
    let now = now_ms();
    let mut created = 0;
    for e in &events {
        let Some(dev) = &e.developer_id else { continue };
        for ep in endpoints
            .iter()
            .filter(|ep| &ep.developer_id == dev && ep.subscribes(&e.event_type))
        {
            created += insert(&mut tx, ep, &e.event_id, &e.event_type, &e.payload, now).await?;
        }
    }
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let sql = format!(
        "UPDATE outbox SET dispatched_at = $1 WHERE id IN ({})",
        placeholders(2, ids.len())
    );
    let mut q = sqlx::query(&sql).bind(now);
    for id in &ids {
        q = q.bind(*id);
    }
    q.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok((events, created))
}

/// A delivery of `event` to `endpoint`, due now; 0 when it exists already.
async fn insert(
    conn: &mut AnyConnection,
    endpoint: &Endpoint,
    event_id: &str,
    event_type: &str,
    payload: &serde_json::Value,
    now: i64,
) -> Result<usize> {
    let n = sqlx::query(
        "INSERT INTO webhook_deliveries (id, endpoint_id, developer_id, event_id, event_type, \
         payload, status, attempts, max_attempts, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $8, $8) \
         ON CONFLICT (endpoint_id, event_id) DO NOTHING",
    )
    .bind(new_id("dlv_"))
    .bind(&endpoint.id)
    .bind(&endpoint.developer_id)
    .bind(event_id)
    .bind(event_type)
    .bind(payload.to_string())
    .bind(1 + endpoint.max_retries)
    .bind(now)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n as usize)
}

/// Writes an event for one endpoint only (`webhook.test`): into the outbox (already
/// dispatched, so the event history shows it and no other endpoint gets it) with its delivery,
/// due now. Returns the delivery.
pub async fn enqueue_for_endpoint(
    conn: &mut AnyConnection,
    endpoint: &Endpoint,
    event_type: &str,
    data: serde_json::Value,
) -> Result<Delivery> {
    let (event_id, payload) =
        outbox::enqueue_dispatched(conn, event_type, Some(&endpoint.developer_id), data).await?;
    insert(conn, endpoint, &event_id, event_type, &payload, now_ms()).await?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 AND event_id = $2"
    ))
    .bind(&endpoint.id)
    .bind(&event_id)
    .fetch_one(conn)
    .await?;
    from_row(&row)
}

/// A delivery leased to a worker, with what sending it needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    /// The body to send, byte for byte.
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: i64,
    pub max_attempts: i64,
    /// When the event was created (unix ms).
    pub created_at: i64,
    pub endpoint: Endpoint,
}

/// Leases up to `limit` due deliveries (oldest due first) to `owner` until `lease_until`,
/// skipping the endpoints in `skip` (those already at their concurrency cap).
pub async fn claim(
    store: &Store,
    owner: &str,
    lease_until: i64,
    limit: i64,
    skip: &[&str],
) -> Result<Vec<Claimed>> {
    let now = now_ms();
    let mut tx = store.begin_write().await?;
    let lock = match store.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    let skip_sql = if skip.is_empty() {
        String::new()
    } else {
        format!(" AND endpoint_id NOT IN ({})", placeholders(5, skip.len()))
    };
    let sql = format!(
        "UPDATE webhook_deliveries SET lease_owner = $1, lease_until = $2 WHERE id IN ( \
           SELECT id FROM webhook_deliveries WHERE next_attempt_at <= $3 \
           AND (lease_until IS NULL OR lease_until < $3){skip_sql} \
           ORDER BY next_attempt_at LIMIT $4{lock}) \
         RETURNING id, endpoint_id, event_id, event_type, payload, attempts, max_attempts, \
         created_at"
    );
    let mut q = sqlx::query(&sql)
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(limit);
    for s in skip {
        q = q.bind(*s);
    }
    let rows = q.fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("endpoint_id"))
        .collect::<std::result::Result<_, _>>()?;
    ids.sort_unstable();
    ids.dedup();
    let sql = format!(
        "SELECT {} FROM webhook_endpoints WHERE id IN ({})",
        webhooks::COLUMNS,
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in &ids {
        q = q.bind(id);
    }
    let endpoints: Vec<Endpoint> = q
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(webhooks::from_row)
        .collect::<Result<_>>()?;
    tx.commit().await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let endpoint_id: String = r.try_get("endpoint_id")?;
        let endpoint = endpoints
            .iter()
            .find(|e| e.id == endpoint_id)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("delivery of unknown {endpoint_id}")))?;
        out.push(Claimed {
            id: r.try_get("id")?,
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            payload: r.try_get("payload")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            created_at: r.try_get("created_at")?,
            endpoint,
        });
    }
    out.sort_by_key(|c| c.created_at);
    Ok(out)
}

/// One attempt's result and what follows from it (decided by the engine).
#[derive(Debug, Clone)]
pub struct Finished {
    pub delivery_id: String,
    pub endpoint_id: String,
    /// This attempt's number (1 = the first).
    pub attempt: i64,
    pub started_at: i64,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    /// The first 1 KiB of the answer's body (lossy UTF-8).
    pub response_body: String,
    pub error: Option<String>,
    pub succeeded: bool,
    /// When to try again; `None` ends the delivery.
    pub next_attempt_at: Option<i64>,
    /// Disable the endpoint now, for this reason (a 410).
    pub disable: Option<String>,
}

/// An endpoint [`finish`] disabled.
#[derive(Debug, Clone)]
pub struct Disabled {
    pub endpoint: Endpoint,
    pub reason: String,
}

/// Records a batch of attempts in one transaction: the attempts, each delivery's new state,
/// each endpoint's run of failures; disables an endpoint told to (410) or failing without a
/// break for at least `disable_after_ms`, ending its pending deliveries and writing a
/// `webhook.disabled` event. Returns the endpoints disabled now.
pub async fn finish(
    store: &Store,
    batch: &[Finished],
    disable_after_ms: i64,
) -> Result<Vec<Disabled>> {
    let now = now_ms();
    let mut tx = store.begin_write().await?;
    // Endpoints disabled or deleted while these attempts ran: nothing more is scheduled.
    let mut ids: Vec<&str> = batch.iter().map(|f| f.endpoint_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let sql = format!(
        "SELECT id FROM webhook_endpoints WHERE id IN ({}) \
         AND (disabled_at IS NOT NULL OR deleted_at IS NOT NULL)",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query_scalar::<_, String>(&sql);
    for id in &ids {
        q = q.bind(*id);
    }
    let inactive: Vec<String> = q.fetch_all(&mut *tx).await?;
    let mut disable: Vec<(&str, String)> = Vec::new();
    for f in batch {
        let next_attempt_at = f
            .next_attempt_at
            .filter(|_| !inactive.contains(&f.endpoint_id));
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, status_code, \
             latency_ms, response_body, error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&f.delivery_id)
        .bind(f.attempt)
        .bind(f.started_at)
        .bind(f.status_code)
        .bind(f.latency_ms)
        .bind(&f.response_body)
        .bind(&f.error)
        .execute(&mut *tx)
        .await?;
        let status = match (f.succeeded, next_attempt_at) {
            (true, _) => SUCCEEDED,
            (false, Some(_)) => PENDING,
            (false, None) => FAILED,
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = $2, status = $3, next_attempt_at = $4, \
             lease_until = NULL, lease_owner = NULL, last_status_code = $5, last_error = $6, \
             updated_at = $7, completed_at = $8 WHERE id = $1",
        )
        .bind(&f.delivery_id)
        .bind(f.attempt)
        .bind(status)
        .bind(next_attempt_at)
        .bind(f.status_code)
        .bind(&f.error)
        .bind(now)
        .bind((status != PENDING).then_some(now))
        .execute(&mut *tx)
        .await?;
        if f.succeeded {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = NULL \
                 WHERE id = $1 AND failing_since IS NOT NULL",
            )
            .bind(&f.endpoint_id)
            .execute(&mut *tx)
            .await?;
            continue;
        }
        let since: Option<i64> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $2) \
             WHERE id = $1 RETURNING failing_since",
        )
        .bind(&f.endpoint_id)
        .bind(f.started_at)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        if let Some(reason) = &f.disable {
            disable.push((&f.endpoint_id, reason.clone()));
        } else if since.is_some_and(|s| now - s >= disable_after_ms) {
            disable.push((
                &f.endpoint_id,
                format!(
                    "every attempt failed for {} hours",
                    (now - since.unwrap_or(now)) / 3_600_000
                ),
            ));
        }
    }
    let mut disabled = Vec::new();
    for (id, reason) in disable {
        let row = sqlx::query(&format!(
            "UPDATE webhook_endpoints SET disabled_at = $2, disabled_reason = $3, updated_at = $2 \
             WHERE id = $1 AND disabled_at IS NULL AND deleted_at IS NULL RETURNING {}",
            webhooks::COLUMNS
        ))
        .bind(id)
        .bind(now)
        .bind(&reason)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { continue };
        let endpoint = webhooks::from_row(&row)?;
        webhooks::end_pending(&mut tx, id, "the endpoint was disabled").await?;
        outbox::enqueue(
            &mut tx,
            outbox::WEBHOOK_DISABLED,
            Some(&endpoint.developer_id),
            serde_json::json!({
                "endpoint_id": endpoint.id,
                "url": endpoint.url,
                "reason": reason,
                "failing_since": endpoint.failing_since.map(outbox::rfc3339_ms),
            }),
        )
        .await?;
        disabled.push(Disabled { endpoint, reason });
    }
    tx.commit().await?;
    Ok(disabled)
}

/// Sends a delivery again now, whatever its state, with at least one more attempt allowed
/// (the developer's redelivery). The endpoint must be active.
pub async fn redeliver(conn: &mut AnyConnection, developer_id: &str, id: &str) -> Result<Delivery> {
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3, \
         max_attempts = CASE WHEN max_attempts > attempts THEN max_attempts ELSE attempts + 1 END, \
         lease_until = NULL, lease_owner = NULL, updated_at = $3, \
         completed_at = NULL WHERE id = $1 AND developer_id = $2 AND endpoint_id IN \
         (SELECT id FROM webhook_endpoints WHERE deleted_at IS NULL AND disabled_at IS NULL) \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(developer_id)
    .bind(now)
    .fetch_optional(conn)
    .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or(StoreError::NotFound)
}

/// One delivery of `developer_id`.
pub async fn get(store: &Store, developer_id: &str, id: &str) -> Result<Delivery> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_deliveries WHERE id = $1 AND developer_id = $2"
    ))
    .bind(id)
    .bind(developer_id)
    .fetch_optional(store.pool())
    .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or(StoreError::NotFound)
}

/// An endpoint's deliveries, newest first; `before` is the `created_at` and id of the last
/// one of the previous page.
pub async fn for_endpoint(
    store: &Store,
    endpoint_id: &str,
    limit: i64,
    before: Option<(i64, &str)>,
) -> Result<Vec<Delivery>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 \
         AND ($2 IS NULL OR created_at < $2 OR (created_at = $2 AND id < $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(endpoint_id)
    .bind(before.map(|b| b.0))
    .bind(before.map(|b| b.1).unwrap_or(""))
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// One attempt, as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub attempt: i64,
    pub started_at: i64,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub response_body: String,
    pub error: Option<String>,
}

/// The attempts of the given deliveries, by delivery, oldest first.
pub async fn attempts(store: &Store, delivery_ids: &[&str]) -> Result<Vec<(String, Attempt)>> {
    if delivery_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT delivery_id, attempt, started_at, status_code, latency_ms, response_body, error \
         FROM webhook_attempts WHERE delivery_id IN ({}) ORDER BY delivery_id, attempt, id",
        placeholders(1, delivery_ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in delivery_ids {
        q = q.bind(*id);
    }
    q.fetch_all(store.pool())
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("delivery_id")?,
                Attempt {
                    attempt: r.try_get("attempt")?,
                    started_at: r.try_get("started_at")?,
                    status_code: r.try_get("status_code")?,
                    latency_ms: r.try_get("latency_ms")?,
                    response_body: r.try_get("response_body")?,
                    error: r.try_get("error")?,
                },
            ))
        })
        .collect()
}

/// Gives back leased deliveries without attempting them (their endpoint is at its
/// concurrency cap): due again at once, for any worker.
pub async fn release(store: &Store, ids: &[&str]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE webhook_deliveries SET lease_until = NULL, lease_owner = NULL WHERE id IN ({})",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in ids {
        q = q.bind(*id);
    }
    q.execute(store.pool()).await?;
    Ok(())
}

/// Read-only: whether events wait to be fanned out, and when the next delivery is due
/// (unix ms; `None`: nothing scheduled). Lets an idle engine skip write transactions.
pub async fn work(store: &Store) -> Result<(bool, Option<i64>)> {
    let events: Option<i64> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE dispatched_at IS NULL LIMIT 1")
            .fetch_optional(store.pool())
            .await?;
    // The earliest scheduled attempt, from the index (one row whatever the backlog). It may be
    // leased elsewhere: a claim then finds nothing and the engine waits for its next poll.
    let due: Option<i64> = sqlx::query_scalar(
        "SELECT next_attempt_at FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL \
         ORDER BY next_attempt_at LIMIT 1",
    )
    .fetch_optional(store.pool())
    .await?;
    Ok((events.is_some(), due))
}
