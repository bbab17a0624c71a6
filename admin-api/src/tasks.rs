//! `/developer/tasks…`: the seed's async task API (`batch_generate`, `usage_export`) over the
//! same queue as the OpenAI batches, which it lists too.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use aihub_control::tasks::CreateTask;
use aihub_store::outbox::rfc3339_ms;
use aihub_store::tasks::{self as store_tasks, Filter, Task};

use crate::auth::Caller;
use crate::error::{AppError, Json as BodyJson};
use crate::range::RangeParams;
use crate::state::AppState;

/// Create a task.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskRequest {
    /// `batch_generate` or `usage_export`.
    #[serde(rename = "type")]
    pub task_type: String,
    /// `batch_generate`: the model.
    pub model: Option<String>,
    /// `batch_generate`: one user message each.
    pub prompts: Option<Vec<String>>,
    /// `batch_generate`: a message list each (instead of `prompts`).
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<Value>>,
    /// `batch_generate`: further request fields (`temperature`, `max_tokens`, …).
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Map<String, Value>>,
    /// `batch_generate`: the key the requests run as (default: your newest live key).
    /// `usage_export`: only this key's usage.
    pub key_id: Option<String>,
    /// `usage_export`: billing period `YYYY-MM` (default: the current one).
    pub period: Option<String>,
    /// `usage_export`: first day `YYYY-MM-DD`, with `to`.
    pub from: Option<String>,
    /// `usage_export`: last day `YYYY-MM-DD` (inclusive), with `from`.
    pub to: Option<String>,
}

/// Item counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// A task (or an OpenAI batch: `type` `openai_batch`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    pub id: String,
    /// `batch_generate`, `usage_export` or `openai_batch`.
    #[serde(rename = "type")]
    pub task_type: String,
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// The detailed lifecycle status (OpenAI's batch statuses).
    pub lifecycle_status: String,
    /// Percent of items ended.
    pub progress: i64,
    pub counts: TaskCounts,
    /// Where the result downloads (`GET`), once written.
    pub result_url: Option<String>,
    /// Where the failed items' lines download, when some failed.
    pub errors_url: Option<String>,
    pub error: Option<String>,
    /// Validation errors of a batch's input (`[{code, message, param, line}]`).
    #[schema(value_type = Option<Vec<Object>>)]
    pub validation_errors: Option<Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub expires_at: String,
}

impl From<&Task> for TaskView {
    fn from(t: &Task) -> TaskView {
        let url = |file: &Option<String>, q: &str| {
            file.as_ref()
                .map(|_| format!("/developer/tasks/{}/result{q}", t.id))
        };
        TaskView {
            id: t.id.clone(),
            task_type: t.kind.clone(),
            status: store_tasks::seed_status(&t.status).to_owned(),
            lifecycle_status: t.status.clone(),
            progress: t.progress(),
            counts: TaskCounts {
                total: t.total,
                completed: t.completed,
                failed: t.failed,
            },
            result_url: url(&t.output_file_id, ""),
            errors_url: url(&t.error_file_id, "?file=errors"),
            error: t.error.clone(),
            validation_errors: t.errors.clone(),
            created_at: rfc3339_ms(t.created_at),
            started_at: t.in_progress_at.map(rfc3339_ms),
            finished_at: t.finished_at.map(rfc3339_ms),
            expires_at: rfc3339_ms(t.expires_at),
        }
    }
}

/// A page of tasks.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskList {
    pub data: Vec<TaskView>,
    pub has_more: bool,
}

/// Checks a request and turns it into the service's command (the range of an export is
/// resolved here, where the usage range rules live). Shared by the JSON API and the portal.
pub(crate) fn command(r: CreateTaskRequest) -> Result<CreateTask, AppError> {
    match r.task_type.as_str() {
        store_tasks::BATCH_GENERATE => Ok(CreateTask::BatchGenerate {
            model: r.model.unwrap_or_default(),
            prompts: r.prompts,
            messages: r.messages,
            options: r.options,
            key_id: r.key_id,
        }),
        store_tasks::USAGE_EXPORT => {
            RangeParams {
                period: r.period.as_deref(),
                from: r.from.as_deref(),
                to: r.to.as_deref(),
            }
            .resolve(None, aihub_store::now_ms())?;
            Ok(CreateTask::UsageExport {
                period: r.period,
                from: r.from,
                to: r.to,
                key_id: r.key_id,
            })
        }
        _ => Err(AppError::validation(
            "type",
            "must be `batch_generate` or `usage_export`",
        )),
    }
}

#[utoipa::path(post, path = "/developer/tasks", tag = "tasks",
    request_body = CreateTaskRequest,
    responses((status = 202, description = "Queued", body = TaskView),
              (status = 403, description = "`task_limit_reached`", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    caller: Caller,
    BodyJson(r): BodyJson<CreateTaskRequest>,
) -> Result<(StatusCode, Json<TaskView>), AppError> {
    let task = s
        .control
        .create_task(&caller.developer, command(r)?)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(TaskView::from(&task))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    pub status: Option<String>,
    /// `batch_generate`, `usage_export` or `openai_batch`.
    #[serde(rename = "type")]
    pub task_type: Option<String>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    /// The last id of the previous page.
    pub before: Option<String>,
}

#[utoipa::path(get, path = "/developer/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, body = TaskList), (status = 422, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskList>, AppError> {
    let statuses = match q.status.as_deref() {
        None => &[][..],
        Some(st) => store_tasks::statuses_of_seed(st).ok_or_else(|| {
            AppError::validation(
                "status",
                "must be pending, running, completed, failed or cancelled",
            )
        })?,
    };
    let kinds: Vec<&str> = match q.task_type.as_deref() {
        None => Vec::new(),
        Some(
            k @ (store_tasks::BATCH_GENERATE
            | store_tasks::USAGE_EXPORT
            | store_tasks::OPENAI_BATCH),
        ) => vec![k],
        Some(_) => {
            return Err(AppError::validation(
                "type",
                "must be batch_generate, usage_export or openai_batch",
            ))
        }
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut tasks = s
        .control
        .tasks(&Filter {
            developer_id: Some(&caller.developer.id),
            kinds: &kinds,
            statuses,
            before: q.before.as_deref(),
            limit: limit + 1,
        })
        .await?;
    let has_more = tasks.len() as i64 > limit;
    tasks.truncate(limit as usize);
    Ok(Json(TaskList {
        data: tasks.iter().map(TaskView::from).collect(),
        has_more,
    }))
}

#[utoipa::path(get, path = "/developer/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task or batch id")),
    responses((status = 200, body = TaskView), (status = 404, body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, AppError> {
    let task = s.control.task(Some(&caller.developer.id), &id).await?;
    Ok(Json(TaskView::from(&task)))
}

#[utoipa::path(post, path = "/developer/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "Task or batch id")),
    responses((status = 200, description = "Cancelling: queued items end now, running ones finish", body = TaskView),
              (status = 404, body = crate::openapi::ErrorBody),
              (status = 409, description = "Already finished", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, AppError> {
    let by = aihub_control::Actor::developer(&caller.developer);
    let task = s
        .control
        .cancel_task(&by, Some(&caller.developer.id), &id)
        .await?;
    Ok(Json(TaskView::from(&task)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResultQuery {
    /// `output` (default) or `errors`.
    pub file: Option<String>,
}

#[utoipa::path(get, path = "/developer/tasks/{id}/result", tag = "tasks",
    params(("id" = String, Path, description = "Task or batch id"), ResultQuery),
    responses((status = 200, description = "JSONL (one line per item) or CSV (`usage_export`)", content_type = "application/octet-stream", body = String),
              (status = 404, description = "No such task, or no such file (nothing succeeded or failed)", body = crate::openapi::ErrorBody),
              (status = 409, description = "Not finished yet", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn result(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ResultQuery>,
) -> Result<Response, AppError> {
    let errors = match q.file.as_deref() {
        None | Some("output") => false,
        Some("errors") => true,
        Some(_) => return Err(AppError::validation("file", "must be `output` or `errors`")),
    };
    let (file, reader) = s
        .control
        .task_result(&caller.developer.id, &id, errors)
        .await?;
    let content_type = if file.filename.ends_with(".csv") {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    crate::batches::download(&file, reader, content_type)
}
