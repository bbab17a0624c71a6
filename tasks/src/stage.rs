//! Task-level work, done by whichever worker holds the task's stage lease: reading a batch's
//! input into items, expanding a `batch_generate` task, running a `usage_export`, and
//! finalizing (output and error files written, final status and event in one transaction).

use std::sync::Arc;

use aihub_store::files::{self as store_files, FileRecord};
use aihub_store::queue::{self, NewItem};
use aihub_store::tasks::{self, Ending, Task};
use aihub_store::{new_id, now_ms, Store, StoreError};
use async_trait::async_trait;
use serde_json::{json, Value};

use crate::config::TasksConfig;
use crate::files::{object_name, FileError, FileStore, Writer};
use crate::openai::{self, InputLine};

/// Writes a `usage_export` task's CSV (implemented by the admin API, which owns usage reads).
#[async_trait]
pub trait Exporter: Send + Sync + 'static {
    /// Writes the CSV of `input`'s range of `developer_id`'s usage into `out`.
    async fn export(
        &self,
        developer_id: &str,
        input: &Value,
        out: &mut Writer,
    ) -> Result<(), String>;
}

/// Why a stage did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] FileError),
}

/// What stages need.
pub struct StageCtx {
    pub store: Store,
    pub files: Arc<dyn FileStore>,
    pub config: TasksConfig,
    pub exporter: Arc<dyn Exporter>,
    /// This worker's lease owner name.
    pub owner: String,
}

/// Does a claimed task's due work.
pub async fn run(cx: &StageCtx, task: &Task) -> Result<(), StageError> {
    match task.status.as_str() {
        tasks::VALIDATING => match task.kind.as_str() {
            tasks::OPENAI_BATCH => validate_batch(cx, task).await,
            tasks::BATCH_GENERATE => expand_generate(cx, task).await,
            tasks::USAGE_EXPORT => export(cx, task).await,
            other => fail(cx, task, &format!("unknown task kind `{other}`"), None).await,
        },
        _ => finalize(cx, task).await,
    }
}

async fn fail(
    cx: &StageCtx,
    task: &Task,
    error: &str,
    errors: Option<&Value>,
) -> Result<(), StageError> {
    let mut tx = cx.store.begin_write().await?;
    tasks::finish(
        &mut tx,
        &task.id,
        &cx.owner,
        &Ending {
            status: tasks::FAILED,
            errors,
            error: Some(error),
            ..Ending::default()
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

async fn start(cx: &StageCtx, task: &Task, lines: &[InputLine]) -> Result<(), StageError> {
    let items: Vec<NewItem<'_>> = lines
        .iter()
        .map(|l| NewItem {
            line: l.line,
            custom_id: &l.custom_id,
            body: &l.body,
        })
        .collect();
    let mut tx = cx.store.begin_write().await?;
    tasks::check_lease(&mut tx, &task.id, &cx.owner).await?;
    queue::insert(&mut tx, &task.id, &task.developer_id, &items).await?;
    tasks::start_running(&mut tx, &task.id, &cx.owner, items.len() as i64).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

async fn validate_batch(cx: &StageCtx, task: &Task) -> Result<(), StageError> {
    let (Some(file_id), Some(endpoint)) = (&task.input_file_id, &task.endpoint) else {
        return fail(cx, task, "the batch names no input file or endpoint", None).await;
    };
    let file = match store_files::get(&cx.store, &task.developer_id, file_id).await {
        Ok(f) => f,
        Err(StoreError::NotFound) => {
            let errors = json!([{"code": "file_not_found", "message": format!("The input file {file_id} was deleted."), "param": "input_file_id", "line": null}]);
            return fail(cx, task, "the input file was deleted", Some(&errors)).await;
        }
        Err(e) => return Err(e.into()),
    };
    let reader = cx.files.open(&file.location).await?;
    match openai::read_input(reader, endpoint, cx.config.max_items_per_batch, |_| true).await {
        Ok(lines) => start(cx, task, &lines).await,
        Err(errors) => {
            let errors = serde_json::to_value(&errors).expect("errors serialize");
            fail(cx, task, "the input file has invalid lines", Some(&errors)).await
        }
    }
}

/// A `batch_generate` task's items: one chat completion per prompt (or message list).
pub fn generate_lines(input: &Value) -> Vec<InputLine> {
    let model = input["model"].clone();
    let options = input["options"].as_object().cloned().unwrap_or_default();
    let conversations: Vec<Value> =
        match (input["prompts"].as_array(), input["messages"].as_array()) {
            (Some(prompts), _) => prompts
                .iter()
                .map(|p| json!([{"role": "user", "content": p}]))
                .collect(),
            (None, Some(lists)) => lists.clone(),
            (None, None) => Vec::new(),
        };
    conversations
        .into_iter()
        .enumerate()
        .map(|(i, messages)| {
            let mut body = options.clone();
            body.insert("model".into(), model.clone());
            body.insert("messages".into(), messages);
            InputLine {
                line: i as i64 + 1,
                custom_id: format!("item-{}", i + 1),
                body: Value::Object(body).to_string(),
            }
        })
        .collect()
}

async fn expand_generate(cx: &StageCtx, task: &Task) -> Result<(), StageError> {
    let lines = generate_lines(&task.input);
    if lines.is_empty() {
        return fail(cx, task, "the task has no prompts", None).await;
    }
    start(cx, task, &lines).await
}

/// A new output file's record and writer.
async fn new_file(
    cx: &StageCtx,
    task: &Task,
    purpose: &str,
    filename: String,
) -> Result<(FileRecord, Writer), StageError> {
    let id = format!("file-{}", uuid::Uuid::now_v7().simple());
    let location = object_name(&task.developer_id, &id);
    let writer = cx.files.create(&location, u64::MAX).await?;
    let now = now_ms();
    let record = FileRecord {
        id,
        developer_id: task.developer_id.clone(),
        purpose: purpose.into(),
        filename,
        bytes: 0,
        sha256: String::new(),
        location,
        created_at: now,
        expires_at: Some(now + cx.config.file_retention.as_millis() as i64),
    };
    Ok((record, writer))
}

async fn export(cx: &StageCtx, task: &Task) -> Result<(), StageError> {
    let (mut record, mut writer) =
        new_file(cx, task, "task_result", format!("{}.csv", task.id)).await?;
    if let Err(e) = cx
        .exporter
        .export(&task.developer_id, &task.input, &mut writer)
        .await
    {
        drop(writer);
        return fail(cx, task, &e, None).await;
    }
    let written = writer.commit().await?;
    record.bytes = written.bytes as i64;
    record.sha256 = written.sha256;
    let mut tx = cx.store.begin_write().await?;
    store_files::insert(&mut tx, &record).await?;
    tasks::finish(
        &mut tx,
        &task.id,
        &cx.owner,
        &Ending {
            status: tasks::COMPLETED,
            output_file_id: Some(&record.id),
            ..Ending::default()
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// One output being written: opened at its first line.
struct Output {
    purpose: &'static str,
    suffix: &'static str,
    open: Option<(FileRecord, Writer)>,
}

impl Output {
    async fn line(&mut self, cx: &StageCtx, task: &Task, text: &str) -> Result<(), StageError> {
        if self.open.is_none() {
            let name = format!("{}_{}.jsonl", task.id, self.suffix);
            self.open = Some(new_file(cx, task, self.purpose, name).await?);
        }
        let (_, w) = self.open.as_mut().expect("opened above");
        w.write(text.as_bytes()).await?;
        w.write(b"\n").await?;
        Ok(())
    }

    async fn commit(self) -> Result<Option<FileRecord>, StageError> {
        let Some((mut record, writer)) = self.open else {
            return Ok(None);
        };
        let written = writer.commit().await?;
        record.bytes = written.bytes as i64;
        record.sha256 = written.sha256;
        Ok(Some(record))
    }
}

/// Writes the output and error files in line order and ends the task.
async fn finalize(cx: &StageCtx, task: &Task) -> Result<(), StageError> {
    let purpose = if task.kind == tasks::OPENAI_BATCH {
        "batch_output"
    } else {
        "task_result"
    };
    let mut output = Output {
        purpose,
        suffix: "output",
        open: None,
    };
    let mut errors = Output {
        purpose,
        suffix: "error",
        open: None,
    };
    let mut after = 0;
    loop {
        let page = queue::ended(&cx.store, &task.id, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.line;
        for item in &page {
            match (item.status.as_str(), &item.result, &item.error) {
                (queue::SUCCEEDED, Some(line), _) => output.line(cx, task, line).await?,
                (queue::FAILED | queue::EXPIRED, Some(line), _) => {
                    errors.line(cx, task, line).await?
                }
                (queue::FAILED | queue::EXPIRED, None, Some(error)) => {
                    let error: Value = serde_json::from_str(error).unwrap_or(Value::Null);
                    let line = openai::error_line(&task.id, item.line, &item.custom_id, error);
                    errors.line(cx, task, &line).await?
                }
                _ => {} // cancelled before it ran: no line
            }
        }
    }
    let output = output.commit().await?;
    let errors_file = errors.commit().await?;
    let status = if task.status == tasks::CANCELLING {
        tasks::CANCELLED
    } else if task.error.as_deref() == Some(EXPIRED_REASON) {
        tasks::EXPIRED
    } else if task.error.is_some() {
        tasks::FAILED
    } else {
        tasks::COMPLETED
    };
    let mut tx = cx.store.begin_write().await?;
    for f in output.iter().chain(errors_file.iter()) {
        store_files::insert(&mut tx, f).await?;
    }
    tasks::finish(
        &mut tx,
        &task.id,
        &cx.owner,
        &Ending {
            status,
            output_file_id: output.as_ref().map(|f| f.id.as_str()),
            error_file_id: errors_file.as_ref().map(|f| f.id.as_str()),
            errors: task.errors.as_ref(),
            error: task.error.as_deref(),
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// The task error the expiry sweep records (the task ends `expired`).
pub const EXPIRED_REASON: &str = "the completion window expired";

/// Ends the queued items of tasks past their window (`expired`, `batch_expired` in the error
/// file); their finalization follows. Returns how many tasks.
pub async fn expire(store: &Store, limit: i64) -> Result<usize, StageError> {
    let ids = tasks::past_window(store, now_ms(), limit).await?;
    for id in &ids {
        let mut tx = store.begin_write().await?;
        queue::end_remaining(
            &mut tx,
            id,
            queue::EXPIRED,
            "batch_expired",
            "This request could not be executed before the completion window expired.",
            Some(EXPIRED_REASON),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
    }
    Ok(ids.len())
}

/// Removes the bytes of files past retention or deleted; returns how many.
pub async fn sweep_files(
    store: &Store,
    files: &dyn FileStore,
    limit: i64,
) -> Result<usize, StageError> {
    let due = store_files::due_for_removal(store, now_ms(), limit).await?;
    for f in &due {
        if !f.location.is_empty() {
            files.remove(&f.location).await?;
        }
        store_files::mark_removed(store, &f.id).await?;
    }
    Ok(due.len())
}

/// A new task id of a kind: `batch_…` for OpenAI batches, `task_…` otherwise.
pub fn new_task_id(kind: &str) -> String {
    if kind == tasks::OPENAI_BATCH {
        new_id("batch_")
    } else {
        new_id("task_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_lines_from_prompts_or_messages() {
        let lines = generate_lines(
            &json!({"model": "m", "prompts": ["a", "b"], "options": {"temperature": 0.5}}),
        );
        assert_eq!(lines.len(), 2);
        let body: Value = serde_json::from_str(&lines[1].body).unwrap();
        assert_eq!(body["messages"][0]["content"], "b");
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(lines[1].custom_id, "item-2");
        let lines = generate_lines(
            &json!({"model": "m", "messages": [[{"role": "system", "content": "x"}]]}),
        );
        assert_eq!(lines.len(), 1);
        assert!(generate_lines(&json!({"model": "m"})).is_empty());
    }
}
