//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]` annotations by the
//! same router that serves them (`utoipa-axum`), so a route cannot exist without its entry.
//! Served at `/openapi.json`, browsable at `/docs` (a small self-contained page: no CDN).

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The error body every failure has (OpenAI's shape).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// e.g. `invalid_request_error`, `authentication_error`, `permission_denied`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The first invalid field, for validation errors.
    pub param: Option<String>,
    /// e.g. `validation_failed`, `invalid_credentials`, `not_found`, `conflict`.
    pub code: String,
    /// Every invalid field (validation errors only).
    pub fields: Option<Vec<crate::error::FieldError>>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("The access token from `POST /developer/login`."))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AI Hub admin API",
        description = "Developer accounts, API keys, plans, usage, analytics, billing and operator tools of AI Hub Gateway. \
            Errors use the OpenAI shape `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "accounts", description = "Registration, email verification, login, passwords, profile"),
        (name = "keys", description = "API keys of the signed-in developer"),
        (name = "tasks", description = "Async tasks (batch generation, usage export) and OpenAI batches, with progress and result downloads (docs/batches.md)"),
        (name = "webhooks", description = "Webhook endpoints, deliveries and the event history (docs/webhooks.md)"),
        (name = "operators", description = "Operator tools (role admin)"),
        (name = "plans", description = "Plans, their prices and limits (public)"),
        (name = "usage", description = "Metered usage: totals and breakdowns by model, key and day; CSV export"),
        (name = "analytics", description = "Trends, costs, performance; platform views for operators"),
        (name = "billing", description = "The month so far, plan changes, invoices and payments"),
    )
)]
pub struct ApiDoc;

/// `GET /docs`: a page that renders `/openapi.json`.
pub async fn docs_page() -> Response {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'",
        )],
        Html(include_str!("../assets/docs.html")),
    )
        .into_response()
}

pub async fn docs_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/docs.js"),
    )
        .into_response()
}
