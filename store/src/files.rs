//! File records (`file-…`): what a developer uploaded (`purpose = batch`) and what tasks wrote
//! (`batch_output`, `task_result`). The bytes live in the file store (`aihub-tasks`); a row
//! names them by `location`. A deleted file keeps its row (`deleted_at`) until its bytes are
//! gone, so a sweep can retry the removal; lookups never return it.

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::{now_ms, Result, Store};

/// A file, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRecord {
    pub id: String,
    pub developer_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub sha256: String,
    pub location: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

const COLUMNS: &str =
    "id, developer_id, purpose, filename, bytes, sha256, location, created_at, expires_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<FileRecord> {
    Ok(FileRecord {
        id: r.try_get("id")?,
        developer_id: r.try_get("developer_id")?,
        purpose: r.try_get("purpose")?,
        filename: r.try_get("filename")?,
        bytes: r.try_get("bytes")?,
        sha256: r.try_get("sha256")?,
        location: r.try_get("location")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

/// Records a file whose bytes are already stored.
pub async fn insert(conn: &mut AnyConnection, f: &FileRecord) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO files ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(&f.id)
    .bind(&f.developer_id)
    .bind(&f.purpose)
    .bind(&f.filename)
    .bind(f.bytes)
    .bind(&f.sha256)
    .bind(&f.location)
    .bind(f.created_at)
    .bind(f.expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// A developer's live file; `NotFound` for another developer's, a deleted or an unknown one.
pub async fn get(store: &Store, developer_id: &str, id: &str) -> Result<FileRecord> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM files WHERE id = $1 AND developer_id = $2 AND deleted_at IS NULL"
    ))
    .bind(id)
    .bind(developer_id)
    .fetch_one(store.pool())
    .await?;
    from_row(&row)
}

/// A developer's live files, newest first, optionally of one purpose, after a cursor (a file
/// id: the page continues with older files).
pub async fn list(
    store: &Store,
    developer_id: &str,
    purpose: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<FileRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM files WHERE developer_id = $1 AND deleted_at IS NULL \
         AND ($2 IS NULL OR purpose = $2) AND ($3 IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4"
    ))
    .bind(developer_id)
    .bind(purpose)
    .bind(after)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Marks a developer's file deleted; returns it (its bytes are the caller's to remove).
pub async fn mark_deleted(store: &Store, developer_id: &str, id: &str) -> Result<FileRecord> {
    let mut tx = store.begin_write().await?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM files WHERE id = $1 AND developer_id = $2 AND deleted_at IS NULL"
    ))
    .bind(id)
    .bind(developer_id)
    .fetch_one(&mut *tx)
    .await?;
    let file = from_row(&row)?;
    sqlx::query("UPDATE files SET deleted_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(file)
}

/// Files whose retention ended (or that were deleted) and whose bytes must go: up to `limit`.
pub async fn due_for_removal(store: &Store, now: i64, limit: i64) -> Result<Vec<FileRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM files WHERE (deleted_at IS NULL AND expires_at IS NOT NULL \
         AND expires_at < $1) OR (deleted_at IS NOT NULL AND location <> '') LIMIT $2"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Records that a file's bytes are gone (its row stays, deleted, without a location).
pub async fn mark_removed(store: &Store, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE files SET deleted_at = COALESCE(deleted_at, $1), location = '' WHERE id = $2",
    )
    .bind(now_ms())
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Bytes a developer holds in live files (the storage quota).
pub async fn bytes_held(store: &Store, developer_id: &str) -> Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(SUM(bytes) AS BIGINT) FROM files WHERE developer_id = $1 AND deleted_at IS NULL",
    )
    .bind(developer_id)
    .fetch_one(store.pool())
    .await?;
    Ok(n.unwrap_or(0))
}
