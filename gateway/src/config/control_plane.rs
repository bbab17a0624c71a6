//! The `control_plane:` section: where the control-plane keys come from and how closely they
//! are followed, and where the Files and Batches calls go (the admin API's internal routes).
//! Changes need a restart, except `admin_url` and `max_upload_bytes`, which a reload applies.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::BaseUrl;

/// Where the control-plane keys come from and how closely they are followed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `sqlite://PATH` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (required). Holds a
    /// credential: never logged. The admin API owns the schema; the gateway never migrates it.
    pub database_url: String,
    /// `redis://HOST[:PORT][/DB]`: change notices pushed on the `aihub:keys:changed` channel
    /// trigger an immediate poll. Default: none (poll only).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// For a `rediss://` `redis_url`: a private CA and a client certificate. Default: the
    /// system's roots, no client certificate.
    #[serde(default)]
    pub redis_tls: aihub_net::tls::ClientTls,
    /// How often the change feed is read while no Redis subscription is live. Default 250ms.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often the feed is read while the Redis subscription is live: a safety net for lost
    /// notices (pub/sub delivers at most once), so the 1 s propagation bound holds even then.
    /// Default 1s.
    #[serde(default = "default_push_poll_interval", with = "humantime_serde")]
    pub push_poll_interval: Duration,
    /// Database connections held by the gateway. Default 2.
    #[serde(default = "default_cp_connections")]
    pub max_connections: u32,
    /// How often last-used times of control-plane keys are written back. Default 10s.
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub last_used_flush_interval: Duration,
    /// File keeping a snapshot of the control-plane keys (hashes only), rewritten at most every
    /// 10 s after changes. A gateway that starts while the database is unreachable serves the
    /// snapshot's keys and follows the feed from its position once the database answers.
    /// Default: none (such a gateway stays not-ready until the database answers).
    #[serde(default)]
    pub snapshot_path: Option<PathBuf>,
    /// Base URL of the admin API (`http://HOST:PORT`) that serves the Files and Batches APIs:
    /// `/v1/files…` and `/v1/batches…` are authenticated here and forwarded to
    /// `{admin_url}/internal/v1/…` with the caller's identity signed by the internal secret.
    /// Default: none (those calls get 404 `unsupported_endpoint`).
    #[serde(default)]
    pub admin_url: Option<String>,
    /// Largest body forwarded to the admin API (file uploads); 413 past it. Default 200 MiB.
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_push_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_cp_connections() -> u32 {
    2
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_upload() -> u64 {
    200 * 1024 * 1024
}

impl ControlPlaneConfig {
    /// The section with its defaults around `database_url`.
    pub fn with_url(database_url: String) -> Self {
        ControlPlaneConfig {
            database_url,
            redis_url: None,
            redis_tls: aihub_net::tls::ClientTls::default(),
            poll_interval: default_poll_interval(),
            push_poll_interval: default_push_poll_interval(),
            max_connections: default_cp_connections(),
            last_used_flush_interval: default_flush_interval(),
            snapshot_path: None,
            admin_url: None,
            max_upload_bytes: default_max_upload(),
        }
    }

    /// Whether `other` differs in a setting that only a restart applies (everything but
    /// `admin_url` and `max_upload_bytes`).
    pub fn needs_restart_for(&self, other: &ControlPlaneConfig) -> bool {
        let reloadable = |c: &ControlPlaneConfig| ControlPlaneConfig {
            admin_url: None,
            max_upload_bytes: 0,
            ..c.clone()
        };
        reloadable(self) != reloadable(other)
    }

    /// The Redis carrying change notices, when `redis_url` is set (reads the TLS files; no
    /// network I/O).
    pub fn redis_target(
        &self,
    ) -> Option<Result<aihub_net::redis::RedisTarget, aihub_net::redis::RedisTargetError>> {
        self.redis_url
            .as_deref()
            .map(|url| aihub_net::redis::RedisTarget::try_new(url, &self.redis_tls))
    }

    /// Checks the section; errors carry the key path. URLs are never echoed (they may hold a
    /// password). Returns the parsed `admin_url`.
    pub(super) fn validate(&self) -> Result<Option<BaseUrl>, (String, String)> {
        let at = |k: &str| format!("control_plane.{k}");
        let url = self.database_url.as_str();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err((
                at("database_url"),
                "expected `sqlite://PATH` or `postgres://USER@HOST/DB`".into(),
            ));
        }
        if let Err(e) = self.redis_target().transpose() {
            let key = e.key();
            let key = match key.strip_prefix("tls") {
                Some(rest) => format!("redis_tls{rest}"),
                None => "redis_url".into(),
            };
            return Err((at(&key), e.message()));
        }
        for (key, d) in [
            ("poll_interval", self.poll_interval),
            ("push_poll_interval", self.push_poll_interval),
            ("last_used_flush_interval", self.last_used_flush_interval),
        ] {
            if d.is_zero() {
                return Err((at(key), "must be positive".into()));
            }
        }
        if self.max_connections == 0 {
            return Err((at("max_connections"), "must be positive".into()));
        }
        if self.max_upload_bytes == 0 {
            return Err((at("max_upload_bytes"), "must be positive".into()));
        }
        let admin = match &self.admin_url {
            None => None,
            Some(url) if super::upstream::has_userinfo(url) => {
                return Err((
                    at("admin_url"),
                    "credentials do not belong in this URL (the internal secret authenticates \
                     the gateway)"
                        .into(),
                ));
            }
            Some(url) => {
                let expected = |m: &str| {
                    (
                        at("admin_url"),
                        format!("expected `http://HOST:PORT` (the admin API's base URL): {m}"),
                    )
                };
                let base = BaseUrl::parse(url).map_err(|m| expected(&m))?;
                if !base.query.is_empty() {
                    return Err(expected("no query string"));
                }
                Some(base)
            }
        };
        Ok(admin)
    }
}
