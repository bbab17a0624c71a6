//! Developer accounts under `/developer/…`: register, verify email, log in and out, password
//! reset and change, and the caller's own profile (`/developer/me`: plan, effective limits, and
//! the monthly spend cap the developer sets).
//!
//! Nothing here tells a stranger whether an email has an account: registration and reset
//! requests answer 202 with the same body either way (the mail says what happened), and login
//! answers the same 401 for an unknown email and a wrong password, after the same argon2 work.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_control::accounts::{self as service, Registered, Registration, TokenPurpose};
use aihub_plans::PlanCatalog;
use aihub_store::developers::{self, Developer};
use aihub_store::outbox::rfc3339_ms;

use crate::auth::{check_password, Caller, ClientMeta};
use crate::error::{AppError, Json, Query};
use crate::plans::{usd_from_nanos, EffectiveLimits};
use crate::state::AppState;

/// A developer account as its owner (or an operator) sees it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeveloperView {
    pub id: String,
    pub email: String,
    pub full_name: String,
    pub company_name: Option<String>,
    /// `individual` or `enterprise`.
    pub developer_type: String,
    /// `developer` or `admin`.
    pub role: String,
    pub plan: String,
    pub email_verified: bool,
    pub active: bool,
    /// Monthly token quota override (`null`: the plan's).
    pub api_quota_limit: Option<i64>,
    /// Requests-per-minute override (`null`: the plan's).
    pub api_rate_limit: Option<i64>,
    /// Tokens-per-minute override (`null`: the plan's).
    pub api_token_rate_limit: Option<i64>,
    /// The developer's cap on monthly overage spend, USD as a decimal string (`null`: no cap).
    /// It applies on plans that bill overage.
    pub monthly_spend_cap_usd: Option<String>,
    /// What applies: the overrides, else the plan's.
    pub limits: EffectiveLimits,
    /// RFC 3339.
    pub created_at: String,
}

impl DeveloperView {
    /// The view of `d`, with limits resolved against `plans`.
    pub fn new(d: &Developer, plans: &PlanCatalog) -> Self {
        DeveloperView {
            id: d.id.clone(),
            email: d.email.clone(),
            full_name: d.full_name.clone(),
            company_name: d.company_name.clone(),
            developer_type: d.developer_type.clone(),
            role: d.role.clone(),
            plan: d.plan.clone(),
            email_verified: d.is_verified(),
            active: d.is_active(),
            api_quota_limit: d.api_quota_limit,
            api_rate_limit: d.api_rate_limit,
            api_token_rate_limit: d.api_token_rate_limit,
            monthly_spend_cap_usd: d.monthly_spend_cap_nanos.map(usd_from_nanos),
            limits: EffectiveLimits::of(d, plans),
            created_at: rfc3339_ms(d.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Message {
    pub message: String,
}

fn accepted(m: &str) -> (StatusCode, Json<Message>) {
    (
        StatusCode::ACCEPTED,
        Json(Message {
            message: m.to_owned(),
        }),
    )
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    pub email: String,
    /// 10 to 128 characters; not a common password; not containing the email.
    pub password: String,
    pub full_name: String,
    #[serde(default)]
    pub company_name: Option<String>,
    /// `individual` (default) or `enterprise`.
    #[serde(default)]
    pub developer_type: Option<String>,
}

const REGISTERED: &str = "Check your inbox: we sent a link to verify your email address.";

/// Register a developer account. A verification link is emailed; the answer is the same
/// whether or not the email already had an account.
#[utoipa::path(post, path = "/developer/register", tag = "accounts",
    request_body = RegisterRequest,
    responses((status = 202, body = Message), (status = 422, body = crate::openapi::ErrorBody),
              (status = 429, body = crate::openapi::ErrorBody)))]
pub(crate) async fn register(
    State(s): State<AppState>,
    meta: ClientMeta,
    Json(r): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<Message>), AppError> {
    sign_up(&s, &meta, r).await?;
    Ok(accepted(REGISTERED))
}

/// Registration as the API and the portal run it: throttle, field rules, the password hash
/// (before the lookup, so both paths cost the same), the service's registration, the mail.
pub(crate) async fn sign_up(
    s: &AppState,
    meta: &ClientMeta,
    r: RegisterRequest,
) -> Result<(), AppError> {
    s.throttle.check_ip(meta.ip)?;
    let r = Registration {
        email: r.email,
        password: r.password,
        full_name: r.full_name,
        company_name: r.company_name,
        developer_type: r.developer_type,
    };
    r.check()?;
    // Hash before looking the email up, so both paths cost the same.
    let hash = s.passwords.hash(r.password.clone()).await?;
    match s.control.register(r, hash).await? {
        Registered::Existing(existing) => {
            if !s.throttle.allow_mail(&existing.email) {
                return Ok(());
            }
            s.mailer.send(
                &existing.email,
                "Your AI Hub account",
                format!(
                    "Someone (maybe you) tried to register a new AI Hub account with this \
                     address, which already has one.\n\nSign in at {0}, or ask for a password \
                     reset there if you forgot it.\n",
                    s.config.public_url
                ),
            );
        }
        Registered::Created { developer, token } => send_verification(s, &developer.email, &token),
        // Registered concurrently by another request: same answer.
        Registered::Raced => {}
    }
    Ok(())
}

/// A duration as the mails say it: "1 day", "2 hours", "1 hour and 30 minutes",
/// "1 day, 2 hours and 5 minutes" (whole seconds; less than one is "0 seconds").
fn human_duration(d: std::time::Duration) -> String {
    let mut left = d.as_secs();
    let mut parts = Vec::new();
    for (unit, secs) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        let n = left / secs;
        left %= secs;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    match parts.len() {
        0 => "0 seconds".to_owned(),
        1 => parts.remove(0),
        n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
    }
}

fn send_verification(s: &AppState, email: &str, token: &str) {
    s.mailer.send(
        email,
        "Verify your AI Hub email address",
        format!(
            "Welcome to AI Hub!\n\nVerify your email address by opening this link:\n\
             {}/portal/verify-email?token={token}\n\nOr paste this token in the portal:\n{token}\n\n\
             The link expires in {}. If you did not register, ignore this message.\n",
            s.config.public_url,
            human_duration(s.config.auth.verify_token_ttl)
        ),
    );
}

#[derive(Debug, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyEmailRequest {
    /// The token from the verification mail.
    pub token: String,
}

/// Verify an email address with the token from the mail (single use, expiring).
#[utoipa::path(post, path = "/developer/verify-email", tag = "accounts",
    request_body = VerifyEmailRequest,
    responses((status = 200, body = Message), (status = 422, body = crate::openapi::ErrorBody)))]
pub(crate) async fn verify_email(
    State(s): State<AppState>,
    Json(r): Json<VerifyEmailRequest>,
) -> Result<Json<Message>, AppError> {
    consume_verification(&s, &r.token).await
}

/// The same, for the link in the mail (`GET /developer/verify-email?token=…`).
#[utoipa::path(get, path = "/developer/verify-email", tag = "accounts",
    params(VerifyEmailRequest),
    responses((status = 200, body = Message), (status = 422, body = crate::openapi::ErrorBody)))]
pub(crate) async fn verify_email_link(
    State(s): State<AppState>,
    Query(r): Query<VerifyEmailRequest>,
) -> Result<Json<Message>, AppError> {
    consume_verification(&s, &r.token).await
}

async fn consume_verification(s: &AppState, token: &str) -> Result<Json<Message>, AppError> {
    s.control.verify_email(token).await?;
    Ok(Json(Message {
        message: "Email verified.".into(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResendRequest {
    pub email: String,
}

/// Send the verification mail again (always 202).
#[utoipa::path(post, path = "/developer/verify-email/resend", tag = "accounts",
    request_body = ResendRequest,
    responses((status = 202, body = Message), (status = 429, body = crate::openapi::ErrorBody)))]
pub(crate) async fn resend_verification(
    State(s): State<AppState>,
    meta: ClientMeta,
    Json(r): Json<ResendRequest>,
) -> Result<(StatusCode, Json<Message>), AppError> {
    resend_mail(&s, &meta, r.email)?;
    Ok(accepted(
        "If the address has an unverified account, a new link is on its way.",
    ))
}

/// Sends `email` a new verification link in the background when it has an unverified, active
/// account (throttled per IP and per address).
pub(crate) fn resend_mail(s: &AppState, meta: &ClientMeta, email: String) -> Result<(), AppError> {
    s.throttle.check_ip(meta.ip)?;
    let s = s.clone();
    // Answered before any lookup: the response time says nothing about the address.
    tokio::spawn(async move {
        let result: Result<(), AppError> = async {
            if let Some(dev) = developers::by_email(&s.store, email.trim()).await? {
                if !dev.is_verified() && dev.is_active() && s.throttle.allow_mail(&dev.email) {
                    let token = s
                        .control
                        .issue_email_token(&dev.id, TokenPurpose::VerifyEmail)
                        .await?;
                    send_verification(&s, &dev.email, &token);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "verification resend failed");
        }
    });
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TokenResponse {
    /// A JWT; send it as `Authorization: Bearer …`. Logging out ends it.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub developer: DeveloperView,
}

/// Log in with email and password; returns an access token.
#[utoipa::path(post, path = "/developer/login", tag = "accounts",
    request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = crate::openapi::ErrorBody),
              (status = 403, body = crate::openapi::ErrorBody), (status = 429, body = crate::openapi::ErrorBody)))]
pub(crate) async fn login(
    State(s): State<AppState>,
    meta: ClientMeta,
    Json(r): Json<LoginRequest>,
) -> Result<Json<TokenResponse>, AppError> {
    sign_in(&s, &meta, r).await.map(Json)
}

/// Signing in as the API and the portal run it: throttles, the password check (equal work for
/// unknown accounts), a new session and its token.
pub(crate) async fn sign_in(
    s: &AppState,
    meta: &ClientMeta,
    r: LoginRequest,
) -> Result<TokenResponse, AppError> {
    s.throttle.check_ip(meta.ip)?;
    s.throttle.check_account(r.email.trim())?;
    let dev = developers::by_email(&s.store, r.email.trim()).await?;
    let hash = dev.as_ref().map(|d| d.password_hash.clone());
    if !s.passwords.verify(r.password, hash).await {
        s.metrics.event("login_failed");
        return Err(AppError::Unauthorized(
            "invalid_credentials",
            "Incorrect email or password.",
        ));
    }
    let dev = dev.ok_or(AppError::Unauthorized(
        "invalid_credentials",
        "Incorrect email or password.",
    ))?;
    if !dev.is_active() {
        return Err(AppError::Forbidden(
            "account_disabled",
            "This account is disabled.".into(),
        ));
    }
    let ttl = s.config.auth.access_token_ttl;
    let ip = meta.ip.map(|i| i.to_string());
    let session = s
        .control
        .open_session(&dev.id, ttl, ip.as_deref(), meta.user_agent.as_deref())
        .await?;
    s.metrics.event("login_ok");
    Ok(TokenResponse {
        access_token: s.jwt.sign(&dev.id, &session, ttl),
        token_type: "Bearer",
        expires_in: ttl.as_secs(),
        developer: DeveloperView::new(&dev, &s.plans),
    })
}

/// Log out: the access token stops working at once.
#[utoipa::path(post, path = "/developer/logout", tag = "accounts",
    responses((status = 204), (status = 401, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn logout(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<StatusCode, AppError> {
    s.control.end_session(&caller.session_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetRequest {
    pub email: String,
}

/// Ask for a password reset link (always 202).
#[utoipa::path(post, path = "/developer/reset-password", tag = "accounts",
    request_body = ResetRequest,
    responses((status = 202, body = Message), (status = 429, body = crate::openapi::ErrorBody)))]
pub(crate) async fn request_reset(
    State(s): State<AppState>,
    meta: ClientMeta,
    Json(r): Json<ResetRequest>,
) -> Result<(StatusCode, Json<Message>), AppError> {
    start_reset(&s, &meta, r.email)?;
    Ok(accepted(
        "If the address has an account, a reset link is on its way.",
    ))
}

/// Mails `email` a reset link in the background when it has an active account (throttled).
pub(crate) fn start_reset(s: &AppState, meta: &ClientMeta, email: String) -> Result<(), AppError> {
    s.throttle.check_ip(meta.ip)?;
    let s = s.clone();
    // Answered before any lookup: the response time says nothing about the address.
    tokio::spawn(async move {
        if let Err(e) = send_reset(&s, email.trim()).await {
            tracing::warn!(error = %e, "password reset mail failed");
        }
    });
    Ok(())
}

async fn send_reset(s: &AppState, email: &str) -> Result<(), AppError> {
    let Some(dev) = developers::by_email(&s.store, email).await? else {
        return Ok(());
    };
    if !dev.is_active() || !s.throttle.allow_mail(&dev.email) {
        return Ok(());
    }
    let token = s
        .control
        .issue_email_token(&dev.id, TokenPurpose::ResetPassword)
        .await?;
    s.mailer.send(
        &dev.email,
        "Reset your AI Hub password",
        format!(
            "Someone (maybe you) asked to reset your AI Hub password.\n\n\
             Choose a new one by opening this link:\n\
             {0}/portal/reset-password/confirm?token={token}\n\n\
             Or paste this token in the portal:\n{token}\n\n\
             (or send it with the new password to\n\
             POST {0}/developer/reset-password/confirm)\n\n\
             The token expires in {1}. If you did not ask for it, ignore this message:\n\
             your password is unchanged.\n",
            s.config.public_url,
            human_duration(s.config.auth.reset_token_ttl)
        ),
    );
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetConfirm {
    pub token: String,
    pub new_password: String,
}

/// Set a new password with the token from the reset mail; every session ends.
#[utoipa::path(post, path = "/developer/reset-password/confirm", tag = "accounts",
    request_body = ResetConfirm,
    responses((status = 200, body = Message), (status = 422, body = crate::openapi::ErrorBody)))]
pub(crate) async fn confirm_reset(
    State(s): State<AppState>,
    meta: ClientMeta,
    Json(r): Json<ResetConfirm>,
) -> Result<Json<Message>, AppError> {
    finish_reset(&s, &meta, r).await?;
    Ok(Json(Message {
        message: "Password changed. Sign in with the new password.".into(),
    }))
}

/// A reset's second half: throttle, the token (before any argon2 work), the password policy,
/// the hash, the service's reset.
pub(crate) async fn finish_reset(
    s: &AppState,
    meta: &ClientMeta,
    r: ResetConfirm,
) -> Result<(), AppError> {
    s.throttle.check_ip(meta.ip)?;
    // The token is checked before any password hashing: a bogus token costs no argon2 work.
    let dev = s.control.reset_token_owner(&r.token).await?;
    if let Err(e) = check_password(&r.new_password, &dev.email) {
        return Err(AppError::validation("new_password", e));
    }
    let password_hash = s.passwords.hash(r.new_password).await?;
    s.control
        .reset_password(&r.token, &dev.id, &password_hash)
        .await?;
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangePassword {
    pub current_password: String,
    pub new_password: String,
}

/// Change the password (the current one is required); every session ends, this one included.
#[utoipa::path(put, path = "/developer/me/password", tag = "accounts",
    request_body = ChangePassword,
    responses((status = 204), (status = 401, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn change_password(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<ChangePassword>,
) -> Result<StatusCode, AppError> {
    set_own_password(&s, &caller.developer, r).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A password change: the policy, the per-account throttle, the current password, the hash,
/// the service's change (every session ends).
pub(crate) async fn set_own_password(
    s: &AppState,
    dev: &Developer,
    r: ChangePassword,
) -> Result<(), AppError> {
    if let Err(e) = check_password(&r.new_password, &dev.email) {
        return Err(AppError::validation("new_password", e));
    }
    s.throttle.check_account(&dev.email)?;
    if !s
        .passwords
        .verify(r.current_password, Some(dev.password_hash.clone()))
        .await
    {
        return Err(AppError::Unauthorized(
            "invalid_credentials",
            "The current password is wrong.",
        ));
    }
    let hash = s.passwords.hash(r.new_password).await?;
    s.control.change_password(&dev.id, &hash).await?;
    Ok(())
}

/// The caller's account, plan and effective limits.
#[utoipa::path(get, path = "/developer/me", tag = "accounts",
    responses((status = 200, body = DeveloperView), (status = 401, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn me(State(s): State<AppState>, caller: Caller) -> Json<DeveloperView> {
    Json(DeveloperView::new(&caller.developer, &s.plans))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateMe {
    pub full_name: Option<String>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "crate::keys::double_option")]
    #[schema(value_type = Option<String>)]
    pub company_name: Option<Option<String>>,
    pub developer_type: Option<String>,
    /// Cap on the month's overage spend, USD as a decimal string (`"50.00"`, at most 6
    /// decimals); once reached, requests are refused until the month ends. `null` removes the
    /// cap. Applies on plans that bill overage.
    #[serde(default, deserialize_with = "crate::keys::double_option")]
    #[schema(value_type = Option<String>)]
    pub monthly_spend_cap_usd: Option<Option<String>>,
}

/// Update the caller's profile (name, company, type) or monthly spend cap. The email cannot be
/// changed here. A new spend cap reaches every gateway within a second.
#[utoipa::path(put, path = "/developer/me", tag = "accounts",
    request_body = UpdateMe,
    responses((status = 200, body = DeveloperView), (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn update_me(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<UpdateMe>,
) -> Result<Json<DeveloperView>, AppError> {
    let u = service::UpdateProfile {
        full_name: r.full_name,
        company_name: r.company_name,
        developer_type: r.developer_type,
        monthly_spend_cap_usd: r.monthly_spend_cap_usd,
    };
    let dev = s.control.update_profile(&caller.developer.id, u).await?;
    Ok(Json(DeveloperView::new(&dev, &s.plans)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::human_duration;

    #[test]
    fn mail_durations_read_as_people_write_them() {
        let h = |secs: u64| human_duration(Duration::from_secs(secs));
        assert_eq!(h(86_400), "1 day");
        assert_eq!(h(3 * 86_400), "3 days");
        assert_eq!(h(3_600), "1 hour");
        assert_eq!(h(2 * 3_600), "2 hours");
        assert_eq!(h(30 * 60), "30 minutes");
        assert_eq!(h(60), "1 minute");
        assert_eq!(h(45), "45 seconds");
        assert_eq!(h(5_400), "1 hour and 30 minutes");
        assert_eq!(
            h(86_400 + 2 * 3_600 + 5 * 60),
            "1 day, 2 hours and 5 minutes"
        );
        assert_eq!(h(36 * 3_600), "1 day and 12 hours");
        assert_eq!(human_duration(Duration::from_millis(1_500)), "1 second");
        assert_eq!(human_duration(Duration::from_millis(300)), "0 seconds");
        // The defaults (auth.verify_token_ttl 24h, reset_token_ttl 1h) as the mails show them.
        let ttl = |s: &str| humantime::parse_duration(s).unwrap();
        assert_eq!(human_duration(ttl("24h")), "1 day");
        assert_eq!(human_duration(ttl("1h")), "1 hour");
    }
}
