//! Developer accounts: registration, email verification, password reset and change, sessions,
//! and the owner's profile (name, company, type, monthly spend cap). The field rules (email
//! shape, password policy, names, types, USD amounts) are here too, shared with the operators'
//! commands.
//!
//! What stays with the caller: hashing passwords (argon2id on the blocking pool, equal work
//! for unknown accounts), throttles, and delivering the mails whose tokens these commands
//! issue. Nothing here tells a stranger whether an email has an account either: callers answer
//! the same whatever [`Registered`] says.

use std::str::FromStr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use aihub_store::developers::{self, Developer, NewDeveloper, ProfileUpdate, ROLE_DEVELOPER};
use aihub_store::{auth as tokens, new_id, now_ms};

use crate::{Control, Error, FieldError, Result};

pub const DEVELOPER_TYPES: &[&str] = &["individual", "enterprise"];

/// Nano-USD per USD.
const NANOS_PER_USD: i64 = 1_000_000_000;

/// Largest spend cap accepted, in USD.
pub const MAX_SPEND_CAP_USD: i64 = 1_000_000_000;

/// The account rules (from the admin configuration).
#[derive(Debug, Clone)]
pub struct AccountRules {
    /// How long a verification link works.
    pub verify_token_ttl: Duration,
    /// How long a password reset link works.
    pub reset_token_ttl: Duration,
}

impl Default for AccountRules {
    fn default() -> Self {
        AccountRules {
            verify_token_ttl: Duration::from_secs(24 * 3600),
            reset_token_ttl: Duration::from_secs(3600),
        }
    }
}

/// Checks an email address's shape (the mail itself proves it exists).
pub fn check_email(email: &str) -> Result<(), String> {
    if email.len() > 254 || email.parse::<lettre::Address>().is_err() {
        return Err("is not a valid email address".into());
    }
    Ok(())
}

pub fn check_name(field: &str, v: &str, errors: &mut Vec<FieldError>) {
    let n = v.trim().chars().count();
    if n == 0 || n > 200 {
        errors.push(FieldError::new(field, "must be 1 to 200 characters"));
    }
}

fn check_type(v: Option<&str>, errors: &mut Vec<FieldError>) {
    if let Some(t) = v {
        if !DEVELOPER_TYPES.contains(&t) {
            errors.push(FieldError::new(
                "developer_type",
                "must be `individual` or `enterprise`",
            ));
        }
    }
}

/// The password policy (NIST SP 800-63B style: length and a blocklist, no composition rules).
pub fn check_password(password: &str, email: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < 10 {
        return Err("must be at least 10 characters".into());
    }
    if n > 128 {
        return Err("must be at most 128 characters".into());
    }
    let lower = password.to_lowercase();
    const COMMON: &[&str] = &[
        "password",
        "1234567890",
        "qwertyuiop",
        "0123456789",
        "iloveyou",
        "letmein",
        "welcome",
        "abc123",
        "aihub",
        "admin",
    ];
    if COMMON
        .iter()
        .any(|c| lower.starts_with(c) && lower.len() < c.len() + 4)
    {
        return Err("is too common".into());
    }
    if password
        .chars()
        .all(|c| c == password.chars().next().unwrap_or(' '))
    {
        return Err("must not repeat one character".into());
    }
    if let Some(local) = email.split('@').next().filter(|l| l.len() >= 4) {
        if lower.contains(&local.to_lowercase()) {
            return Err("must not contain your email address".into());
        }
    }
    Ok(())
}

/// Parses a USD amount given as a decimal string (`"50"`, `"50.00"`, `"0.125"`): not negative,
/// at most 6 decimals, at most [`MAX_SPEND_CAP_USD`]. Returns nano-USD.
pub fn parse_usd_nanos(text: &str) -> Result<i64, String> {
    const SHAPE: &str = "must be a USD amount as a decimal string, e.g. \"50.00\"";
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || digits.starts_with('.')
        || digits.ends_with('.')
    {
        return Err(SHAPE.into());
    }
    let d = Decimal::from_str(text).map_err(|_| SHAPE.to_owned())?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err("must not be negative".into());
    }
    if d.normalize().scale() > 6 {
        return Err("must have at most 6 decimals".into());
    }
    if d > Decimal::from(MAX_SPEND_CAP_USD) {
        return Err(format!("must be at most {MAX_SPEND_CAP_USD}"));
    }
    (d * Decimal::from(NANOS_PER_USD))
        .to_i64()
        .ok_or_else(|| SHAPE.to_owned())
}

/// A new single-use email token and the sha256 the store keeps.
pub fn new_email_token() -> (String, String) {
    let token = B64.encode(rand::random::<[u8; 32]>());
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of an email token (sha256, hex).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A self-service registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub email: String,
    pub password: String,
    pub full_name: String,
    pub company_name: Option<String>,
    /// `individual` (default) or `enterprise`.
    pub developer_type: Option<String>,
}

impl Registration {
    /// Every field rule, all invalid fields named at once.
    pub fn check(&self) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = check_email(&self.email) {
            errors.push(FieldError::new("email", e));
        }
        if let Err(e) = check_password(&self.password, &self.email) {
            errors.push(FieldError::new("password", e));
        }
        check_name("full_name", &self.full_name, &mut errors);
        if let Some(c) = &self.company_name {
            check_name("company_name", c, &mut errors);
        }
        check_type(self.developer_type.as_deref(), &mut errors);
        Error::check(errors)
    }
}

/// What a registration did (callers answer the same either way).
#[derive(Debug)]
pub enum Registered {
    /// A new, unverified account and the verification token to mail.
    Created { developer: Developer, token: String },
    /// The email already has this account.
    Existing(Developer),
    /// Registered concurrently by another request.
    Raced,
}

/// The owner's profile change; `None` fields stay, `Some(None)` clears.
#[derive(Debug, Clone, Default)]
pub struct UpdateProfile {
    pub full_name: Option<String>,
    pub company_name: Option<Option<String>>,
    pub developer_type: Option<String>,
    /// A USD decimal string; `Some(None)` removes the cap.
    pub monthly_spend_cap_usd: Option<Option<String>>,
}

/// What an email token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    VerifyEmail,
    ResetPassword,
}

impl TokenPurpose {
    fn store(self) -> &'static str {
        match self {
            TokenPurpose::VerifyEmail => tokens::VERIFY_EMAIL,
            TokenPurpose::ResetPassword => tokens::RESET_PASSWORD,
        }
    }
}

const BAD_TOKEN: &str = "is invalid, used or expired";

impl Control {
    /// Registers `r` (already [`Registration::check`]ed; `password_hash` is its password's
    /// hash): an unverified account on the default plan with a verification token, in one
    /// transaction. An existing account is returned as such, untouched.
    pub async fn register(&self, r: Registration, password_hash: String) -> Result<Registered> {
        let email = r.email.trim().to_lowercase();
        if let Some(existing) = developers::by_email(&self.store, &email).await? {
            return Ok(Registered::Existing(existing));
        }
        let new = NewDeveloper {
            email,
            password_hash,
            full_name: r.full_name.trim().to_owned(),
            company_name: r.company_name.map(|c| c.trim().to_owned()),
            developer_type: r.developer_type.unwrap_or_else(|| "individual".into()),
            role: ROLE_DEVELOPER.into(),
            plan: self.config.plans.default_plan.clone(),
            verified: false,
        };
        let mut tx = self.store.begin_write().await?;
        let developer = match developers::insert(&mut tx, &new).await {
            Ok(d) => d,
            Err(aihub_store::StoreError::Conflict(_)) => return Ok(Registered::Raced),
            Err(e) => return Err(e.into()),
        };
        let token = self
            .email_token(&mut tx, &developer.id, TokenPurpose::VerifyEmail)
            .await?;
        tx.commit().await?;
        self.event("registered");
        Ok(Registered::Created { developer, token })
    }

    async fn email_token(
        &self,
        conn: &mut sqlx::AnyConnection,
        developer_id: &str,
        purpose: TokenPurpose,
    ) -> Result<String> {
        let ttl = match purpose {
            TokenPurpose::VerifyEmail => self.config.accounts.verify_token_ttl,
            TokenPurpose::ResetPassword => self.config.accounts.reset_token_ttl,
        };
        let (token, hash) = new_email_token();
        let expires = now_ms() + ttl.as_millis() as i64;
        tokens::create_email_token(conn, &hash, developer_id, purpose.store(), expires).await?;
        Ok(token)
    }

    /// A new email token for `developer_id` (a resent verification, a reset), to mail.
    pub async fn issue_email_token(
        &self,
        developer_id: &str,
        purpose: TokenPurpose,
    ) -> Result<String> {
        let mut tx = self.store.begin_write().await?;
        let token = self.email_token(&mut tx, developer_id, purpose).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Verifies an email address with its token (single use, expiring).
    pub async fn verify_email(&self, token: &str) -> Result<()> {
        let mut tx = self.store.begin_write().await?;
        let dev = tokens::consume_email_token(&mut tx, &token_hash(token), tokens::VERIFY_EMAIL)
            .await?
            .ok_or_else(|| Error::invalid("token", BAD_TOKEN))?;
        developers::mark_verified(&mut tx, &dev).await?;
        tx.commit().await?;
        self.event("verified");
        Ok(())
    }

    /// The account a password reset token belongs to, checked before any password work.
    pub async fn reset_token_owner(&self, token: &str) -> Result<Developer> {
        let owner =
            tokens::email_token_owner(&self.store, &token_hash(token), tokens::RESET_PASSWORD)
                .await?
                .ok_or_else(|| Error::invalid("token", BAD_TOKEN))?;
        Ok(developers::by_id(&self.store, &owner).await?)
    }

    /// Uses the reset token once: the new password (hashed), the address verified (the mail
    /// proved it), every session ended; one transaction.
    pub async fn reset_password(
        &self,
        token: &str,
        developer_id: &str,
        password_hash: &str,
    ) -> Result<()> {
        let mut tx = self.store.begin_write().await?;
        // Used here, once: a concurrent confirm with the same token finds it used.
        match tokens::consume_email_token(&mut tx, &token_hash(token), tokens::RESET_PASSWORD)
            .await?
        {
            Some(id) if id == developer_id => {}
            _ => return Err(Error::invalid("token", BAD_TOKEN)),
        }
        developers::set_password(&mut tx, developer_id, password_hash).await?;
        developers::mark_verified(&mut tx, developer_id).await?;
        tokens::revoke_all_sessions(&mut tx, developer_id).await?;
        tx.commit().await?;
        self.event("password_reset");
        Ok(())
    }

    /// A new password (hashed; the current one already checked); every session ends.
    pub async fn change_password(&self, developer_id: &str, password_hash: &str) -> Result<()> {
        let mut tx = self.store.begin_write().await?;
        developers::set_password(&mut tx, developer_id, password_hash).await?;
        tokens::revoke_all_sessions(&mut tx, developer_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens a session for a signed-in developer; returns its id (the token names it).
    pub async fn open_session(
        &self,
        developer_id: &str,
        ttl: Duration,
        ip: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<String> {
        let session = new_id("ses_");
        tokens::create_session(
            &self.store,
            &session,
            developer_id,
            now_ms() + ttl.as_millis() as i64,
            ip,
            user_agent,
        )
        .await?;
        Ok(session)
    }

    /// Ends a session: its token stops working at once.
    pub async fn end_session(&self, session_id: &str) -> Result<()> {
        Ok(tokens::revoke_session(&self.store, session_id).await?)
    }

    /// Changes the owner's profile and spend cap; a new cap reaches gateways through the
    /// change feed (it puts the developer's keys on it).
    pub async fn update_profile(&self, developer_id: &str, r: UpdateProfile) -> Result<Developer> {
        let mut errors = Vec::new();
        if let Some(n) = &r.full_name {
            check_name("full_name", n, &mut errors);
        }
        if let Some(Some(c)) = &r.company_name {
            check_name("company_name", c, &mut errors);
        }
        check_type(r.developer_type.as_deref(), &mut errors);
        let cap = match &r.monthly_spend_cap_usd {
            None => None,
            Some(None) => Some(None),
            Some(Some(text)) => match parse_usd_nanos(text) {
                Ok(nanos) => Some(Some(nanos)),
                Err(e) => {
                    errors.push(FieldError::new("monthly_spend_cap_usd", e));
                    None
                }
            },
        };
        Error::check(errors)?;
        let u = ProfileUpdate {
            full_name: r.full_name.map(|n| n.trim().to_owned()),
            company_name: r.company_name.map(|c| c.map(|c| c.trim().to_owned())),
            developer_type: r.developer_type,
        };
        let mut tx = self.store.begin_write().await?;
        let mut dev = developers::update_profile(&mut tx, developer_id, &u).await?;
        if let Some(cap) = cap {
            // Last: it puts the developer's keys on the change feed.
            dev = developers::set_spend_cap(&mut tx, developer_id, cap).await?;
        }
        tx.commit().await?;
        if cap.is_some() {
            self.notifier.keys_changed();
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_amounts_parse_exactly() {
        assert_eq!(parse_usd_nanos("50.00"), Ok(50_000_000_000));
        assert_eq!(parse_usd_nanos("0"), Ok(0));
        assert_eq!(parse_usd_nanos("0.000001"), Ok(1_000));
        assert_eq!(parse_usd_nanos("12.3400000"), Ok(12_340_000_000));
        assert_eq!(
            parse_usd_nanos("1000000000"),
            Ok(1_000_000_000 * 1_000_000_000)
        );
        for bad in [
            "", "abc", "1e3", "1.", ".5", " 5", "5 ", "+5", "1,5", "0x10",
        ] {
            assert!(
                parse_usd_nanos(bad).unwrap_err().contains("decimal"),
                "{bad}"
            );
        }
        assert_eq!(parse_usd_nanos("-1").unwrap_err(), "must not be negative");
        assert!(parse_usd_nanos("0.0000001")
            .unwrap_err()
            .contains("6 decimals"));
        assert!(parse_usd_nanos("1000000000.01")
            .unwrap_err()
            .contains("at most"));
    }
}
