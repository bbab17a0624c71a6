//! Operator endpoints under `/admin/…` (role `admin`): list and search developers, create
//! accounts, disable or enable them (their keys stop or resume on every gateway), set plan,
//! role, quota and rate-limit overrides (gateways apply them within a second), revoke any key,
//! and read the audit log. Every change is written to the audit log in its own transaction.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_store::audit::{self, Audit, AuditEntry};
use aihub_store::developers::{self, NewDeveloper, OperatorUpdate, ROLE_ADMIN, ROLE_DEVELOPER};
use aihub_store::{auth as sessions, StoreError};

use crate::accounts::{check_email, DeveloperView, DEVELOPER_TYPES};
use crate::auth::{check_password, ClientMeta, Operator};
use crate::error::{AppError, FieldError, Json, Query};
use crate::keys::{double_option, KeyList, ListQuery};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Substring of the email, name or company.
    pub q: Option<String>,
    /// 1 to 200. Default 50.
    pub limit: Option<i64>,
    /// Default 0.
    pub offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeveloperList {
    pub data: Vec<DeveloperView>,
    /// Matching accounts in all pages.
    pub total: i64,
}

/// List or search developer accounts, newest first.
#[utoipa::path(get, path = "/admin/developers", tag = "operators", params(SearchQuery),
    responses((status = 200, body = DeveloperList), (status = 403, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_developers(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<SearchQuery>,
) -> Result<Json<DeveloperList>, AppError> {
    let limit = q.limit.unwrap_or(50);
    let offset = q.offset.unwrap_or(0);
    let mut errors = Vec::new();
    if !(1..=200).contains(&limit) {
        errors.push(FieldError::new("limit", "must be 1 to 200"));
    }
    if offset < 0 {
        errors.push(FieldError::new("offset", "must not be negative"));
    }
    AppError::check(errors)?;
    let (rows, total) = developers::search(&s.store, q.q.as_deref(), limit, offset).await?;
    Ok(Json(DeveloperList {
        data: rows
            .iter()
            .map(|d| DeveloperView::new(d, &s.plans))
            .collect(),
        total,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeveloper {
    pub email: String,
    pub password: String,
    pub full_name: String,
    pub company_name: Option<String>,
    /// Default `individual`.
    pub developer_type: Option<String>,
    /// `developer` (default) or `admin`.
    pub role: Option<String>,
    /// One of the plans (`GET /plans`). Default: the default plan.
    pub plan: Option<String>,
}

/// Create an account (already verified), e.g. for an enterprise customer or another operator.
#[utoipa::path(post, path = "/admin/developers", tag = "operators",
    request_body = CreateDeveloper,
    responses((status = 201, body = DeveloperView), (status = 409, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_developer(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Json(r): Json<CreateDeveloper>,
) -> Result<(StatusCode, Json<DeveloperView>), AppError> {
    let mut errors = Vec::new();
    if let Err(e) = check_email(&r.email) {
        errors.push(FieldError::new("email", e));
    }
    if let Err(e) = check_password(&r.password, &r.email) {
        errors.push(FieldError::new("password", e));
    }
    crate::accounts::check_name("full_name", &r.full_name, &mut errors);
    if let Some(c) = &r.company_name {
        crate::accounts::check_name("company_name", c, &mut errors);
    }
    check_choices(
        &s,
        r.developer_type.as_deref(),
        r.role.as_deref(),
        r.plan.as_deref(),
        &mut errors,
    );
    AppError::check(errors)?;
    let new = NewDeveloper {
        email: r.email.trim().to_lowercase(),
        password_hash: s.passwords.hash(r.password).await?,
        full_name: r.full_name.trim().to_owned(),
        company_name: r.company_name.map(|c| c.trim().to_owned()),
        developer_type: r.developer_type.unwrap_or_else(|| "individual".into()),
        role: r.role.unwrap_or_else(|| ROLE_DEVELOPER.into()),
        plan: r.plan.unwrap_or_else(|| s.plans.default_plan.clone()),
        verified: true,
    };
    let mut tx = s.store.begin_write().await?;
    let dev = developers::insert(&mut tx, &new)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                AppError::Conflict("An account with this email exists.".into())
            }
            e => e.into(),
        })?;
    let ip = meta.ip.map(|i| i.to_string());
    let entry = Audit {
        actor_id: &op.id,
        action: "developer.create",
        target_type: "developer",
        target_id: &dev.id,
        details: serde_json::json!({ "email": dev.email, "role": dev.role, "plan": dev.plan }),
        ip: ip.as_deref(),
    };
    audit::record(&mut tx, &entry).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(DeveloperView::new(&dev, &s.plans)),
    ))
}

fn check_choices(
    s: &AppState,
    developer_type: Option<&str>,
    role: Option<&str>,
    plan: Option<&str>,
    errors: &mut Vec<FieldError>,
) {
    if developer_type.is_some_and(|t| !DEVELOPER_TYPES.contains(&t)) {
        errors.push(FieldError::new(
            "developer_type",
            "must be `individual` or `enterprise`",
        ));
    }
    if role.is_some_and(|r| r != ROLE_DEVELOPER && r != ROLE_ADMIN) {
        errors.push(FieldError::new("role", "must be `developer` or `admin`"));
    }
    if let Some(p) = plan {
        if !s.plans.plans.contains_key(p) {
            let names: Vec<&str> = s.plans.plans.keys().map(String::as_str).collect();
            errors.push(FieldError::new(
                "plan",
                format!("must be one of: {}", names.join(", ")),
            ));
        }
    }
}

/// One developer account.
#[utoipa::path(get, path = "/admin/developers/{id}", tag = "operators",
    params(("id" = String, Path, description = "Developer id")),
    responses((status = 200, body = DeveloperView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_developer(
    State(s): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<DeveloperView>, AppError> {
    let dev = developers::by_id(&s.store, &id).await?;
    Ok(Json(DeveloperView::new(&dev, &s.plans)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDeveloper {
    /// `false` disables the account: its sessions end and its keys stop working on every
    /// gateway within a second. `true` enables it again.
    pub active: Option<bool>,
    pub plan: Option<String>,
    pub role: Option<String>,
    /// Monthly token quota; `null` = the plan's.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub api_quota_limit: Option<Option<i64>>,
    /// Requests per minute over all the developer's keys (1 to 10000000); `null` = the plan's.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub api_rate_limit: Option<Option<i64>>,
    /// Tokens per minute over all the developer's keys (1 to 1000000000); `null` = the plan's.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub api_token_rate_limit: Option<Option<i64>>,
}

/// Disable or enable an account; set its plan, role, quota or rate limits. Gateways apply a
/// new plan or limit within a second.
#[utoipa::path(put, path = "/admin/developers/{id}", tag = "operators",
    params(("id" = String, Path, description = "Developer id")),
    request_body = UpdateDeveloper,
    responses((status = 200, body = DeveloperView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_developer(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
    Json(r): Json<UpdateDeveloper>,
) -> Result<Json<DeveloperView>, AppError> {
    let mut errors = Vec::new();
    check_choices(&s, None, r.role.as_deref(), r.plan.as_deref(), &mut errors);
    if r.api_quota_limit.flatten().is_some_and(|n| n < 0) {
        errors.push(FieldError::new("api_quota_limit", "must not be negative"));
    }
    // Per-minute limits are positive, as the gateway applies them (0 would read as the plan's).
    for (field, v, max) in [
        ("api_rate_limit", r.api_rate_limit, crate::keys::MAX_RPM),
        (
            "api_token_rate_limit",
            r.api_token_rate_limit,
            crate::keys::MAX_TPM,
        ),
    ] {
        if v.flatten().is_some_and(|n| !(1..=max).contains(&n)) {
            errors.push(FieldError::new(field, format!("must be 1 to {max}")));
        }
    }
    if id == op.id && (r.active == Some(false) || r.role.as_deref() == Some(ROLE_DEVELOPER)) {
        errors.push(FieldError::new(
            "active",
            "operators cannot disable or demote themselves",
        ));
    }
    AppError::check(errors)?;
    let u = OperatorUpdate {
        active: r.active,
        plan: r.plan.clone(),
        role: r.role.clone(),
        api_quota_limit: r.api_quota_limit,
        api_rate_limit: r.api_rate_limit,
        api_token_rate_limit: r.api_token_rate_limit,
        changed_by: Some(op.id.clone()),
    };
    let mut tx = s.store.begin_write().await?;
    // The developer's row first (lock order: developer, sessions, keys, feed counter), so the
    // update with its change-feed stamp can be the last write.
    developers::lock(&mut tx, &id).await?;
    if r.active == Some(false) {
        sessions::revoke_all_sessions(&mut tx, &id).await?;
    }
    let ip = meta.ip.map(|i| i.to_string());
    let entry = Audit {
        actor_id: &op.id,
        action: "developer.update",
        target_type: "developer",
        target_id: &id,
        details: serde_json::json!({
            "active": r.active,
            "plan": r.plan,
            "role": r.role,
            "api_quota_limit": r.api_quota_limit,
            "api_rate_limit": r.api_rate_limit,
            "api_token_rate_limit": r.api_token_rate_limit,
        }),
        ip: ip.as_deref(),
    };
    audit::record(&mut tx, &entry).await?;
    let dev = developers::operator_update(&mut tx, &id, &u).await?;
    tx.commit().await?;
    if u.touches_keys() {
        s.notifier.keys_changed();
    }
    Ok(Json(DeveloperView::new(&dev, &s.plans)))
}

/// A developer's keys.
#[utoipa::path(get, path = "/admin/developers/{id}/keys", tag = "operators",
    params(("id" = String, Path, description = "Developer id"), ListQuery),
    responses((status = 200, body = KeyList), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn developer_keys(
    State(s): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<KeyList>, AppError> {
    developers::by_id(&s.store, &id).await?;
    crate::keys::list_for(&s, &id, q).await
}

/// Revoke any developer's key.
#[utoipa::path(delete, path = "/admin/keys/{id}", tag = "operators",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let ip = meta.ip.map(|i| i.to_string());
    crate::keys::revoke(&s, None, &id, Some((&op.id, ip.as_deref()))).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries about this developer or key id.
    pub target_id: Option<String>,
    /// Entries older than this entry id (paging).
    pub before: Option<i64>,
    /// 1 to 500. Default 100.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<AuditEntry>,
}

/// The audit log of operator actions, newest first.
#[utoipa::path(get, path = "/admin/audit", tag = "operators", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = 403, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_log(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditList>, AppError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(AppError::validation("limit", "must be 1 to 500"));
    }
    let data = audit::list(&s.store, q.target_id.as_deref(), q.before, limit).await?;
    Ok(Json(AuditList { data }))
}
