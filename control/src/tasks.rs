//! Files, OpenAI batches and the seed's async tasks: upload (streamed into the file store
//! under the size and storage limits), list, read, delete files; create, read, list and cancel
//! batches and tasks. Running them is `aihub-tasks`' engine; this module only writes the
//! requests and reads the results. An operator's cancel is audited.

use aihub_store::developers::Developer;
use aihub_store::files::{self as store_files, FileRecord};
use aihub_store::keys as store_keys;
use aihub_store::tasks::{self, CancelOutcome, Filter, NewTask, Task};
use aihub_store::{new_id, now_ms, StoreError};
use aihub_tasks::files::{object_name, FileError, Reader, Writer};
use aihub_tasks::openai::{BATCH_ENDPOINTS, COMPLETION_WINDOW, COMPLETION_WINDOW_MS};
use aihub_tasks::stage::new_task_id;
use serde_json::{json, Value};

use crate::journal::{self, Actor, Entry};
use crate::{Control, Error, FieldError, Result};

/// Purposes a developer may upload with.
pub const UPLOAD_PURPOSES: &[&str] = &["batch"];

/// An upload in progress: bytes go in with [`Upload::write`], [`Control::finish_upload`]
/// records the file; dropping it leaves nothing behind.
pub struct Upload {
    developer_id: String,
    id: String,
    purpose: String,
    filename: String,
    writer: Writer,
}

impl Upload {
    /// Appends bytes; fails (`Forbidden file_too_large`) past the size limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.writer.write(chunk).await.map_err(file_error)
    }
}

fn file_error(e: FileError) -> Error {
    match e {
        FileError::TooLarge(n) => Error::Forbidden(
            "file_too_large",
            format!("The file is larger than the limit of {n} bytes."),
        ),
        FileError::NotFound => Error::NotFound,
        e => Error::Store(StoreError::Corrupt(e.to_string())),
    }
}

/// Create an OpenAI batch.
#[derive(Debug, Clone, Default)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
}

/// Create a seed task.
#[derive(Debug, Clone)]
pub enum CreateTask {
    /// Chat completions of `prompts` (each a user message) or `messages` (each a list),
    /// run as `key_id` (default: the developer's newest live key).
    BatchGenerate {
        model: String,
        prompts: Option<Vec<String>>,
        messages: Option<Vec<Value>>,
        options: Option<serde_json::Map<String, Value>>,
        key_id: Option<String>,
    },
    /// The developer's usage rows of a range as CSV (`period` `YYYY-MM`, or `from`/`to` days).
    UsageExport {
        period: Option<String>,
        from: Option<String>,
        to: Option<String>,
        key_id: Option<String>,
    },
}

/// The most metadata pairs of a batch and their sizes (OpenAI's).
const METADATA_PAIRS: usize = 16;

fn check_metadata(m: &Value, errors: &mut Vec<FieldError>) {
    let Some(map) = m.as_object() else {
        if !m.is_null() {
            errors.push(FieldError::new("metadata", "must be an object of strings"));
        }
        return;
    };
    if map.len() > METADATA_PAIRS {
        errors.push(FieldError::new("metadata", "at most 16 keys"));
    }
    for (k, v) in map {
        let ok = k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512);
        if !ok {
            errors.push(FieldError::new(
                "metadata",
                "keys of at most 64 characters, string values of at most 512",
            ));
            break;
        }
    }
}

impl Control {
    fn files(&self) -> Result<&dyn aihub_tasks::FileStore> {
        self.files.as_deref().ok_or_else(|| {
            Error::Forbidden(
                "files_unavailable",
                "Files are not enabled on this server.".into(),
            )
        })
    }

    /// Starts an upload after checking purpose, name and the developer's storage.
    pub async fn begin_upload(
        &self,
        developer_id: &str,
        purpose: &str,
        filename: &str,
    ) -> Result<Upload> {
        let mut errors = Vec::new();
        if !UPLOAD_PURPOSES.contains(&purpose) {
            errors.push(FieldError::new("purpose", "must be `batch`"));
        }
        let filename = filename.trim();
        if filename.is_empty()
            || filename.chars().count() > 255
            || filename.contains(['/', '\\', '\0'])
        {
            errors.push(FieldError::new(
                "file",
                "a file name of 1 to 255 characters without slashes is required",
            ));
        }
        Error::check(errors)?;
        let rules = &self.config.tasks;
        let held = store_files::bytes_held(&self.store, developer_id).await? as u64;
        if held >= rules.max_storage_bytes_per_developer {
            return Err(Error::Forbidden(
                "storage_limit_reached",
                "Your files use all of your storage. Delete some files first.".into(),
            ));
        }
        let limit = rules
            .max_file_bytes
            .min(rules.max_storage_bytes_per_developer - held);
        let id = format!("file-{}", uuid_simple());
        let writer = self
            .files()?
            .create(&object_name(developer_id, &id), limit)
            .await
            .map_err(file_error)?;
        Ok(Upload {
            developer_id: developer_id.to_owned(),
            id,
            purpose: purpose.to_owned(),
            filename: filename.to_owned(),
            writer,
        })
    }

    /// Commits an upload's bytes and records the file.
    pub async fn finish_upload(&self, upload: Upload) -> Result<FileRecord> {
        if upload.writer.is_empty() {
            return Err(Error::invalid("file", "the file is empty"));
        }
        let written = upload.writer.commit().await.map_err(file_error)?;
        let now = now_ms();
        let record = FileRecord {
            location: object_name(&upload.developer_id, &upload.id),
            id: upload.id,
            developer_id: upload.developer_id,
            purpose: upload.purpose,
            filename: upload.filename,
            bytes: written.bytes as i64,
            sha256: written.sha256,
            created_at: now,
            expires_at: Some(now + self.config.tasks.file_retention.as_millis() as i64),
        };
        let mut conn = self.store.pool().acquire().await?;
        store_files::insert(&mut conn, &record).await?;
        Ok(record)
    }

    pub async fn file(&self, developer_id: &str, id: &str) -> Result<FileRecord> {
        Ok(store_files::get(&self.store, developer_id, id).await?)
    }

    pub async fn files_of(
        &self,
        developer_id: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FileRecord>> {
        Ok(store_files::list(
            &self.store,
            developer_id,
            purpose,
            after,
            limit.clamp(1, 10_000),
        )
        .await?)
    }

    /// A file and a reader of its bytes.
    pub async fn file_content(&self, developer_id: &str, id: &str) -> Result<(FileRecord, Reader)> {
        let f = self.file(developer_id, id).await?;
        let reader = self.files()?.open(&f.location).await.map_err(file_error)?;
        Ok((f, reader))
    }

    /// Deletes a file (its record at once, its bytes now or by the retention sweep).
    pub async fn delete_file(&self, developer_id: &str, id: &str) -> Result<FileRecord> {
        let f = store_files::mark_deleted(&self.store, developer_id, id).await?;
        if let Ok(files) = self.files() {
            if files.remove(&f.location).await.is_ok() {
                store_files::mark_removed(&self.store, &f.id).await?;
            }
        }
        Ok(f)
    }

    async fn check_open_tasks(
        &self,
        conn: &mut sqlx::AnyConnection,
        developer_id: &str,
    ) -> Result<()> {
        let open = tasks::count_open(conn, developer_id).await?;
        if open >= self.config.tasks.max_open_per_developer {
            return Err(Error::Forbidden(
                "task_limit_reached",
                format!(
                    "You have {open} unfinished tasks and batches, the most allowed. Wait for some to finish or cancel them."
                ),
            ));
        }
        Ok(())
    }

    /// Creates an OpenAI batch run as `key_id`; its input is read by a worker.
    pub async fn create_batch(
        &self,
        developer_id: &str,
        key_id: &str,
        r: CreateBatch,
    ) -> Result<Task> {
        let mut errors = Vec::new();
        if !BATCH_ENDPOINTS.contains(&r.endpoint.as_str()) {
            errors.push(FieldError::new(
                "endpoint",
                format!("must be one of {}", BATCH_ENDPOINTS.join(", ")),
            ));
        }
        if r.completion_window != COMPLETION_WINDOW {
            errors.push(FieldError::new("completion_window", "must be `24h`"));
        }
        if let Some(m) = &r.metadata {
            check_metadata(m, &mut errors);
        }
        if r.input_file_id.is_empty() {
            errors.push(FieldError::new("input_file_id", "is required"));
        }
        Error::check(errors)?;
        let file = match store_files::get(&self.store, developer_id, &r.input_file_id).await {
            Ok(f) => f,
            Err(StoreError::NotFound) => {
                return Err(Error::invalid(
                    "input_file_id",
                    format!("No such file: {}", r.input_file_id),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if file.purpose != "batch" {
            return Err(Error::invalid(
                "input_file_id",
                "the file's purpose must be `batch`",
            ));
        }
        let mut tx = self.store.begin_write().await?;
        self.check_open_tasks(&mut tx, developer_id).await?;
        let id = new_task_id(tasks::OPENAI_BATCH);
        let metadata = r.metadata.filter(|m| !m.is_null());
        let task = tasks::insert(
            &mut tx,
            &NewTask {
                id: &id,
                developer_id,
                key_id: Some(key_id),
                kind: tasks::OPENAI_BATCH,
                endpoint: Some(&r.endpoint),
                input: &json!({"input_file_id": file.id, "endpoint": r.endpoint}),
                metadata: metadata.as_ref(),
                input_file_id: Some(&file.id),
                expires_at: now_ms() + COMPLETION_WINDOW_MS,
            },
        )
        .await?;
        tx.commit().await?;
        self.wake_tasks();
        Ok(task)
    }

    /// A developer's live key to run a task as: `key_id` when given (theirs), else their
    /// newest usable key.
    async fn task_key(&self, dev: &Developer, key_id: Option<&str>) -> Result<String> {
        let now = now_ms();
        let usable = |k: &store_keys::ApiKey| {
            k.deleted_at.is_none()
                && k.disabled_at.is_none()
                && k.expires_at.is_none_or(|e| e > now)
        };
        if let Some(id) = key_id {
            return match store_keys::get(&self.store, Some(&dev.id), id).await {
                Ok(k) if usable(&k) => Ok(k.id),
                Ok(_) => Err(Error::invalid(
                    "key_id",
                    "the key is revoked, disabled or expired",
                )),
                Err(StoreError::NotFound) => Err(Error::invalid("key_id", "no such key")),
                Err(e) => Err(e.into()),
            };
        }
        let keys = store_keys::list(&self.store, &dev.id, false, 200, None).await?;
        keys.into_iter()
            .filter(usable)
            .max_by_key(|k| k.created_at)
            .map(|k| k.id)
            .ok_or_else(|| {
                Error::invalid(
                    "key_id",
                    "create an API key first: the task's requests run as one",
                )
            })
    }

    /// Creates a seed task (`batch_generate` or `usage_export`).
    pub async fn create_task(&self, dev: &Developer, r: CreateTask) -> Result<Task> {
        let (kind, key_id, input, endpoint) = match r {
            CreateTask::BatchGenerate {
                model,
                prompts,
                messages,
                options,
                key_id,
            } => {
                let mut errors = Vec::new();
                if model.trim().is_empty() {
                    errors.push(FieldError::new("model", "is required"));
                }
                let n = match (&prompts, &messages) {
                    (Some(p), None) => p.len(),
                    (None, Some(m)) => {
                        if m.iter().any(|c| !c.is_array()) {
                            errors.push(FieldError::new(
                                "messages",
                                "must be a list of message lists",
                            ));
                        }
                        m.len()
                    }
                    _ => {
                        errors.push(FieldError::new(
                            "prompts",
                            "give either `prompts` or `messages`",
                        ));
                        0
                    }
                };
                let max = self.config.tasks.max_items_per_batch;
                if n == 0 && (prompts.is_some() || messages.is_some()) {
                    errors.push(FieldError::new("prompts", "at least one item"));
                }
                if n > max {
                    errors.push(FieldError::new("prompts", format!("at most {max} items")));
                }
                if let Some(o) = &options {
                    for reserved in ["model", "messages", "stream"] {
                        if o.contains_key(reserved) {
                            errors.push(FieldError::new(
                                "options",
                                format!("may not set `{reserved}`"),
                            ));
                        }
                    }
                }
                Error::check(errors)?;
                let key = self.task_key(dev, key_id.as_deref()).await?;
                let input = json!({"model": model, "prompts": prompts, "messages": messages, "options": options});
                (
                    tasks::BATCH_GENERATE,
                    Some(key),
                    input,
                    Some("/v1/chat/completions"),
                )
            }
            CreateTask::UsageExport {
                period,
                from,
                to,
                key_id,
            } => {
                let input = json!({"period": period, "from": from, "to": to, "key_id": key_id});
                (tasks::USAGE_EXPORT, None, input, None)
            }
        };
        let mut tx = self.store.begin_write().await?;
        self.check_open_tasks(&mut tx, &dev.id).await?;
        let id = new_task_id(kind);
        let task = tasks::insert(
            &mut tx,
            &NewTask {
                id: &id,
                developer_id: &dev.id,
                key_id: key_id.as_deref(),
                kind,
                endpoint,
                input: &input,
                metadata: None,
                input_file_id: None,
                expires_at: now_ms() + COMPLETION_WINDOW_MS,
            },
        )
        .await?;
        tx.commit().await?;
        self.wake_tasks();
        Ok(task)
    }

    /// A task or batch; with `developer_id`, only theirs.
    pub async fn task(&self, developer_id: Option<&str>, id: &str) -> Result<Task> {
        Ok(tasks::get(&self.store, developer_id, id).await?)
    }

    pub async fn tasks(&self, f: &Filter<'_>) -> Result<Vec<Task>> {
        let f = Filter {
            limit: f.limit.clamp(1, 1000),
            ..f.clone()
        };
        Ok(tasks::list(&self.store, &f).await?)
    }

    /// Cancels a task or batch: queued items end now, running ones finish. An operator's or
    /// the CLI's cancel is audited. `Conflict` when it already finished.
    pub async fn cancel_task(
        &self,
        by: &Actor<'_>,
        developer_id: Option<&str>,
        id: &str,
    ) -> Result<Task> {
        let mut tx = self.store.begin_write().await?;
        let (task, outcome) = tasks::request_cancel(&mut tx, developer_id, id).await?;
        if outcome == CancelOutcome::Finished {
            return Err(Error::Conflict(format!(
                "Cannot cancel a {} with status {}.",
                if task.kind == tasks::OPENAI_BATCH {
                    "batch"
                } else {
                    "task"
                },
                task.status
            )));
        }
        let entry = by.is_staff().then(|| Entry {
            action: "task.cancel",
            target_type: "task",
            target_id: id,
            details: json!({"developer_id": task.developer_id, "kind": task.kind}),
        });
        journal::record(&mut tx, by, None, entry).await?;
        tx.commit().await?;
        self.wake_tasks();
        Ok(task)
    }

    /// A finished task's result file (`errors`: its error file) and a reader of it.
    pub async fn task_result(
        &self,
        developer_id: &str,
        id: &str,
        errors: bool,
    ) -> Result<(FileRecord, Reader)> {
        let task = self.task(Some(developer_id), id).await?;
        let file = if errors {
            &task.error_file_id
        } else {
            &task.output_file_id
        };
        match file {
            Some(f) => self.file_content(developer_id, f).await,
            None if task.finished_at.is_none() => Err(Error::Conflict(
                "The task has not finished yet; its result is written when it does.".into(),
            )),
            None => Err(Error::NotFound),
        }
    }
}

fn uuid_simple() -> String {
    new_id("")
}
