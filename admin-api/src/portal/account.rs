//! Account pages: register, verify email (the mail's link opens a page whose button verifies,
//! so a mail scanner following links cannot use the token up), resend the verification, log
//! in and out, reset a forgotten password. Each form runs what the JSON API runs: a service
//! call (`aihub_control::accounts`), or the same flow where throttles, password hashing and
//! mail are involved (`crate::accounts::sign_in`, `sign_up`, …), so rules, throttles and
//! answers are the same in both.

use askama::Template;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Form;
use serde::Deserialize;

use crate::accounts::{self, LoginRequest, RegisterRequest, ResetConfirm};
use crate::auth::ClientMeta;
use crate::error::{AppError, Query};
use crate::state::AppState;

use super::session::{local_next, see_other, set_cookie, Guest, Member, SESSION_COOKIE};
use super::{form_errors, render, render_status, Chrome, FieldErrors, PageResult};

#[derive(Template)]
#[template(path = "portal/login.html")]
struct LoginPage {
    page: Chrome,
    email: String,
    next: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
    done: Option<String>,
}

pub async fn login_page(guest: Guest, Query(q): Query<NextQuery>) -> PageResult {
    let t = guest.visit.lang.texts();
    if guest.caller.is_some() {
        return Ok(see_other(local_next(q.next.as_deref())));
    }
    let notice = match q.done.as_deref() {
        Some("logged_out") => Some(t.logged_out),
        Some("verified") => Some(t.verify_done),
        Some("reset") => Some(t.reset_done),
        _ => None,
    };
    render(&LoginPage {
        page: Chrome::new(&guest.visit, None, "login", t.login_title).with_notice(notice),
        email: String::new(),
        next: local_next(q.next.as_deref()).to_owned(),
        error: None,
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
    email: String,
    password: String,
    next: Option<String>,
}

pub async fn login(
    State(s): State<AppState>,
    guest: Guest,
    meta: ClientMeta,
    Form(f): Form<LoginForm>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    let next = local_next(f.next.as_deref()).to_owned();
    let request = LoginRequest {
        email: f.email.clone(),
        password: f.password,
    };
    let failed = |message: String, status: StatusCode| {
        render_status(
            status,
            &LoginPage {
                page: Chrome::new(&guest.visit, None, "login", t.login_title),
                email: f.email.clone(),
                next: next.clone(),
                error: Some(message),
            },
        )
    };
    match accounts::sign_in(&s, &meta, request).await {
        Ok(token) => {
            let mut resp = see_other(&next);
            resp.headers_mut().append(
                header::SET_COOKIE,
                set_cookie(&s, SESSION_COOKIE, &token.access_token, token.expires_in),
            );
            Ok(resp)
        }
        Err(AppError::Unauthorized(..)) => {
            failed(t.login_failed.to_owned(), StatusCode::UNAUTHORIZED)
        }
        Err(AppError::Forbidden(_, message)) => failed(message, StatusCode::FORBIDDEN),
        Err(e) => Err(e.into()),
    }
}

pub async fn logout(State(s): State<AppState>, member: Member) -> PageResult {
    s.control.end_session(&member.caller.session_id).await?;
    let mut resp = see_other("/portal/login?done=logged_out");
    resp.headers_mut()
        .append(header::SET_COOKIE, set_cookie(&s, SESSION_COOKIE, "", 0));
    Ok(resp)
}

#[derive(Template)]
#[template(path = "portal/register.html")]
struct RegisterPage {
    page: Chrome,
    form: RegisterForm,
    errors: FieldErrors,
}

#[derive(Deserialize, Default)]
pub struct RegisterForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    full_name: String,
    #[serde(default)]
    company_name: String,
    #[serde(default)]
    developer_type: String,
}

pub async fn register_page(guest: Guest) -> PageResult {
    let t = guest.visit.lang.texts();
    render(&RegisterPage {
        page: Chrome::new(&guest.visit, None, "register", t.register_title),
        form: RegisterForm {
            developer_type: "individual".into(),
            ..Default::default()
        },
        errors: FieldErrors::default(),
    })
}

pub async fn register(
    State(s): State<AppState>,
    guest: Guest,
    meta: ClientMeta,
    Form(mut f): Form<RegisterForm>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    let request = RegisterRequest {
        email: f.email.clone(),
        password: std::mem::take(&mut f.password),
        full_name: f.full_name.clone(),
        company_name: Some(f.company_name.trim().to_owned()).filter(|c| !c.is_empty()),
        developer_type: Some(f.developer_type.clone()).filter(|c| !c.is_empty()),
    };
    match form_errors(accounts::sign_up(&s, &meta, request).await)? {
        Ok(_) => message_page(&guest, t.register_title, t.register_done, None),
        Err(errors) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &RegisterPage {
                page: Chrome::new(&guest.visit, None, "register", t.register_title),
                form: f,
                errors,
            },
        ),
    }
}

#[derive(Template)]
#[template(path = "portal/message.html")]
struct MessagePage {
    page: Chrome,
    message: &'static str,
    link: Option<(&'static str, &'static str)>,
}

fn message_page(
    guest: &Guest,
    title: &str,
    message: &'static str,
    link: Option<(&'static str, &'static str)>,
) -> PageResult {
    let dev = guest.caller.as_ref().map(|c| &c.developer);
    render(&MessagePage {
        page: Chrome::new(&guest.visit, dev, "", title),
        message,
        link,
    })
}

#[derive(Template)]
#[template(path = "portal/verify.html")]
struct VerifyPage {
    page: Chrome,
    token: String,
    errors: FieldErrors,
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

pub async fn verify_page(guest: Guest, Query(q): Query<TokenQuery>) -> PageResult {
    let t = guest.visit.lang.texts();
    let dev = guest.caller.as_ref().map(|c| &c.developer);
    render(&VerifyPage {
        page: Chrome::new(&guest.visit, dev, "", t.verify_title),
        token: q.token.unwrap_or_default(),
        errors: FieldErrors::default(),
    })
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    token: String,
}

pub async fn verify(
    State(s): State<AppState>,
    guest: Guest,
    Form(f): Form<TokenForm>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    let verified = s.control.verify_email(f.token.trim()).await;
    match form_errors(verified.map_err(AppError::from))? {
        Ok(_) if guest.caller.is_some() => Ok(see_other("/portal/keys?done=verified")),
        Ok(_) => Ok(see_other("/portal/login?done=verified")),
        Err(errors) => {
            let dev = guest.caller.as_ref().map(|c| &c.developer);
            render_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                &VerifyPage {
                    page: Chrome::new(&guest.visit, dev, "", t.verify_title),
                    token: f.token,
                    errors,
                },
            )
        }
    }
}

/// Sends the signed-in developer a new verification mail.
pub async fn resend(State(s): State<AppState>, member: Member, meta: ClientMeta) -> PageResult {
    accounts::resend_mail(&s, &meta, member.caller.developer.email.clone())?;
    Ok(see_other("/portal/dashboard?done=resent"))
}

#[derive(Template)]
#[template(path = "portal/reset.html")]
struct ResetPage {
    page: Chrome,
}

pub async fn reset_page(guest: Guest) -> PageResult {
    let t = guest.visit.lang.texts();
    render(&ResetPage {
        page: Chrome::new(&guest.visit, None, "", t.reset_title),
    })
}

#[derive(Deserialize)]
pub struct EmailForm {
    #[serde(default)]
    email: String,
}

pub async fn reset(
    State(s): State<AppState>,
    guest: Guest,
    meta: ClientMeta,
    Form(f): Form<EmailForm>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    accounts::start_reset(&s, &meta, f.email)?;
    message_page(
        &guest,
        t.reset_title,
        t.reset_sent,
        Some(("/portal/reset-password/confirm", t.reset_confirm_title)),
    )
}

#[derive(Template)]
#[template(path = "portal/reset_confirm.html")]
struct ResetConfirmPage {
    page: Chrome,
    token: String,
    errors: FieldErrors,
}

pub async fn reset_confirm_page(guest: Guest, Query(q): Query<TokenQuery>) -> PageResult {
    let t = guest.visit.lang.texts();
    render(&ResetConfirmPage {
        page: Chrome::new(&guest.visit, None, "", t.reset_confirm_title),
        token: q.token.unwrap_or_default(),
        errors: FieldErrors::default(),
    })
}

#[derive(Deserialize)]
pub struct ResetConfirmForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    new_password: String,
}

pub async fn reset_confirm(
    State(s): State<AppState>,
    guest: Guest,
    meta: ClientMeta,
    Form(f): Form<ResetConfirmForm>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    let request = ResetConfirm {
        token: f.token.trim().to_owned(),
        new_password: f.new_password,
    };
    match form_errors(accounts::finish_reset(&s, &meta, request).await)? {
        Ok(_) => {
            // Every session ended with the reset, this browser's too.
            let mut resp = see_other("/portal/login?done=reset").into_response();
            resp.headers_mut()
                .append(header::SET_COOKIE, set_cookie(&s, SESSION_COOKIE, "", 0));
            Ok(resp)
        }
        Err(errors) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &ResetConfirmPage {
                page: Chrome::new(&guest.visit, None, "", t.reset_confirm_title),
                token: f.token,
                errors,
            },
        ),
    }
}

#[derive(Template)]
#[template(path = "portal/account.html")]
struct AccountPage {
    page: Chrome,
    view: crate::accounts::DeveloperView,
    errors: FieldErrors,
}

fn account_page(
    s: &AppState,
    member: &Member,
    dev: &aihub_store::developers::Developer,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> AccountPage {
    let t = member.visit.lang.texts();
    AccountPage {
        page: Chrome::new(&member.visit, Some(dev), "account", t.nav_account).with_notice(notice),
        view: crate::accounts::DeveloperView::new(dev, &s.plans),
        errors,
    }
}

pub async fn account(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<NextQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let notice = (q.done.as_deref() == Some("saved")).then_some(t.admin_saved);
    render(&account_page(
        &s,
        &member,
        &member.caller.developer,
        FieldErrors::default(),
        notice,
    ))
}

#[derive(Deserialize)]
pub struct ProfileForm {
    #[serde(default)]
    full_name: String,
    #[serde(default)]
    company_name: String,
    #[serde(default)]
    monthly_spend_cap_usd: String,
}

pub async fn update_profile(
    State(s): State<AppState>,
    member: Member,
    Form(f): Form<ProfileForm>,
) -> PageResult {
    let blank_is_none = |v: &str| Some(v.trim().to_owned()).filter(|v| !v.is_empty());
    let update = aihub_control::accounts::UpdateProfile {
        full_name: Some(f.full_name.clone()),
        company_name: Some(blank_is_none(&f.company_name)),
        developer_type: None,
        monthly_spend_cap_usd: Some(blank_is_none(&f.monthly_spend_cap_usd)),
    };
    let result = s
        .control
        .update_profile(&member.caller.developer.id, update)
        .await;
    match form_errors(result.map_err(AppError::from))? {
        Ok(_) => Ok(see_other("/portal/account?done=saved")),
        Err(errors) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &account_page(&s, &member, &member.caller.developer, errors, None),
        ),
    }
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    current_password: String,
    #[serde(default)]
    new_password: String,
}

/// Changes the password; every session ends (this one too), so the answer is the login page.
pub async fn change_password(
    State(s): State<AppState>,
    member: Member,
    Form(f): Form<PasswordForm>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let request = crate::accounts::ChangePassword {
        current_password: f.current_password,
        new_password: f.new_password,
    };
    let result = accounts::set_own_password(&s, &member.caller.developer, request).await;
    let errors = match result {
        Ok(_) => {
            let mut resp = see_other("/portal/login?done=reset").into_response();
            resp.headers_mut()
                .append(header::SET_COOKIE, set_cookie(&s, SESSION_COOKIE, "", 0));
            return Ok(resp);
        }
        Err(AppError::Unauthorized(..)) => FieldErrors(vec![crate::error::FieldError::new(
            "current_password",
            t.login_failed,
        )]),
        Err(e) => match form_errors::<()>(Err(e))? {
            Err(errors) => errors,
            Ok(()) => FieldErrors::default(),
        },
    };
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &account_page(&s, &member, &member.caller.developer, errors, None),
    )
}
