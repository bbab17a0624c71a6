//! Webhook endpoints: where a developer wants events delivered, which event types (exact names
//! and wildcards), how many retries, the signing secret (and, for 24 h after a rotation, the
//! previous one), and whether the endpoint is active. Deliveries are [`crate::deliveries`].
//!
//! The rules (URL policy, caps, the event catalogue) are the control plane's; this module only
//! stores. An endpoint is never removed: deleting stamps `deleted_at` and ends its pending
//! deliveries, so the delivery log stays readable.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::{new_id, now_ms, Result, Store, StoreError};

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub id: String,
    pub developer_id: String,
    pub url: String,
    pub description: String,
    /// Exact event names and wildcards (`task.*`, `*`).
    pub event_types: Vec<String>,
    /// Retries after the first attempt.
    pub max_retries: i64,
    #[serde(skip)]
    pub secret: String,
    #[serde(skip)]
    pub previous_secret: Option<String>,
    /// Until when the previous secret still signs (unix ms).
    pub previous_secret_until: Option<i64>,
    pub disabled_at: Option<i64>,
    pub disabled_reason: Option<String>,
    /// The first failure of the current unbroken run of failures.
    pub failing_since: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Endpoint {
    pub fn active(&self) -> bool {
        self.disabled_at.is_none()
    }

    /// Whether the endpoint wants events of this type.
    pub fn subscribes(&self, event_type: &str) -> bool {
        self.event_types
            .iter()
            .any(|p| pattern_matches(p, event_type))
    }

    /// The secrets that sign a request sent at `now_ms`: the current one, and the previous
    /// one during its grace period.
    pub fn signing_secrets(&self, now_ms: i64) -> Vec<&str> {
        let mut s = vec![self.secret.as_str()];
        if let (Some(prev), Some(until)) = (&self.previous_secret, self.previous_secret_until) {
            if now_ms < until {
                s.push(prev);
            }
        }
        s
    }
}

/// `*` matches every type, `prefix.*` every type under `prefix.`, anything else itself.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => prefix.ends_with('.') && event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

pub(crate) const COLUMNS: &str = "id, developer_id, url, description, event_types, max_retries, \
    secret, previous_secret, previous_secret_until, disabled_at, disabled_reason, failing_since, \
    created_at, updated_at";

pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<Endpoint> {
    let types: String = r.try_get("event_types")?;
    Ok(Endpoint {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        url: r.try_get("url")?,
        description: r.try_get("description")?,
        event_types: serde_json::from_str(&types)
            .map_err(|e| StoreError::Corrupt(format!("webhook event_types: {e}")))?,
        max_retries: r.try_get("max_retries")?,
        secret: r.try_get("secret")?,
        previous_secret: r.try_get("previous_secret")?,
        previous_secret_until: r.try_get("previous_secret_until")?,
        disabled_at: r.try_get("disabled_at")?,
        disabled_reason: r.try_get("disabled_reason")?,
        failing_since: r.try_get("failing_since")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// A new endpoint, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewEndpoint<'a> {
    pub developer_id: &'a str,
    pub url: &'a str,
    pub description: &'a str,
    pub event_types: &'a [String],
    pub max_retries: i64,
    pub secret: &'a str,
    pub active: bool,
}

pub async fn create(conn: &mut AnyConnection, e: &NewEndpoint<'_>) -> Result<Endpoint> {
    let now = now_ms();
    let row = sqlx::query(&format!(
        "INSERT INTO webhook_endpoints (id, developer_id, url, description, event_types, \
         max_retries, secret, disabled_at, disabled_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING {COLUMNS}"
    ))
    .bind(new_id("whk_"))
    .bind(e.developer_id)
    .bind(e.url)
    .bind(e.description)
    .bind(serde_json::to_string(e.event_types).expect("strings serialize"))
    .bind(e.max_retries)
    .bind(e.secret)
    .bind((!e.active).then_some(now))
    .bind((!e.active).then_some("disabled by the developer"))
    .bind(now)
    .fetch_one(conn)
    .await?;
    from_row(&row)
}

/// A developer's endpoints (not deleted), oldest first.
pub async fn list(store: &Store, developer_id: &str) -> Result<Vec<Endpoint>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_endpoints WHERE developer_id = $1 AND deleted_at IS NULL \
         ORDER BY created_at, id"
    ))
    .bind(developer_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// How many endpoints a developer has (not deleted).
pub async fn count(conn: &mut AnyConnection, developer_id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_endpoints WHERE developer_id = $1 AND deleted_at IS NULL",
    )
    .bind(developer_id)
    .fetch_one(conn)
    .await?)
}

/// One endpoint (not deleted) of `developer_id` (`None`: anyone's).
pub async fn get(store: &Store, developer_id: Option<&str>, id: &str) -> Result<Endpoint> {
    let mut conn = store.pool().acquire().await?;
    get_on(&mut conn, developer_id, id).await
}

pub async fn get_on(
    conn: &mut AnyConnection,
    developer_id: Option<&str>,
    id: &str,
) -> Result<Endpoint> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL \
         AND ($2 IS NULL OR developer_id = $2)"
    ))
    .bind(id)
    .bind(developer_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or(StoreError::NotFound)
}

/// Fields to change; `None` keeps the value.
#[derive(Debug, Clone, Default)]
pub struct EndpointUpdate {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub max_retries: Option<i64>,
    /// `true` re-enables (clearing the failure run), `false` disables.
    pub active: Option<bool>,
}

pub async fn update(
    conn: &mut AnyConnection,
    developer_id: &str,
    id: &str,
    u: &EndpointUpdate,
) -> Result<Endpoint> {
    let cur = get_on(conn, Some(developer_id), id).await?;
    let now = now_ms();
    let (disabled_at, disabled_reason, failing_since) = match u.active {
        Some(true) => (None, None, None),
        Some(false) if cur.active() => (
            Some(now),
            Some("disabled by the developer".to_owned()),
            None,
        ),
        _ => (
            cur.disabled_at,
            cur.disabled_reason.clone(),
            cur.failing_since,
        ),
    };
    let types = u.event_types.as_ref().unwrap_or(&cur.event_types);
    let row = sqlx::query(&format!(
        "UPDATE webhook_endpoints SET url = $2, description = $3, event_types = $4, \
         max_retries = $5, disabled_at = $6, disabled_reason = $7, failing_since = $8, \
         updated_at = $9 WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(u.url.as_ref().unwrap_or(&cur.url))
    .bind(u.description.as_ref().unwrap_or(&cur.description))
    .bind(serde_json::to_string(types).expect("strings serialize"))
    .bind(u.max_retries.unwrap_or(cur.max_retries))
    .bind(disabled_at)
    .bind(disabled_reason)
    .bind(failing_since)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    let e = from_row(&row)?;
    if !e.active() {
        end_pending(conn, id, "the endpoint is disabled").await?;
    }
    Ok(e)
}

/// Deletes an endpoint (its delivery log stays) and ends its pending deliveries.
pub async fn delete(conn: &mut AnyConnection, developer_id: &str, id: &str) -> Result<Endpoint> {
    let e = get_on(conn, Some(developer_id), id).await?;
    let now = now_ms();
    sqlx::query("UPDATE webhook_endpoints SET deleted_at = $2, updated_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    end_pending(conn, id, "the endpoint was deleted").await?;
    Ok(e)
}

/// Replaces the signing secret; the old one keeps signing until `previous_until` (unix ms).
pub async fn rotate_secret(
    conn: &mut AnyConnection,
    developer_id: &str,
    id: &str,
    secret: &str,
    previous_until: i64,
) -> Result<Endpoint> {
    let cur = get_on(conn, Some(developer_id), id).await?;
    let row = sqlx::query(&format!(
        "UPDATE webhook_endpoints SET secret = $2, previous_secret = $3, \
         previous_secret_until = $4, updated_at = $5 WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(secret)
    .bind(&cur.secret)
    .bind(previous_until)
    .bind(now_ms())
    .fetch_one(conn)
    .await?;
    from_row(&row)
}

/// Ends an endpoint's pending deliveries (`failed`, with `why`).
pub async fn end_pending(conn: &mut AnyConnection, endpoint_id: &str, why: &str) -> Result<u64> {
    let now = now_ms();
    Ok(sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, \
         lease_until = NULL, lease_owner = NULL, last_error = $2, updated_at = $3, \
         completed_at = $3 WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(endpoint_id)
    .bind(why)
    .bind(now)
    .execute(conn)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::pattern_matches as m;

    #[test]
    fn patterns() {
        assert!(m("*", "task.completed"));
        assert!(m("task.*", "task.completed"));
        assert!(!m("task.*", "tasks.completed"));
        assert!(!m("task.*", "task"));
        assert!(m("invoice.finalized", "invoice.finalized"));
        assert!(!m("invoice.finalized", "invoice.voided"));
        assert!(!m("task*", "task.completed"));
    }
}
