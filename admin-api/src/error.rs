//! [`AppError`]: every failure of the admin API, turned into a response in exactly one place
//! (its `IntoResponse`), in the OpenAI error shape
//! `{"error": {"message", "type", "param", "code"}}`. Internal details are logged with the
//! request id and never sent to the client. Also [`Json`], the body extractor whose rejections
//! become `AppError`s.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use aihub_store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 422: the request is well-formed JSON but some fields are invalid.
    #[error("invalid fields")]
    Validation(Vec<FieldError>),
    /// 400: the body is not the JSON expected.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401 with a code (`invalid_credentials`, `invalid_token`, …).
    #[error("unauthorized: {1}")]
    Unauthorized(&'static str, &'static str),
    /// 403 with a code (`email_not_verified`, `account_disabled`, `operator_only`, …).
    #[error("forbidden: {1}")]
    Forbidden(&'static str, String),
    /// 404: no such resource for this caller (also for other developers' resources).
    #[error("not found")]
    NotFound,
    /// 404 for a path no route serves.
    #[error("unknown url")]
    UnknownUrl(String),
    /// 405 for a method a path does not serve.
    #[error("method not allowed")]
    MethodNotAllowed(String),
    /// 413 `file_too_large`: an upload passed the file size or storage limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// 409: the resource exists already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 429 with the seconds after which a retry may succeed.
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    /// 503: the database cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 503 `usage_unavailable`: the usage database (ClickHouse) is not configured or cannot be
    /// reached.
    #[error("usage data unavailable: {0}")]
    UsageUnavailable(String),
    /// 500: anything else; the detail is logged, not shown.
    #[error("internal: {0}")]
    Internal(String),
}

/// A failed ClickHouse query: unreachable or timed out is 503, anything else (a query the
/// server refused) is a bug, 500. The server's message is logged, never shown.
impl From<clickhouse::error::Error> for AppError {
    fn from(e: clickhouse::error::Error) -> AppError {
        match e {
            clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => {
                AppError::UsageUnavailable(e.to_string())
            }
            other => AppError::Internal(format!("ClickHouse: {other}")),
        }
    }
}

impl From<aihub_billing::BillingError> for AppError {
    fn from(e: aihub_billing::BillingError) -> AppError {
        match e {
            aihub_billing::BillingError::Store(e) => e.into(),
            aihub_billing::BillingError::ClickHouse(e) => e.into(),
            aihub_billing::BillingError::UnknownDeveloper => AppError::NotFound,
        }
    }
}

/// The service layer's failures, mapped in this one place.
impl From<aihub_control::Error> for AppError {
    fn from(e: aihub_control::Error) -> AppError {
        use aihub_control::Error;
        match e {
            Error::Invalid(fields) => AppError::Validation(
                fields
                    .into_iter()
                    .map(|f| FieldError {
                        field: f.field,
                        message: f.message,
                    })
                    .collect(),
            ),
            Error::Forbidden("file_too_large", message) => AppError::TooLarge(message),
            Error::Forbidden(code, message) => AppError::Forbidden(code, message),
            Error::NotFound => AppError::NotFound,
            Error::Conflict(message) => AppError::Conflict(message),
            Error::Store(e) => e.into(),
        }
    }
}

impl AppError {
    pub fn validation(field: &str, message: impl Into<String>) -> AppError {
        AppError::Validation(vec![FieldError::new(field, message)])
    }

    /// `Ok` when no field is invalid, else one 422 naming them all.
    pub fn check(errors: Vec<FieldError>) -> Result<(), AppError> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AppError::Validation(errors))
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> AppError {
        AppError::Internal(e.to_string())
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AppError::NotFound,
            StoreError::Conflict(_) => AppError::Conflict("the resource already exists".into()),
            e if e.is_unavailable() => AppError::Unavailable(e.to_string()),
            e => AppError::Internal(e.to_string()),
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

/// What a client is told about an [`AppError`]: status, OpenAI error type and code, a
/// client-safe message, and the invalid fields. Built (and internal details logged) once per
/// error, by [`AppError::describe`]; the JSON body here and the portal's error page both use it.
pub struct Described {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub fields: Option<Vec<FieldError>>,
}

impl AppError {
    /// The client-facing description; logs what clients are not told.
    pub fn describe(&self) -> Described {
        let (status, kind, code, message, param, fields) = match self {
            AppError::Validation(fields) => {
                let list: Vec<String> = fields
                    .iter()
                    .map(|f| format!("{}: {}", f.field, f.message))
                    .collect();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    "validation_failed",
                    format!("Invalid request: {}", list.join("; ")),
                    fields.first().map(|f| f.field.clone()),
                    Some(fields.clone()),
                )
            }
            AppError::BadRequest(m) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                m.clone(),
                None,
                None,
            ),
            AppError::Unauthorized(code, m) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                *code,
                (*m).to_owned(),
                None,
                None,
            ),
            AppError::Forbidden(code, m) => (
                StatusCode::FORBIDDEN,
                "permission_denied",
                *code,
                m.clone(),
                None,
                None,
            ),
            AppError::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "No such resource.".to_owned(),
                None,
                None,
            ),
            AppError::UnknownUrl(path) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                format!("Unknown request URL: {path}."),
                None,
                None,
            ),
            AppError::MethodNotAllowed(what) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                format!("Method not allowed: {what}."),
                None,
                None,
            ),
            AppError::TooLarge(m) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "file_too_large",
                m.clone(),
                None,
                None,
            ),
            AppError::Conflict(m) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "conflict",
                m.clone(),
                None,
                None,
            ),
            AppError::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                "Too many attempts. Try again later.".to_owned(),
                None,
                None,
            ),
            AppError::Unavailable(detail) => {
                tracing::error!(error = %detail, "control-plane database unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "unavailable",
                    "The service is temporarily unavailable. Try again later.".to_owned(),
                    None,
                    None,
                )
            }
            AppError::UsageUnavailable(detail) => {
                tracing::error!(error = %detail, "usage database unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "usage_unavailable",
                    "Usage data is temporarily unavailable. Try again later.".to_owned(),
                    None,
                    None,
                )
            }
            AppError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "Internal server error.".to_owned(),
                    None,
                    None,
                )
            }
        };
        Described {
            status,
            kind,
            code,
            message,
            param,
            fields,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let d = self.describe();
        let mut error =
            json!({ "message": d.message, "type": d.kind, "param": d.param, "code": d.code });
        if let Some(fields) = d.fields {
            error["fields"] = json!(fields);
        }
        let mut resp = (d.status, axum::Json(json!({ "error": error }))).into_response();
        if let AppError::TooManyRequests { retry_after_secs } = self {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs.max(1)),
            );
        }
        resp
    }
}

/// A JSON body; malformed JSON (or a missing JSON content type) is a 400, a body of the wrong
/// shape a 422 naming the field, and a string holding a NUL character a 422 too (PostgreSQL
/// cannot store one) — all as [`AppError`].
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
        if !json {
            return Err(AppError::BadRequest(
                "Expected a JSON body with `Content-Type: application/json`.".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            AppError::BadRequest(format!("Cannot read the body: {}", e.body_text()))
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Deserializes a JSON body with field-naming errors (see [`Json`]).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    if memmem(bytes, b"\\u0000") {
        return Err(AppError::validation(
            "body",
            "strings must not contain NUL characters",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if !inner.is_data() {
                return Err(AppError::BadRequest(format!(
                    "Malformed JSON body: {inner}"
                )));
            }
            let message = inner.to_string();
            // Missing and unknown fields are reported at their parent: name the field itself.
            let named = message.split('`').nth(1).filter(|_| {
                message.starts_with("missing field") || message.starts_with("unknown field")
            });
            let field = match (path.as_str(), named) {
                (".", Some(f)) => f.to_owned(),
                (p, Some(f)) => format!("{p}.{f}"),
                (".", None) => "body".to_owned(),
                (p, None) => p.to_owned(),
            };
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            return Err(AppError::Validation(vec![FieldError { field, message }]));
        }
    };
    de.end()
        .map_err(|e| AppError::BadRequest(format!("Malformed JSON body: {e}")))?;
    Ok(value)
}

fn memmem(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Query parameters; a bad one is a 422 naming the query string, as [`AppError`].
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| {
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                AppError::validation("query", detail.to_owned())
            })
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
