//! Subscriptions: which plan a developer held when. One row per plan held (`ended_at` `NULL` for
//! the current one); a plan change closes the current row and opens the next at the same
//! instant, in the transaction that changes `developers.plan`, so the history has no gaps and
//! no overlaps. Billing splits a period at each change (proration, `docs/billing.md`).

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{now_ms, Result, Store};

/// One plan held over `[started_at, ended_at)` (unix ms; `ended_at` `None`: still held).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub id: String,
    pub developer_id: String,
    pub plan: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// Who changed to this plan (a developer or operator id); `None` at sign-up.
    pub changed_by: Option<String>,
}

const COLUMNS: &str = "id, developer_id, plan, started_at, ended_at, changed_by";

fn from_row(r: &AnyRow) -> Result<Subscription> {
    Ok(Subscription {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        plan: r.try_get("plan")?,
        started_at: r.try_get("started_at")?,
        ended_at: r.try_get("ended_at")?,
        changed_by: r.try_get("changed_by")?,
    })
}

/// Opens the first subscription of a new account (same transaction as the insert).
pub async fn start(
    conn: &mut AnyConnection,
    developer_id: &str,
    plan: &str,
    at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO subscriptions (id, developer_id, plan, started_at, ended_at, changed_by, created_at) \
         VALUES ($1, $2, $3, $4, NULL, NULL, $5)",
    )
    .bind(format!("sub_{developer_id}"))
    .bind(developer_id)
    .bind(plan)
    .bind(at)
    .bind(now_ms())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the developer to `plan` from `at` on: closes the current subscription and opens the
/// next. Nothing happens when `plan` is already the current one. The caller holds the
/// developer's row (it updates `developers.plan` in the same transaction), so concurrent
/// changes are serialized. Returns whether the plan changed.
pub async fn switch(
    conn: &mut AnyConnection,
    developer_id: &str,
    plan: &str,
    at: i64,
    changed_by: Option<&str>,
) -> Result<bool> {
    let current = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE developer_id = $1 AND ended_at IS NULL"
    ))
    .bind(developer_id)
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| from_row(&r))
    .transpose()?;
    if current.as_ref().is_some_and(|c| c.plan == plan) {
        return Ok(false);
    }
    // A change in the same millisecond as the previous one replaces it (zero-length spans
    // would only clutter invoices).
    let at = match &current {
        Some(c) => at.max(c.started_at),
        None => at,
    };
    if let Some(c) = &current {
        if c.started_at == at {
            sqlx::query("DELETE FROM subscriptions WHERE id = $1")
                .bind(&c.id)
                .execute(&mut *conn)
                .await?;
            // Undoing a change made in the same millisecond back to the plan before it: that
            // plan simply continues (no two adjacent spans of one plan).
            let reopened = sqlx::query(
                "UPDATE subscriptions SET ended_at = NULL \
                 WHERE developer_id = $1 AND ended_at = $2 AND plan = $3",
            )
            .bind(developer_id)
            .bind(at)
            .bind(plan)
            .execute(&mut *conn)
            .await?;
            if reopened.rows_affected() > 0 {
                return Ok(true);
            }
        } else {
            sqlx::query("UPDATE subscriptions SET ended_at = $2 WHERE id = $1")
                .bind(&c.id)
                .bind(at)
                .execute(&mut *conn)
                .await?;
        }
    }
    sqlx::query(
        "INSERT INTO subscriptions (id, developer_id, plan, started_at, ended_at, changed_by, created_at) \
         VALUES ($1, $2, $3, $4, NULL, $5, $6)",
    )
    .bind(crate::new_id("sub_"))
    .bind(developer_id)
    .bind(plan)
    .bind(at)
    .bind(changed_by)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// The developer's subscriptions overlapping `[from, to)`, oldest first.
pub async fn overlapping(
    store: &Store,
    developer_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<Subscription>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE developer_id = $1 AND started_at < $3 \
         AND (ended_at IS NULL OR ended_at > $2) ORDER BY started_at"
    ))
    .bind(developer_id)
    .bind(from)
    .bind(to)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Every subscription overlapping `[from, to)`, ordered by developer then start: what invoice
/// generation for a whole period reads (one query for all developers).
pub async fn all_overlapping(store: &Store, from: i64, to: i64) -> Result<Vec<Subscription>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE started_at < $2 \
         AND (ended_at IS NULL OR ended_at > $1) ORDER BY developer_id, started_at"
    ))
    .bind(from)
    .bind(to)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}
