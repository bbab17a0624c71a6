//! The key change feed every gateway follows, and the last-used times gateways report back.
//!
//! Each transaction that changes a key (or what gateways need of its developer: active state,
//! plan, rate limits, quota, spend cap) takes the next value of the `keys` counter and stamps
//! it on the changed key rows as `change_seq`. The counter row is locked from that update to
//! the commit, so sequence numbers become visible in order: a gateway that has read every row
//! up to `(seq, id)` can never later find a row with a smaller stamp. Gateways read `(change_seq, id) > cursor` in pages and apply each row as the key's
//! whole current state (idempotent), so re-reading is harmless.
//!
//! **Invariant:** the counter update is the last write of such a transaction (or close to it),
//! so the serialized section is the commit itself.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::json_list;
use crate::{Result, Store};

/// Redis pub/sub channel on which the admin API announces committed key changes; gateways
/// subscribed to it poll the feed at once.
pub const REDIS_CHANNEL: &str = "aihub:keys:changed";

/// Takes the next change number. Call late in the transaction: it serializes until commit.
async fn next_seq(conn: &mut AnyConnection) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "UPDATE change_counters SET value = value + 1 WHERE name = 'keys' RETURNING value",
    )
    .fetch_one(conn)
    .await?)
}

/// Puts keys on the feed. On PostgreSQL the counter update and the stamp are one statement
/// (one round trip less while the counter row is locked).
pub async fn touch_keys(conn: &mut AnyConnection, ids: &[&str]) -> Result<i64> {
    let list = |first: usize| -> String {
        let p: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + first)).collect();
        p.join(", ")
    };
    if conn.backend_name() == "PostgreSQL" {
        let sql = format!(
            "WITH s AS (UPDATE change_counters SET value = value + 1 WHERE name = 'keys' \
             RETURNING value) \
             UPDATE api_keys SET change_seq = s.value FROM s WHERE api_keys.id IN ({}) \
             RETURNING s.value",
            list(1)
        );
        let mut q = sqlx::query_scalar::<_, i64>(&sql);
        for id in ids {
            q = q.bind(*id);
        }
        return Ok(q.fetch_all(conn).await?.first().copied().unwrap_or(0));
    }
    let seq = next_seq(conn).await?;
    let sql = format!(
        "UPDATE api_keys SET change_seq = $1 WHERE id IN ({})",
        list(2)
    );
    let mut q = sqlx::query(&sql).bind(seq);
    for id in ids {
        q = q.bind(*id);
    }
    q.execute(conn).await?;
    Ok(seq)
}

/// Puts every key of a developer on the feed (after the developer was disabled or enabled, or
/// their plan or limits changed: each key's state carries them). Call it after the developer's
/// row was updated (or locked): the lock order is developer row, key rows, counter, as in the
/// single-key writes. On PostgreSQL the developer's key rows are locked in id order first, so a
/// concurrent key write cannot deadlock with this.
pub async fn touch_developer_keys(conn: &mut AnyConnection, developer_id: &str) -> Result<i64> {
    if conn.backend_name() == "PostgreSQL" {
        sqlx::query(
            "SELECT id FROM api_keys WHERE developer_id = $1 AND deleted_at IS NULL \
             ORDER BY id FOR UPDATE",
        )
        .bind(developer_id)
        .fetch_all(&mut *conn)
        .await?;
    }
    let seq = next_seq(conn).await?;
    sqlx::query(
        "UPDATE api_keys SET change_seq = $1 WHERE developer_id = $2 AND deleted_at IS NULL",
    )
    .bind(seq)
    .bind(developer_id)
    .execute(conn)
    .await?;
    Ok(seq)
}

/// A key's whole current state as gateways need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub id: String,
    /// Hex sha256 of the key.
    pub key_hash: String,
    pub developer_id: String,
    pub models: Vec<String>,
    pub endpoints: Vec<String>,
    pub ip_allowlist: Vec<String>,
    /// The key's requests per minute (`NULL` in the store: the developer's or plan's).
    pub rate_limit_rpm: Option<i64>,
    /// The key's tokens per minute (`None`: the developer's or plan's).
    pub rate_limit_tpm: Option<i64>,
    /// The developer's plan (a name from the plans file; unknown names mean the default plan).
    pub plan: String,
    /// The developer's requests-per-minute override (`developers.api_rate_limit`).
    pub dev_rate_limit_rpm: Option<i64>,
    /// The developer's tokens-per-minute override (`developers.api_token_rate_limit`).
    pub dev_rate_limit_tpm: Option<i64>,
    /// The developer's monthly token quota override (`developers.api_quota_limit`).
    pub dev_quota_tokens: Option<i64>,
    /// The developer's monthly overage spend cap, nano-USD
    /// (`developers.monthly_spend_cap_nanos`).
    pub spend_cap_nanos: Option<i64>,
    pub expires_at: Option<i64>,
    /// Key not disabled and its developer not disabled.
    pub active: bool,
    /// Revoked: gateways forget the key.
    pub deleted: bool,
    pub change_seq: i64,
}

/// Position in the feed: the last `(change_seq, key id)` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub seq: i64,
    pub id: String,
}

fn state_from_row(r: &AnyRow) -> Result<KeyState> {
    let key_disabled: Option<i64> = r.try_get("disabled_at")?;
    let dev_disabled: Option<i64> = r.try_get("dev_disabled_at")?;
    let deleted: Option<i64> = r.try_get("deleted_at")?;
    Ok(KeyState {
        id: r.try_get("id")?,
        key_hash: r.try_get("key_hash")?,
        developer_id: r.try_get("developer_id")?,
        models: json_list(r, "models")?,
        endpoints: json_list(r, "endpoints")?,
        ip_allowlist: json_list(r, "ip_allowlist")?,
        rate_limit_rpm: r.try_get("rate_limit_rpm")?,
        rate_limit_tpm: r.try_get("rate_limit_tpm")?,
        plan: r.try_get("plan")?,
        dev_rate_limit_rpm: r.try_get("api_rate_limit")?,
        dev_rate_limit_tpm: r.try_get("api_token_rate_limit")?,
        dev_quota_tokens: r.try_get("api_quota_limit")?,
        spend_cap_nanos: r.try_get("monthly_spend_cap_nanos")?,
        expires_at: r.try_get("expires_at")?,
        active: key_disabled.is_none() && dev_disabled.is_none(),
        deleted: deleted.is_some(),
        change_seq: r.try_get("change_seq")?,
    })
}

/// The next page of changes after `cursor`, in feed order. At start a gateway reads from the
/// default cursor with `live_only` (revoked keys are of no interest then); afterwards it reads
/// everything, revocations included. The cursor is compared as a row value, so that both
/// databases seek the `(change_seq, id)` index to it: with `seq > $1 OR (seq = $1 AND id > $2)`
/// SQLite seeks only on `change_seq` and re-reads a large group of keys sharing one change
/// (a bulk import, a developer's plan change) from its start for every page.
pub async fn changes_since(
    store: &Store,
    cursor: &Cursor,
    live_only: bool,
    limit: i64,
) -> Result<Vec<KeyState>> {
    let rows = sqlx::query(
        "SELECT k.id, k.key_hash, k.developer_id, k.models, k.endpoints, k.ip_allowlist, \
                k.rate_limit_rpm, k.rate_limit_tpm, k.expires_at, k.disabled_at, k.deleted_at, \
                k.change_seq, d.disabled_at AS dev_disabled_at, d.plan, d.api_rate_limit, \
                d.api_token_rate_limit, d.api_quota_limit, d.monthly_spend_cap_nanos \
         FROM api_keys k JOIN developers d ON d.id = k.developer_id \
         WHERE (k.change_seq, k.id) > ($1, $2) \
           AND ($3 = 0 OR k.deleted_at IS NULL) \
         ORDER BY k.change_seq, k.id LIMIT $4",
    )
    .bind(cursor.seq)
    .bind(&cursor.id)
    .bind(live_only as i64)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(state_from_row).collect()
}

/// Records when keys were last used (gateways batch these). A time never moves backwards. On
/// PostgreSQL rows locked by a key write at that moment are skipped (`SKIP LOCKED`) rather than
/// waited for, so this never blocks or deadlocks an admin transaction; a skipped key gets its
/// time at its next use. Returns how many rows were written.
pub async fn record_last_used(store: &Store, uses: &[(String, i64)]) -> Result<u64> {
    let postgres = store.dialect() == crate::Dialect::Postgres;
    let mut written = 0;
    for chunk in uses.chunks(400) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
            .collect();
        let lock = if postgres {
            " AND api_keys.id IN (SELECT id FROM api_keys WHERE id IN (SELECT id FROM v) \
             FOR UPDATE SKIP LOCKED)"
        } else {
            ""
        };
        let sql = format!(
            "WITH v (id, t) AS (VALUES {}) \
             UPDATE api_keys SET last_used_at = v.t FROM v \
             WHERE api_keys.id = v.id AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < v.t){lock}",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (id, t) in chunk {
            q = q.bind(id).bind(*t);
        }
        written += q.execute(store.pool()).await?.rows_affected();
    }
    Ok(written)
}

/// How many keys are live (not revoked) and how many developers there are: what a gateway's
/// initial load will read, to size its maps once instead of growing them.
pub async fn live_keys(store: &Store) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM api_keys WHERE deleted_at IS NULL), \
                (SELECT COUNT(*) FROM developers)",
    )
    .fetch_one(store.pool())
    .await?)
}

/// The feed's current head: every change numbered up to it is committed and visible. A gateway
/// reads the head before its initial load and follows the feed from there, so changes made
/// while it loads are not missed.
pub async fn head(store: &Store) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT value FROM change_counters WHERE name = 'keys'")
            .fetch_one(store.pool())
            .await?,
    )
}

/// Whether the database still holds the change a follower read last (`cursor`): the key row
/// stamped `cursor.seq`, or stamped later by a newer change. False when the database went back
/// behind it: a failover to a standby that missed commits the follower had read on the old
/// primary (an asynchronous standby, or a synchronous-replication wait cut short), or a restore.
/// The new primary then hands out those numbers again, to other changes, and the follower must
/// reload everything rather than follow from its cursor.
pub async fn holds(store: &Store, cursor: &Cursor) -> Result<bool> {
    // No key row to look at (nothing read yet, or a head no key is stamped with): the head
    // check alone applies.
    if cursor.seq == 0 || cursor.id.is_empty() {
        return Ok(true);
    }
    let seq: Option<i64> = sqlx::query_scalar("SELECT change_seq FROM api_keys WHERE id = $1")
        .bind(&cursor.id)
        .fetch_optional(store.pool())
        .await?;
    Ok(seq.is_some_and(|s| s >= cursor.seq))
}
