//! API keys: create (the full key exists only in the answer), list, read, update, revoke, and
//! regenerate with a grace period for the old key. Each change commits with its outbox event
//! (`api_key.created`, `api_key.deleted`, `api_key.rotated`), with an audit entry when an
//! operator or the CLI acts, and then nudges gateways; gateways follow the change feed either
//! way.

use std::time::{Duration, UNIX_EPOCH};

use aihub_apikey::pattern::Pattern;
use aihub_apikey::KeyHash;
use aihub_store::developers::{self, Developer};
use aihub_store::keys::{self as store_keys, ApiKey, KeyUpdate};
use aihub_store::now_ms;
use aihub_store::outbox::{self, rfc3339_ms};

use crate::journal::{self, Actor, Entry, Event};
use crate::{Control, Error, FieldError, Result};

/// Largest requests-per-minute limit accepted (keys and developer overrides).
pub const MAX_RPM: i64 = 10_000_000;
/// Largest tokens-per-minute limit accepted (keys and developer overrides).
pub const MAX_TPM: i64 = 1_000_000_000;

/// The platform's key rules (`keys` in the admin configuration).
#[derive(Debug, Clone)]
pub struct KeyRules {
    /// Lifetime of a new key when the command names none; `None` = never expires.
    pub default_lifetime: Option<Duration>,
    /// Keys (not revoked) a developer may hold.
    pub max_per_developer: i64,
    /// Longest grace period a regeneration may give the old key.
    pub max_rotation_grace: Duration,
    /// The latest expiry a key may be given, from now.
    pub max_lifetime: Duration,
    /// Whether a key may have no expiry.
    pub allow_never_expires: bool,
}

impl Default for KeyRules {
    fn default() -> Self {
        KeyRules {
            default_lifetime: Some(Duration::from_secs(365 * 86_400)),
            max_per_developer: 100,
            max_rotation_grace: Duration::from_secs(7 * 86_400),
            max_lifetime: Duration::from_secs(3650 * 86_400),
            allow_never_expires: true,
        }
    }
}

/// What a key may call: model and endpoint patterns (`*`, `prefix*`, exact names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub models: Vec<String>,
    pub endpoints: Vec<String>,
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions {
            models: vec!["*".into()],
            endpoints: vec!["*".into()],
        }
    }
}

/// Create a key.
#[derive(Debug, Clone, Default)]
pub struct CreateKey {
    pub name: String,
    /// `None`: everything.
    pub permissions: Option<Permissions>,
    pub rate_limit_rpm: Option<i64>,
    pub rate_limit_tpm: Option<i64>,
    /// Lifetime in days; `None`: the platform's default.
    pub expires_in_days: Option<i64>,
    pub never_expires: bool,
    pub ip_allowlist: Vec<String>,
}

/// A new key: the full key (shown this once) and the stored row.
#[derive(Debug)]
pub struct Created {
    pub key: String,
    pub api_key: ApiKey,
}

/// Change a key; `None` fields stay, `Some(None)` clears.
#[derive(Debug, Clone, Default)]
pub struct UpdateKey {
    pub name: Option<String>,
    pub permissions: Option<Permissions>,
    pub rate_limit_rpm: Option<Option<i64>>,
    pub rate_limit_tpm: Option<Option<i64>>,
    /// An RFC 3339 instant; `Some(None)` = never expires.
    pub expires_at: Option<Option<String>>,
    pub ip_allowlist: Option<Vec<String>>,
    pub active: Option<bool>,
}

/// A page of a developer's keys, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListKeys {
    pub include_revoked: bool,
    /// 1 to 100; default 50.
    pub limit: Option<i64>,
    /// The id of the last key of the previous page.
    pub after: Option<String>,
}

#[derive(Debug)]
pub struct KeyPage {
    pub keys: Vec<ApiKey>,
    /// Whether another page follows.
    pub has_more: bool,
}

/// A regenerated key: the new key (shown this once), its row, and the old key's row (now
/// expiring at the end of the grace period).
#[derive(Debug)]
pub struct Rotated {
    pub key: String,
    pub api_key: ApiKey,
    pub previous: ApiKey,
}

/// A developer may create (and regenerate) keys only with a verified email address.
pub fn may_create_keys(developer: &Developer) -> Result<()> {
    if developer.is_verified() {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "email_not_verified",
            "Verify your email address before creating API keys.".into(),
        ))
    }
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
/// (unix ms; `None` = never) must lie in the future and at most `max_lifetime` after `now`,
/// and `never` needs `allow_never_expires`. The message is for the field that carried the
/// expiry.
pub fn check_expiry(rules: &KeyRules, expires_at: Option<i64>, now: i64) -> Result<(), String> {
    let max = rules.max_lifetime;
    match expires_at {
        None if rules.allow_never_expires => Ok(()),
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

/// A regenerated key's expiry: none when the old key had none (and the platform still allows
/// that), else the default lifetime from now (at most `max_lifetime`).
fn successor_expiry(rules: &KeyRules, never: bool, now: i64) -> Option<i64> {
    if never && rules.allow_never_expires {
        return None;
    }
    let lifetime = match rules.default_lifetime {
        Some(l) => l.min(rules.max_lifetime),
        None if rules.allow_never_expires => return None,
        None => rules.max_lifetime,
    };
    Some(now + lifetime.as_millis() as i64)
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

impl Control {
    /// Creates a key for `developer_id`: validated, under the per-developer cap, stored with
    /// its `api_key.created` event (and an audit entry when staff act) in one transaction. A
    /// developer acting for themselves needs a verified email.
    pub async fn create_key(
        &self,
        by: &Actor<'_>,
        developer_id: &str,
        r: CreateKey,
    ) -> Result<Created> {
        if let Actor::Developer { developer, .. } = by {
            may_create_keys(developer)?;
        }
        let rules = &self.config.keys;
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
                rules.default_lifetime.map(|l| now + l.as_millis() as i64),
            ),
        };
        if errors.iter().all(|e| e.field != field) {
            if let Err(m) = check_expiry(rules, expires_at, now) {
                errors.push(FieldError::new(field, m));
            }
        }
        Error::check(errors)?;

        let (key, hash, prefix) = mint();
        let new = store_keys::NewKey {
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
        let mut tx = self.store.begin_write().await?;
        // Concurrent creates by one developer queue here, so the cap holds exactly.
        developers::lock(&mut tx, developer_id).await?;
        if store_keys::count_live(&mut tx, developer_id).await? >= rules.max_per_developer {
            return Err(Error::Forbidden(
                "key_limit_reached",
                format!(
                    "An account may hold {} keys; revoke one first.",
                    rules.max_per_developer
                ),
            ));
        }
        // The event (and audit entry) first: the key's insert ends with its change-feed stamp,
        // which serializes key writes until commit, so it must be the last write.
        let event = Event {
            kind: outbox::API_KEY_CREATED,
            developer_id: Some(developer_id),
            data: serde_json::json!({
                "key_id": new.id,
                "developer_id": developer_id,
                "name": new.name,
                "prefix": new.key_prefix,
                "expires_at": new.expires_at.map(rfc3339_ms),
            }),
        };
        let entry = by.is_staff().then(|| Entry {
            action: "api_key.create",
            target_type: "api_key",
            target_id: &new.id,
            details: serde_json::json!({ "developer_id": developer_id }),
        });
        journal::record(&mut tx, by, Some(event), entry).await?;
        let created = store_keys::insert(&mut tx, &new).await?;
        tx.commit().await?;
        self.notifier.keys_changed();
        self.event("key_created");
        Ok(Created {
            key,
            api_key: created,
        })
    }

    /// A page of `developer_id`'s keys, newest first.
    pub async fn list_keys(&self, developer_id: &str, q: ListKeys) -> Result<KeyPage> {
        let limit = q.limit.unwrap_or(50);
        if !(1..=100).contains(&limit) {
            return Err(Error::invalid("limit", "must be 1 to 100"));
        }
        let after = match &q.after {
            Some(id) => Some(
                store_keys::get(&self.store, Some(developer_id), id)
                    .await
                    .map_err(|_| Error::invalid("after", "is not one of your keys"))?,
            ),
            None => None,
        };
        let mut keys = store_keys::list(
            &self.store,
            developer_id,
            q.include_revoked,
            limit + 1,
            after.as_ref().map(|k| (k.created_at, k.id.as_str())),
        )
        .await?;
        let has_more = keys.len() as i64 > limit;
        keys.truncate(limit as usize);
        Ok(KeyPage { keys, has_more })
    }

    /// One key (of `owner`, or any key when `None`).
    pub async fn key(&self, owner: Option<&str>, id: &str) -> Result<ApiKey> {
        Ok(store_keys::get(&self.store, owner, id).await?)
    }

    /// Changes `owner`'s key: name, permissions, limits, expiry (an expired or regenerated
    /// key's expiry is final), IP allowlist, active flag.
    pub async fn update_key(&self, owner: &str, id: &str, r: UpdateKey) -> Result<ApiKey> {
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
            if let Err(m) = check_expiry(&self.config.keys, e, now) {
                errors.push(FieldError::new("expires_at", m));
            }
        }
        Error::check(errors)?;
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
        let mut tx = self.store.begin_write().await?;
        if u.expires_at.is_some() {
            let current = store_keys::get_on(&mut tx, Some(owner), id).await?;
            if current.deleted_at.is_some() {
                return Err(Error::NotFound);
            }
            // A regenerated key's grace period is final: it cannot be extended.
            if current.rotated_to.is_some() {
                return Err(Error::invalid(
                    "expires_at",
                    "cannot change on a regenerated key (its grace period is final)",
                ));
            }
            // An expired key stays expired: neither extended nor made never-expiring.
            if current.expires_at.is_some_and(|e| e <= now_ms()) {
                return Err(Error::invalid(
                    "expires_at",
                    "cannot change: the key has expired (create a new key)",
                ));
            }
        }
        let k = store_keys::update(&mut tx, Some(owner), id, &u).await?;
        tx.commit().await?;
        self.notifier.keys_changed();
        Ok(k)
    }

    /// Revokes a key (of `owner`, or any key when `None`) with its `api_key.deleted` event
    /// (and an audit entry when staff act), in one transaction.
    pub async fn revoke_key(
        &self,
        by: &Actor<'_>,
        owner: Option<&str>,
        id: &str,
    ) -> Result<ApiKey> {
        let mut tx = self.store.begin_write().await?;
        let k = store_keys::revoke(&mut tx, owner, id).await?;
        let event = Event {
            kind: outbox::API_KEY_DELETED,
            developer_id: Some(&k.developer_id),
            data: event_data(&k),
        };
        let entry = by.is_staff().then(|| Entry {
            action: "api_key.revoke",
            target_type: "api_key",
            target_id: &k.id,
            details: serde_json::json!({ "developer_id": k.developer_id, "name": k.name }),
        });
        journal::record(&mut tx, by, Some(event), entry).await?;
        tx.commit().await?;
        self.notifier.keys_changed();
        self.event("key_revoked");
        Ok(k)
    }

    /// Checks a regeneration's grace period against the platform's maximum.
    pub fn check_grace(&self, grace_period_seconds: u64) -> Result<()> {
        let max = self.config.keys.max_rotation_grace;
        if grace_period_seconds > max.as_secs() {
            return Err(Error::invalid(
                "grace_period_seconds",
                format!("must be at most {}", max.as_secs()),
            ));
        }
        Ok(())
    }

    /// Regenerates `developer`'s key: a new key with the same permissions and limits, the old
    /// one working for `grace_period_seconds` more; one successor per key; with the
    /// `api_key.rotated` event, in one transaction.
    pub async fn regenerate_key(
        &self,
        developer: &Developer,
        id: &str,
        grace_period_seconds: u64,
    ) -> Result<Rotated> {
        may_create_keys(developer)?;
        self.check_grace(grace_period_seconds)?;
        let dev_id = developer.id.as_str();
        let mut tx = self.store.begin_write().await?;
        let old = store_keys::get_on(&mut tx, Some(dev_id), id).await?;
        if old.deleted_at.is_some() {
            return Err(Error::NotFound);
        }
        let now = now_ms();
        // One successor per key: otherwise regenerating one key over and over would multiply
        // live keys past the per-developer cap.
        if let Some(next) = &old.rotated_to {
            return Err(Error::Conflict(format!(
                "This key was already regenerated as {next}; regenerate that key instead."
            )));
        }
        if old.expires_at.is_some_and(|e| e <= now) {
            return Err(Error::Conflict(
                "This key has expired; create a new key.".into(),
            ));
        }
        let (key, hash, prefix) = mint();
        let new = store_keys::NewKey {
            id: aihub_store::new_id("key_"),
            developer_id: dev_id.to_owned(),
            name: old.name.clone(),
            key_hash: hash,
            key_prefix: prefix,
            models: old.models.clone(),
            endpoints: old.endpoints.clone(),
            ip_allowlist: old.ip_allowlist.clone(),
            rate_limit_rpm: old.rate_limit_rpm,
            rate_limit_tpm: old.rate_limit_tpm,
            expires_at: successor_expiry(&self.config.keys, old.expires_at.is_none(), now),
        };
        let old_until = now + grace_period_seconds as i64 * 1000;
        let previous_expires_at = old.expires_at.map_or(old_until, |e| e.min(old_until));
        let event = Event {
            kind: outbox::API_KEY_ROTATED,
            developer_id: Some(dev_id),
            data: serde_json::json!({
                "key_id": new.id,
                "previous_key_id": old.id,
                "developer_id": dev_id,
                "name": new.name,
                "prefix": new.key_prefix,
                "previous_expires_at": rfc3339_ms(previous_expires_at),
            }),
        };
        // The event first: the rotation ends with the change-feed stamp (see `create_key`).
        let by = Actor::developer(developer);
        journal::record(&mut tx, &by, Some(event), None).await?;
        let (old, new) = store_keys::rotate(&mut tx, Some(dev_id), id, &new, old_until).await?;
        tx.commit().await?;
        self.notifier.keys_changed();
        self.event("key_rotated");
        Ok(Rotated {
            key,
            api_key: new,
            previous: old,
        })
    }
}
