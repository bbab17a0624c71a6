//! The tasks page: the developer's async tasks (`batch_generate`, `usage_export`) and OpenAI
//! batches, newest first and paged, filtered by status, with progress, result downloads and
//! cancel; the forms that queue a batch generation or a usage export; and the live progress of
//! unfinished tasks over server-sent events (`/portal/tasks/stream`). Every action is the
//! service-layer call the JSON API makes (`aihub_control::tasks`); a form becomes the JSON
//! API's request and goes through the same [`crate::tasks::command`].

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Form;
use serde::{Deserialize, Serialize};

use aihub_control::Actor;
use aihub_plans::Period;
use aihub_store::tasks::{self as store_tasks, Filter, Task};

use crate::error::{AppError, FieldError, Query};
use crate::state::AppState;
use crate::tasks::{command, CreateTaskRequest, TaskView};

use super::i18n::Texts;
use super::session::{see_other, Member};
use super::{form_errors, render, render_status, view, Chrome, FieldErrors, PageResult};

/// Tasks on one page.
const PAGE: usize = 50;
/// The lifecycle statuses of an unfinished task.
const UNFINISHED: &[&str] = &[
    store_tasks::VALIDATING,
    store_tasks::IN_PROGRESS,
    store_tasks::FINALIZING,
    store_tasks::CANCELLING,
];
/// Unfinished tasks one stream read takes (newest first).
const STREAM_READ: i64 = 100;
/// Tasks one stream follows to their end.
const MAX_WATCHED: usize = 200;
/// How often an open stream reads, at most.
const STREAM_EVERY: Duration = Duration::from_secs(1);

/// A task as the page shows it, and as the stream sends it (the page's script puts these
/// strings in place).
#[derive(Clone, PartialEq, Serialize)]
pub(crate) struct TaskRow {
    pub id: String,
    pub kind: String,
    pub kind_text: String,
    /// The seed's status (`pending|running|completed|failed|cancelled`).
    pub status: &'static str,
    pub status_text: &'static str,
    /// The detailed lifecycle status (OpenAI's batch statuses).
    pub lifecycle: String,
    /// Percent of items ended, 0–100.
    pub progress: i64,
    pub completed: String,
    pub failed: String,
    pub total: String,
    pub created: String,
    pub finished: String,
    /// Whether the task ended.
    pub done: bool,
    pub result_url: Option<String>,
    pub errors_url: Option<String>,
    pub error: String,
    /// Whether a cancel would do something (unfinished, not finalizing, not already cancelling).
    pub cancellable: bool,
}

fn kind_text(t: &'static Texts, kind: &str) -> String {
    match kind {
        store_tasks::BATCH_GENERATE => t.tasks_type_batch_generate.into(),
        store_tasks::USAGE_EXPORT => t.tasks_type_usage_export.into(),
        store_tasks::OPENAI_BATCH => t.tasks_type_openai_batch.into(),
        other => other.into(),
    }
}

fn status_text(t: &'static Texts, seed: &str) -> &'static str {
    match seed {
        "pending" => t.tasks_status_pending,
        "running" => t.tasks_status_running,
        "completed" => t.tasks_status_completed,
        "cancelled" => t.tasks_status_cancelled,
        _ => t.tasks_status_failed,
    }
}

impl TaskRow {
    pub fn new(task: &Task, t: &'static Texts) -> TaskRow {
        let v = TaskView::from(task);
        let seed = store_tasks::seed_status(&task.status);
        let done = task.finished_at.is_some();
        TaskRow {
            kind_text: kind_text(t, &v.task_type),
            kind: v.task_type,
            status: seed,
            status_text: status_text(t, seed),
            lifecycle: v.lifecycle_status,
            progress: v.progress,
            completed: view::int(v.counts.completed),
            failed: view::int(v.counts.failed),
            total: view::int(v.counts.total),
            created: view::when(&v.created_at),
            finished: v.finished_at.as_deref().map_or(String::new(), view::when),
            done,
            result_url: v
                .result_url
                .map(|_| format!("/portal/tasks/{}/result", v.id)),
            errors_url: v
                .errors_url
                .map(|_| format!("/portal/tasks/{}/result?file=errors", v.id)),
            error: v.error.unwrap_or_default(),
            cancellable: !done
                && !matches!(
                    task.status.as_str(),
                    store_tasks::FINALIZING | store_tasks::CANCELLING
                ),
            id: v.id,
        }
    }
}

/// The create forms' fields, as typed (re-shown after a validation error). `type` says which
/// form was sent.
#[derive(Deserialize, Default)]
pub struct TaskForm {
    #[serde(default, rename = "type")]
    task_type: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompts: String,
    #[serde(default)]
    max_tokens: String,
    #[serde(default)]
    period: String,
}

fn this_month() -> String {
    Period::of_unix_ms(aihub_store::now_ms()).to_string()
}

impl TaskForm {
    /// Both forms with their defaults: the portal's example model, this month.
    fn new(s: &AppState) -> TaskForm {
        TaskForm::default().filled(s)
    }

    /// The form that was not sent gets its defaults back.
    fn filled(mut self, s: &AppState) -> TaskForm {
        if self.task_type != store_tasks::BATCH_GENERATE && self.model.is_empty() {
            self.model = s.config.portal.example_model.clone();
        }
        if self.task_type != store_tasks::USAGE_EXPORT && self.period.is_empty() {
            self.period = this_month();
        }
        self
    }

    /// Which form the errors belong to (the template marks that one).
    fn is(&self, kind: &str) -> bool {
        self.task_type == kind
    }

    /// The JSON API's request; a `max_tokens` that is not a number is a field error.
    fn request(&self) -> Result<CreateTaskRequest, FieldErrors> {
        let some = |v: &str| Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        let mut r = CreateTaskRequest {
            task_type: self.task_type.clone(),
            model: None,
            prompts: None,
            messages: None,
            options: None,
            key_id: None,
            period: None,
            from: None,
            to: None,
        };
        if self.task_type == store_tasks::BATCH_GENERATE {
            let max_tokens = match self.max_tokens.trim() {
                "" => None,
                text => match text.replace([',', '_', ' '], "").parse::<u32>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        return Err(FieldErrors(vec![FieldError::new(
                            "max_tokens",
                            "must be a whole number above 0",
                        )]))
                    }
                },
            };
            r.model = Some(self.model.trim().to_owned());
            r.prompts = Some(
                self.prompts
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
            r.options = max_tokens.map(|n| {
                let mut o = serde_json::Map::new();
                o.insert("max_tokens".into(), n.into());
                o
            });
        } else {
            r.period = some(&self.period);
        }
        Ok(r)
    }
}

/// One choice of the status filter.
pub struct StatusChoice {
    value: &'static str,
    label: &'static str,
    selected: bool,
}

#[derive(Template)]
#[template(path = "portal/tasks.html")]
struct TasksPage {
    page: Chrome,
    tasks: Vec<TaskRow>,
    statuses: Vec<StatusChoice>,
    /// The status filter (empty: all).
    status: String,
    /// The next page's cursor.
    older: Option<String>,
    /// Whether this is an older page.
    paged: bool,
    /// The live progress stream of the unfinished tasks shown, when there are some.
    stream: Option<String>,
    form: TaskForm,
    errors: FieldErrors,
}

/// The lifecycle statuses a status filter shows (the JSON API's `status`).
fn statuses_of(status: &str) -> Result<&'static [&'static str], AppError> {
    if status.is_empty() {
        return Ok(&[]);
    }
    store_tasks::statuses_of_seed(status).ok_or_else(|| {
        AppError::validation(
            "status",
            "must be pending, running, completed, failed or cancelled",
        )
    })
}

async fn tasks_page(
    s: &AppState,
    member: &Member,
    status: &str,
    before: Option<&str>,
    form: TaskForm,
    errors: FieldErrors,
    notice: Option<&'static str>,
) -> Result<TasksPage, super::Failure> {
    let t = member.visit.lang.texts();
    let dev = &member.caller.developer;
    let mut list = s
        .control
        .tasks(&Filter {
            developer_id: Some(&dev.id),
            kinds: &[],
            statuses: statuses_of(status)?,
            before,
            limit: PAGE as i64 + 1,
        })
        .await?;
    let older = (list.len() > PAGE).then(|| list[PAGE - 1].id.clone());
    list.truncate(PAGE);
    let tasks: Vec<TaskRow> = list.iter().map(|task| TaskRow::new(task, t)).collect();
    let open: Vec<&str> = tasks
        .iter()
        .filter(|r| !r.done)
        .map(|r| r.id.as_str())
        .collect();
    let stream = (!open.is_empty()).then(|| format!("/portal/tasks/stream?ids={}", open.join(",")));
    let statuses = ["pending", "running", "completed", "failed", "cancelled"]
        .into_iter()
        .map(|value| StatusChoice {
            value,
            label: status_text(t, value),
            selected: value == status,
        })
        .collect();
    Ok(TasksPage {
        page: Chrome::new(&member.visit, Some(dev), "tasks", t.tasks_title).with_notice(notice),
        tasks,
        statuses,
        status: status.to_owned(),
        older,
        paged: before.is_some(),
        stream,
        form,
        errors,
    })
}

#[derive(Deserialize)]
pub struct TasksQuery {
    #[serde(default)]
    status: String,
    before: Option<String>,
    done: Option<String>,
}

/// `GET /portal/tasks`.
pub async fn page(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<TasksQuery>,
) -> PageResult {
    let t = member.visit.lang.texts();
    let notice = match q.done.as_deref() {
        Some("created") => Some(t.done_task_created),
        Some("cancelled") => Some(t.done_task_cancelled),
        _ => None,
    };
    let p = tasks_page(
        &s,
        &member,
        q.status.trim(),
        q.before.as_deref(),
        TaskForm::new(&s),
        FieldErrors::default(),
        notice,
    )
    .await?;
    render(&p)
}

/// `POST /portal/tasks`: queues a batch generation or a usage export (`type`).
pub async fn create(
    State(s): State<AppState>,
    member: Member,
    Form(f): Form<TaskForm>,
) -> PageResult {
    let dev = &member.caller.developer;
    let created = match f.request() {
        Ok(request) => match form_errors(command(request))? {
            Ok(cmd) => form_errors(
                s.control
                    .create_task(dev, cmd)
                    .await
                    .map_err(AppError::from),
            )?,
            Err(errors) => Err(errors),
        },
        Err(errors) => Err(errors),
    };
    match created {
        Ok(_) => Ok(see_other("/portal/tasks?done=created")),
        Err(errors) => {
            let form = f.filled(&s);
            let p = tasks_page(&s, &member, "", None, form, errors, None).await?;
            render_status(axum::http::StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}

/// `POST /portal/tasks/{id}/cancel`.
pub async fn cancel(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
) -> PageResult {
    let dev = &member.caller.developer;
    s.control
        .cancel_task(&Actor::developer(dev), Some(&dev.id), &id)
        .await?;
    Ok(see_other("/portal/tasks?done=cancelled"))
}

#[derive(Deserialize)]
pub struct ResultQuery {
    file: Option<String>,
}

/// `GET /portal/tasks/{id}/result[?file=errors]`: the JSON API's download, signed in by the
/// session cookie.
pub async fn result(
    State(s): State<AppState>,
    member: Member,
    Path(id): Path<String>,
    Query(q): Query<ResultQuery>,
) -> PageResult {
    let errors = match q.file.as_deref() {
        None | Some("output") => false,
        Some("errors") => true,
        Some(_) => return Err(AppError::validation("file", "must be `output` or `errors`").into()),
    };
    let (file, reader) = s
        .control
        .task_result(&member.caller.developer.id, &id, errors)
        .await?;
    let content_type = if file.filename.ends_with(".csv") {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok(crate::batches::download(&file, reader, content_type)?)
}

#[derive(Deserialize)]
pub struct StreamQuery {
    /// The unfinished tasks the page shows, comma-separated.
    #[serde(default)]
    ids: String,
}

/// Whether `id` could be a task id (anything else in `ids` is ignored unread).
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What a stream reports this round: the developer's unfinished tasks (which it then follows)
/// and the followed tasks no longer among them, read once each (they finished; a task that is
/// gone is dropped).
async fn stream_read(s: &AppState, developer_id: &str, watched: &mut HashSet<String>) -> Vec<Task> {
    let filter = Filter {
        developer_id: Some(developer_id),
        kinds: &[],
        statuses: UNFINISHED,
        before: None,
        limit: STREAM_READ,
    };
    let mut out = match s.control.tasks(&filter).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "task stream: cannot read tasks");
            return Vec::new();
        }
    };
    for t in &out {
        if watched.len() < MAX_WATCHED {
            watched.insert(t.id.clone());
        }
    }
    let left: Vec<String> = watched
        .iter()
        .filter(|id| !out.iter().any(|t| &t.id == *id))
        .cloned()
        .collect();
    for id in left {
        match s.control.task(Some(developer_id), &id).await {
            Ok(t) => out.push(t),
            Err(aihub_control::Error::NotFound) => {
                watched.remove(&id);
            }
            Err(e) => tracing::warn!(error = %e, "task stream: cannot read a task"),
        }
    }
    out
}

/// `text/event-stream` of the developer's tasks' progress (`event: task`, a [`TaskRow`] as
/// JSON `data`): while open, it reads the unfinished tasks at most once a second and sends the
/// ones whose state changed since it last sent them (each once when the stream opens), and a
/// task it followed once more when it ends. `ids` names the unfinished tasks the page shows,
/// so one that ends before the stream's first read is still reported. Reading stops when the
/// client goes away.
pub async fn stream(
    State(s): State<AppState>,
    member: Member,
    Query(q): Query<StreamQuery>,
) -> impl IntoResponse {
    let developer_id = member.caller.developer.id.clone();
    let t = member.visit.lang.texts();
    let mut watched: HashSet<String> = q
        .ids
        .split(',')
        .map(str::trim)
        .filter(|id| plausible_id(id))
        .take(MAX_WATCHED)
        .map(str::to_owned)
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let mut sent: HashMap<String, TaskRow> = HashMap::new();
        loop {
            for task in stream_read(&s, &developer_id, &mut watched).await {
                let row = TaskRow::new(&task, t);
                if sent.get(&row.id) != Some(&row) {
                    let data = serde_json::to_string(&row).unwrap_or_default();
                    let ev = Event::default().event("task").data(data);
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                if row.done {
                    watched.remove(&row.id);
                    sent.remove(&row.id);
                } else {
                    sent.insert(row.id.clone(), row);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(STREAM_EVERY) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Sse::new(body).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_become_the_json_apis_requests() {
        let f = TaskForm {
            task_type: "batch_generate".into(),
            model: " gpt-4o-mini ".into(),
            prompts: "first\r\n\n  second  \n".into(),
            max_tokens: "1,000".into(),
            period: String::new(),
        };
        let r = f.request().ok().unwrap();
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.prompts.unwrap(), vec!["first", "second"]);
        assert_eq!(r.options.unwrap()["max_tokens"], 1000);
        let bad = TaskForm {
            max_tokens: "lots".into(),
            ..f
        };
        assert_eq!(
            bad.request().err().unwrap().get("max_tokens"),
            Some("must be a whole number above 0")
        );
        let export = TaskForm {
            task_type: "usage_export".into(),
            period: " 2026-11 ".into(),
            ..TaskForm::default()
        };
        let r = export.request().ok().unwrap();
        assert_eq!(r.period.as_deref(), Some("2026-11"));
        assert!(r.prompts.is_none());
        assert!(plausible_id("task_01abc-Z") && !plausible_id("a'b") && !plausible_id(""));
    }
}
