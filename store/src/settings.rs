//! Small named values every admin node must agree on, created by whichever node starts first
//! (e.g. the JWT signing secret when none is configured).

use crate::{Result, Store};

/// Returns the stored value of `name`, storing `proposed` first if there is none. Concurrent
/// callers all get the same value.
pub async fn get_or_init(store: &Store, name: &str, proposed: &str) -> Result<String> {
    sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(proposed)
        .execute(store.pool())
        .await?;
    Ok(
        sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(store.pool())
            .await?,
    )
}

/// Returns the stored value of `name`, if any (the gateway reads the internal secret this way;
/// it never writes settings).
pub async fn get(store: &Store, name: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(store.pool())
            .await?,
    )
}
