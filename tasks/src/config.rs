//! The `tasks:` section of the admin configuration: files, limits and the worker engine.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksConfig {
    /// Run the worker engine on this admin node. Default true (on PostgreSQL several nodes
    /// share the queue; on SQLite run it on one node).
    #[serde(default = "yes")]
    pub work: bool,
    /// The gateway's base URL: every item is sent through it, as the key that created its
    /// task. Default `http://127.0.0.1:8080`.
    #[serde(default = "default_gateway_url")]
    pub gateway_url: String,
    /// For an `https://` `gateway_url`: a private CA and a client certificate. Default: the
    /// system's roots, no client certificate.
    #[serde(default)]
    pub gateway_tls: aihub_net::tls::ClientTls,
    /// Where file bytes are kept (a local directory; with `s3`, only where uploads are spooled
    /// before they are sent). Default `data/files`.
    #[serde(default = "default_files_dir")]
    pub files_dir: PathBuf,
    /// Keep file bytes in an S3-compatible bucket instead of `files_dir`. Default: none.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// Largest upload. Default 200 MiB (OpenAI's batch input limit).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Deadline of one upload, from its first byte to its last. Default 10m.
    #[serde(default = "default_upload_timeout", with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// Bytes of live files one developer may hold. Default 10 GiB.
    #[serde(default = "default_storage")]
    pub max_storage_bytes_per_developer: u64,
    /// How long files are kept (uploads, outputs, results); then removed. Default 30 days.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub file_retention: Duration,
    /// Requests in one batch. Default 50,000 (OpenAI's).
    #[serde(default = "default_max_items")]
    pub max_items_per_batch: usize,
    /// Unfinished tasks and batches one developer may have. Default 1,000.
    #[serde(default = "default_max_open")]
    pub max_open_per_developer: i64,
    /// Items in flight on this node, every developer together. Default 64.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Items in flight for one developer across all nodes, so one big batch does not starve
    /// the others. Default 16.
    #[serde(default = "default_per_developer")]
    pub per_developer_concurrency: i64,
    /// How long a claimed item or task stays with this node without a heartbeat (renewed
    /// every third of it). Default 30s.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often the engine looks for work when nothing woke it. Default 100ms.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Deadline of one item's request through the gateway. Default 10m.
    #[serde(default = "default_item_timeout", with = "humantime_serde")]
    pub item_timeout: Duration,
    /// Attempts of an item that meets a transient failure (gateway unreachable, 5xx). Rate
    /// limits (429) are waited out and never count. Default 5.
    #[serde(default = "default_attempts")]
    pub max_attempts: i64,
}

/// An S3-compatible bucket (`tasks.s3`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (it must exist).
    pub bucket: String,
    /// The endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`. Default: AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Default `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Objects go under this prefix. Default none.
    #[serde(default)]
    pub prefix: String,
    /// Environment variable holding the access key id. Default `AIHUB_S3_ACCESS_KEY_ID`.
    #[serde(default = "default_key_env")]
    pub access_key_id_env: String,
    /// Environment variable holding the secret key. Default `AIHUB_S3_SECRET_ACCESS_KEY`.
    #[serde(default = "default_secret_env")]
    pub secret_access_key_env: String,
    /// Allow an `http://` endpoint (a server on a private network). Default false.
    #[serde(default)]
    pub allow_http: bool,
    /// `https://BUCKET.host/…` requests instead of `https://host/BUCKET/…`. Default false
    /// (path style, what most S3-compatible servers expect).
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_key_env() -> String {
    "AIHUB_S3_ACCESS_KEY_ID".into()
}
fn default_secret_env() -> String {
    "AIHUB_S3_SECRET_ACCESS_KEY".into()
}

fn yes() -> bool {
    true
}
fn default_gateway_url() -> String {
    "http://127.0.0.1:8080".into()
}
fn default_files_dir() -> PathBuf {
    PathBuf::from("data/files")
}
fn default_max_file_bytes() -> u64 {
    200 * 1024 * 1024
}
fn default_upload_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_storage() -> u64 {
    10 * 1024 * 1024 * 1024
}
fn default_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_max_items() -> usize {
    50_000
}
fn default_max_open() -> i64 {
    1_000
}
fn default_concurrency() -> usize {
    64
}
fn default_per_developer() -> i64 {
    16
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_poll() -> Duration {
    Duration::from_millis(100)
}
fn default_item_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_attempts() -> i64 {
    5
}

impl Default for TasksConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl TasksConfig {
    /// Checks values no type expresses: `(key, message)` on failure.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = self.gateway_url.as_str();
        let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
        if !scheme_ok || url.ends_with('/') || reqwest::Url::parse(url).is_err() {
            return Err((
                "gateway_url",
                "must be an http(s) base URL without a trailing slash, e.g. http://127.0.0.1:8080"
                    .into(),
            ));
        }
        if !self.gateway_tls.is_default() && !url.starts_with("https://") {
            return Err(("gateway_tls", "set, but gateway_url is not https://".into()));
        }
        if let Err(e) = self.gateway_tls.load() {
            return Err((
                match e.field {
                    "ca_file" => "gateway_tls.ca_file",
                    "client_cert_file" => "gateway_tls.client_cert_file",
                    _ => "gateway_tls.client_key_file",
                },
                e.reason,
            ));
        }
        if self.concurrency == 0 {
            return Err(("concurrency", "must be at least 1".into()));
        }
        if self.per_developer_concurrency < 1 {
            return Err(("per_developer_concurrency", "must be at least 1".into()));
        }
        if self.lease < Duration::from_secs(3) {
            return Err(("lease", "must be at least 3s".into()));
        }
        if self.max_attempts < 1 {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        if let Some(s3) = &self.s3 {
            if s3.bucket.is_empty() {
                return Err(("s3.bucket", "is required".into()));
            }
            if let Some(e) = &s3.endpoint {
                let http = e.starts_with("http://");
                if !(http || e.starts_with("https://")) || reqwest::Url::parse(e).is_err() {
                    return Err(("s3.endpoint", "must be an http(s) URL".into()));
                }
                if http && !s3.allow_http {
                    return Err(("s3.endpoint", "is http://: set s3.allow_http".into()));
                }
            }
        }
        if self.max_items_per_batch == 0 || self.max_file_bytes == 0 {
            return Err(("max_items_per_batch", "limits must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_urls_are_checked() {
        let c = TasksConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.per_developer_concurrency, 16);
        let bad = TasksConfig {
            gateway_url: "127.0.0.1:8080".into(),
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "gateway_url");
        let bad = TasksConfig {
            gateway_url: "http://h:1/".into(),
            ..c
        };
        assert_eq!(bad.validate().unwrap_err().0, "gateway_url");
    }
}
