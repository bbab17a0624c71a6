//! One item through the gateway: the request (as the task's key, by a signed batch token),
//! and what its answer means for the item (a result line, a retry, or a stop of its task).

use std::time::Duration;

use aihub_apikey::internal::{BatchToken, InternalSecret};
use aihub_apikey::KeyHash;
use aihub_store::now_ms;
use aihub_store::queue::{Claimed, Outcome};
use serde_json::{json, Value};

use crate::openai;

/// The rest of a task's items must end: its key is no longer valid, or its quota is used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub task_id: String,
    pub code: String,
    pub message: String,
    /// Recorded as the task's error (the task ends `failed`); `None`: the task completes with
    /// these items failed.
    pub reason: Option<String>,
}

/// What running an item produced.
#[derive(Debug, Clone)]
pub struct Ran {
    pub outcome: Outcome,
    pub stop: Option<Stop>,
    /// A label for metrics: `succeeded`, `failed`, `retried`, `rate_limited`, `cancelled`.
    pub label: &'static str,
}

/// Statuses worth another attempt (the model provider or the gateway had a moment).
fn transient(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504 | 529)
}

/// Backoff before attempt `attempts + 1`: 1 s doubling, at most a minute.
fn backoff(attempts: i64) -> i64 {
    1000 * (1i64 << attempts.clamp(0, 6))
}

/// Sends `item` to `gateway_url` and classifies the answer.
pub async fn run(
    client: &reqwest::Client,
    secret: &InternalSecret,
    gateway_url: &str,
    timeout: Duration,
    max_attempts: i64,
    item: &Claimed,
) -> Ran {
    let now = now_ms();
    let Some(hash) = item
        .key_hash
        .as_deref()
        .and_then(|h| KeyHash::from_hex(h).ok())
    else {
        let error = json!({"code": "invalid_api_key", "message": "The API key this batch runs as was deleted."});
        return Ran {
            outcome: Outcome::Failed(openai::error_line(
                &item.task_id,
                item.line,
                &item.custom_id,
                error,
            )),
            stop: Some(Stop {
                task_id: item.task_id.clone(),
                code: "invalid_api_key".into(),
                message: "The API key this batch runs as was deleted.".into(),
                reason: Some("the API key this batch runs as was deleted".into()),
            }),
            label: "failed",
        };
    };
    if item.task_expires_at < now {
        let error = json!({"code": "batch_expired", "message": "This request could not be executed before the completion window expired."});
        return Ran {
            outcome: Outcome::Failed(openai::error_line(
                &item.task_id,
                item.line,
                &item.custom_id,
                error,
            )),
            stop: None,
            label: "failed",
        };
    }
    let token = secret.batch_token(&BatchToken {
        key_hash: hash,
        task_id: item.task_id.clone(),
        line: item.line as u64,
        expires_at_ms: now + timeout.as_millis() as i64 + 60_000,
    });
    let url = format!("{gateway_url}/v1/{}", item.endpoint);
    let sent = client
        .post(&url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(item.body.clone())
        .timeout(timeout)
        .send()
        .await;
    let retry_or_fail = |why: String| {
        if item.attempts + 1 < max_attempts {
            Ran {
                outcome: Outcome::Retry {
                    at: now_ms() + backoff(item.attempts),
                    counts: true,
                },
                stop: None,
                label: "retried",
            }
        } else {
            let error = json!({"code": "gateway_unreachable", "message": why});
            Ran {
                outcome: Outcome::Failed(openai::error_line(
                    &item.task_id,
                    item.line,
                    &item.custom_id,
                    error,
                )),
                stop: None,
                label: "failed",
            }
        }
    };
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(task_id = %item.task_id, line = item.line, error = %e, "batch item not sent");
            return retry_or_fail(format!(
                "The request could not be completed after {max_attempts} attempts."
            ));
        }
    };
    let status = resp.status().as_u16();
    let request_id = header(&resp, "x-request-id").unwrap_or_default();
    let retry_after = header(&resp, "retry-after").and_then(|v| v.parse::<i64>().ok());
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(_) => return retry_or_fail("The answer could not be read.".into()),
    };
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let line = || {
        openai::response_line(
            &item.task_id,
            item.line,
            &item.custom_id,
            status,
            &request_id,
            body.clone(),
        )
    };
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
    match status {
        200..=299 => Ran {
            outcome: Outcome::Succeeded(line()),
            stop: None,
            label: "succeeded",
        },
        429 if code == "insufficient_quota" => Ran {
            outcome: Outcome::Failed(line()),
            stop: Some(Stop {
                task_id: item.task_id.clone(),
                code,
                message,
                reason: None,
            }),
            label: "failed",
        },
        429 => Ran {
            outcome: Outcome::Retry {
                at: now_ms() + retry_after.unwrap_or(1).clamp(1, 60) * 1000,
                counts: false,
            },
            stop: None,
            label: "rate_limited",
        },
        401 => Ran {
            outcome: Outcome::Failed(line()),
            stop: Some(Stop {
                task_id: item.task_id.clone(),
                reason: Some(format!(
                    "the API key this batch runs as is no longer valid ({code})"
                )),
                code,
                message,
            }),
            label: "failed",
        },
        s if transient(s) && item.attempts + 1 < max_attempts => Ran {
            outcome: Outcome::Retry {
                at: now_ms() + backoff(item.attempts),
                counts: true,
            },
            stop: None,
            label: "retried",
        },
        _ => Ran {
            outcome: Outcome::Failed(line()),
            stop: None,
            label: "failed",
        },
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(0), 1000);
        assert_eq!(backoff(3), 8000);
        assert_eq!(backoff(20), 64_000);
        assert!(transient(503) && !transient(400));
    }
}
