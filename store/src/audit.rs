//! The audit log of operator actions: who did what to which account or key, and when. Written
//! in the same transaction as the action.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::{now_ms, Result, Store};

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor_id: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub details: serde_json::Value,
    pub ip: Option<String>,
}

/// What an entry records. `actor_id` is a developer id, or `cli` for the `aihub` command.
pub struct Audit<'a> {
    pub actor_id: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: &'a str,
    pub details: serde_json::Value,
    pub ip: Option<&'a str>,
}

pub async fn record(conn: &mut AnyConnection, a: &Audit<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor_id, action, target_type, target_id, details, ip) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(now_ms())
    .bind(a.actor_id)
    .bind(a.action)
    .bind(a.target_type)
    .bind(a.target_id)
    .bind(a.details.to_string())
    .bind(a.ip)
    .execute(conn)
    .await?;
    Ok(())
}

/// Newest entries first, optionally for one target, before an entry id (paging).
pub async fn list(
    store: &Store,
    target_id: Option<&str>,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>> {
    let rows = sqlx::query(
        "SELECT id, at, actor_id, action, target_type, target_id, details, ip FROM audit_log \
         WHERE ($1 IS NULL OR target_id = $1) AND ($2 IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(target_id)
    .bind(before_id)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let details: String = r.try_get("details")?;
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                actor_id: r.try_get("actor_id")?,
                action: r.try_get("action")?,
                target_type: r.try_get("target_type")?,
                target_id: r.try_get("target_id")?,
                details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                ip: r.try_get("ip")?,
            })
        })
        .collect()
}
