//! Login sessions (what a JWT points at, so logout really ends it; looked up with their
//! developer by [`crate::developers::by_live_session`]) and single-use email tokens
//! (verification and password reset; only their sha256 is stored).

use sqlx::AnyConnection;

use crate::{now_ms, Result, Store};

/// Token purposes.
pub const VERIFY_EMAIL: &str = "verify_email";
pub const RESET_PASSWORD: &str = "reset_password";

/// Opens a session; the id goes into the JWT.
pub async fn create_session(
    store: &Store,
    id: &str,
    developer_id: &str,
    expires_at: i64,
    ip: Option<&str>,
    user_agent: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sessions (id, developer_id, created_at, expires_at, ip, user_agent) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(developer_id)
    .bind(now_ms())
    .bind(expires_at)
    .bind(ip)
    .bind(user_agent)
    .execute(store.pool())
    .await?;
    Ok(())
}

pub async fn revoke_session(store: &Store, id: &str) -> Result<()> {
    sqlx::query("UPDATE sessions SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .bind(now_ms())
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Ends every session of a developer (password reset or change, account disabled).
pub async fn revoke_all_sessions(conn: &mut AnyConnection, developer_id: &str) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE sessions SET revoked_at = $2 WHERE developer_id = $1 AND revoked_at IS NULL",
    )
    .bind(developer_id)
    .bind(now_ms())
    .execute(conn)
    .await?
    .rows_affected())
}

/// Stores a new email token (by hash). Earlier unused tokens of the same purpose stop working:
/// only the latest mail's link is valid.
pub async fn create_email_token(
    conn: &mut AnyConnection,
    token_hash: &str,
    developer_id: &str,
    purpose: &str,
    expires_at: i64,
) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "UPDATE email_tokens SET used_at = $3 \
         WHERE developer_id = $1 AND purpose = $2 AND used_at IS NULL",
    )
    .bind(developer_id)
    .bind(purpose)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO email_tokens (token_hash, developer_id, purpose, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(token_hash)
    .bind(developer_id)
    .bind(purpose)
    .bind(now)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The developer a token belongs to when it is usable (exists, this purpose, unused,
/// unexpired), without using it.
pub async fn email_token_owner(
    store: &Store,
    token_hash: &str,
    purpose: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT developer_id FROM email_tokens \
         WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3",
    )
    .bind(token_hash)
    .bind(purpose)
    .bind(now_ms())
    .fetch_optional(store.pool())
    .await?)
}

/// Uses a token once: returns its developer when it exists, has this purpose, is unused and
/// unexpired, and marks it used in the same statement (two concurrent uses: one wins).
pub async fn consume_email_token(
    conn: &mut AnyConnection,
    token_hash: &str,
    purpose: &str,
) -> Result<Option<String>> {
    let now = now_ms();
    Ok(sqlx::query_scalar(
        "UPDATE email_tokens SET used_at = $3 \
         WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3 \
         RETURNING developer_id",
    )
    .bind(token_hash)
    .bind(purpose)
    .bind(now)
    .fetch_optional(conn)
    .await?)
}
