//! The API keys page: the list (prefix, status, last use, expiry), creating a key with name,
//! permissions, limits, expiry and IP allowlist (the key is on the answer page only, never
//! again), rotating with a grace period, disabling/enabling, revoking. Every action is a
//! service-layer call (`aihub_control::keys`), the same the JSON API makes.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Form;
use serde::Deserialize;

use crate::error::Query;
use aihub_control::keys::{self, ListKeys, UpdateKey};
use aihub_control::Actor;

use crate::keys::{CreateKeyRequest, CreatedKey, KeyList, KeyView, Permissions, RegeneratedKey};
use crate::state::AppState;

use super::i18n::Texts;
use super::session::{see_other, Member};
use super::{form_errors, render, render_status, view, Chrome, FieldErrors, PageResult};

/// A key as the list shows it.
pub(crate) struct KeyRow {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub status: &'static str,
    pub status_text: &'static str,
    pub models: String,
    pub created: String,
    pub last_used: String,
    pub expires: String,
    pub live: bool,
    pub disabled: bool,
}

pub fn status_text(t: &'static Texts, status: &str) -> &'static str {
    match status {
        "active" => t.status_active,
        "disabled" => t.status_disabled,
        "expired" => t.status_expired,
        _ => t.status_revoked,
    }
}

impl KeyRow {
    pub fn new(k: &KeyView, t: &'static Texts) -> KeyRow {
        KeyRow {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            status: k.status,
            status_text: status_text(t, k.status),
            models: k.permissions.models.join(", "),
            created: view::day(&k.created_at),
            last_used: k.last_used_at.as_deref().map_or("—".into(), view::when),
            expires: k
                .expires_at
                .as_deref()
                .map_or(t.keys_never_short.into(), view::when),
            live: k.status == "active" || k.status == "disabled",
            disabled: k.status == "disabled",
        }
    }
}

/// The create form's fields, as typed (re-shown after a validation error).
#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    name: String,
    #[serde(default = "star")]
    models: String,
    #[serde(default = "star")]
    endpoints: String,
    #[serde(default)]
    rate_limit_rpm: String,
    #[serde(default)]
    rate_limit_tpm: String,
    #[serde(default = "default_days")]
    expires_in_days: String,
    #[serde(default)]
    never_expires: Option<String>,
    #[serde(default)]
    ip_allowlist: String,
}

fn star() -> String {
    "*".into()
}
fn default_days() -> String {
    "365".into()
}

impl Default for KeyForm {
    fn default() -> Self {
        KeyForm {
            name: String::new(),
            models: star(),
            endpoints: star(),
            rate_limit_rpm: String::new(),
            rate_limit_tpm: String::new(),
            expires_in_days: default_days(),
            never_expires: None,
            ip_allowlist: String::new(),
        }
    }
}

fn list(text: &str) -> Vec<String> {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl KeyForm {
    /// The JSON API's request; a number field that is not a number is a field error.
    fn request(&self) -> Result<CreateKeyRequest, FieldErrors> {
        let mut errors = Vec::new();
        let mut number = |field: &str, text: &str| -> Option<i64> {
            let text = text.trim().replace([',', '_', ' '], "");
            if text.is_empty() {
                return None;
            }
            match text.parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(crate::error::FieldError::new(
                        field,
                        "must be a whole number",
                    ));
                    None
                }
            }
        };
        let never = self.never_expires.is_some();
        let request = CreateKeyRequest {
            name: self.name.clone(),
            permissions: Some(Permissions {
                models: list(&self.models),
                endpoints: list(&self.endpoints),
            }),
            rate_limit_rpm: number("rate_limit_rpm", &self.rate_limit_rpm),
            rate_limit_tpm: number("rate_limit_tpm", &self.rate_limit_tpm),
            expires_in_days: if never {
                None
            } else {
                number("expires_in_days", &self.expires_in_days)
            },
            never_expires: never,
            ip_allowlist: list(&self.ip_allowlist),
        };
        if errors.is_empty() {
            Ok(request)
        } else {
            Err(FieldErrors(errors))
        }
    }
}

#[derive(Template)]
#[template(path = "portal/keys.html")]
struct KeysPage {
    page: Chrome,
    keys: Vec<KeyRow>,
    verified: bool,
    show_revoked: bool,
    form: KeyForm,
    errors: FieldErrors,
    max_grace_days: u64,
    /// Keys without an expiry are allowed (`keys.allow_never_expires`).
    never_allowed: bool,
}

#[derive(Deserialize)]
pub struct KeysQuery {
    #[serde(default)]
    revoked: bool,
    done: Option<String>,
}

async fn keys_page(
    s: &AppState,
    member: &Member,
    show_revoked: bool,
    form: KeyForm,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<KeysPage, super::Failure> {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let q = ListKeys {
        include_revoked: show_revoked,
        limit: Some(100),
        after: None,
    };
    let list = KeyList::from(s.control.list_keys(&dev.id, q).await?);
    Ok(KeysPage {
        page: Chrome::new(&member.visit, Some(dev), "keys", t.keys_title).with_notice(notice),
        keys: list.data.iter().map(|k| KeyRow::new(k, t)).collect(),
        verified: dev.is_verified(),
        show_revoked,
        form,
        errors,
        max_grace_days: s.config.keys.max_rotation_grace.as_secs() / 86_400,
        never_allowed: s.config.keys.allow_never_expires,
    })
}

pub async fn page(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<KeysQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let notice = match q.done.as_deref() {
        Some("revoked") => Some(t.done_key_revoked),
        Some("updated") => Some(t.done_key_updated),
        Some("verified") => Some(t.verify_done),
        _ => None,
    };
    let p = keys_page(
        &s,
        &member,
        q.revoked,
        KeyForm::default(),
        FieldErrors::default(),
        notice,
    )
    .await?;
    render(&p)
}

#[derive(Template)]
#[template(path = "portal/key_created.html")]
struct KeyCreatedPage {
    page: Chrome,
    key: String,
    row: KeyRow,
    /// After a rotation: when the previous key stops working.
    previous_until: Option<String>,
    gateway_url: String,
    example_model: String,
}

pub async fn create(
    State(s): State<AppState>,
    member: Member,
    Form(f): Form<KeyForm>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    keys::may_create_keys(dev)?;
    let created = match f.request() {
        Ok(request) => {
            let by = Actor::developer(dev);
            let created = s.control.create_key(&by, &dev.id, request.into()).await;
            form_errors(created.map(CreatedKey::from).map_err(Into::into))?
        }
        Err(errors) => Err(errors),
    };
    match created {
        Ok(created) => render_status(
            StatusCode::CREATED,
            &KeyCreatedPage {
                page: Chrome::new(&member.visit, Some(dev), "keys", t.keys_once_title),
                row: KeyRow::new(&created.api_key, t),
                key: created.key,
                previous_until: None,
                gateway_url: s.config.portal.gateway_url.clone(),
                example_model: s.config.portal.example_model.clone(),
            },
        ),
        Err(errors) => {
            let p = keys_page(&s, &member, false, f, errors, None).await?;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

#[derive(Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    grace_period_seconds: u64,
}

pub async fn rotate(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Form(f): Form<RotateForm>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let page = Chrome::new(
        &member.visit,
        Some(&member.caller.developer),
        "keys",
        t.keys_once_title,
    );
    let rotated = s
        .control
        .regenerate_key(&member.caller.developer, &id, f.grace_period_seconds)
        .await
        .map(RegeneratedKey::from)?;
    render_status(
        StatusCode::CREATED,
        &KeyCreatedPage {
            page,
            row: KeyRow::new(&rotated.api_key, t),
            key: rotated.key,
            previous_until: rotated.previous.expires_at.as_deref().map(view::when),
            gateway_url: s.config.portal.gateway_url.clone(),
            example_model: s.config.portal.example_model.clone(),
        },
    )
}

pub async fn revoke(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    let dev = &member.caller.developer;
    s.control
        .revoke_key(&Actor::developer(dev), Some(&dev.id), &id)
        .await?;
    Ok(see_other("/portal/keys?done=revoked"))
}

#[derive(Deserialize)]
pub struct ActiveForm {
    active: bool,
}

pub async fn set_active(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Form(f): Form<ActiveForm>,
) -> PageResult {
    let update = UpdateKey {
        active: Some(f.active),
        ..Default::default()
    };
    s.control
        .update_key(&member.caller.developer.id, &id, update)
        .await?;
    Ok(see_other("/portal/keys?done=updated"))
}
