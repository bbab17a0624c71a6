//! Operator endpoints under `/admin/…` (role `admin`): list and search developers, create
//! accounts, disable or enable them (their keys stop or resume on every gateway), set plan,
//! role, quota and rate-limit overrides (gateways apply them within a second), revoke any key,
//! and read the audit log. The wire types and handlers only: the rules, transactions and audit
//! entries are the service layer's (`aihub_control::operators`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_control::{operators, Actor};
use aihub_store::audit::AuditEntry;

use crate::accounts::DeveloperView;
use crate::auth::{ClientMeta, Operator};
use crate::error::{AppError, Json, Query};
use crate::keys::{double_option, KeyList, ListQuery};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    /// Substring of the email, name or company.
    pub q: Option<String>,
    /// 1 to 200. Default 50.
    pub limit: Option<i64>,
    /// Default 0.
    pub offset: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeveloperList {
    pub data: Vec<DeveloperView>,
    /// Matching accounts in all pages.
    pub total: i64,
}

/// List or search developer accounts, newest first.
#[utoipa::path(get, path = "/admin/developers", tag = "operators", params(SearchQuery),
    responses((status = 200, body = DeveloperList), (status = 403, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_developers(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<SearchQuery>,
) -> Result<Json<DeveloperList>, AppError> {
    let search = operators::Search {
        q: q.q,
        limit: q.limit,
        offset: q.offset,
    };
    let (rows, total) = s.control.search_developers(search).await?;
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
pub(crate) struct CreateDeveloper {
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
pub(crate) async fn create_developer(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Json(r): Json<CreateDeveloper>,
) -> Result<(StatusCode, Json<DeveloperView>), AppError> {
    let r = operators::NewAccount {
        email: r.email,
        password: r.password,
        full_name: r.full_name,
        company_name: r.company_name,
        developer_type: r.developer_type,
        role: r.role,
        plan: r.plan,
    };
    s.control.check_new_account(&r)?;
    let hash = s.passwords.hash(r.password.clone()).await?;
    let ip = meta.ip.map(|i| i.to_string());
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    let dev = s.control.create_account(&by, r, hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(DeveloperView::new(&dev, &s.plans)),
    ))
}

/// One developer account.
#[utoipa::path(get, path = "/admin/developers/{id}", tag = "operators",
    params(("id" = String, Path, description = "Developer id")),
    responses((status = 200, body = DeveloperView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_developer(
    State(s): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<DeveloperView>, AppError> {
    let dev = s.control.developer(&id).await?;
    Ok(Json(DeveloperView::new(&dev, &s.plans)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateDeveloper {
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
pub(crate) async fn update_developer(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
    Json(r): Json<UpdateDeveloper>,
) -> Result<Json<DeveloperView>, AppError> {
    let change = operators::AccountChange {
        active: r.active,
        plan: r.plan,
        role: r.role,
        api_quota_limit: r.api_quota_limit,
        api_rate_limit: r.api_rate_limit,
        api_token_rate_limit: r.api_token_rate_limit,
        ..Default::default()
    };
    let ip = meta.ip.map(|i| i.to_string());
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    let dev = s.control.update_account(&by, &id, change).await?;
    Ok(Json(DeveloperView::new(&dev, &s.plans)))
}

/// A developer's keys.
#[utoipa::path(get, path = "/admin/developers/{id}/keys", tag = "operators",
    params(("id" = String, Path, description = "Developer id"), ListQuery),
    responses((status = 200, body = KeyList), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn developer_keys(
    State(s): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<KeyList>, AppError> {
    s.control.developer(&id).await?;
    let page = s.control.list_keys(&id, q.into()).await?;
    Ok(Json(page.into()))
}

/// Revoke any developer's key.
#[utoipa::path(delete, path = "/admin/keys/{id}", tag = "operators",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn revoke_key(
    State(s): State<AppState>,
    Operator(op): Operator,
    meta: ClientMeta,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let ip = meta.ip.map(|i| i.to_string());
    let by = Actor::Operator {
        id: &op.id,
        ip: ip.as_deref(),
    };
    s.control.revoke_key(&by, None, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Only entries about this developer or key id.
    pub target_id: Option<String>,
    /// Entries older than this entry id (paging).
    pub before: Option<i64>,
    /// 1 to 500. Default 100.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditList {
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<AuditEntry>,
}

/// The audit log of operator actions, newest first.
#[utoipa::path(get, path = "/admin/audit", tag = "operators", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = 403, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn audit_log(
    State(s): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditList>, AppError> {
    let q = operators::AuditSearch {
        target_id: q.target_id,
        before: q.before,
        limit: q.limit,
    };
    let data = s.control.audit_log(q).await?;
    Ok(Json(AuditList { data }))
}
