//! The event outbox: events (`api_key.created`, …) are inserted in the same transaction as the
//! change they describe, so an event exists exactly when its change committed. The webhook
//! engine fans undispatched rows out into deliveries in id order ([`crate::deliveries`]) and
//! marks them dispatched; the rows stay as the developer's event history.
//!
//! Event bodies follow the wire convention:
//! `{"id": "evt_…", "type": "…", "created_at": "RFC 3339", "data": {…}}`.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::{new_id, now_ms, Result, Store};

/// Event types written today.
pub const API_KEY_CREATED: &str = "api_key.created";
pub const API_KEY_DELETED: &str = "api_key.deleted";
pub const API_KEY_ROTATED: &str = "api_key.rotated";
/// A developer's monthly usage crossed an alert threshold ([`crate::usage_alerts`]).
pub const API_USAGE_ALERT: &str = "api.usage_alert";
/// An endpoint was disabled by the delivery engine (410, or failing for too long).
pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
/// Sent to one endpoint on the developer's request.
pub const WEBHOOK_TEST: &str = "webhook.test";

#[derive(Debug, Clone, Serialize)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub developer_id: Option<String>,
    pub payload: serde_json::Value,
    pub created_at: i64,
    pub dispatched_at: Option<i64>,
}

/// Writes an event; returns its `evt_…` id.
pub async fn enqueue(
    conn: &mut AnyConnection,
    event_type: &str,
    developer_id: Option<&str>,
    data: serde_json::Value,
) -> Result<String> {
    Ok(insert(conn, event_type, developer_id, data, None).await?.0)
}

/// Writes an event already dispatched (delivered by its writer to chosen endpoints only);
/// returns its id and body.
pub async fn enqueue_dispatched(
    conn: &mut AnyConnection,
    event_type: &str,
    developer_id: Option<&str>,
    data: serde_json::Value,
) -> Result<(String, serde_json::Value)> {
    insert(conn, event_type, developer_id, data, Some(now_ms())).await
}

async fn insert(
    conn: &mut AnyConnection,
    event_type: &str,
    developer_id: Option<&str>,
    data: serde_json::Value,
    dispatched_at: Option<i64>,
) -> Result<(String, serde_json::Value)> {
    let now = now_ms();
    let event_id = new_id("evt_");
    let payload = serde_json::json!({
        "id": event_id,
        "type": event_type,
        "created_at": rfc3339_ms(now),
        "data": data,
    });
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, developer_id, payload, created_at, \
         dispatched_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&event_id)
    .bind(event_type)
    .bind(developer_id)
    .bind(payload.to_string())
    .bind(now)
    .bind(dispatched_at)
    .execute(conn)
    .await?;
    Ok((event_id, payload))
}

const COLUMNS: &str = "id, event_id, event_type, developer_id, payload, created_at, dispatched_at";

pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<OutboxEvent> {
    let payload: String = r.try_get("payload")?;
    Ok(OutboxEvent {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        developer_id: r.try_get("developer_id")?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| crate::StoreError::Corrupt(e.to_string()))?,
        created_at: r.try_get("created_at")?,
        dispatched_at: r.try_get("dispatched_at")?,
    })
}

/// A developer's events, newest first: `limit` of them, of one type (or types under a
/// `prefix.*`) when asked, older than the event with row id `before` when given.
pub async fn history(
    store: &Store,
    developer_id: &str,
    event_type: Option<&str>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<OutboxEvent>> {
    let (exact, prefix) = match event_type.and_then(|t| t.strip_suffix('*')) {
        Some(p) => (None, Some(format!("{p}%"))),
        None => (event_type, None),
    };
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox WHERE developer_id = $1 \
         AND ($2 IS NULL OR event_type = $2) AND ($3 IS NULL OR event_type LIKE $3) \
         AND ($4 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
    ))
    .bind(developer_id)
    .bind(exact)
    .bind(prefix)
    .bind(before)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// One event of a developer, by its `evt_…` id.
pub async fn event(store: &Store, developer_id: &str, event_id: &str) -> Result<OutboxEvent> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox WHERE event_id = $1 AND developer_id = $2"
    ))
    .bind(event_id)
    .bind(developer_id)
    .fetch_optional(store.pool())
    .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or(crate::StoreError::NotFound)
}

/// Events of a developer, oldest first (for tests and the delivery log).
pub async fn for_developer(store: &Store, developer_id: &str) -> Result<Vec<OutboxEvent>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox WHERE developer_id = $1 ORDER BY id"
    ))
    .bind(developer_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-25T10:45:09.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = aihub_plans::period::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339_ms(1_795_604_709_123),
            "2026-11-25T11:05:09.123Z"
        );
        assert_eq!(
            super::rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
