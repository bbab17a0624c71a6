//! The OpenAI Files and Batches APIs, served under `/internal/v1/…` for the gateway, which
//! authenticates the developer's `ahub_` key and forwards the call with a signed identity
//! ([`Forwarded`]). Clients never call these routes directly: they call `/v1/files…` and
//! `/v1/batches…` on the gateway, with any OpenAI SDK.
//!
//! Uploads are streamed into the file store chunk by chunk (multipart, `purpose=batch`) under
//! the size and storage limits; contents are streamed back. Objects and lists have OpenAI's
//! shapes (`aihub_tasks::openai`).

use axum::body::Body;
use axum::extract::{FromRequestParts, Multipart, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use aihub_apikey::internal::{self, Identity};
use aihub_control::tasks::CreateBatch;
use aihub_store::tasks::{self as store_tasks, Filter};
use aihub_tasks::openai;

use crate::error::AppError;
use crate::state::AppState;

/// The path of the upload route (its body is streamed, not buffered by the body middleware).
pub const UPLOAD_PATH: &str = "/internal/v1/files";

/// The routes, mounted by `app`.
pub fn router() -> Router<AppState> {
    Router::new()
        // Uploads are bounded by `tasks.max_file_bytes` as they stream, not by axum's default
        // 2 MB extractor limit.
        .route(
            UPLOAD_PATH,
            post(upload)
                .layer(axum::extract::DefaultBodyLimit::disable())
                .get(list_files),
        )
        .route("/internal/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/internal/v1/files/{id}/content", get(file_content))
        .route("/internal/v1/batches", post(create_batch).get(list_batches))
        .route("/internal/v1/batches/{id}", get(get_batch))
        .route("/internal/v1/batches/{id}/cancel", post(cancel_batch))
}

/// The developer and key a gateway forwarded the call for, checked against the internal
/// secret, the method, the path and the time.
pub struct Forwarded(pub Identity);

impl FromRequestParts<AppState> for Forwarded {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, AppError> {
        const REFUSED: AppError = AppError::Unauthorized(
            "invalid_internal_identity",
            "This route serves the gateway only: call /v1/files and /v1/batches on the gateway with your API key.",
        );
        let h = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (Some(key_id), Some(developer_id), Some(ts), Some(sig)) = (
            h(internal::KEY_ID_HEADER),
            h(internal::DEVELOPER_ID_HEADER),
            h(internal::TIMESTAMP_HEADER),
            h(internal::SIGNATURE_HEADER),
        ) else {
            return Err(REFUSED);
        };
        let id = Identity {
            key_id,
            developer_id,
        };
        let path = parts.uri.path().strip_prefix("/internal").unwrap_or("");
        s.internal
            .verify_identity(
                &id,
                parts.method.as_str(),
                path,
                &ts,
                &sig,
                aihub_store::now_ms(),
            )
            .map_err(|e| {
                tracing::warn!(error = %e, "forwarded identity refused");
                REFUSED
            })?;
        Ok(Forwarded(id))
    }
}

/// An OpenAI list page.
fn page(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|d| d["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|d| d["id"].clone()).unwrap_or(Value::Null);
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
    purpose: Option<String>,
    // Accepted for compatibility; lists are newest first.
    #[allow(dead_code)]
    order: Option<String>,
}

/// `POST /v1/files`: multipart with `purpose` and `file`.
async fn upload(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    mut form: Multipart,
) -> Result<Json<Value>, AppError> {
    let deadline = tokio::time::Instant::now() + s.config.tasks.upload_timeout;
    let mut purpose: Option<String> = None;
    let mut upload = None;
    let bad = |e: axum::extract::multipart::MultipartError| {
        AppError::BadRequest(format!(
            "The multipart body could not be read: {}",
            e.body_text()
        ))
    };
    loop {
        let field = match tokio::time::timeout_at(deadline, form.next_field()).await {
            Err(_) => {
                return Err(AppError::BadRequest(
                    "The upload did not finish in time.".into(),
                ))
            }
            Ok(r) => r.map_err(bad)?,
        };
        let Some(mut field) = field else { break };
        match field.name() {
            Some("purpose") => {
                let text = field.text().await.map_err(bad)?;
                if upload.is_some()
                    && !aihub_control::tasks::UPLOAD_PURPOSES.contains(&text.as_str())
                {
                    return Err(AppError::validation("purpose", "must be `batch`"));
                }
                purpose = Some(text);
            }
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut u = s
                    .control
                    .begin_upload(
                        &id.developer_id,
                        purpose.as_deref().unwrap_or("batch"),
                        &filename,
                    )
                    .await?;
                loop {
                    let chunk = match tokio::time::timeout_at(deadline, field.chunk()).await {
                        Err(_) => {
                            return Err(AppError::BadRequest(
                                "The upload did not finish in time.".into(),
                            ))
                        }
                        Ok(r) => r.map_err(bad)?,
                    };
                    let Some(chunk) = chunk else { break };
                    u.write(&chunk).await?;
                }
                upload = Some(u);
            }
            _ => {} // other fields are ignored, as OpenAI does
        }
    }
    if purpose.is_none() {
        return Err(AppError::validation("purpose", "is required (`batch`)"));
    }
    let upload = upload.ok_or_else(|| AppError::validation("file", "is required"))?;
    let f = s.control.finish_upload(upload).await?;
    tracing::info!(file_id = %f.id, developer_id = %f.developer_id, bytes = f.bytes, "file uploaded");
    Ok(Json(openai::file_object(&f)))
}

async fn list_files(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, AppError> {
    let limit = q.limit.unwrap_or(10_000).clamp(1, 10_000);
    let mut files = s
        .control
        .files_of(
            &id.developer_id,
            q.purpose.as_deref(),
            q.after.as_deref(),
            limit + 1,
        )
        .await?;
    let has_more = files.len() as i64 > limit;
    files.truncate(limit as usize);
    Ok(Json(page(
        files.iter().map(openai::file_object).collect(),
        has_more,
    )))
}

async fn get_file(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Path(file_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let f = s.control.file(&id.developer_id, &file_id).await?;
    Ok(Json(openai::file_object(&f)))
}

async fn delete_file(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Path(file_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let f = s.control.delete_file(&id.developer_id, &file_id).await?;
    Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
}

/// A stored file's bytes as a streamed response.
pub(crate) fn download(
    file: &aihub_store::files::FileRecord,
    reader: aihub_tasks::files::Reader,
    content_type: &'static str,
) -> Result<Response, AppError> {
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(file.bytes as u64));
    let name: String = file
        .filename
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
            .map_err(AppError::internal)?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn file_content(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Path(file_id): Path<String>,
) -> Result<Response, AppError> {
    let (f, reader) = s.control.file_content(&id.developer_id, &file_id).await?;
    download(&f, reader, "application/octet-stream")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatchBody {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    // The SDK may send it; only the default (24 h after completion) is offered.
    #[serde(default)]
    output_expires_after: Option<Value>,
}

async fn create_batch(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    crate::error::Json(b): crate::error::Json<CreateBatchBody>,
) -> Result<Json<Value>, AppError> {
    let _ = b.output_expires_after;
    let task = s
        .control
        .create_batch(
            &id.developer_id,
            &id.key_id,
            CreateBatch {
                input_file_id: b.input_file_id.unwrap_or_default(),
                endpoint: b.endpoint.unwrap_or_default(),
                completion_window: b.completion_window.unwrap_or_default(),
                metadata: b.metadata,
            },
        )
        .await?;
    tracing::info!(batch_id = %task.id, developer_id = %task.developer_id, "batch created");
    Ok(Json(openai::batch_object(&task)))
}

/// A developer's batch (`NotFound` for their tasks of other kinds).
async fn batch_of(
    s: &AppState,
    developer_id: &str,
    id: &str,
) -> Result<store_tasks::Task, AppError> {
    let t = s.control.task(Some(developer_id), id).await?;
    if t.kind != store_tasks::OPENAI_BATCH {
        return Err(AppError::NotFound);
    }
    Ok(t)
}

async fn get_batch(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    Ok(Json(openai::batch_object(
        &batch_of(&s, &id.developer_id, &batch_id).await?,
    )))
}

async fn list_batches(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, AppError> {
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut list = s
        .control
        .tasks(&Filter {
            developer_id: Some(&id.developer_id),
            kinds: &[store_tasks::OPENAI_BATCH],
            statuses: &[],
            before: q.after.as_deref(),
            limit: limit + 1,
        })
        .await?;
    let has_more = list.len() as i64 > limit;
    list.truncate(limit as usize);
    Ok(Json(page(
        list.iter().map(openai::batch_object).collect(),
        has_more,
    )))
}

async fn cancel_batch(
    State(s): State<AppState>,
    Forwarded(id): Forwarded,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    batch_of(&s, &id.developer_id, &batch_id).await?;
    let dev = aihub_store::developers::by_id(&s.store, &id.developer_id).await?;
    let by = aihub_control::Actor::developer(&dev);
    let task = s
        .control
        .cancel_task(&by, Some(&id.developer_id), &batch_id)
        .await?;
    Ok(Json(openai::batch_object(&task)))
}
