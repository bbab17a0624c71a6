//! The web developer portal, served by the admin API under `/portal`: server-rendered pages
//! (askama templates in `admin-api/templates/portal/`, compiled into the binary) over the same
//! service calls and reads the JSON API uses (never a handler), one stylesheet and one small script (`assets/portal/`), charts
//! as inline SVG. Works without JavaScript; English and Chinese.
//!
//! # Layout
//! - [`session`] — cookies, the CSRF check and security headers ([`session::guard`]), the
//!   `Guest` / `Member` / `Staff` extractors.
//! - [`i18n`] — the two languages and every text.
//! - [`crate::view`] (display formatting, shared with the printable invoice); [`charts`] — SVG charts.
//! - [`account`] — register, verify email, login/logout, password reset; the account page
//!   (profile, monthly spend cap, password change).
//! - [`dashboard`] — this period at a glance.
//! - [`keys`] — create (shown once), rotate, disable, revoke.
//! - [`webhooks`] — endpoints (secret shown once), delivery log and redelivery, the event
//!   history with live updates (server-sent events).
//! - [`usage`] — charts by day and model, per-key table, CSV export.
//! - [`tasks`] — async tasks and OpenAI batches: list, queue a batch generation or a usage
//!   export, cancel, download results; live progress (server-sent events).
//! - [`billing`] — plan, current period, projection, plan change, invoices.
//! - [`docs`] — the guides in `docs/guide/` and the API references.
//! - [`admin`] — operators: developers, plans, platform analytics.
//!
//! Failures: handlers return [`PageResult`]; an error travels as a [`Failure`] to the guard,
//! which renders it as a page in the visitor's language — the one place portal errors become
//! responses. Validation errors of a form re-render that form with the fields marked.

pub mod account;
pub mod admin;
pub mod billing;
pub mod charts;
pub mod dashboard;
pub mod docs;
pub mod i18n;
pub mod keys;
pub mod session;
pub mod tasks;
pub mod usage;
pub mod webhooks;
pub(crate) use crate::view;

use std::sync::{Arc, LazyLock};

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use aihub_store::developers::Developer;

use crate::error::{AppError, FieldError, Query};
use crate::state::AppState;
use i18n::{Lang, Texts};
use session::{local_next, set_cookie, Guest, Visit, LANG_COOKIE};

/// Every portal route, behind [`session::guard`].
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/portal", get(home))
        .route("/portal/", get(home))
        .route("/portal/lang", get(switch_language))
        .route("/portal/assets/{name}", get(asset))
        .route(
            "/portal/register",
            get(account::register_page).post(account::register),
        )
        .route(
            "/portal/verify-email",
            get(account::verify_page).post(account::verify),
        )
        .route("/portal/resend-verification", post(account::resend))
        .route(
            "/portal/login",
            get(account::login_page).post(account::login),
        )
        .route("/portal/logout", post(account::logout))
        .route(
            "/portal/reset-password",
            get(account::reset_page).post(account::reset),
        )
        .route(
            "/portal/reset-password/confirm",
            get(account::reset_confirm_page).post(account::reset_confirm),
        )
        .route(
            "/portal/account",
            get(account::account).post(account::update_profile),
        )
        .route("/portal/account/password", post(account::change_password))
        .route("/portal/dashboard", get(dashboard::page))
        .route("/portal/keys", get(keys::page).post(keys::create))
        .route("/portal/keys/{id}/rotate", post(keys::rotate))
        .route("/portal/keys/{id}/revoke", post(keys::revoke))
        .route("/portal/keys/{id}/active", post(keys::set_active))
        .route(
            "/portal/webhooks",
            get(webhooks::page).post(webhooks::create),
        )
        .route(
            "/portal/webhooks/{id}",
            get(webhooks::detail).post(webhooks::update),
        )
        .route("/portal/webhooks/{id}/active", post(webhooks::set_active))
        .route("/portal/webhooks/{id}/test", post(webhooks::test))
        .route("/portal/webhooks/{id}/rotate", post(webhooks::rotate))
        .route("/portal/webhooks/{id}/delete", post(webhooks::delete))
        .route(
            "/portal/deliveries/{id}/redeliver",
            post(webhooks::redeliver),
        )
        .route("/portal/events", get(webhooks::events))
        .route("/portal/events/stream", get(webhooks::stream))
        .route("/portal/usage", get(usage::page))
        .route("/portal/usage/export", get(usage::export))
        .route("/portal/tasks", get(tasks::page).post(tasks::create))
        .route("/portal/tasks/stream", get(tasks::stream))
        .route("/portal/tasks/{id}/cancel", post(tasks::cancel))
        .route("/portal/tasks/{id}/result", get(tasks::result))
        .route("/portal/billing", get(billing::page))
        .route("/portal/billing/plan", post(billing::change_plan))
        .route("/portal/invoices/{id}", get(billing::invoice))
        .route("/portal/docs", get(docs::index))
        .route("/portal/docs/api", get(docs::api_reference))
        .route(
            "/portal/docs/gateway-openapi.json",
            get(docs::gateway_openapi),
        )
        .route("/portal/docs/{slug}", get(docs::page))
        .route("/portal/admin", get(admin::overview))
        .route("/portal/admin/developers", get(admin::developers))
        .route(
            "/portal/admin/developers/{id}",
            get(admin::developer).post(admin::update_developer),
        )
        .route("/portal/admin/plans", get(admin::plans))
        .route("/portal/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::from_fn_with_state(state, session::guard))
}

/// The result of a page handler: a page, a redirect, or a failure for the guard to render.
pub type PageResult = Result<Response, Failure>;

/// An error on its way to [`session::guard`], which renders it in the visitor's language.
#[derive(Clone)]
pub struct Failure(pub Arc<AppError>);

impl Failure {
    /// A placeholder response carrying `err` for the guard.
    pub fn response(err: AppError) -> Response {
        let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        resp.extensions_mut().insert(Failure(Arc::new(err)));
        resp
    }
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Failure {
        Failure(Arc::new(e))
    }
}

impl From<aihub_control::Error> for Failure {
    fn from(e: aihub_control::Error) -> Failure {
        AppError::from(e).into()
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        resp.extensions_mut().insert(self);
        resp
    }
}

/// What every page's frame needs: texts, the visitor's CSRF token, who is signed in, which
/// navigation item is current.
pub struct Chrome {
    pub t: &'static Texts,
    pub lang: &'static str,
    pub csrf: String,
    pub here: String,
    pub title: String,
    /// The signed-in developer's name, or `None` for a visitor.
    pub user: Option<String>,
    pub operator: bool,
    pub nav: &'static str,
    pub notice: Option<&'static str>,
    pub asset_version: &'static str,
}

impl Chrome {
    pub fn new(visit: &Visit, dev: Option<&Developer>, nav: &'static str, title: &str) -> Chrome {
        Chrome {
            t: visit.lang.texts(),
            lang: visit.lang.code(),
            csrf: visit.csrf.clone(),
            here: visit.here.clone(),
            title: title.to_owned(),
            user: dev.map(|d| d.full_name.clone()),
            operator: dev.is_some_and(Developer::is_admin),
            nav,
            notice: None,
            asset_version: ASSET_VERSION.as_str(),
        }
    }

    pub fn with_notice(mut self, notice: Option<&'static str>) -> Chrome {
        self.notice = notice;
        self
    }

    /// Whether `nav` is the current navigation item (for the template).
    pub fn on(&self, nav: &str) -> &'static str {
        if self.nav == nav {
            "on"
        } else {
            ""
        }
    }

    pub fn is_lang(&self, code: &str) -> &'static str {
        if self.lang == code {
            "true"
        } else {
            "false"
        }
    }
}

/// Renders a template as a 200 page.
pub fn render(t: &impl Template) -> PageResult {
    render_status(StatusCode::OK, t)
}

pub fn render_status(status: StatusCode, t: &impl Template) -> PageResult {
    let body = t.render().map_err(AppError::internal)?;
    Ok((status, Html(body)).into_response())
}

/// The invalid fields of a form by name, for templates (`errors.get("email")`).
#[derive(Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|f| f.field == field)
            .map(|f| f.message.as_str())
    }

    pub fn any(&self) -> bool {
        !self.0.is_empty()
    }
}

/// Splits a form submission's outcome: validation errors go back into the form, anything else
/// is a failure page.
pub fn form_errors<T>(r: Result<T, AppError>) -> Result<Result<T, FieldErrors>, Failure> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(AppError::Validation(fields)) => Ok(Err(FieldErrors(fields))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "portal/error.html")]
struct ErrorPage<'a> {
    page: Chrome,
    message: &'a str,
    code: &'a str,
}

/// The page for a failure (see [`Failure`]); the status and the client-safe message come from
/// [`AppError::describe`], as in the JSON API.
pub fn error_page(visit: &Visit, err: &AppError) -> Response {
    let d = err.describe();
    let t = visit.lang.texts();
    let message = match d.code {
        "csrf_failed" => t.error_csrf,
        "unknown_url" | "not_found" => t.error_not_found,
        "usage_unavailable" => t.usage_unavailable,
        _ => d.message.as_str(),
    };
    let page = ErrorPage {
        page: Chrome::new(visit, None, "", t.error_title),
        message,
        code: d.code,
    };
    let mut resp = match page.render() {
        Ok(html) => (d.status, Html(html)).into_response(),
        Err(_) => (d.status, d.message.clone()).into_response(),
    };
    if let AppError::TooManyRequests { retry_after_secs } = err {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from((*retry_after_secs).max(1)),
        );
    }
    resp
}

async fn not_found() -> Failure {
    AppError::NotFound.into()
}

async fn home(guest: Guest) -> Response {
    if guest.caller.is_some() {
        Redirect::to("/portal/dashboard").into_response()
    } else {
        Redirect::to("/portal/login").into_response()
    }
}

#[derive(Deserialize)]
struct LangQuery {
    to: String,
    next: Option<String>,
}

/// `GET /portal/lang?to=zh&next=/portal/keys`: remembers the language, goes back.
async fn switch_language(State(s): State<AppState>, Query(q): Query<LangQuery>) -> Response {
    let lang = Lang::parse(&q.to).unwrap_or(Lang::En);
    let mut resp = Redirect::to(local_next(q.next.as_deref())).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&s, LANG_COOKIE, lang.code(), 400 * 86_400),
    );
    resp
}

const CSS: &str = include_str!("../../assets/portal/portal.css");
const JS: &str = include_str!("../../assets/portal/portal.js");

/// A short hash of the assets: their URLs change when they do, so they can be cached forever.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let digest = crate::auth::token_hash(&format!("{CSS}{JS}"));
    digest[..12].to_owned()
});

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "portal.css" => (CSS, "text/css; charset=utf-8"),
        "portal.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return Failure::response(AppError::NotFound),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}
