//! An upstream's `retry:` section: which failures before the first response byte send the
//! request again (to the upstream's next endpoint), and within what budget. Reloadable.

use std::time::Duration;

use serde::Deserialize;

/// When and how often a request is sent again.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included, for a request the upstream answered with a status
    /// of `on_status` or did not answer within `read_timeout`. 1 turns retries off. Connect
    /// failures are not counted: nothing was sent, so every endpoint is tried once regardless.
    /// Default 2.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Statuses answered before any byte reached the client that are retried. Default
    /// `[429, 500, 502, 503, 504, 529]`.
    #[serde(default = "default_statuses")]
    pub on_status: Vec<u16>,
    /// Retry a request whose response header did not arrive within `read_timeout` (the
    /// provider may have processed it). Default true.
    #[serde(default = "yes")]
    pub on_timeout: bool,
    /// Budget from the first attempt: no attempt starts after it, and a wait the upstream asks
    /// for (`Retry-After`, `retry-after-ms`, `x-ratelimit-reset-*`) that would end past it ends
    /// the retries (the client gets the upstream's answer). Default 30s.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Wait before going back to an endpoint already tried when the upstream names none,
    /// doubled for each further round over the endpoints, at most 2 s. Moving on to an
    /// endpoint not tried yet in this request does not wait. Default 50ms.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Paths (after `/v1/`) whose requests may be sent again; any other path is sent once.
    /// Default: the model APIs (`chat/completions`, `completions`, `embeddings`, `responses`,
    /// `messages`), whose requests create nothing at the provider.
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
}

fn default_attempts() -> u32 {
    2
}
fn default_statuses() -> Vec<u16> {
    vec![429, 500, 502, 503, 504, 529]
}
fn yes() -> bool {
    true
}
fn default_deadline() -> Duration {
    Duration::from_secs(30)
}
fn default_backoff() -> Duration {
    Duration::from_millis(50)
}
fn default_paths() -> Vec<String> {
    [
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "messages",
    ]
    .map(String::from)
    .to_vec()
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            on_status: default_statuses(),
            on_timeout: true,
            deadline: default_deadline(),
            backoff: default_backoff(),
            paths: default_paths(),
        }
    }
}

impl RetryConfig {
    /// Checks the section; errors carry the key after `retry.`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=10).contains(&self.attempts) {
            return Err(("attempts".into(), "must be 1 to 10".into()));
        }
        if let Some(s) = self.on_status.iter().find(|s| !(400..=599).contains(*s)) {
            return Err((
                "on_status".into(),
                format!("`{s}`: only error statuses (400 to 599) are retried"),
            ));
        }
        if self.deadline.is_zero() {
            return Err(("deadline".into(), "must be positive".into()));
        }
        for (i, path) in self.paths.iter().enumerate() {
            if let Err(m) = super::check_api_path(path) {
                return Err((format!("paths[{i}]"), format!("`{path}`: {m}")));
            }
        }
        Ok(())
    }

    /// Whether requests to `path` (after `/v1/`) may be sent more than once.
    pub fn retries_path(&self, path: &str) -> bool {
        self.attempts > 1 && self.paths.iter().any(|p| p == path)
    }
}
