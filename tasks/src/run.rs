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
    /// What the answer's rate-limit headers say of the key's room, when it sent them.
    pub room: Option<Room>,
}

/// The room a key's rate limits leave (`x-ratelimit-remaining-*`, `x-ratelimit-reset-*`):
/// the fewer remaining of requests and tokens, and when the limit admits again if none remain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub remaining: u64,
    /// Unix ms from which the limit admits again (now when something remains).
    pub until: i64,
}

/// A Go-style duration as the gateway writes it (`20ms`, `1.5s`, `6m30.5s`, `1h2m3s`), in ms.
pub fn go_duration_ms(s: &str) -> Option<i64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v.ceil() as i64);
    }
    let mut total = 0.0;
    let mut rest = s;
    for (unit, factor) in [('h', 3_600_000.0), ('m', 60_000.0), ('s', 1000.0)] {
        if let Some((n, tail)) = rest.split_once(unit) {
            total += n.parse::<f64>().ok()? * factor;
            rest = tail;
        }
    }
    rest.is_empty().then_some(total.ceil() as i64)
}

fn room(resp: &reqwest::Response, now: i64) -> Option<Room> {
    ["requests", "tokens"]
        .iter()
        .filter_map(|unit| {
            let remaining = header(resp, &format!("x-ratelimit-remaining-{unit}"))?
                .parse::<u64>()
                .ok()?;
            let reset = header(resp, &format!("x-ratelimit-reset-{unit}"))
                .and_then(|v| go_duration_ms(&v))
                .unwrap_or(0);
            let until = if remaining == 0 { now + reset } else { now };
            Some(Room { remaining, until })
        })
        .min_by_key(|r| (r.remaining, -r.until))
}

/// An item that ends without an answer: its error line (`{code, message}`), maybe a stop.
fn unanswered(item: &Claimed, code: &str, message: &str, stop: Option<Stop>) -> Ran {
    let error = json!({"code": code, "message": message});
    Ran {
        outcome: Outcome::Failed(openai::error_line(
            &item.task_id,
            item.line,
            &item.custom_id,
            error,
        )),
        stop,
        label: "failed",
        room: None,
    }
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
        const DELETED: &str = "The API key this batch runs as was deleted.";
        let stop = Stop {
            task_id: item.task_id.clone(),
            code: "invalid_api_key".into(),
            message: DELETED.into(),
            reason: Some("the API key this batch runs as was deleted".into()),
        };
        return unanswered(item, "invalid_api_key", DELETED, Some(stop));
    };
    if item.task_expires_at < now {
        let why = "This request could not be executed before the completion window expired.";
        return unanswered(item, "batch_expired", why, None);
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
                room: None,
            }
        } else {
            unanswered(item, "gateway_unreachable", &why, None)
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
    let room = room(&resp, now_ms());
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
            room,
        },
        // A quota refusal may come from the reservations of the developer's other requests in
        // flight (released when they end): the item is tried once more, alone (the engine
        // pauses the developer, then sends one item), before the quota counts as used up.
        429 if code == "insufficient_quota" && item.attempts == 0 => {
            let at = now_ms() + 1000;
            Ran {
                outcome: Outcome::Retry { at, counts: true },
                stop: None,
                label: "retried",
                room: Some(Room {
                    remaining: 0,
                    until: at,
                }),
            }
        }
        429 if code == "insufficient_quota" => Ran {
            outcome: Outcome::Failed(line()),
            stop: Some(Stop {
                task_id: item.task_id.clone(),
                code,
                message,
                reason: None,
            }),
            label: "failed",
            room,
        },
        429 => Ran {
            outcome: Outcome::Retry {
                at: now_ms() + retry_after.unwrap_or(1).clamp(1, 60) * 1000,
                counts: false,
            },
            stop: None,
            label: "rate_limited",
            room,
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
            room,
        },
        s if transient(s) && item.attempts + 1 < max_attempts => Ran {
            outcome: Outcome::Retry {
                at: now_ms() + backoff(item.attempts),
                counts: true,
            },
            stop: None,
            label: "retried",
            room,
        },
        _ => Ran {
            outcome: Outcome::Failed(line()),
            stop: None,
            label: "failed",
            room,
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
    fn durations_as_the_gateway_writes_them() {
        assert_eq!(go_duration_ms("0s"), Some(0));
        assert_eq!(go_duration_ms("20ms"), Some(20));
        assert_eq!(go_duration_ms("1.5s"), Some(1500));
        assert_eq!(go_duration_ms("6m30.5s"), Some(390_500));
        assert_eq!(go_duration_ms("1h2m3s"), Some(3_723_000));
        assert_eq!(go_duration_ms("soon"), None);
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(0), 1000);
        assert_eq!(backoff(3), 8000);
        assert_eq!(backoff(20), 64_000);
        assert!(transient(503) && !transient(400));
    }
}
