//! The AI Hub control plane's HTTP API (axum): developer accounts, API keys, operator tools,
//! the public plan list, and its OpenAPI document. Data lives in the control-plane store (`aihub-store`: SQLite by
//! default, PostgreSQL when configured); gateways follow key changes from the store's change
//! feed, nudged through Redis when configured.
//!
//! [`app`] builds the whole router from an [`AppState`], so tests can call it directly; the
//! `aihub admin` and `aihub serve` commands bind it with [`serve`].
//!
//! The rules of every control-plane write (transactions, outbox events, audit entries, key
//! caps, plan changes) are in the service layer, `aihub-control`, which the state holds as
//! `control`; the modules here are the HTTP edge: wire types, extractors, throttles, password
//! hashing, mail, tokens, and `AppError` (which maps `aihub_control::Error` in one place). Only
//! [`config`] is a public module (for the `aihub` binary); [`app`], [`api`], [`serve`] and
//! [`AppState`] are the rest of the surface.
//!
//! # Layout
//! - [`config`] — `config/admin.yaml`, defaults, environment overrides, validation.
//! - [`state`] — shared state, start-up (migrations, JWT secret, operator bootstrap, the
//!   service layer, background jobs).
//! - [`error`] — `AppError`, the one place errors become responses; the JSON extractor.
//! - [`credentials`] — argon2id passwords, JWTs bound to sessions, throttling.
//! - [`auth`] — the caller extractors (`Caller`, `Operator`, `ClientMeta`).
//! - [`accounts`] — `/developer/register|verify-email|login|logout|reset-password|me`.
//! - [`keys`] — `/developer/keys…`.
//! - [`operators`] — `/admin/…`.
//! - [`plans`] — `GET /plans`, effective limits, USD amounts.
//! - [`range`] — the time range of usage and analytics requests (period or days), validated.
//! - [`csv`] — usage rows as CSV (the download and the `usage_export` task) and the task
//!   engine's `UsageExporter`.
//! - [`usage`] — `/developer/usage`, `/developer/keys/{id}/usage`, `/developer/usage/export`
//!   (CSV, streamed), from the ClickHouse rollups.
//! - [`analytics`] — `/developer/analytics/{overview,trends,costs,performance}` and
//!   `/admin/analytics/overview`.
//! - [`billing`] — `/developer/billing…`, `/developer/invoices…` (JSON and printable HTML),
//!   `/admin/invoices…` (generate, finalize, void, payments), `/admin/billing/revenue`.
//! - [`email`] — SMTP or `.eml` files.
//! - [`http`] — request ids, access log, health, 404, the request-body deadline.
//! - [`metrics`] — the Prometheus registry and its bounded labels.
//! - [`notices`] — mail for what the webhook engine reports (usage alerts, disabled endpoints).
//! - [`batches`] — the OpenAI Files and Batches APIs under `/internal/v1/…`, called by the
//!   gateway with a signed identity (clients call `/v1/files…`, `/v1/batches…` there).
//! - [`tasks`] — `/developer/tasks…` (the seed's task API) and the usage-export writer.
//! - [`webhooks`] — `/developer/webhooks…`, `/developer/deliveries…`, `/developer/events…`.
//! - [`view`] — display formatting (grouped numbers, USD, times) for the portal and invoices.
//! - [`server`] — the accept loop: HTTP/1.1 with a header read deadline, graceful shutdown.
//! - [`listener`] — before HTTP: the PROXY header (trusted proxies only), TLS (certificate
//!   swapped on SIGHUP); the client address of each request (`X-Forwarded-For` from trusted
//!   proxies only).
//! - [`openapi`] — the document and the `/docs` page.
//! - [`portal`] — the web developer portal under `/portal` (server-rendered pages over the
//!   same service calls, session cookie, CSRF, English and Chinese).

pub(crate) mod accounts;
pub(crate) mod analytics;
pub(crate) mod auth;
pub(crate) mod batches;
pub(crate) mod billing;
pub mod config;
pub(crate) mod credentials;
pub(crate) mod csv;
pub(crate) mod email;
pub(crate) mod error;
pub(crate) mod http;
pub(crate) mod keys;
pub mod listener;
pub(crate) mod metrics;
pub(crate) mod notices;
pub(crate) mod openapi;
pub(crate) mod operators;
pub(crate) mod plans;
pub(crate) mod portal;
pub(crate) mod range;
pub(crate) mod server;
pub(crate) mod state;
pub(crate) mod tasks;
pub(crate) mod usage;
pub(crate) mod view;
pub(crate) mod webhooks;

use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::AdminConfig;
pub use state::{AppState, StartError};

/// The documented API routes and their OpenAPI document, built together.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(accounts::register))
        .routes(routes!(accounts::verify_email, accounts::verify_email_link))
        .routes(routes!(accounts::resend_verification))
        .routes(routes!(accounts::login))
        .routes(routes!(accounts::logout))
        .routes(routes!(accounts::request_reset))
        .routes(routes!(accounts::confirm_reset))
        .routes(routes!(accounts::me, accounts::update_me))
        .routes(routes!(accounts::change_password))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::get, keys::update, keys::delete))
        .routes(routes!(keys::regenerate))
        .routes(routes!(tasks::list, tasks::create))
        .routes(routes!(tasks::get))
        .routes(routes!(tasks::cancel))
        .routes(routes!(tasks::result))
        .routes(routes!(webhooks::list, webhooks::create))
        .routes(routes!(webhooks::event_types))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::rotate_secret))
        .routes(routes!(webhooks::test))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::redeliver))
        .routes(routes!(webhooks::events))
        .routes(routes!(webhooks::event))
        .routes(routes!(
            operators::list_developers,
            operators::create_developer
        ))
        .routes(routes!(
            operators::get_developer,
            operators::update_developer
        ))
        .routes(routes!(operators::developer_keys))
        .routes(routes!(operators::revoke_key))
        .routes(routes!(operators::audit_log))
        .routes(routes!(plans::list))
        .routes(routes!(usage::usage))
        .routes(routes!(usage::key_usage))
        .routes(routes!(usage::export::export))
        .routes(routes!(analytics::overview))
        .routes(routes!(analytics::trends))
        .routes(routes!(analytics::costs))
        .routes(routes!(analytics::performance))
        .routes(routes!(analytics::platform_overview))
        .routes(routes!(billing::developer_billing))
        .routes(routes!(billing::change_plan))
        .routes(routes!(billing::developer_invoices))
        .routes(routes!(billing::developer_invoice))
        .routes(routes!(billing::admin::admin_invoices))
        .routes(routes!(billing::admin::admin_invoice))
        .routes(routes!(billing::admin::generate))
        .routes(routes!(billing::admin::finalize))
        .routes(routes!(billing::admin::void))
        .routes(routes!(billing::admin::record_payment))
        .routes(routes!(billing::admin::revenue))
        .split_for_parts()
}

/// The whole admin API: documented routes, operational endpoints, middleware.
pub fn app(state: AppState) -> Router {
    let (mut api, doc) = api();
    if state.config.portal.enabled {
        api = api.merge(portal::router(state.clone())).route(
            "/",
            get(|| async { axum::response::Redirect::to("/portal") }),
        );
    }
    let doc_json = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    api.merge(batches::router())
        .route(
            "/openapi.json",
            get(move || async move { ([("content-type", "application/json")], doc_json) }),
        )
        .route("/docs", get(openapi::docs_page))
        .route("/docs/app.js", get(openapi::docs_script))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .fallback(http::fallback)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            http::BodyLimits {
                timeout: state.config.server.body_read_timeout,
                max_bytes: state.config.server.max_body_bytes,
            },
            http::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::observe,
        ))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` resolves (in-flight requests finish),
/// with the `server` section's deadlines for slow clients, behind `front` (TLS, trusted
/// proxies: [`listener::Front::try_new`] from the same section).
pub async fn serve(
    listener: tokio::net::TcpListener,
    front: listener::Front,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let deadlines = server::Deadlines {
        header_read: state.config.server.header_read_timeout,
        response_write: state.config.server.response_write_timeout,
    };
    server::serve_router(listener, front, app(state), deadlines, shutdown).await
}
