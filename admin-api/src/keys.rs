//! API keys under `/developer/keys`: create (the full key is returned once), list, read,
//! update, revoke, and regenerate with a grace period for the old key. Each change commits with
//! its outbox event (`api_key.created`, `api_key.deleted`, `api_key.rotated`) and then nudges
//! gateways (Redis); gateways follow the change feed either way.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use aihub_apikey::pattern::Pattern;
use aihub_apikey::KeyHash;
use aihub_store::keys::{self as store_keys, ApiKey, KeyUpdate, NewKey};
use aihub_store::now_ms;
use aihub_store::outbox::{self, rfc3339_ms};

use crate::auth::Caller;
use crate::error::{AppError, FieldError, Json, Query};
use crate::state::AppState;

/// For optional fields where `null` means "clear": absent = `None`, `null` = `Some(None)`.
pub fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
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
pub struct Permissions {
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
pub struct KeyView {
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
pub struct CreatedKey {
    /// The full key. It is shown this once: store it now.
    pub key: String,
    pub api_key: KeyView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
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

fn check_key_name(name: &str, errors: &mut Vec<FieldError>) {
    let n = name.trim().chars().count();
    if n == 0 || n > 100 {
        errors.push(FieldError::new("name", "must be 1 to 100 characters"));
    }
}

fn check_patterns(field: &str, list: &[String], errors: &mut Vec<FieldError>) {
    if list.is_empty() || list.len() > 50 {
        errors.push(FieldError::new(field, "must hold 1 to 50 patterns"));
        return;
    }
    for (i, p) in list.iter().enumerate() {
        if p.len() > 200 {
            errors.push(FieldError::new(
                &format!("{field}[{i}]"),
                "is longer than 200 characters",
            ));
        } else if let Err(e) = Pattern::parse(p) {
            errors.push(FieldError::new(&format!("{field}[{i}]"), e.to_string()));
        }
    }
}

/// Largest requests-per-minute limit accepted (keys and developer overrides).
pub const MAX_RPM: i64 = 10_000_000;
/// Largest tokens-per-minute limit accepted (keys and developer overrides).
pub const MAX_TPM: i64 = 1_000_000_000;

fn check_rates(rpm: Option<i64>, tpm: Option<i64>, errors: &mut Vec<FieldError>) {
    for (field, v, max) in [
        ("rate_limit_rpm", rpm, MAX_RPM),
        ("rate_limit_tpm", tpm, MAX_TPM),
    ] {
        if v.is_some_and(|n| !(1..=max).contains(&n)) {
            errors.push(FieldError::new(field, format!("must be 1 to {max}")));
        }
    }
}

/// Parses and normalizes an IP allowlist (CIDRs or single addresses).
fn check_ips(list: &[String], errors: &mut Vec<FieldError>) -> Vec<String> {
    if list.len() > 50 {
        errors.push(FieldError::new(
            "ip_allowlist",
            "must hold at most 50 entries",
        ));
        return Vec::new();
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let entry = entry.trim();
        // The gateway's own parser: what is stored is exactly what the gateway enforces.
        match aihub_apikey::pattern::parse_ip_net(entry) {
            Ok(n) => out.push(n.to_string()),
            Err(_) => errors.push(FieldError::new(
                &format!("ip_allowlist[{i}]"),
                "is not an IP address or CIDR block",
            )),
        }
    }
    out
}

/// `d` for people: `3650 days`, `1 day`, else humantime's form (`36h`).
fn span(d: Duration) -> String {
    match d.as_secs() {
        86_400 => "1 day".into(),
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// The one rule for a key's expiry, at creation and on every later change: `expires_at`
/// (unix ms; `None` = never) must lie in the future and at most `keys.max_lifetime` after
/// `now`, and `never` needs `keys.allow_never_expires`. The message is for the field that
/// carried the expiry.
pub fn check_expiry(
    keys: &crate::config::KeysConfig,
    expires_at: Option<i64>,
    now: i64,
) -> Result<(), String> {
    let max = keys.max_lifetime;
    match expires_at {
        None if keys.allow_never_expires => Ok(()),
        None => Err(format!(
            "keys must expire on this platform, at most {} from now",
            span(max)
        )),
        Some(at) if at <= now => Err("must be in the future".into()),
        Some(at) if (at - now) as u128 > max.as_millis() => {
            Err(format!("must be at most {} from now", span(max)))
        }
        Some(_) => Ok(()),
    }
}

fn event_data(k: &ApiKey) -> serde_json::Value {
    serde_json::json!({
        "key_id": k.id,
        "developer_id": k.developer_id,
        "name": k.name,
        "prefix": k.key_prefix,
        "expires_at": k.expires_at.map(rfc3339_ms),
    })
}

/// A new key string, its stored hash and display prefix.
fn mint() -> (String, String, String) {
    let key = aihub_apikey::generate();
    let hash = KeyHash::of(&key).to_hex();
    let prefix = aihub_apikey::display_prefix(&key);
    (key, hash, prefix)
}

fn require_verified(caller: &Caller) -> Result<(), AppError> {
    if caller.developer.is_verified() {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "email_not_verified",
            "Verify your email address before creating API keys.".into(),
        ))
    }
}

/// Create an API key. The full key is in this response only.
#[utoipa::path(post, path = "/developer/keys", tag = "keys",
    request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), AppError> {
    require_verified(&caller)?;
    let created = create_key(&s, &caller.developer.id, r, None).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Validates a key request and stores the key with its `api_key.created` event and, when an
/// operator or the CLI acts (`actor`), its audit entry, in one transaction (shared by the
/// endpoint and the `aihub keys create` command).
pub async fn create_key(
    s: &AppState,
    developer_id: &str,
    r: CreateKeyRequest,
    actor: Option<&str>,
) -> Result<CreatedKey, AppError> {
    let mut errors = Vec::new();
    check_key_name(&r.name, &mut errors);
    let perms = r.permissions.unwrap_or_default();
    check_patterns("permissions.models", &perms.models, &mut errors);
    check_patterns("permissions.endpoints", &perms.endpoints, &mut errors);
    check_rates(r.rate_limit_rpm, r.rate_limit_tpm, &mut errors);
    let ips = check_ips(&r.ip_allowlist, &mut errors);
    let now = now_ms();
    let (field, expires_at) = match (r.expires_in_days, r.never_expires) {
        (Some(_), true) => {
            errors.push(FieldError::new(
                "expires_in_days",
                "conflicts with never_expires",
            ));
            ("expires_in_days", None)
        }
        (Some(d), false) if d < 1 => {
            errors.push(FieldError::new("expires_in_days", "must be at least 1"));
            ("expires_in_days", None)
        }
        // Clamped only to keep the arithmetic sane; the rule below refuses it anyway.
        (Some(d), false) => ("expires_in_days", Some(now + d.min(1 << 32) * 86_400_000)),
        (None, true) => ("never_expires", None),
        (None, false) => (
            "expires_in_days",
            s.config
                .keys
                .default_lifetime()
                .map(|l| now + l.as_millis() as i64),
        ),
    };
    if errors.iter().all(|e| e.field != field) {
        if let Err(m) = check_expiry(&s.config.keys, expires_at, now) {
            errors.push(FieldError::new(field, m));
        }
    }
    AppError::check(errors)?;

    let (key, hash, prefix) = mint();
    let new = NewKey {
        id: aihub_store::new_id("key_"),
        developer_id: developer_id.to_owned(),
        name: r.name.trim().to_owned(),
        key_hash: hash,
        key_prefix: prefix,
        models: perms.models,
        endpoints: perms.endpoints,
        ip_allowlist: ips,
        rate_limit_rpm: r.rate_limit_rpm,
        rate_limit_tpm: r.rate_limit_tpm,
        expires_at,
    };
    let mut tx = s.store.begin_write().await?;
    // Concurrent creates by one developer queue here, so the cap holds exactly.
    aihub_store::developers::lock(&mut tx, developer_id).await?;
    if store_keys::count_live(&mut tx, developer_id).await? >= s.config.keys.max_per_developer {
        return Err(AppError::Forbidden(
            "key_limit_reached",
            format!(
                "An account may hold {} keys; revoke one first.",
                s.config.keys.max_per_developer
            ),
        ));
    }
    // The event (and audit entry) first: the key's insert ends with its change-feed stamp,
    // which serializes key writes until commit, so it must be the last write.
    let event = serde_json::json!({
        "key_id": new.id,
        "developer_id": developer_id,
        "name": new.name,
        "prefix": new.key_prefix,
        "expires_at": new.expires_at.map(rfc3339_ms),
    });
    outbox::enqueue(&mut tx, outbox::API_KEY_CREATED, Some(developer_id), event).await?;
    if let Some(actor_id) = actor {
        let entry = aihub_store::audit::Audit {
            actor_id,
            action: "api_key.create",
            target_type: "api_key",
            target_id: &new.id,
            details: serde_json::json!({ "developer_id": developer_id }),
            ip: None,
        };
        aihub_store::audit::record(&mut tx, &entry).await?;
    }
    let created = store_keys::insert(&mut tx, &new).await?;
    tx.commit().await?;
    s.notifier.keys_changed();
    s.metrics.event("key_created");
    Ok(CreatedKey {
        key,
        api_key: (&created).into(),
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
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

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<KeyView>,
    /// Whether another page follows (pass the last id as `after`).
    pub has_more: bool,
}

/// List the caller's keys, newest first.
#[utoipa::path(get, path = "/developer/keys", tag = "keys", params(ListQuery),
    responses((status = 200, body = KeyList), (status = 401, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<KeyList>, AppError> {
    list_for(&s, &caller.developer.id, q).await
}

pub async fn list_for(
    s: &AppState,
    developer_id: &str,
    q: ListQuery,
) -> Result<Json<KeyList>, AppError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(AppError::validation("limit", "must be 1 to 100"));
    }
    let after = match &q.after {
        Some(id) => Some(
            store_keys::get(&s.store, Some(developer_id), id)
                .await
                .map_err(|_| AppError::validation("after", "is not one of your keys"))?,
        ),
        None => None,
    };
    let mut rows = store_keys::list(
        &s.store,
        developer_id,
        q.include_revoked,
        limit + 1,
        after.as_ref().map(|k| (k.created_at, k.id.as_str())),
    )
    .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(KeyList {
        data: rows.iter().map(KeyView::from).collect(),
        has_more,
    }))
}

/// One of the caller's keys.
#[utoipa::path(get, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, AppError> {
    let k = store_keys::get(&s.store, Some(&caller.developer.id), &id).await?;
    Ok(Json((&k).into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
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

/// Update a key's name, permissions, limits, expiry, IP allowlist or active flag.
#[utoipa::path(put, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body = UpdateKeyRequest,
    responses((status = 200, body = KeyView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(r): Json<UpdateKeyRequest>,
) -> Result<Json<KeyView>, AppError> {
    let mut errors = Vec::new();
    if let Some(n) = &r.name {
        check_key_name(n, &mut errors);
    }
    if let Some(p) = &r.permissions {
        check_patterns("permissions.models", &p.models, &mut errors);
        check_patterns("permissions.endpoints", &p.endpoints, &mut errors);
    }
    check_rates(
        r.rate_limit_rpm.flatten(),
        r.rate_limit_tpm.flatten(),
        &mut errors,
    );
    let ips = r.ip_allowlist.as_deref().map(|l| check_ips(l, &mut errors));
    let now = now_ms();
    let expires_at = match &r.expires_at {
        None => None,
        Some(None) => Some(None),
        Some(Some(t)) => match humantime::parse_rfc3339_weak(t) {
            Ok(at) => Some(Some(
                at.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
                    .unwrap_or(0),
            )),
            Err(_) => {
                errors.push(FieldError::new("expires_at", "must be an RFC 3339 instant"));
                None
            }
        },
    };
    if let Some(e) = expires_at {
        if let Err(m) = check_expiry(&s.config.keys, e, now) {
            errors.push(FieldError::new("expires_at", m));
        }
    }
    AppError::check(errors)?;
    let u = KeyUpdate {
        name: r.name.map(|n| n.trim().to_owned()),
        models: r.permissions.as_ref().map(|p| p.models.clone()),
        endpoints: r.permissions.map(|p| p.endpoints),
        ip_allowlist: ips,
        rate_limit_rpm: r.rate_limit_rpm,
        rate_limit_tpm: r.rate_limit_tpm,
        expires_at,
        active: r.active,
    };
    let mut tx = s.store.begin_write().await?;
    if u.expires_at.is_some() {
        let current = store_keys::get_on(&mut tx, Some(&caller.developer.id), &id).await?;
        if current.deleted_at.is_some() {
            return Err(AppError::NotFound);
        }
        // A regenerated key's grace period is final: it cannot be extended.
        if current.rotated_to.is_some() {
            return Err(AppError::validation(
                "expires_at",
                "cannot change on a regenerated key (its grace period is final)",
            ));
        }
        // An expired key stays expired: neither extended nor made never-expiring.
        if current.expires_at.is_some_and(|e| e <= now_ms()) {
            return Err(AppError::validation(
                "expires_at",
                "cannot change: the key has expired (create a new key)",
            ));
        }
    }
    let k = store_keys::update(&mut tx, Some(&caller.developer.id), &id, &u).await?;
    tx.commit().await?;
    s.notifier.keys_changed();
    Ok(Json((&k).into()))
}

/// Revoke a key: every gateway refuses it within a second.
#[utoipa::path(delete, path = "/developer/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    revoke(&s, Some(&caller.developer.id), &id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes a key (of `owner`, or any key for operators) with its outbox event and, when an
/// operator or the CLI acts (`actor`: id and client IP), its audit entry, in one transaction.
pub async fn revoke(
    s: &AppState,
    owner: Option<&str>,
    id: &str,
    actor: Option<(&str, Option<&str>)>,
) -> Result<ApiKey, AppError> {
    let mut tx = s.store.begin_write().await?;
    let k = store_keys::revoke(&mut tx, owner, id).await?;
    outbox::enqueue(
        &mut tx,
        outbox::API_KEY_DELETED,
        Some(&k.developer_id),
        event_data(&k),
    )
    .await?;
    if let Some((actor_id, ip)) = actor {
        let entry = aihub_store::audit::Audit {
            actor_id,
            action: "api_key.revoke",
            target_type: "api_key",
            target_id: &k.id,
            details: serde_json::json!({ "developer_id": k.developer_id, "name": k.name }),
            ip,
        };
        aihub_store::audit::record(&mut tx, &entry).await?;
    }
    tx.commit().await?;
    s.notifier.keys_changed();
    s.metrics.event("key_revoked");
    Ok(k)
}

/// A regenerated key's expiry: none when the old key had none (and the platform still allows
/// that), else the default lifetime from now (at most `keys.max_lifetime`).
fn successor_expiry(keys: &crate::config::KeysConfig, never: bool, now: i64) -> Option<i64> {
    if never && keys.allow_never_expires {
        return None;
    }
    let lifetime = match keys.default_lifetime() {
        Some(l) => l.min(keys.max_lifetime),
        None if keys.allow_never_expires => return None,
        None => keys.max_lifetime,
    };
    Some(now + lifetime.as_millis() as i64)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegenerateRequest {
    /// How long the old key keeps working, in seconds (0 = it stops now). Default 0; at most
    /// the platform's maximum (7 days).
    #[serde(default)]
    pub grace_period_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegeneratedKey {
    /// The new key, shown this once.
    pub key: String,
    pub api_key: KeyView,
    /// The old key, now expiring at the end of the grace period.
    pub previous: KeyView,
}

/// Regenerate a key: a new key with the same permissions and limits; the old one works for
/// the grace period chosen.
#[utoipa::path(post, path = "/developer/keys/{id}/regenerate", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body(content = RegenerateRequest, description = "Optional; an empty body means no grace period"),
    responses((status = 201, body = RegeneratedKey), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub async fn regenerate(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RegeneratedKey>), AppError> {
    require_verified(&caller)?;
    let r: RegenerateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RegenerateRequest::default()
    } else {
        crate::error::parse_json(&body)?
    };
    let max = s.config.keys.max_rotation_grace;
    if r.grace_period_seconds > max.as_secs() {
        return Err(AppError::validation(
            "grace_period_seconds",
            format!("must be at most {}", max.as_secs()),
        ));
    }
    let dev_id = caller.developer.id.clone();
    let mut tx = s.store.begin_write().await?;
    let old = store_keys::get_on(&mut tx, Some(&dev_id), &id).await?;
    if old.deleted_at.is_some() {
        return Err(AppError::NotFound);
    }
    let now = now_ms();
    // One successor per key: otherwise regenerating one key over and over would multiply live
    // keys past the per-developer cap.
    if let Some(next) = &old.rotated_to {
        return Err(AppError::Conflict(format!(
            "This key was already regenerated as {next}; regenerate that key instead."
        )));
    }
    if old.expires_at.is_some_and(|e| e <= now) {
        return Err(AppError::Conflict(
            "This key has expired; create a new key.".into(),
        ));
    }
    let (key, hash, prefix) = mint();
    let new = NewKey {
        id: aihub_store::new_id("key_"),
        developer_id: dev_id.clone(),
        name: old.name.clone(),
        key_hash: hash,
        key_prefix: prefix,
        models: old.models.clone(),
        endpoints: old.endpoints.clone(),
        ip_allowlist: old.ip_allowlist.clone(),
        rate_limit_rpm: old.rate_limit_rpm,
        rate_limit_tpm: old.rate_limit_tpm,
        expires_at: successor_expiry(&s.config.keys, old.expires_at.is_none(), now),
    };
    let old_until = now + r.grace_period_seconds as i64 * 1000;
    let previous_expires_at = old.expires_at.map_or(old_until, |e| e.min(old_until));
    let data = serde_json::json!({
        "key_id": new.id,
        "previous_key_id": old.id,
        "developer_id": dev_id,
        "name": new.name,
        "prefix": new.key_prefix,
        "previous_expires_at": rfc3339_ms(previous_expires_at),
    });
    // The event first: the rotation ends with the change-feed stamp (see `create_key`).
    outbox::enqueue(&mut tx, outbox::API_KEY_ROTATED, Some(&dev_id), data).await?;
    let (old, new) = store_keys::rotate(&mut tx, Some(&dev_id), &id, &new, old_until).await?;
    tx.commit().await?;
    s.notifier.keys_changed();
    s.metrics.event("key_rotated");
    Ok((
        StatusCode::CREATED,
        Json(RegeneratedKey {
            key,
            api_key: (&new).into(),
            previous: (&old).into(),
        }),
    ))
}
