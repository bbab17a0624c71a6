//! Operator commands on developer accounts: search, create (already verified), update (active,
//! plan, role, quota and rate overrides; disabling ends the sessions and stops the keys on
//! every gateway), and the audit log. Every change is written to the audit log in its own
//! transaction.

use aihub_store::audit::{self, AuditEntry};
use aihub_store::developers::{self, Developer, NewDeveloper, OperatorUpdate};
use aihub_store::developers::{ROLE_ADMIN, ROLE_DEVELOPER};
use aihub_store::{auth as sessions, StoreError};

use crate::accounts::{check_email, check_name, check_password, DEVELOPER_TYPES};
use crate::journal::{self, Actor, Entry};
use crate::keys::{MAX_RPM, MAX_TPM};
use crate::{Control, Error, FieldError, Result};

/// An account an operator creates.
#[derive(Debug, Clone, Default)]
pub struct NewAccount {
    pub email: String,
    pub password: String,
    pub full_name: String,
    pub company_name: Option<String>,
    /// Default `individual`.
    pub developer_type: Option<String>,
    /// `developer` (default) or `admin`.
    pub role: Option<String>,
    /// Default: the default plan.
    pub plan: Option<String>,
}

/// An operator's change to an account ([`OperatorUpdate`]: `None` fields stay, `Some(None)`
/// clears an override); its `changed_by` is set by [`Control::update_account`] from the actor.
pub type AccountChange = OperatorUpdate;

/// A page of a search.
#[derive(Debug, Clone, Default)]
pub struct Search {
    /// Substring of the email, name or company.
    pub q: Option<String>,
    /// 1 to 200; default 50.
    pub limit: Option<i64>,
    /// Default 0.
    pub offset: Option<i64>,
}

/// A page of a search in the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditSearch {
    /// Only entries about this developer or key id.
    pub target_id: Option<String>,
    /// Entries older than this entry id.
    pub before: Option<i64>,
    /// 1 to 500; default 100.
    pub limit: Option<i64>,
}

impl Control {
    fn check_choices(
        &self,
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
        let plans = &self.config.plans.plans;
        if let Some(p) = plan {
            if !plans.contains_key(p) {
                let names: Vec<&str> = plans.keys().map(String::as_str).collect();
                errors.push(FieldError::new(
                    "plan",
                    format!("must be one of: {}", names.join(", ")),
                ));
            }
        }
    }

    /// Accounts matching a search, newest first, and how many match in all.
    pub async fn search_developers(&self, q: Search) -> Result<(Vec<Developer>, i64)> {
        let limit = q.limit.unwrap_or(50);
        let offset = q.offset.unwrap_or(0);
        let mut errors = Vec::new();
        if !(1..=200).contains(&limit) {
            errors.push(FieldError::new("limit", "must be 1 to 200"));
        }
        if offset < 0 {
            errors.push(FieldError::new("offset", "must not be negative"));
        }
        Error::check(errors)?;
        Ok(developers::search(&self.store, q.q.as_deref(), limit, offset).await?)
    }

    /// One account.
    pub async fn developer(&self, id: &str) -> Result<Developer> {
        Ok(developers::by_id(&self.store, id).await?)
    }

    /// The field rules of a new account (all invalid fields named at once); run before the
    /// password is hashed.
    pub fn check_new_account(&self, r: &NewAccount) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = check_email(&r.email) {
            errors.push(FieldError::new("email", e));
        }
        if let Err(e) = check_password(&r.password, &r.email) {
            errors.push(FieldError::new("password", e));
        }
        check_name("full_name", &r.full_name, &mut errors);
        if let Some(c) = &r.company_name {
            check_name("company_name", c, &mut errors);
        }
        self.check_choices(
            r.developer_type.as_deref(),
            r.role.as_deref(),
            r.plan.as_deref(),
            &mut errors,
        );
        Error::check(errors)
    }

    /// Creates a verified account ([`Control::check_new_account`]ed; `password_hash` is its
    /// password's hash) with its audit entry, in one transaction.
    pub async fn create_account(
        &self,
        by: &Actor<'_>,
        r: NewAccount,
        password_hash: String,
    ) -> Result<Developer> {
        let new = NewDeveloper {
            email: r.email.trim().to_lowercase(),
            password_hash,
            full_name: r.full_name.trim().to_owned(),
            company_name: r.company_name.map(|c| c.trim().to_owned()),
            developer_type: r.developer_type.unwrap_or_else(|| "individual".into()),
            role: r.role.unwrap_or_else(|| ROLE_DEVELOPER.into()),
            plan: r
                .plan
                .unwrap_or_else(|| self.config.plans.default_plan.clone()),
            verified: true,
        };
        let mut tx = self.store.begin_write().await?;
        let dev = developers::insert(&mut tx, &new)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    Error::Conflict("An account with this email exists.".into())
                }
                e => e.into(),
            })?;
        let entry = Entry {
            action: "developer.create",
            target_type: "developer",
            target_id: &dev.id,
            details: serde_json::json!({ "email": dev.email, "role": dev.role, "plan": dev.plan }),
        };
        journal::record(&mut tx, by, None, Some(entry)).await?;
        tx.commit().await?;
        Ok(dev)
    }

    /// An operator's change to account `id`, with its audit entry, in one transaction; the
    /// acting operator cannot disable or demote themselves. Gateways apply a new state, plan or
    /// limit within a second.
    pub async fn update_account(
        &self,
        by: &Actor<'_>,
        id: &str,
        mut r: AccountChange,
    ) -> Result<Developer> {
        let mut errors = Vec::new();
        self.check_choices(None, r.role.as_deref(), r.plan.as_deref(), &mut errors);
        if r.api_quota_limit.flatten().is_some_and(|n| n < 0) {
            errors.push(FieldError::new("api_quota_limit", "must not be negative"));
        }
        // Per-minute limits are positive, as the gateway applies them (0 would read as the
        // plan's).
        for (field, v, max) in [
            ("api_rate_limit", r.api_rate_limit, MAX_RPM),
            ("api_token_rate_limit", r.api_token_rate_limit, MAX_TPM),
        ] {
            if v.flatten().is_some_and(|n| !(1..=max).contains(&n)) {
                errors.push(FieldError::new(field, format!("must be 1 to {max}")));
            }
        }
        if id == by.id() && (r.active == Some(false) || r.role.as_deref() == Some(ROLE_DEVELOPER)) {
            errors.push(FieldError::new(
                "active",
                "operators cannot disable or demote themselves",
            ));
        }
        Error::check(errors)?;
        r.changed_by = Some(by.id().to_owned());
        let mut tx = self.store.begin_write().await?;
        // The developer's row first (lock order: developer, sessions, keys, feed counter), so
        // the update with its change-feed stamp can be the last write.
        developers::lock(&mut tx, id).await?;
        if r.active == Some(false) {
            sessions::revoke_all_sessions(&mut tx, id).await?;
        }
        let entry = Entry {
            action: "developer.update",
            target_type: "developer",
            target_id: id,
            details: serde_json::json!({
                "active": r.active,
                "plan": r.plan,
                "role": r.role,
                "api_quota_limit": r.api_quota_limit,
                "api_rate_limit": r.api_rate_limit,
                "api_token_rate_limit": r.api_token_rate_limit,
            }),
        };
        journal::record(&mut tx, by, None, Some(entry)).await?;
        let dev = developers::operator_update(&mut tx, id, &r).await?;
        tx.commit().await?;
        if r.touches_keys() {
            self.notifier.keys_changed();
        }
        Ok(dev)
    }

    /// The audit log, newest first.
    pub async fn audit_log(&self, q: AuditSearch) -> Result<Vec<AuditEntry>> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(Error::invalid("limit", "must be 1 to 500"));
        }
        Ok(audit::list(&self.store, q.target_id.as_deref(), q.before, limit).await?)
    }

    /// Makes `email` the configured operator (`password_hash`: the configured password's
    /// hash) with its `operator.bootstrap` audit entry, in one transaction. A new account is
    /// created verified on `plan`; an existing one becomes the operator only on the configured
    /// terms (password replaced, verified, sessions ended). Returns the account id, or `None`
    /// when it already is an operator or another admin node bootstrapped it a moment ago.
    pub async fn bootstrap_operator(
        &self,
        email: &str,
        password_hash: String,
        plan: String,
    ) -> Result<Option<String>> {
        let existing = developers::by_email(&self.store, email).await?;
        if existing.as_ref().is_some_and(|d| d.is_admin()) {
            return Ok(None);
        }
        let mut tx = self.store.begin_write().await?;
        let id = match existing {
            Some(d) => {
                developers::set_password(&mut tx, &d.id, &password_hash).await?;
                developers::mark_verified(&mut tx, &d.id).await?;
                sessions::revoke_all_sessions(&mut tx, &d.id).await?;
                let promote = OperatorUpdate {
                    role: Some(ROLE_ADMIN.into()),
                    ..Default::default()
                };
                developers::operator_update(&mut tx, &d.id, &promote).await?;
                tracing::warn!(developer_id = %d.id, "bootstrap_admin: an existing account was made the operator; its password was replaced and its sessions ended");
                d.id
            }
            None => {
                let new = NewDeveloper {
                    email: email.to_owned(),
                    password_hash,
                    full_name: "Operator".into(),
                    company_name: None,
                    developer_type: "enterprise".into(),
                    role: ROLE_ADMIN.into(),
                    plan,
                    verified: true,
                };
                match developers::insert(&mut tx, &new).await {
                    Ok(d) => d.id,
                    Err(StoreError::Conflict(_)) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let entry = Entry {
            action: "operator.bootstrap",
            target_type: "developer",
            target_id: &id,
            details: serde_json::json!({ "email": email.to_lowercase() }),
        };
        journal::record(&mut tx, &Actor::System("bootstrap"), None, Some(entry)).await?;
        tx.commit().await?;
        Ok(Some(id))
    }
}
