//! The API key lifecycle in the store: create, read, list, update, revoke and rotate. Only the
//! sha256 of a key and its display prefix are stored. Every change puts the key on the change
//! feed ([`crate::feed`]) in the same transaction; revoked keys keep their row (`deleted_at`) so
//! gateways learn of the revocation and usage records keep a name to show.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{feed, json_list, now_ms, to_json, Result, Store};

/// A key as the owner sees it (never the key itself, never its hash).
#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub developer_id: String,
    pub name: String,
    pub key_prefix: String,
    pub models: Vec<String>,
    pub endpoints: Vec<String>,
    pub ip_allowlist: Vec<String>,
    /// Requests per minute for this key (`None`: the developer's or plan's limit).
    pub rate_limit_rpm: Option<i64>,
    /// Tokens per minute for this key (`None`: the developer's or plan's limit).
    pub rate_limit_tpm: Option<i64>,
    pub expires_at: Option<i64>,
    pub disabled_at: Option<i64>,
    pub deleted_at: Option<i64>,
    pub rotated_to: Option<String>,
    pub last_used_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str = "id, developer_id, name, key_prefix, models, endpoints, ip_allowlist, \
    rate_limit_rpm, rate_limit_tpm, expires_at, disabled_at, deleted_at, rotated_to, last_used_at, \
    created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        name: r.try_get("name")?,
        key_prefix: r.try_get("key_prefix")?,
        models: json_list(r, "models")?,
        endpoints: json_list(r, "endpoints")?,
        ip_allowlist: json_list(r, "ip_allowlist")?,
        rate_limit_rpm: r.try_get("rate_limit_rpm")?,
        rate_limit_tpm: r.try_get("rate_limit_tpm")?,
        expires_at: r.try_get("expires_at")?,
        disabled_at: r.try_get("disabled_at")?,
        deleted_at: r.try_get("deleted_at")?,
        rotated_to: r.try_get("rotated_to")?,
        last_used_at: r.try_get("last_used_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// A key to store. The caller generated the key, shows it once, and passes only its hash.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// `key_…`, from [`crate::new_id`]: chosen by the caller so that the key's event can be
    /// written before the key (the change-feed stamp must be the transaction's last write).
    pub id: String,
    pub developer_id: String,
    pub name: String,
    /// Hex sha256 of the whole key.
    pub key_hash: String,
    pub key_prefix: String,
    pub models: Vec<String>,
    pub endpoints: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit_rpm: Option<i64>,
    pub rate_limit_tpm: Option<i64>,
    pub expires_at: Option<i64>,
}

/// Stores a new key and puts it on the change feed (its last statement).
pub async fn insert(conn: &mut AnyConnection, k: &NewKey) -> Result<ApiKey> {
    let key = insert_row(conn, k).await?;
    feed::touch_keys(conn, &[&k.id]).await?;
    Ok(key)
}

async fn insert_row(conn: &mut AnyConnection, k: &NewKey) -> Result<ApiKey> {
    let now = now_ms();
    let id = &k.id;
    let sql = format!(
        "INSERT INTO api_keys (id, developer_id, name, key_hash, key_prefix, models, endpoints, \
         ip_allowlist, rate_limit_rpm, expires_at, created_at, updated_at, change_seq, \
         rate_limit_tpm) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, 0, $12) RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(&k.developer_id)
        .bind(&k.name)
        .bind(&k.key_hash)
        .bind(&k.key_prefix)
        .bind(to_json(&k.models))
        .bind(to_json(&k.endpoints))
        .bind(to_json(&k.ip_allowlist))
        .bind(k.rate_limit_rpm)
        .bind(k.expires_at)
        .bind(now)
        .bind(k.rate_limit_tpm)
        .fetch_one(&mut *conn)
        .await?;
    from_row(&row)
}

/// A key by id. With `owner`, only that developer's key is found (anything else is
/// [`StoreError::NotFound`], never "forbidden": ids of others' keys are not confirmed).
pub async fn get(store: &Store, owner: Option<&str>, id: &str) -> Result<ApiKey> {
    get_on(&mut *store.pool().acquire().await?, owner, id).await
}

pub async fn get_on(conn: &mut AnyConnection, owner: Option<&str>, id: &str) -> Result<ApiKey> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND ($2 IS NULL OR developer_id = $2)"
    );
    from_row(
        &sqlx::query(&sql)
            .bind(id)
            .bind(owner)
            .fetch_one(conn)
            .await?,
    )
}

/// A developer's keys, newest first; revoked keys only when asked. `before` is the `created_at`
/// and id of the last key of the previous page.
pub async fn list(
    store: &Store,
    developer_id: &str,
    include_revoked: bool,
    limit: i64,
    before: Option<(i64, &str)>,
) -> Result<Vec<ApiKey>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE developer_id = $1 \
           AND ($2 = 1 OR deleted_at IS NULL) \
           AND ($3 IS NULL OR created_at < $3 OR (created_at = $3 AND id < $4)) \
         ORDER BY created_at DESC, id DESC LIMIT $5"
    );
    let rows = sqlx::query(&sql)
        .bind(developer_id)
        .bind(include_revoked as i64)
        .bind(before.map(|b| b.0))
        .bind(before.map(|b| b.1).unwrap_or(""))
        .bind(limit)
        .fetch_all(store.pool())
        .await?;
    rows.iter().map(from_row).collect()
}

/// Keys a developer holds that are neither revoked nor expired (for the per-developer cap).
pub async fn count_live(conn: &mut AnyConnection, developer_id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_keys WHERE developer_id = $1 AND deleted_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2)",
    )
    .bind(developer_id)
    .bind(now_ms())
    .fetch_one(conn)
    .await?)
}

/// Changes to a key. `None` leaves a field alone; `Some(None)` clears an optional one.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub models: Option<Vec<String>>,
    pub endpoints: Option<Vec<String>>,
    pub ip_allowlist: Option<Vec<String>>,
    pub rate_limit_rpm: Option<Option<i64>>,
    pub rate_limit_tpm: Option<Option<i64>>,
    pub expires_at: Option<Option<i64>>,
    pub active: Option<bool>,
}

/// Updates a live key of `owner` (any owner when `None`) and puts it on the change feed.
pub async fn update(
    conn: &mut AnyConnection,
    owner: Option<&str>,
    id: &str,
    u: &KeyUpdate,
) -> Result<ApiKey> {
    let now = now_ms();
    let sql = format!(
        "UPDATE api_keys SET \
           name = COALESCE($3, name), \
           models = COALESCE($4, models), \
           endpoints = COALESCE($5, endpoints), \
           ip_allowlist = COALESCE($6, ip_allowlist), \
           rate_limit_rpm = CASE WHEN $7 = 1 THEN $8 ELSE rate_limit_rpm END, \
           expires_at = CASE WHEN $9 = 1 THEN $10 ELSE expires_at END, \
           disabled_at = CASE WHEN $11 = 1 THEN NULL WHEN $11 = 0 THEN COALESCE(disabled_at, $12) \
                         ELSE disabled_at END, \
           rate_limit_tpm = CASE WHEN $13 = 1 THEN $14 ELSE rate_limit_tpm END, \
           updated_at = $12 \
         WHERE id = $1 AND ($2 IS NULL OR developer_id = $2) AND deleted_at IS NULL \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(owner)
        .bind(&u.name)
        .bind(u.models.as_deref().map(to_json))
        .bind(u.endpoints.as_deref().map(to_json))
        .bind(u.ip_allowlist.as_deref().map(to_json))
        .bind(u.rate_limit_rpm.is_some() as i64)
        .bind(u.rate_limit_rpm.flatten())
        .bind(u.expires_at.is_some() as i64)
        .bind(u.expires_at.flatten())
        .bind(u.active.map(|a| a as i64).unwrap_or(-1))
        .bind(now)
        .bind(u.rate_limit_tpm.is_some() as i64)
        .bind(u.rate_limit_tpm.flatten())
        .fetch_one(&mut *conn)
        .await?;
    feed::touch_keys(conn, &[id]).await?;
    from_row(&row)
}

/// Revokes a live key (kept as a row with `deleted_at`) and puts it on the change feed.
pub async fn revoke(conn: &mut AnyConnection, owner: Option<&str>, id: &str) -> Result<ApiKey> {
    let sql = format!(
        "UPDATE api_keys SET deleted_at = $3, updated_at = $3 \
         WHERE id = $1 AND ($2 IS NULL OR developer_id = $2) AND deleted_at IS NULL \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(owner)
        .bind(now_ms())
        .fetch_one(&mut *conn)
        .await?;
    feed::touch_keys(conn, &[id]).await?;
    from_row(&row)
}

/// Rotation: stores `new` (which the caller built from the old key's permissions and limits),
/// lets the old key live until `old_expires_at` at most, and links the two. Returns
/// `(old, new)`. Both go on the change feed. A key is rotated once: a key that already has a
/// successor, or has expired, is [`StoreError::NotFound`] here.
pub async fn rotate(
    conn: &mut AnyConnection,
    owner: Option<&str>,
    old_id: &str,
    new: &NewKey,
    old_expires_at: i64,
) -> Result<(ApiKey, ApiKey)> {
    let sql = format!(
        "UPDATE api_keys SET \
           expires_at = CASE WHEN expires_at IS NULL OR expires_at > $3 THEN $3 ELSE expires_at END, \
           rotated_to = $4, updated_at = $5 \
         WHERE id = $1 AND ($2 IS NULL OR developer_id = $2) AND deleted_at IS NULL \
           AND rotated_to IS NULL AND (expires_at IS NULL OR expires_at > $5) \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(old_id)
        .bind(owner)
        .bind(old_expires_at)
        .bind(&new.id)
        .bind(now_ms())
        .fetch_one(&mut *conn)
        .await?;
    let old = from_row(&row)?;
    let created = insert_row(conn, new).await?;
    feed::touch_keys(conn, &[old_id, &new.id]).await?;
    Ok((old, created))
}
