//! Webhooks under `/developer/webhooks` (endpoints: the secret is returned on creation and
//! rotation only; test events), `/developer/deliveries/{id}/redeliver`, the event history
//! under `/developer/events`, and the event catalogue. Wire types and handlers only: the
//! rules are `aihub_control::webhooks`, delivery is `aihub_webhooks`' engine.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use aihub_control::webhooks::{CreateWebhook, LoggedDelivery, UpdateWebhook, WithSecret};
use aihub_control::Actor;
use aihub_store::deliveries::{Attempt, Delivery};
use aihub_store::outbox::rfc3339_ms;
use aihub_store::webhooks::Endpoint;
use aihub_webhooks::catalogue::CATALOGUE;

use crate::auth::Caller;
use crate::error::{AppError, Json, Query};
use crate::state::AppState;

/// An endpoint, as its owner sees it (never the secret).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookView {
    pub id: String,
    pub url: String,
    pub description: String,
    /// Exact event types and wildcards (`task.*`, `*`).
    pub event_types: Vec<String>,
    /// Retries after the first attempt (0 to 7).
    pub max_retries: i64,
    /// `false` once disabled (by the developer, a 410, or failing too long).
    pub active: bool,
    pub disabled_at: Option<String>,
    pub disabled_reason: Option<String>,
    /// The first failure of the current unbroken run of failures, if failing.
    pub failing_since: Option<String>,
    /// After a rotation, the previous secret also signs until then.
    pub previous_secret_expires_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Endpoint> for WebhookView {
    fn from(e: &Endpoint) -> Self {
        let now = aihub_store::now_ms();
        WebhookView {
            id: e.id.clone(),
            url: e.url.clone(),
            description: e.description.clone(),
            event_types: e.event_types.clone(),
            max_retries: e.max_retries,
            active: e.active(),
            disabled_at: e.disabled_at.map(rfc3339_ms),
            disabled_reason: e.disabled_reason.clone(),
            failing_since: e.failing_since.map(rfc3339_ms),
            previous_secret_expires_at: e
                .previous_secret_until
                .filter(|u| *u > now)
                .map(rfc3339_ms),
            created_at: rfc3339_ms(e.created_at),
            updated_at: rfc3339_ms(e.updated_at),
        }
    }
}

/// An endpoint with its signing secret: shown in this response only.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// `whsec_…`: signs every request (see `docs/webhooks.md` to verify).
    pub secret: String,
}

impl From<WithSecret> for WebhookWithSecret {
    fn from(w: WithSecret) -> Self {
        WebhookWithSecret {
            webhook: (&w.endpoint).into(),
            secret: w.secret,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateWebhookRequest {
    /// `https://…` (plain `http` only where the operator allows it).
    pub url: String,
    /// Event types and wildcards, e.g. `["invoice.finalized", "task.*"]`; `["*"]` for all.
    pub event_types: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Retries after the first attempt, 0 to 7. Default 3.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Default true.
    #[serde(default)]
    pub active: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateWebhookRequest {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub description: Option<String>,
    pub max_retries: Option<i64>,
    /// `true` re-enables a disabled endpoint; `false` disables it (pending deliveries end).
    pub active: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookList {
    pub data: Vec<WebhookView>,
}

/// Register a webhook endpoint. The signing secret is in this response only.
#[utoipa::path(post, path = "/developer/webhooks", tag = "webhooks",
    request_body = CreateWebhookRequest,
    responses((status = 201, body = WebhookWithSecret), (status = 403, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(r): Json<CreateWebhookRequest>,
) -> Result<(StatusCode, Json<WebhookWithSecret>), AppError> {
    let dev = &caller.developer;
    let cmd = CreateWebhook {
        url: r.url,
        event_types: r.event_types,
        description: r.description,
        max_retries: r.max_retries,
        active: r.active,
    };
    let w = s
        .control
        .create_webhook(&Actor::developer(dev), dev, cmd)
        .await?;
    Ok((StatusCode::CREATED, Json(w.into())))
}

/// The caller's webhook endpoints, oldest first.
#[utoipa::path(get, path = "/developer/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)), security(("bearer" = [])))]
pub(crate) async fn list(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, AppError> {
    let list = s.control.webhooks(&caller.developer).await?;
    Ok(Json(WebhookList {
        data: list.iter().map(WebhookView::from).collect(),
    }))
}

/// One of the caller's endpoints.
#[utoipa::path(get, path = "/developer/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, AppError> {
    Ok(Json(
        (&s.control.webhook(&caller.developer, &id).await?).into(),
    ))
}

/// Change an endpoint (absent fields stay).
#[utoipa::path(put, path = "/developer/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id")), request_body = UpdateWebhookRequest,
    responses((status = 200, body = WebhookView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn update(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(r): Json<UpdateWebhookRequest>,
) -> Result<Json<WebhookView>, AppError> {
    let dev = &caller.developer;
    let cmd = UpdateWebhook {
        url: r.url,
        event_types: r.event_types,
        description: r.description,
        max_retries: r.max_retries,
        active: r.active,
    };
    let e = s
        .control
        .update_webhook(&Actor::developer(dev), dev, &id, cmd)
        .await?;
    Ok(Json((&e).into()))
}

/// Delete an endpoint: its pending deliveries end; its delivery log stays readable.
#[utoipa::path(delete, path = "/developer/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 204), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let dev = &caller.developer;
    s.control
        .delete_webhook(&Actor::developer(dev), dev, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new signing secret (in this response only); the previous one also signs for 24 hours.
#[utoipa::path(post, path = "/developer/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookWithSecret), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn rotate_secret(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WebhookWithSecret>, AppError> {
    let dev = &caller.developer;
    let w = s
        .control
        .rotate_webhook_secret(&Actor::developer(dev), dev, &id)
        .await?;
    Ok(Json(w.into()))
}

/// Send a `webhook.test` event to this endpoint now.
#[utoipa::path(post, path = "/developer/webhooks/{id}/test", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 202, body = DeliveryView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn test(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), AppError> {
    let d = s.control.test_webhook(&caller.developer, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::new(&d, &[]))))
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    /// 1 = the first.
    pub attempt: i64,
    pub at: String,
    /// The receiver's status; `null` when none came back (see `error`).
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    /// The first 1 KiB of the receiver's answer.
    pub response_body: String,
    pub error: Option<String>,
}

/// A delivery of one event to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryView {
    pub id: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub completed_at: Option<String>,
    /// Oldest first.
    pub attempt_log: Vec<AttemptView>,
}

impl DeliveryView {
    fn new(d: &Delivery, attempts: &[Attempt]) -> DeliveryView {
        DeliveryView {
            id: d.id.clone(),
            endpoint_id: d.endpoint_id.clone(),
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            status: d.status.clone(),
            attempts: d.attempts,
            max_attempts: d.max_attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339_ms),
            last_status_code: d.last_status_code,
            last_error: d.last_error.clone(),
            created_at: rfc3339_ms(d.created_at),
            completed_at: d.completed_at.map(rfc3339_ms),
            attempt_log: attempts
                .iter()
                .map(|a| AttemptView {
                    attempt: a.attempt,
                    at: rfc3339_ms(a.started_at),
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    response_body: a.response_body.clone(),
                    error: a.error.clone(),
                })
                .collect(),
        }
    }
}

impl From<&LoggedDelivery> for DeliveryView {
    fn from(l: &LoggedDelivery) -> Self {
        DeliveryView::new(&l.delivery, &l.attempts)
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// Page size, 1 to 100. Default 20.
    #[serde(default)]
    pub limit: Option<i64>,
    /// The id of the last item of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

fn page_size(limit: Option<i64>) -> Result<i64, AppError> {
    match limit.unwrap_or(20) {
        n @ 1..=100 => Ok(n),
        _ => Err(AppError::validation("limit", "must be 1 to 100")),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryList {
    pub data: Vec<DeliveryView>,
    pub has_more: bool,
}

/// An endpoint's deliveries, newest first, each with its attempts.
#[utoipa::path(get, path = "/developer/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id"), PageQuery),
    responses((status = 200, body = DeliveryList), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn deliveries(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<DeliveryList>, AppError> {
    let limit = page_size(q.limit)?;
    let mut list = s
        .control
        .webhook_deliveries(&caller.developer, &id, limit + 1, q.after.as_deref())
        .await?;
    let has_more = list.len() as i64 > limit;
    list.truncate(limit as usize);
    Ok(Json(DeliveryList {
        data: list.iter().map(DeliveryView::from).collect(),
        has_more,
    }))
}

/// Send a delivery again now (one more attempt, whatever its state).
#[utoipa::path(post, path = "/developer/deliveries/{id}/redeliver", tag = "webhooks",
    params(("id" = String, Path, description = "Delivery id")),
    responses((status = 202, body = DeliveryView), (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn redeliver(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), AppError> {
    let dev = &caller.developer;
    let d = s
        .control
        .redeliver(&Actor::developer(dev), dev, &id)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::new(&d, &[]))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventQuery {
    /// Only this type, or a wildcard (`invoice.*`).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// Page size, 1 to 100. Default 20.
    #[serde(default)]
    pub limit: Option<i64>,
    /// The id (`evt_…`) of the last event of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventList {
    /// Event bodies, as delivered, newest first.
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<serde_json::Value>,
    pub has_more: bool,
}

/// The caller's events, newest first (the bodies webhooks receive).
#[utoipa::path(get, path = "/developer/events", tag = "webhooks", params(EventQuery),
    responses((status = 200, body = EventList), (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn events(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<EventQuery>,
) -> Result<Json<EventList>, AppError> {
    let limit = page_size(q.limit)?;
    let mut list = s
        .control
        .events(
            &caller.developer,
            q.event_type.as_deref(),
            limit + 1,
            q.after.as_deref(),
        )
        .await?;
    let has_more = list.len() as i64 > limit;
    list.truncate(limit as usize);
    Ok(Json(EventList {
        data: list.into_iter().map(|e| e.payload).collect(),
        has_more,
    }))
}

/// One of the caller's events.
#[utoipa::path(get, path = "/developer/events/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Event id (`evt_…`)")),
    responses((status = 200, body = Object), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn event(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    Ok(Json(
        s.control.event_of(&caller.developer, &id).await?.payload,
    ))
}

/// One event type of the catalogue.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventTypeView {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema (2020-12) of the event body.
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
    #[schema(value_type = Object)]
    pub example: serde_json::Value,
}

/// Every event type a webhook can subscribe to, with its schema and an example.
#[utoipa::path(get, path = "/developer/webhooks/event-types", tag = "webhooks",
    responses((status = 200, body = Vec<EventTypeView>)))]
pub(crate) async fn event_types() -> Json<Vec<EventTypeView>> {
    Json(
        CATALOGUE
            .iter()
            .map(|e| EventTypeView {
                name: e.name,
                description: e.description,
                schema: e.schema(),
                example: e.example(),
            })
            .collect(),
    )
}
