//! API keys under `/developer/keys`: create (the full key is returned once), list, read,
//! update, revoke, and regenerate with a grace period for the old key. The wire types and
//! handlers only: every rule, transaction and outbox event is in the service layer
//! (`aihub_control::keys`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use aihub_control::{keys, Actor};
use aihub_store::keys::ApiKey;
use aihub_store::now_ms;
use aihub_store::outbox::rfc3339_ms;

use crate::auth::Caller;
use crate::error::{AppError, Json, Query};
use crate::state::AppState;

/// For optional fields where `null` means "clear": absent = `None`, `null` = `Some(None)`.
pub(crate) fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// What a key may call: model and endpoint patterns (`*`, `prefix*`, exact names). Endpoints
/// are paths after `/v1/`, e.g. `chat/completions`, `embeddings`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Permissions {
    #[serde(default = "star")]
    pub models: Vec<String>,
    #[serde(default = "star")]
    pub endpoints: Vec<String>,
}

fn star() -> Vec<String> {
    vec!["*".into()]
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions {
            models: star(),
            endpoints: star(),
        }
    }
}

/// A key as its owner sees it: never the key, never its hash.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyView {
    pub id: String,
    pub name: String,
    /// The first characters of the key, e.g. `ahub_dev_abcd…`.
    pub prefix: String,
    pub permissions: Permissions,
    /// Requests per minute for this key (`null`: the developer's or plan's limit).
    pub rate_limit_rpm: Option<i64>,
    /// Tokens (prompt + completion) per minute for this key (`null`: the developer's or plan's
    /// limit).
    pub rate_limit_tpm: Option<i64>,
    /// Client addresses allowed (CIDRs); empty = any.
    pub ip_allowlist: Vec<String>,
    /// RFC 3339; `null` = never.
    pub expires_at: Option<String>,
    /// `active`, `disabled`, `expired` or `revoked`.
    pub status: &'static str,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// The key that replaced this one (after a regeneration).
    pub rotated_to: Option<String>,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        let status = if k.deleted_at.is_some() {
            "revoked"
        } else if k.expires_at.is_some_and(|e| e <= now_ms()) {
            "expired"
        } else if k.disabled_at.is_some() {
            "disabled"
        } else {
            "active"
        };
        KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.key_prefix.clone(),
            permissions: Permissions {
                models: k.models.clone(),
                endpoints: k.endpoints.clone(),
            },
            rate_limit_rpm: k.rate_limit_rpm,
            rate_limit_tpm: k.rate_limit_tpm,
            ip_allowlist: k.ip_allowlist.clone(),
            expires_at: k.expires_at.map(rfc3339_ms),
            status,
            created_at: rfc3339_ms(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339_ms),
            rotated_to: k.rotated_to.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    /// The full key. It is shown this once: store it now.
    pub key: String,
    pub api_key: KeyView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKeyRequest {
    pub name: String,
    #[serde(default)]
    pub permissions: Option<Permissions>,
    /// Requests per minute for this key (1 to 10000000). Default: the developer's or plan's.
    #[serde(default)]
    pub rate_limit_rpm: Option<i64>,
    /// Tokens per minute for this key (1 to 1000000000). Default: the developer's or plan's.
    #[serde(default)]
    pub rate_limit_tpm: Option<i64>,
    /// Lifetime in days (1 to the platform's maximum, `keys.max_lifetime`: 3650 days unless
    /// configured). Default: the platform's (365 days).
    #[serde(default)]
    pub expires_in_days: Option<i64>,
    /// Set to create a key that never expires (when the platform allows it,
    /// `keys.allow_never_expires`).
    #[serde(default)]
    pub never_expires: bool,
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
}

impl From<Permissions> for keys::Permissions {
    fn from(p: Permissions) -> Self {
        keys::Permissions {
            models: p.models,
            endpoints: p.endpoints,
        }
    }
}

impl From<CreateKeyRequest> for keys::CreateKey {
    fn from(r: CreateKeyRequest) -> Self {
        keys::CreateKey {
            name: r.name,
            permissions: r.permissions.map(Into::into),
            rate_limit_rpm: r.rate_limit_rpm,
            rate_limit_tpm: r.rate_limit_tpm,
            expires_in_days: r.expires_in_days,
            never_expires: r.never_expires,
            ip_allowlist: r.ip_allowlist,
        }
    }
}

impl From<keys::Created> for CreatedKey {
    fn from(c: keys::Created) -> Self {
        CreatedKey {
            key: c.key,
            api_key: (&c.api_key).into(),
        }
    }
}

/// Create an API key. The full key is in this response only.
#[utoipa::path(post, path = "/developer/keys", tag = "keys",
    request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), AppError> {
    let dev = &caller.developer;
    let created = s
        .control
        .create_key(&Actor::developer(dev), &dev.id, r.into())
        .await?;
    Ok((StatusCode::CREATED, Json(created.into())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Include revoked keys. Default false.
    #[serde(default)]
    pub include_revoked: bool,
    /// Page size, 1 to 100. Default 50.
    #[serde(default)]
    pub limit: Option<i64>,
    /// The id of the last key of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

impl From<ListQuery> for keys::ListKeys {
    fn from(q: ListQuery) -> Self {
        keys::ListKeys {
            include_revoked: q.include_revoked,
            limit: q.limit,
            after: q.after,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyList {
    pub data: Vec<KeyView>,
    /// Whether another page follows (pass the last id as `after`).
    pub has_more: bool,
}

impl From<keys::KeyPage> for KeyList {
    fn from(p: keys::KeyPage) -> Self {
        KeyList {
            data: p.keys.iter().map(KeyView::from).collect(),
            has_more: p.has_more,
        }
    }
}

/// List the caller's keys, newest first.
#[utoipa::path(get, path = "/developer/keys", tag = "keys", params(ListQuery),
    responses((status = 200, body = KeyList), (status = 401, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<KeyList>, AppError> {
    let page = s.control.list_keys(&caller.developer.id, q.into()).await?;
    Ok(Json(page.into()))
}

/// One of the caller's keys.
#[utoipa::path(get, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, AppError> {
    let k = s.control.key(Some(&caller.developer.id), &id).await?;
    Ok(Json((&k).into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateKeyRequest {
    pub name: Option<String>,
    pub permissions: Option<Permissions>,
    /// `null` clears the per-key limit.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub rate_limit_rpm: Option<Option<i64>>,
    /// `null` clears the per-key limit.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub rate_limit_tpm: Option<Option<i64>>,
    /// RFC 3339 instant in the future, at most the platform's maximum key lifetime
    /// (`keys.max_lifetime`, 3650 days unless configured) from now; `null` = never expires
    /// (when the platform allows it). An expired key's expiry cannot change: it stays expired.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<Option<String>>,
    pub ip_allowlist: Option<Vec<String>>,
    /// `false` disables the key (it can be enabled again); `true` enables it.
    pub active: Option<bool>,
}

impl From<UpdateKeyRequest> for keys::UpdateKey {
    fn from(r: UpdateKeyRequest) -> Self {
        keys::UpdateKey {
            name: r.name,
            permissions: r.permissions.map(Into::into),
            rate_limit_rpm: r.rate_limit_rpm,
            rate_limit_tpm: r.rate_limit_tpm,
            expires_at: r.expires_at,
            ip_allowlist: r.ip_allowlist,
            active: r.active,
        }
    }
}

/// Update a key's name, permissions, limits, expiry, IP allowlist or active flag.
#[utoipa::path(put, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body = UpdateKeyRequest,
    responses((status = 200, body = KeyView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn update(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(r): Json<UpdateKeyRequest>,
) -> Result<Json<KeyView>, AppError> {
    let k = s
        .control
        .update_key(&caller.developer.id, &id, r.into())
        .await?;
    Ok(Json((&k).into()))
}

/// Revoke a key: every gateway refuses it within a second.
#[utoipa::path(delete, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let dev = &caller.developer;
    s.control
        .revoke_key(&Actor::developer(dev), Some(&dev.id), &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegenerateRequest {
    /// How long the old key keeps working, in seconds (0 = it stops now). Default 0; at most
    /// the platform's maximum (7 days).
    #[serde(default)]
    pub grace_period_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RegeneratedKey {
    /// The new key, shown this once.
    pub key: String,
    pub api_key: KeyView,
    /// The old key, now expiring at the end of the grace period.
    pub previous: KeyView,
}

impl From<keys::Rotated> for RegeneratedKey {
    fn from(r: keys::Rotated) -> Self {
        RegeneratedKey {
            key: r.key,
            api_key: (&r.api_key).into(),
            previous: (&r.previous).into(),
        }
    }
}

/// Regenerate a key: a new key with the same permissions and limits; the old one works for
/// the grace period chosen.
#[utoipa::path(post, path = "/developer/keys/{id}/regenerate", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body(content = RegenerateRequest, description = "Optional; an empty body means no grace period"),
    responses((status = 201, body = RegeneratedKey), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn regenerate(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RegeneratedKey>), AppError> {
    // Refused before the body is read, as before any other check.
    keys::may_create_keys(&caller.developer)?;
    let r: RegenerateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RegenerateRequest::default()
    } else {
        crate::error::parse_json(&body)?
    };
    let rotated = s
        .control
        .regenerate_key(&caller.developer, &id, r.grace_period_seconds)
        .await?;
    Ok((StatusCode::CREATED, Json(rotated.into())))
}
