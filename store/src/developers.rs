//! Developer accounts: registration, profile, password, email verification, and the operator's
//! view (search, disable, plan and limits), and the developer's own monthly spend cap. Emails
//! are stored lowercased; uniqueness is the database's. A change gateways enforce (active state,
//! plan, limits, spend cap) puts all the developer's keys on the change feed ([`feed`]) in the
//! same transaction.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{feed, new_id, now_ms, subscriptions, Result, Store, StoreError};

/// Account roles.
pub const ROLE_DEVELOPER: &str = "developer";
pub const ROLE_ADMIN: &str = "admin";

/// A developer account as stored (the password hash never leaves the admin API).
#[derive(Debug, Clone, Serialize)]
pub struct Developer {
    pub id: String,
    pub email: String,
    #[serde(skip)]
    pub password_hash: String,
    pub full_name: String,
    pub company_name: Option<String>,
    pub developer_type: String,
    pub role: String,
    pub plan: String,
    /// Monthly token quota override (`None`: the plan's included tokens).
    pub api_quota_limit: Option<i64>,
    /// Requests-per-minute override (`None`: the plan's).
    pub api_rate_limit: Option<i64>,
    /// Tokens-per-minute override (`None`: the plan's).
    pub api_token_rate_limit: Option<i64>,
    /// The developer's cap on monthly overage spend, nano-USD (`None`: no cap).
    pub monthly_spend_cap_nanos: Option<i64>,
    pub email_verified_at: Option<i64>,
    pub disabled_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Developer {
    pub fn is_admin(&self) -> bool {
        self.role == ROLE_ADMIN
    }
    pub fn is_active(&self) -> bool {
        self.disabled_at.is_none()
    }
    pub fn is_verified(&self) -> bool {
        self.email_verified_at.is_some()
    }
}

const COLUMNS: &str = "id, email, password_hash, full_name, company_name, developer_type, role, \
    plan, api_quota_limit, api_rate_limit, api_token_rate_limit, monthly_spend_cap_nanos, \
    email_verified_at, disabled_at, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<Developer> {
    Ok(Developer {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        password_hash: r.try_get("password_hash")?,
        full_name: r.try_get("full_name")?,
        company_name: r.try_get("company_name")?,
        developer_type: r.try_get("developer_type")?,
        role: r.try_get("role")?,
        plan: r.try_get("plan")?,
        api_quota_limit: r.try_get("api_quota_limit")?,
        api_rate_limit: r.try_get("api_rate_limit")?,
        api_token_rate_limit: r.try_get("api_token_rate_limit")?,
        monthly_spend_cap_nanos: r.try_get("monthly_spend_cap_nanos")?,
        email_verified_at: r.try_get("email_verified_at")?,
        disabled_at: r.try_get("disabled_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// What registration provides.
#[derive(Debug, Clone)]
pub struct NewDeveloper {
    pub email: String,
    pub password_hash: String,
    pub full_name: String,
    pub company_name: Option<String>,
    pub developer_type: String,
    pub role: String,
    pub plan: String,
    /// Set for accounts created already verified (bootstrapped operators, seeding).
    pub verified: bool,
}

/// Inserts an account and opens its first subscription; [`StoreError::Conflict`] when the
/// email is taken.
pub async fn insert(conn: &mut AnyConnection, d: &NewDeveloper) -> Result<Developer> {
    insert_as(conn, &new_id("dev_"), now_ms(), d).await
}

/// Inserts an account with a given id and creation time (imports from another system, demo
/// and benchmark data): as [`insert`] otherwise. The subscription starts at `created_at`.
pub async fn import(
    conn: &mut AnyConnection,
    id: &str,
    created_at: i64,
    d: &NewDeveloper,
) -> Result<Developer> {
    insert_as(conn, id, created_at, d).await
}

async fn insert_as(
    conn: &mut AnyConnection,
    id: &str,
    now: i64,
    d: &NewDeveloper,
) -> Result<Developer> {
    let sql = format!(
        "INSERT INTO developers (id, email, password_hash, full_name, company_name, \
         developer_type, role, plan, email_verified_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(d.email.to_lowercase())
        .bind(&d.password_hash)
        .bind(&d.full_name)
        .bind(&d.company_name)
        .bind(&d.developer_type)
        .bind(&d.role)
        .bind(&d.plan)
        .bind(d.verified.then_some(now))
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
    subscriptions::start(conn, id, &d.plan, now).await?;
    from_row(&row)
}

pub async fn by_id(store: &Store, id: &str) -> Result<Developer> {
    let sql = format!("SELECT {COLUMNS} FROM developers WHERE id = $1");
    from_row(&sqlx::query(&sql).bind(id).fetch_one(store.pool()).await?)
}

/// The developer of a live (unrevoked, unexpired) session, in one query: what every
/// authenticated admin request needs.
pub async fn by_live_session(store: &Store, session_id: &str) -> Result<Option<Developer>> {
    let columns: Vec<String> = COLUMNS.split(", ").map(|c| format!("d.{c}")).collect();
    let sql = format!(
        "SELECT {} FROM sessions s JOIN developers d ON d.id = s.developer_id \
         WHERE s.id = $1 AND s.revoked_at IS NULL AND s.expires_at > $2",
        columns.join(", ")
    );
    sqlx::query(&sql)
        .bind(session_id)
        .bind(now_ms())
        .fetch_optional(store.pool())
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

pub async fn by_email(store: &Store, email: &str) -> Result<Option<Developer>> {
    let sql = format!("SELECT {COLUMNS} FROM developers WHERE email = $1");
    sqlx::query(&sql)
        .bind(email.to_lowercase())
        .fetch_optional(store.pool())
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Profile fields a developer may change.
#[derive(Debug, Clone, Default)]
pub struct ProfileUpdate {
    pub full_name: Option<String>,
    pub company_name: Option<Option<String>>,
    pub developer_type: Option<String>,
}

/// Changes profile fields (nothing gateways see, so no key goes on the feed).
pub async fn update_profile(
    conn: &mut AnyConnection,
    id: &str,
    u: &ProfileUpdate,
) -> Result<Developer> {
    let sql = format!(
        "UPDATE developers SET \
           full_name = COALESCE($2, full_name), \
           company_name = CASE WHEN $3 = 1 THEN $4 ELSE company_name END, \
           developer_type = COALESCE($5, developer_type), \
           updated_at = $6 \
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(&u.full_name)
        .bind(u.company_name.is_some() as i64)
        .bind(u.company_name.clone().flatten())
        .bind(&u.developer_type)
        .bind(now_ms())
        .fetch_one(conn)
        .await?;
    from_row(&row)
}

/// Locks a developer's row until the transaction ends (PostgreSQL; SQLite write transactions
/// are exclusive already), so checks on their keys (the per-developer cap) cannot race.
/// Lock order everywhere: developer row, then key rows, then the feed counter.
pub async fn lock(conn: &mut AnyConnection, id: &str) -> Result<()> {
    if conn.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT id FROM developers WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    }
    Ok(())
}

pub async fn set_password(conn: &mut AnyConnection, id: &str, hash: &str) -> Result<()> {
    let n = sqlx::query("UPDATE developers SET password_hash = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(hash)
        .bind(now_ms())
        .execute(conn)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn mark_verified(conn: &mut AnyConnection, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE developers SET email_verified_at = COALESCE(email_verified_at, $2), \
         updated_at = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(now_ms())
    .execute(conn)
    .await?;
    Ok(())
}

/// What an operator may change on an account. `None` leaves a field alone; for the limits,
/// `Some(None)` clears the override (the plan's value applies).
#[derive(Debug, Clone, Default)]
pub struct OperatorUpdate {
    pub active: Option<bool>,
    pub plan: Option<String>,
    pub role: Option<String>,
    pub api_quota_limit: Option<Option<i64>>,
    pub api_rate_limit: Option<Option<i64>>,
    pub api_token_rate_limit: Option<Option<i64>>,
    /// Who makes the change (recorded on the subscription when the plan changes).
    pub changed_by: Option<String>,
}

impl OperatorUpdate {
    /// Whether the change is one gateways enforce (active state, plan, limits), so the
    /// developer's keys must go on the change feed.
    pub fn touches_keys(&self) -> bool {
        self.active.is_some()
            || self.plan.is_some()
            || self.api_quota_limit.is_some()
            || self.api_rate_limit.is_some()
            || self.api_token_rate_limit.is_some()
    }
}

/// Applies an operator change. A new plan closes the current subscription and opens the next
/// (billing prorates). Setting the active flag, the plan or a limit puts all the account's keys
/// on the change feed in the same transaction (its last write), so every gateway drops or
/// restores them, or applies the new limits.
pub async fn operator_update(
    conn: &mut AnyConnection,
    id: &str,
    u: &OperatorUpdate,
) -> Result<Developer> {
    let now = now_ms();
    let sql = format!(
        "UPDATE developers SET \
           disabled_at = CASE WHEN $2 = 1 THEN NULL WHEN $2 = 0 THEN COALESCE(disabled_at, $9) \
                         ELSE disabled_at END, \
           plan = COALESCE($3, plan), \
           role = COALESCE($4, role), \
           api_quota_limit = CASE WHEN $5 = 1 THEN $6 ELSE api_quota_limit END, \
           api_rate_limit = CASE WHEN $7 = 1 THEN $8 ELSE api_rate_limit END, \
           api_token_rate_limit = CASE WHEN $10 = 1 THEN $11 ELSE api_token_rate_limit END, \
           updated_at = $9 \
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(u.active.map(|a| a as i64).unwrap_or(-1))
        .bind(&u.plan)
        .bind(&u.role)
        .bind(u.api_quota_limit.is_some() as i64)
        .bind(u.api_quota_limit.flatten())
        .bind(u.api_rate_limit.is_some() as i64)
        .bind(u.api_rate_limit.flatten())
        .bind(now)
        .bind(u.api_token_rate_limit.is_some() as i64)
        .bind(u.api_token_rate_limit.flatten())
        .fetch_one(&mut *conn)
        .await?;
    let dev = from_row(&row)?;
    if let Some(plan) = &u.plan {
        subscriptions::switch(conn, id, plan, now, u.changed_by.as_deref()).await?;
    }
    // Whenever such a field is set (changed or not): deciding from a read made before this
    // update could miss a concurrent change, and re-stamping is harmless. The update above
    // holds the developer's row, so the lock order is developer row, key rows, counter.
    if u.touches_keys() {
        feed::touch_developer_keys(conn, id).await?;
    }
    Ok(dev)
}

/// Sets (or, with `None`, clears) the developer's monthly overage spend cap in nano-USD, and
/// puts their keys on the change feed so gateways apply it (same transaction, last write).
pub async fn set_spend_cap(
    conn: &mut AnyConnection,
    id: &str,
    cap_nanos: Option<i64>,
) -> Result<Developer> {
    let sql = format!(
        "UPDATE developers SET monthly_spend_cap_nanos = $2, updated_at = $3 \
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(cap_nanos)
        .bind(now_ms())
        .fetch_one(&mut *conn)
        .await?;
    let dev = from_row(&row)?;
    feed::touch_developer_keys(conn, id).await?;
    Ok(dev)
}

/// One page of the operator's developer list: newest first, optionally filtered by a substring
/// of the email, name or company (case-insensitive).
pub async fn search(
    store: &Store,
    query: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Developer>, i64)> {
    let pattern = query.filter(|q| !q.is_empty()).map(|q| {
        let escaped = q
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let filter =
        "($1 IS NULL OR email LIKE $1 ESCAPE '\\' OR LOWER(full_name) LIKE $1 ESCAPE '\\' \
                  OR LOWER(COALESCE(company_name, '')) LIKE $1 ESCAPE '\\')";
    let sql = format!(
        "SELECT {COLUMNS} FROM developers WHERE {filter} \
         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    );
    let rows = sqlx::query(&sql)
        .bind(&pattern)
        .bind(limit)
        .bind(offset)
        .fetch_all(store.pool())
        .await?;
    let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM developers WHERE {filter}"))
        .bind(&pattern)
        .fetch_one(store.pool())
        .await?;
    Ok((rows.iter().map(from_row).collect::<Result<_>>()?, total))
}
