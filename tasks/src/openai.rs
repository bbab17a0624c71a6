//! The OpenAI Batch and Files wire formats: batch input lines and their validation (errors
//! with line numbers, as OpenAI reports them), output and error lines, and the `batch` and
//! `file` objects the API returns.

use aihub_store::files::FileRecord;
use aihub_store::tasks::{self, Task};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Endpoints a batch may target (the metered model APIs that answer in one JSON body).
pub const BATCH_ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// The only completion window offered (OpenAI's).
pub const COMPLETION_WINDOW: &str = "24h";
pub const COMPLETION_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// The longest input line read (a request body).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// A valid input line.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    /// 1-based line number.
    pub line: i64,
    pub custom_id: String,
    /// The request body (compact JSON text).
    pub body: String,
}

/// A validation error (`batch.errors.data[]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub line: Option<i64>,
}

impl LineError {
    fn at(line: i64, code: &'static str, param: Option<&'static str>, message: String) -> Self {
        LineError {
            code,
            message,
            param,
            line: Some(line),
        }
    }
}

/// Validation stops after this many errors (the batch fails anyway).
const MAX_ERRORS: usize = 100;

#[derive(Deserialize)]
struct RawLine {
    custom_id: Option<Value>,
    method: Option<Value>,
    url: Option<Value>,
    body: Option<Value>,
}

/// Reads a batch input file and checks every line: JSON, a unique string `custom_id`, method
/// `POST`, `url` equal to the batch's endpoint, a `body` object with a string `model` and no
/// `stream: true`; `known_model` decides whether a model is served. At most `max_items`
/// lines. Returns the lines, or every error found (up to 100).
pub async fn read_input<R: AsyncRead + Unpin>(
    reader: R,
    endpoint: &str,
    max_items: usize,
    known_model: impl Fn(&str) -> bool,
) -> Result<Vec<InputLine>, Vec<LineError>> {
    let mut lines = BufReader::new(reader).split(b'\n');
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut n: i64 = 0;
    loop {
        let raw = match lines.next_segment().await {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(e) => {
                errors.push(LineError {
                    code: "file_unreadable",
                    message: format!("The input file could not be read: {e}"),
                    param: None,
                    line: None,
                });
                return Err(errors);
            }
        };
        n += 1;
        if errors.len() >= MAX_ERRORS {
            continue;
        }
        let text = trim(&raw);
        if text.is_empty() {
            continue; // blank lines (a trailing newline) are not requests
        }
        if text.len() > MAX_LINE_BYTES {
            errors.push(LineError::at(
                n,
                "invalid_json_line",
                None,
                format!("This line is longer than {MAX_LINE_BYTES} bytes."),
            ));
            continue;
        }
        match check_line(n, text, endpoint, &known_model, &mut seen) {
            Ok(line) => out.push(line),
            Err(e) => errors.push(e),
        }
        if out.len() > max_items {
            errors.push(LineError {
                code: "too_many_requests",
                message: format!("The input file has more than {max_items} requests."),
                param: None,
                line: Some(n),
            });
            return Err(errors);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if out.is_empty() {
        return Err(vec![LineError {
            code: "empty_file",
            message: "The input file has no requests.".into(),
            param: None,
            line: None,
        }]);
    }
    Ok(out)
}

fn trim(raw: &[u8]) -> &[u8] {
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let start = raw[..end]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(end);
    &raw[start..end]
}

fn check_line(
    n: i64,
    text: &[u8],
    endpoint: &str,
    known_model: &impl Fn(&str) -> bool,
    seen: &mut std::collections::HashSet<String>,
) -> Result<InputLine, LineError> {
    let invalid = |code, param, message: String| LineError::at(n, code, param, message);
    let raw: RawLine = serde_json::from_slice(text).map_err(|e| {
        invalid(
            "invalid_json_line",
            None,
            format!("This line is not valid JSON: {e}."),
        )
    })?;
    let custom_id = match raw.custom_id {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
        Some(_) => {
            return Err(invalid(
                "invalid_custom_id",
                Some("custom_id"),
                "`custom_id` must be a non-empty string of at most 512 characters.".into(),
            ))
        }
        None => {
            return Err(invalid(
                "missing_required_parameter",
                Some("custom_id"),
                "Missing required parameter: `custom_id`.".into(),
            ))
        }
    };
    if !seen.insert(custom_id.clone()) {
        return Err(invalid(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("The custom_id `{custom_id}` appears on more than one line."),
        ));
    }
    if raw.method.as_ref().and_then(Value::as_str) != Some("POST") {
        return Err(invalid(
            "invalid_method",
            Some("method"),
            "`method` must be `POST`.".into(),
        ));
    }
    if raw.url.as_ref().and_then(Value::as_str) != Some(endpoint) {
        return Err(invalid(
            "invalid_url",
            Some("url"),
            format!("`url` must be the batch's endpoint, `{endpoint}`."),
        ));
    }
    let body = match raw.body {
        Some(Value::Object(b)) => b,
        _ => {
            return Err(invalid(
                "missing_required_parameter",
                Some("body"),
                "Missing required parameter: `body` (a JSON object).".into(),
            ))
        }
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(invalid(
                "missing_required_parameter",
                Some("body.model"),
                "Missing required parameter: `body.model`.".into(),
            ))
        }
    };
    if !known_model(&model) {
        return Err(invalid(
            "model_not_found",
            Some("body.model"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        ));
    }
    if body.get("stream") == Some(&Value::Bool(true)) {
        return Err(invalid(
            "invalid_value",
            Some("body.stream"),
            "Streaming is not supported in batches.".into(),
        ));
    }
    Ok(InputLine {
        line: n,
        custom_id,
        body: Value::Object(body).to_string(),
    })
}

/// The id of an item's request in output lines (`batch_req_…`, stable per item).
pub fn item_id(task_id: &str, line: i64) -> String {
    let id = aihub_apikey::internal::item_request_id(task_id, line as u64);
    format!("batch_req_{}", id.simple())
}

/// An output or error line for an item that got an answer.
pub fn response_line(
    task_id: &str,
    line: i64,
    custom_id: &str,
    status: u16,
    request_id: &str,
    body: Value,
) -> String {
    json!({
        "id": item_id(task_id, line),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
    .to_string()
}

/// An error line for an item that never got an answer (`error` is `{code, message}`).
pub fn error_line(task_id: &str, line: i64, custom_id: &str, error: Value) -> String {
    json!({
        "id": item_id(task_id, line),
        "custom_id": custom_id,
        "response": null,
        "error": error,
    })
    .to_string()
}

fn secs(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| json!(ms / 1000))
}

/// The OpenAI `batch` object of a task.
pub fn batch_object(t: &Task) -> Value {
    let at = |status: &str| {
        if t.status == status {
            secs(t.finished_at)
        } else {
            Value::Null
        }
    };
    let errors = t
        .errors
        .as_ref()
        .map_or(Value::Null, |e| json!({"object": "list", "data": e}));
    json!({
        "id": t.id,
        "object": "batch",
        "endpoint": t.endpoint,
        "errors": errors,
        "input_file_id": t.input_file_id,
        "completion_window": COMPLETION_WINDOW,
        "status": t.status,
        "output_file_id": t.output_file_id,
        "error_file_id": t.error_file_id,
        "created_at": t.created_at / 1000,
        "in_progress_at": secs(t.in_progress_at),
        "expires_at": t.expires_at / 1000,
        "finalizing_at": secs(t.finalizing_at),
        "completed_at": at(tasks::COMPLETED),
        "failed_at": at(tasks::FAILED),
        "expired_at": at(tasks::EXPIRED),
        "cancelling_at": secs(t.cancel_requested_at),
        "cancelled_at": at(tasks::CANCELLED),
        "request_counts": {"total": t.total, "completed": t.completed, "failed": t.failed},
        "metadata": t.metadata.clone().unwrap_or(Value::Null),
    })
}

/// The OpenAI `file` object of a file record.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at / 1000,
        "expires_at": secs(f.expires_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(text: &str) -> Result<Vec<InputLine>, Vec<LineError>> {
        read_input(text.as_bytes(), "/v1/chat/completions", 10, |m| m != "nope").await
    }

    fn line(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#
        )
    }

    #[tokio::test]
    async fn good_lines_are_kept_with_their_numbers() {
        let text = format!("{}\n\n{}\n", line("a", "m"), line("b", "m"));
        let lines = read(&text).await.unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].line, lines[1].line), (1, 3));
        assert_eq!(lines[1].custom_id, "b");
        let body: Value = serde_json::from_str(&lines[0].body).unwrap();
        assert_eq!(body["model"], "m");
    }

    #[tokio::test]
    async fn every_bad_line_is_reported_with_its_number() {
        let text = [
            line("a", "m"),
            "{not json".into(),
            line("a", "m"),
            line("c", "nope"),
            r#"{"custom_id":"d","method":"GET","url":"/v1/chat/completions","body":{"model":"m"}}"#.into(),
            r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#.into(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#.into(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#.into(),
        ]
        .join("\n");
        let errors = read(&text).await.unwrap_err();
        let got: Vec<(&str, Option<i64>)> = errors.iter().map(|e| (e.code, e.line)).collect();
        assert_eq!(
            got,
            [
                ("invalid_json_line", Some(2)),
                ("duplicate_custom_id", Some(3)),
                ("model_not_found", Some(4)),
                ("invalid_method", Some(5)),
                ("invalid_url", Some(6)),
                ("invalid_value", Some(7)),
                ("missing_required_parameter", Some(8)),
            ]
        );
    }

    #[tokio::test]
    async fn empty_and_oversized_files() {
        assert_eq!(read("\n\n").await.unwrap_err()[0].code, "empty_file");
        let many: Vec<String> = (0..11).map(|i| line(&i.to_string(), "m")).collect();
        assert_eq!(
            read(&many.join("\n")).await.unwrap_err()[0].code,
            "too_many_requests"
        );
    }

    #[test]
    fn item_ids_are_stable() {
        assert_eq!(item_id("batch_1", 3), item_id("batch_1", 3));
        assert_ne!(item_id("batch_1", 3), item_id("batch_1", 4));
        assert!(item_id("batch_1", 3).starts_with("batch_req_"));
    }
}
