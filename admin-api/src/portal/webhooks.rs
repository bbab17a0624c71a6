//! The webhooks pages: endpoints (add with the secret shown once, edit, enable/disable, test,
//! rotate the secret, delete), an endpoint's delivery log with redelivery, and the event
//! history, which shows new events as they happen over server-sent events
//! (`/portal/events/stream`). Every action is the service-layer call the JSON API makes
//! (`aihub_control::webhooks`).

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Form;
use serde::Deserialize;

use aihub_control::webhooks::{CreateWebhook, UpdateWebhook, WithSecret};
use aihub_control::Actor;
use aihub_store::outbox::OutboxEvent;
use aihub_store::webhooks::Endpoint;

use crate::error::Query;
use crate::state::AppState;
use crate::webhooks::DeliveryView;

use super::i18n::Texts;
use super::session::{see_other, Member};
use super::{form_errors, render, render_status, view, Chrome, FieldErrors, PageResult};

/// An endpoint as the pages show it.
pub(crate) struct HookRow {
    pub id: String,
    pub url: String,
    pub description: String,
    pub types: String,
    pub retries: i64,
    pub active: bool,
    pub state: &'static str,
    pub disabled_reason: String,
    pub failing_since: String,
}

impl HookRow {
    fn new(e: &Endpoint, t: &'static Texts) -> HookRow {
        HookRow {
            id: e.id.clone(),
            url: e.url.clone(),
            description: e.description.clone(),
            types: e.event_types.join(", "),
            retries: e.max_retries,
            active: e.active(),
            state: if e.active() {
                t.hooks_active
            } else {
                t.hooks_disabled
            },
            disabled_reason: e.disabled_reason.clone().unwrap_or_default(),
            failing_since: e
                .failing_since
                .map(|f| view::when(&aihub_store::outbox::rfc3339_ms(f)))
                .unwrap_or_default(),
        }
    }
}

/// The endpoint form's fields, as typed.
#[derive(Deserialize, Default)]
pub struct HookForm {
    #[serde(default)]
    url: String,
    #[serde(default)]
    event_types: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    max_retries: String,
}

impl HookForm {
    fn types(&self) -> Vec<String> {
        self.event_types
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn retries(&self) -> Result<Option<i64>, FieldErrors> {
        let t = self.max_retries.trim();
        if t.is_empty() {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| {
            FieldErrors(vec![crate::error::FieldError::new(
                "max_retries",
                "must be a whole number",
            )])
        })
    }
}

#[derive(Template)]
#[template(path = "portal/webhooks.html")]
struct HooksPage {
    page: Chrome,
    hooks: Vec<HookRow>,
    form: HookForm,
    errors: FieldErrors,
    catalogue: Vec<&'static str>,
}

async fn hooks_page(
    s: &AppState,
    member: &Member,
    form: HookForm,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<HooksPage, super::Failure> {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let hooks = s.control.webhooks(dev).await?;
    Ok(HooksPage {
        page: Chrome::new(&member.visit, Some(dev), "webhooks", t.hooks_title).with_notice(notice),
        hooks: hooks.iter().map(|e| HookRow::new(e, t)).collect(),
        form,
        errors,
        catalogue: aihub_webhooks::catalogue::CATALOGUE
            .iter()
            .map(|e| e.name)
            .collect(),
    })
}

#[derive(Deserialize)]
pub struct DoneQuery {
    done: Option<String>,
}

fn notice(t: &'static Texts, done: Option<&str>) -> Option<&'static str> {
    match done {
        Some("saved") => Some(t.done_hook_saved),
        Some("deleted") => Some(t.done_hook_deleted),
        Some("test") => Some(t.done_hook_test),
        Some("redelivered") => Some(t.done_redelivered),
        _ => None,
    }
}

pub async fn page(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let form = HookForm {
        event_types: "*".into(),
        ..HookForm::default()
    };
    let p = hooks_page(
        &s,
        &member,
        form,
        FieldErrors::default(),
        notice(t, q.done.as_deref()),
    )
    .await?;
    render(&p)
}

#[derive(Template)]
#[template(path = "portal/webhook_secret.html")]
struct SecretPage {
    page: Chrome,
    hook: HookRow,
    secret: String,
    previous_until: Option<String>,
}

fn secret_page(member: &Member, w: WithSecret) -> SecretPage {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    SecretPage {
        page: Chrome::new(&member.visit, Some(dev), "webhooks", t.hooks_secret_title),
        hook: HookRow::new(&w.endpoint, t),
        previous_until: w
            .endpoint
            .previous_secret_until
            .filter(|u| *u > aihub_store::now_ms())
            .map(|u| view::when(&aihub_store::outbox::rfc3339_ms(u))),
        secret: w.secret,
    }
}

pub async fn create(
    State(s): State<AppState>,
    member: Member,
    Form(f): Form<HookForm>,
) -> PageResult {
    let dev = &member.caller.developer;
    let created = match f.retries() {
        Ok(max_retries) => {
            let cmd = CreateWebhook {
                url: f.url.clone(),
                event_types: f.types(),
                description: Some(f.description.clone()),
                max_retries,
                active: None,
            };
            let r = s
                .control
                .create_webhook(&Actor::developer(dev), dev, cmd)
                .await;
            form_errors(r.map_err(Into::into))?
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(w) => render_status(StatusCode::CREATED, &secret_page(&member, w)),
        Err(errors) => {
            let p = hooks_page(&s, &member, f, errors, None).await?;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

/// A delivery as the log shows it.
pub(crate) struct DeliveryRow {
    pub id: String,
    pub event_type: String,
    pub event_id: String,
    pub status: String,
    pub attempts: i64,
    pub last: String,
    pub next: String,
    pub created: String,
}

impl From<&DeliveryView> for DeliveryRow {
    fn from(d: &DeliveryView) -> Self {
        let last = d.attempt_log.last().map_or(String::new(), |a| {
            let code = a.status_code.map_or("—".into(), |c| c.to_string());
            match &a.error {
                Some(e) => format!("{code} · {} ms · {e}", a.latency_ms),
                None => format!("{code} · {} ms", a.latency_ms),
            }
        });
        DeliveryRow {
            id: d.id.clone(),
            event_type: d.event_type.clone(),
            event_id: d.event_id.clone(),
            status: d.status.clone(),
            attempts: d.attempts,
            last,
            next: d
                .next_attempt_at
                .as_deref()
                .map(view::when)
                .unwrap_or_default(),
            created: view::when(&d.created_at),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/webhook.html")]
struct HookPage {
    page: Chrome,
    hook: HookRow,
    form: HookForm,
    errors: FieldErrors,
    deliveries: Vec<DeliveryRow>,
}

async fn hook_page(
    s: &AppState,
    member: &Member,
    id: &str,
    form: Option<HookForm>,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<HookPage, super::Failure> {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let e = s.control.webhook(dev, id).await?;
    let log = s.control.webhook_deliveries(dev, id, 50, None).await?;
    let form = form.unwrap_or_else(|| HookForm {
        url: e.url.clone(),
        event_types: e.event_types.join(", "),
        description: e.description.clone(),
        max_retries: e.max_retries.to_string(),
    });
    Ok(HookPage {
        page: Chrome::new(&member.visit, Some(dev), "webhooks", &e.url).with_notice(notice),
        hook: HookRow::new(&e, t),
        form,
        errors,
        deliveries: log
            .iter()
            .map(|l| DeliveryRow::from(&DeliveryView::from(l)))
            .collect(),
    })
}

pub async fn detail(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let p = hook_page(
        &s,
        &member,
        &id,
        None,
        FieldErrors::default(),
        notice(t, q.done.as_deref()),
    )
    .await?;
    render(&p)
}

pub async fn update(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Form(f): Form<HookForm>,
) -> PageResult {
    let dev = &member.caller.developer;
    let saved = match f.retries() {
        Ok(max_retries) => {
            let cmd = UpdateWebhook {
                url: Some(f.url.clone()),
                event_types: Some(f.types()),
                description: Some(f.description.clone()),
                max_retries,
                active: None,
            };
            let r = s
                .control
                .update_webhook(&Actor::developer(dev), dev, &id, cmd)
                .await;
            form_errors(r.map_err(Into::into))?
        }
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(see_other(&format!("/portal/webhooks/{id}?done=saved"))),
        Err(errors) => {
            let p = hook_page(&s, &member, &id, Some(f), errors, None).await?;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

#[derive(Deserialize)]
pub struct ActiveForm {
    active: bool,
}

pub async fn set_active(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Form(f): Form<ActiveForm>,
) -> PageResult {
    let dev = &member.caller.developer;
    let cmd = UpdateWebhook {
        active: Some(f.active),
        ..UpdateWebhook::default()
    };
    s.control
        .update_webhook(&Actor::developer(dev), dev, &id, cmd)
        .await?;
    Ok(see_other(&format!("/portal/webhooks/{id}?done=saved")))
}

pub async fn test(State(s): State<AppState>, member: Member, Path(id): Path<String>) -> PageResult {
    s.control
        .test_webhook(&member.caller.developer, &id)
        .await?;
    Ok(see_other(&format!("/portal/webhooks/{id}?done=test")))
}

pub async fn rotate(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    let dev = &member.caller.developer;
    let w = s
        .control
        .rotate_webhook_secret(&Actor::developer(dev), dev, &id)
        .await?;
    render_status(StatusCode::OK, &secret_page(&member, w))
}

pub async fn delete(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    let dev = &member.caller.developer;
    s.control
        .delete_webhook(&Actor::developer(dev), dev, &id)
        .await?;
    Ok(see_other("/portal/webhooks?done=deleted"))
}

pub async fn redeliver(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    let dev = &member.caller.developer;
    let d = s
        .control
        .redeliver(&Actor::developer(dev), dev, &id)
        .await?;
    Ok(see_other(&format!(
        "/portal/webhooks/{}?done=redelivered",
        d.endpoint_id
    )))
}

/// An event as the history shows it.
pub(crate) struct EventRow {
    pub row_id: i64,
    pub id: String,
    pub event_type: String,
    pub when: String,
    pub data: String,
}

impl From<&OutboxEvent> for EventRow {
    fn from(e: &OutboxEvent) -> Self {
        EventRow {
            row_id: e.id,
            id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            when: view::when(&aihub_store::outbox::rfc3339_ms(e.created_at)),
            data: serde_json::to_string_pretty(&e.payload["data"]).unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/events.html")]
struct EventsPage {
    page: Chrome,
    events: Vec<EventRow>,
    filter: String,
    catalogue: Vec<&'static str>,
    older: Option<String>,
    /// The newest row shown (the stream sends what follows it).
    newest: i64,
}

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(default, rename = "type")]
    event_type: String,
    after: Option<String>,
}

pub async fn events(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<EventsQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let filter = q.event_type.trim().to_owned();
    let list = s
        .control
        .events(
            dev,
            Some(filter.as_str()).filter(|f| !f.is_empty()),
            51,
            q.after.as_deref(),
        )
        .await?;
    let older = (list.len() > 50).then(|| list[49].event_id.clone());
    let newest = match q.after {
        None => list.first().map_or(0, |e| e.id),
        // An older page: the stream would insert newer events above older ones.
        Some(_) => i64::MAX,
    };
    render(&EventsPage {
        page: Chrome::new(&member.visit, Some(dev), "webhooks", t.events_title),
        events: list.iter().take(50).map(EventRow::from).collect(),
        filter,
        catalogue: aihub_webhooks::catalogue::CATALOGUE
            .iter()
            .map(|e| e.name)
            .collect(),
        older,
        newest,
    })
}

#[derive(Deserialize)]
pub struct StreamQuery {
    /// The newest event row the page shows.
    since: i64,
    #[serde(default, rename = "type")]
    event_type: String,
}

/// `text/event-stream` of the developer's new events (`event: aihub`, the event body as
/// `data`), pushed when the webhook engine reports new events or a request may have written
/// one (and re-checked every few seconds for events written by other nodes). The browser
/// reconnects by itself; nothing polls from the page.
pub async fn stream(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<StreamQuery>,
) -> impl IntoResponse {
    let dev = member.caller.developer.clone();
    let filter = Some(q.event_type.trim().to_owned()).filter(|f| !f.is_empty());
    let mut ticks = s.event_ticks.subscribe();
    let state = s.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let mut since = q.since;
        loop {
            match state
                .control
                .events(&dev, filter.as_deref(), 100, None)
                .await
            {
                Ok(list) => {
                    let from = since;
                    for e in list.iter().rev().filter(|e| e.id > from) {
                        let ev = Event::default()
                            .event("aihub")
                            .id(e.id.to_string())
                            .data(e.payload.to_string());
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                        since = e.id;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "event stream: cannot read events"),
            }
            // At most five reads a second per open page, however busy the node is.
            tokio::time::sleep(Duration::from_millis(200)).await;
            tokio::select! {
                _ = ticks.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Sse::new(body).keep_alive(KeepAlive::default())
}
