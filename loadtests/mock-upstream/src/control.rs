//! Runtime control endpoints under `/__mock/` and the counters they report. They are not under
//! `/v1`, so a gateway never forwards them: tests call the mock directly. They need no API key,
//! ignore `x-mock-*` headers and are not counted.
//!
//! - `POST /__mock/fail` with `{"status": 503}` (any 400–599): every later request answers
//!   that status with the usual injected error body (`GET /v1/models` too) until
//!   `POST /__mock/fail` with `{"status": null}` or `DELETE /__mock/fail` clears it;
//!   `GET /__mock/fail` shows it. Each answers `{"status": 503}` / `{"status": null}`.
//! - `GET /__mock/stats`: `{"requests": N, "by_path": {"GET /v1/models": n,
//!   "POST /v1/chat/completions": m, …}}`, counting every other request received (on arrival,
//!   whatever its answer); `DELETE /__mock/stats` zeroes them.
//!
//! The failure is one atomic; the counters one mutex-guarded map touched once per request
//! (no allocation once a method and path have been seen).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, PoisonError};

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::{error, json, MockBody};

/// Paths under this prefix are control endpoints.
pub(crate) const PREFIX: &str = "/__mock/";

#[derive(Default)]
pub(crate) struct Control {
    /// The status every request answers (0: none).
    fail: AtomicU16,
    stats: Mutex<Stats>,
}

#[derive(Default)]
struct Stats {
    requests: u64,
    by_path: HashMap<Method, HashMap<String, u64>>,
}

impl Control {
    /// The status set by `POST /__mock/fail`.
    pub(crate) fn fail_status(&self) -> Option<u16> {
        match self.fail.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s),
        }
    }

    /// Counts a request (not a control one).
    pub(crate) fn record(&self, method: &Method, path: &str) {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.requests += 1;
        let paths = stats.by_path.entry(method.clone()).or_default();
        match paths.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                paths.insert(path.to_owned(), 1);
            }
        }
    }

    /// Answers a request to a path under [`PREFIX`].
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<MockBody> {
        let (parts, body) = req.into_parts();
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
            return error(
                400,
                "invalid_request_error",
                None,
                "Could not read the body.",
            );
        };
        let (method, path) = (&parts.method, parts.uri.path());
        match (method.as_str(), path) {
            ("GET", "/__mock/fail") => {}
            ("DELETE", "/__mock/fail") => self.fail.store(0, Ordering::Relaxed),
            ("POST", "/__mock/fail") => {
                let status = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("status").cloned());
                match status {
                    Some(Value::Null) => self.fail.store(0, Ordering::Relaxed),
                    Some(s) if s.as_u64().is_some_and(|s| (400..=599).contains(&s)) => {
                        let s = s.as_u64().map_or(0, |s| s as u16);
                        self.fail.store(s, Ordering::Relaxed);
                    }
                    _ => {
                        let message = r#"Expected {"status": <400-599>} or {"status": null}."#;
                        return error(400, "invalid_request_error", None, message);
                    }
                }
            }
            ("GET", "/__mock/stats") => return json(200, &self.stats()),
            ("DELETE", "/__mock/stats") => {
                *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = Stats::default();
                return json(200, &self.stats());
            }
            _ => {
                let message = format!("Unknown control endpoint: {method} {path}.");
                return error(404, "invalid_request_error", Some("unknown_url"), &message);
            }
        }
        json(200, &json!({"status": self.fail_status()}))
    }

    fn stats(&self) -> Value {
        let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let by_path: serde_json::Map<String, Value> = stats
            .by_path
            .iter()
            .flat_map(|(m, paths)| {
                paths
                    .iter()
                    .map(move |(p, n)| (format!("{m} {p}"), json!(n)))
            })
            .collect();
        json!({"requests": stats.requests, "by_path": by_path})
    }
}
