//! Usage alerts: a developer's monthly token usage crossed a threshold (a percentage of their
//! quota). Gateways detect the crossing and call [`record`]; the row's primary key
//! `(developer_id, period, threshold_pct)` makes each alert happen once per billing period,
//! however many gateway nodes report it, and the `api.usage_alert` outbox event is written in
//! the same transaction only when the row is new.

use serde::Serialize;
use sqlx::Row;

use crate::{now_ms, outbox, Result, Store};

/// One alert: who, which billing period (`YYYY-MM`, UTC), which threshold, and the usage that
/// crossed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageAlert {
    pub developer_id: String,
    /// The billing period, `YYYY-MM` (calendar month, UTC).
    pub period: String,
    /// The threshold crossed, in percent of `quota_tokens`.
    pub threshold_pct: i64,
    /// Tokens used in the period when the threshold was seen crossed.
    pub used_tokens: i64,
    /// The monthly quota the threshold is a percentage of.
    pub quota_tokens: i64,
}

/// Records an alert and its `api.usage_alert` event, once: returns `true` when this call raised
/// it, `false` when it existed already (another gateway node, or a retry, was first). Safe to
/// call concurrently from any number of nodes: the insert is `ON CONFLICT DO NOTHING` on the
/// primary key, so exactly one transaction inserts the row (on PostgreSQL a concurrent insert
/// waits for the first to commit or roll back), and only that one writes the event.
pub async fn record(store: &Store, alert: &UsageAlert) -> Result<bool> {
    let mut tx = store.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO usage_alerts (developer_id, period, threshold_pct, used_tokens, \
         quota_tokens, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (developer_id, period, threshold_pct) DO NOTHING",
    )
    .bind(&alert.developer_id)
    .bind(&alert.period)
    .bind(alert.threshold_pct)
    .bind(alert.used_tokens)
    .bind(alert.quota_tokens)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        let data = serde_json::json!({
            "developer_id": alert.developer_id,
            "period": alert.period,
            "threshold_percent": alert.threshold_pct,
            "used_tokens": alert.used_tokens,
            "quota_tokens": alert.quota_tokens,
        });
        outbox::enqueue(
            &mut tx,
            outbox::API_USAGE_ALERT,
            Some(&alert.developer_id),
            data,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// A developer's alerts, by period then threshold (for the portal and tests).
pub async fn for_developer(store: &Store, developer_id: &str) -> Result<Vec<UsageAlert>> {
    let rows = sqlx::query(
        "SELECT developer_id, period, threshold_pct, used_tokens, quota_tokens \
         FROM usage_alerts WHERE developer_id = $1 ORDER BY period, threshold_pct",
    )
    .bind(developer_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(UsageAlert {
                developer_id: r.try_get("developer_id")?,
                period: r.try_get("period")?,
                threshold_pct: r.try_get("threshold_pct")?,
                used_tokens: r.try_get("used_tokens")?,
                quota_tokens: r.try_get("quota_tokens")?,
            })
        })
        .collect()
}
