//! The gateway's YAML configuration: serde structs with documented defaults, loading, and
//! [`Config::check`], which checks every value once and keeps what it parsed ([`Checked`]: the
//! upstreams' URLs and credentials, prices, plans) for the routing table to be built from;
//! its errors name the file and the key path (`upstreams.openai.endpoints[1]`).
//!
//! `config/gateway.yaml` is the commented reference; every default below is repeated there.
//! Three sections live in files of their own: `control_plane:` ([`ControlPlaneConfig`], in
//! `config/control_plane.rs`), `batches:` ([`BatchesConfig`], in `config/batches.rs`), each
//! upstream ([`UpstreamConfig`], in `config/upstream.rs`, with routes' `timeouts:`) and its
//! `retry:` ([`RetryConfig`], in `config/retry.rs`).
//! Loading never touches the network: turning the config into live routes (DNS, peers) is
//! [`crate::routing`]'s job.
//!
//! Environment overrides, applied once by [`Config::load`]: `AIHUB_CLICKHOUSE_URL`,
//! `AIHUB_CLICKHOUSE_DATABASE`, `AIHUB_CLICKHOUSE_USER` (the `metering.clickhouse` fields, when
//! that section is present) and `AIHUB_DATABASE_URL` (sets `control_plane.database_url`,
//! creating the section with its defaults when the file has none; ignored when empty).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::keys::KeyTable;

/// Environment variable that sets `control_plane.database_url`.
pub const DATABASE_URL_ENV: &str = "AIHUB_DATABASE_URL";

pub use aihub_yamlconf::ConfigError;

mod batches;
mod control_plane;
mod keys;
mod listen;
mod retry;
mod upstream;

pub use batches::BatchesConfig;
pub use control_plane::ControlPlaneConfig;
pub use keys::{DeclaredKeys, KeyConfig};
pub use listen::Listen;
pub use retry::RetryConfig;
pub use upstream::{
    BaseUrl, DnsConfig, HealthCheckConfig, HealthConfig, TimeoutsConfig, TlsFiles, TlsMaterial,
    UpstreamConfig, UpstreamSpec,
};

/// The whole gateway configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Upstream providers by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Model routes: which upstream serves each model name clients send.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Declarative API keys (hashes only), for running without a control plane: each entry a
    /// [`KeyConfig`], kept as the key records it became ([`DeclaredKeys`]).
    #[serde(default)]
    pub keys: DeclaredKeys,
    /// Usage metering into ClickHouse. Absent: requests are not metered (logged as a warning).
    #[serde(default)]
    pub metering: Option<aihub_usage::PipelineConfig>,
    /// Prices by model. Default: the seed's table (USD per 1K tokens) and default price.
    #[serde(default)]
    pub pricing: aihub_usage::pricing::PricingConfig,
    /// Keys from the control-plane database, followed through its change feed. Absent: only
    /// the declarative `keys` (env `AIHUB_DATABASE_URL` creates it). Changes need a restart.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// Rate limits, token limits and plan quotas. Absent: nothing is limited.
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    /// Pricing of batch items. Default: `discount: 0.5`.
    #[serde(default)]
    pub batches: BatchesConfig,
}

/// How requests are limited (`limits:`). Changes need a restart, except the plans file, which
/// is re-read on reload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Plans file (see `config/plans.yaml`), relative to this file's directory. Default: the
    /// built-in plans (the shipped `config/plans.yaml`).
    #[serde(default)]
    pub plans_file: Option<PathBuf>,
    /// Completion tokens reserved for a request that names no `max_tokens`. Default 1024.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Shared limits across gateway nodes. Absent: each node limits alone.
    #[serde(default)]
    pub redis: Option<LimitsRedisConfig>,
}

/// Redis holding the limits every node shares.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRedisConfig {
    /// `redis://[:password@]host:port[/db]` (required). Holds a credential: never logged.
    pub url: String,
    /// Longest a request waits for Redis before deciding locally (and marking Redis down).
    /// Default 50ms.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Prefix of every Redis key. Default `aihub`.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// For a `rediss://` URL: a private CA and a client certificate (Redis asks TLS clients
    /// for one by default). Default: the system's roots, no client certificate.
    #[serde(default)]
    pub tls: aihub_net::tls::ClientTls,
}

impl std::fmt::Debug for LimitsRedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("LimitsRedisConfig")
            .field("url", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .finish()
    }
}

impl LimitsRedisConfig {
    /// The Redis to connect to (reads the TLS files; no network I/O).
    pub fn target(
        &self,
    ) -> Result<aihub_net::redis::RedisTarget, aihub_net::redis::RedisTargetError> {
        aihub_net::redis::RedisTarget::try_new(&self.url, &self.tls)
    }
}

impl LimitsConfig {
    /// The plans, from `plans_file` (relative to `config_file`'s directory) or built in.
    pub fn plans(&self, config_file: &Path) -> Result<aihub_plans::PlanCatalog, ConfigError> {
        match &self.plans_file {
            None => Ok(aihub_plans::PlanCatalog::builtin()),
            Some(p) => {
                let path = config_file
                    .parent()
                    .map_or_else(|| p.clone(), |dir| dir.join(p));
                aihub_plans::PlanCatalog::load(&path)
            }
        }
    }
}

/// Listeners and request handling. Listener and thread changes need a restart; the rest reloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Proxy listeners: `IP:PORT`, or `{addr, tls, http2, trusted_proxies}` (see [`Listen`]).
    /// Default `["127.0.0.1:8080"]`.
    #[serde(default = "default_listen")]
    pub listen: Vec<Listen>,
    /// Operations listener (`/metrics`, `/healthz`, `/readyz`). Default `127.0.0.1:9091`.
    #[serde(default = "default_ops_listen")]
    pub ops_listen: String,
    /// Worker threads of the proxy; 0 means one per CPU. Default 0.
    #[serde(default)]
    pub threads: usize,
    /// Largest request body accepted; 413 past it. Default 10 MiB.
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: usize,
    /// Time allowed to receive the whole request body; 408 past it. For uploads forwarded to
    /// the admin API (Files), the longest silence between two reads instead. Default 60s.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish (after `drain_delay`); the
    /// process exits earlier once none is in flight and usage is delivered. Default 30s.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace_period: Duration,
    /// On SIGTERM, how long to keep accepting requests after `/readyz` turned 503, so load
    /// balancers stop sending first. Default 0s.
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Duration,
    /// This process's pid, written at start; `--upgrade` reads it to find the running gateway.
    /// Default `$TMPDIR/aihub-gateway-<ops port>.pid`.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket the listening sockets are handed over on (`--upgrade`). Default
    /// `$TMPDIR/aihub-gateway-<ops port>.upgrade.sock`.
    #[serde(default)]
    pub upgrade_sock: Option<PathBuf>,
    /// Longest a single write to the client (the response header, a body chunk) may wait for
    /// the client to read. Past it the connection is dropped, the upstream connection is not
    /// reused, and the request is metered with what was delivered (`error_type` =
    /// `client_timeout`). Default 60s.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub response_write_timeout: Duration,
    /// Longest a request header may take to arrive whole, from its first byte (HTTP/1): past
    /// it the connection is closed (a client sending its header a byte at a time holds no
    /// socket for long). Needs a restart. Default 10s.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a client connection may stay open with no request in progress: from its start,
    /// or from the end of the previous response on a kept-alive connection, to the first byte
    /// of its next request (HTTP/1). Past it the connection is closed. Needs a restart.
    /// Default 60s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// Where the gateway keeps its pid and its upgrade socket by default: one pair per operations
/// port, so several gateways on one host never share them.
fn default_runtime_path(ops_listen: &str, what: &str) -> PathBuf {
    let port = ops_listen.rsplit(':').next().unwrap_or("0");
    std::env::temp_dir().join(format!("aihub-gateway-{port}.{what}"))
}

impl ServerConfig {
    /// `pid_file`, or its default.
    pub fn pid_file(&self) -> PathBuf {
        self.pid_file
            .clone()
            .unwrap_or_else(|| default_runtime_path(&self.ops_listen, "pid"))
    }

    /// `upgrade_sock`, or its default.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.upgrade_sock
            .clone()
            .unwrap_or_else(|| default_runtime_path(&self.ops_listen, "upgrade.sock"))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            ops_listen: default_ops_listen(),
            threads: 0,
            max_request_body_bytes: default_max_body(),
            request_body_timeout: default_body_timeout(),
            shutdown_grace_period: default_grace(),
            drain_delay: Duration::ZERO,
            pid_file: None,
            upgrade_sock: None,
            response_write_timeout: default_write_timeout(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// A model clients may name, and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The name clients send in `model`.
    pub model: String,
    /// Name of an entry of `upstreams`.
    pub upstream: String,
    /// Model name sent upstream instead (alias rewrite). Default: unchanged.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Other routes' models tried in order when this route's upstream fails before the first
    /// byte: its last answer (after its retries) has a retry status or a 5xx, or it cannot be
    /// reached or does not answer in time. The key must be allowed the fallback's model.
    /// Default none.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Error codes of a 4xx answer that also move on to the next fallback, e.g.
    /// `context_length_exceeded`, `content_policy_violation`. Default none.
    #[serde(default)]
    pub fallback_on: Vec<String>,
    /// Timeouts toward the upstream for this route's requests (connect, first byte, idle
    /// between stream events, total); each defaults to the upstream's.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
}

fn default_listen() -> Vec<Listen> {
    vec![Listen::plain("127.0.0.1:8080")]
}
fn default_ops_listen() -> String {
    "127.0.0.1:9091".into()
}
fn default_max_body() -> usize {
    10 * 1024 * 1024
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_tokens() -> u32 {
    1024
}
fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_redis_prefix() -> String {
    "aihub".into()
}
fn default_true() -> bool {
    true
}

/// A path of `upstreams.*.paths`: segments of letters, digits, `-`, `_` and `.` (no dot
/// segments), separated by single slashes, without the `/v1/` prefix.
fn check_api_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty");
    }
    if path.starts_with('/') || path.starts_with("v1/") {
        return Err("give the path after `/v1/`, without a leading slash");
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("empty or dot segment");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err("only letters, digits, `-`, `_` and `.` in a segment");
        }
    }
    Ok(())
}

impl Config {
    /// Reads, parses and checks a configuration file; applies the `AIHUB_CLICKHOUSE_*` and
    /// `AIHUB_DATABASE_URL` environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::load_checked(path)?.0)
    }

    /// [`Config::load`], keeping what checking parsed: the values the gateway runs on.
    pub fn load_checked(path: &Path) -> Result<(Config, Checked), ConfigError> {
        Config::load_checked_reusing(path, None)
    }

    /// [`Config::load_checked`] for a reload: unchanged keys keep their records in `served`
    /// (the declared keys' table in use), so a reload of a million keys builds only the
    /// changed ones and holds one copy of the rest.
    pub fn load_checked_reusing(
        path: &Path,
        served: Option<Arc<KeyTable>>,
    ) -> Result<(Config, Checked), ConfigError> {
        let cannot_read = |e| ConfigError::new(path, "", format!("cannot read the file: {e}"));
        let file = std::fs::File::open(path).map_err(cannot_read)?;
        let size = file.metadata().map_err(cannot_read)?.len();
        let reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut config = Config::read(reader, path, size, served)?;
        config.anchor_tls_files(path.parent().unwrap_or(Path::new("")));
        if let Some(m) = &mut config.metering {
            m.clickhouse = std::mem::take(&mut m.clickhouse).with_env_overrides();
        }
        config.apply_database_url(std::env::var(DATABASE_URL_ENV).ok());
        let checked = config.check(path)?;
        Ok((config, checked))
    }

    /// Makes the clients' TLS file paths relative to the configuration file's directory, as
    /// the upstreams' are.
    fn anchor_tls_files(&mut self, dir: &Path) {
        for l in &mut self.server.listen {
            l.anchor(dir);
        }
        if let Some(m) = &mut self.metering {
            m.clickhouse.tls.anchor(dir);
        }
        if let Some(r) = self.limits.as_mut().and_then(|l| l.redis.as_mut()) {
            r.tls.anchor(dir);
        }
        if let Some(cp) = &mut self.control_plane {
            cp.redis_tls.anchor(dir);
        }
    }

    /// Applies `AIHUB_DATABASE_URL`: sets `control_plane.database_url`, creating the section
    /// with its defaults when absent. `None` or empty changes nothing.
    pub fn apply_database_url(&mut self, url: Option<String>) {
        let Some(url) = url.filter(|u| !u.is_empty()) else {
            return;
        };
        match &mut self.control_plane {
            Some(cp) => cp.database_url = url,
            None => self.control_plane = Some(ControlPlaneConfig::with_url(url)),
        }
    }

    /// Parses YAML text; `file` is only used to name errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Config::from_reader(text.as_bytes(), file)
    }

    /// Parses YAML read from `reader`; `file` is only used to name errors. The `keys:` list is
    /// read one entry at a time, each turned into its key record at once (a file of a million
    /// keys is never held whole, nor any list of its entries: see `aihub_yamlconf::
    /// parse_streaming`); errors are the same as parsing the whole text.
    pub fn from_reader(reader: impl std::io::BufRead, file: &Path) -> Result<Config, ConfigError> {
        Config::read(reader, file, 0, None)
    }

    /// [`Config::from_reader`] of a document of `size` bytes (to size the key table), reusing
    /// the records of `previous` for unchanged keys.
    fn read(
        reader: impl std::io::BufRead,
        file: &Path,
        size: u64,
        previous: Option<Arc<KeyTable>>,
    ) -> Result<Config, ConfigError> {
        let room = usize::try_from(size / keys::MIN_ENTRY_BYTES).unwrap_or(usize::MAX);
        let mut keys = keys::KeysBuilder::new(room, previous);
        let (mut config, streamed) =
            aihub_yamlconf::parse_streaming::<Config, KeyConfig>(reader, file, "keys", |k| {
                keys.push(k)
            })?;
        if streamed {
            config.keys = keys.finish();
        }
        Ok(config)
    }

    /// Checks everything that can be checked without the network, parsing each value once
    /// into what the gateway runs on ([`Checked`]: upstream URLs and credentials, plans,
    /// prices). Reads the upstreams' credential variables; an optional upstream whose variable
    /// is unset is left out here (with its routes), once.
    pub fn check(&self, file: &Path) -> Result<Checked, ConfigError> {
        let err = |key: String, message: String| ConfigError {
            file: file.to_owned(),
            key,
            message,
        };
        let s = &self.server;
        if s.listen.is_empty() {
            return Err(err("server.listen".into(), "at least one listener".into()));
        }
        for (i, l) in s.listen.iter().enumerate() {
            l.socket_addr()
                .map_err(|e| err(format!("server.listen[{i}]"), e))?;
            if let Some(tls) = &l.tls {
                tls.load()
                    .map_err(|e| err(format!("server.listen[{i}].tls.{}", e.field), e.reason))?;
            }
        }
        s.ops_listen.parse::<SocketAddr>().map_err(|e| {
            err(
                "server.ops_listen".into(),
                format!("`{}`: {e}", s.ops_listen),
            )
        })?;
        for (key, d) in [
            ("server.response_write_timeout", s.response_write_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(err(key.into(), "must be positive".into()));
            }
        }
        if s.max_request_body_bytes == 0 {
            return Err(err(
                "server.max_request_body_bytes".into(),
                "must be positive".into(),
            ));
        }
        let mut upstreams = BTreeMap::new();
        for (name, up) in &self.upstreams {
            let spec = up
                .check(file)
                .map_err(|(key, message)| err(format!("upstreams.{name}.{key}"), message))?;
            match spec {
                Some(spec) => {
                    upstreams.insert(name.clone(), spec);
                }
                None => {
                    let var = up.api_key_env.as_deref().unwrap_or_default();
                    tracing::warn!(upstream = %name, env = %var, "credential variable unset; optional upstream and its routes left out");
                }
            }
        }
        let mut models = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.model.is_empty() {
                return Err(err(format!("routes[{i}].model"), "empty model name".into()));
            }
            if !models.insert(r.model.as_str()) {
                return Err(err(
                    format!("routes[{i}].model"),
                    format!("`{}` is routed twice", r.model),
                ));
            }
            if !self.upstreams.contains_key(&r.upstream) {
                return Err(err(
                    format!("routes[{i}].upstream"),
                    format!("no upstream named `{}`", r.upstream),
                ));
            }
            if r.upstream_model.as_deref() == Some("") {
                return Err(err(format!("routes[{i}].upstream_model"), "empty".into()));
            }
            r.timeouts
                .validate()
                .map_err(|(k, m)| err(format!("routes[{i}].timeouts.{k}"), m))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            let mut seen = HashSet::new();
            for (j, f) in r.fallbacks.iter().enumerate() {
                if f == &r.model || !models.contains(f.as_str()) || !seen.insert(f) {
                    return Err(err(
                        format!("routes[{i}].fallbacks[{j}]"),
                        format!("`{f}`: name another routed model, once"),
                    ));
                }
            }
        }
        if let Some(m) = &self.metering {
            m.validate().map_err(|(key, message)| err(key, message))?;
        }
        let pricing = aihub_usage::pricing::Pricing::from_config(&self.pricing)
            .map_err(|(key, message)| err(key, message))?;
        if let Some(e) = self.keys.error() {
            return Err(err(e.key.clone(), e.message.clone()));
        }
        let mut plans = None;
        if let Some(l) = &self.limits {
            let plans = plans.insert(l.plans(file)?);
            // In key order: the first key naming an unknown plan.
            if let Some((p, i)) = self
                .keys
                .plans()
                .find(|(p, _)| !plans.plans.contains_key(*p))
            {
                return Err(err(
                    format!("keys[{i}].plan"),
                    format!("no plan named `{p}` in the plans file"),
                ));
            }
            if l.default_max_tokens == 0 {
                return Err(err(
                    "limits.default_max_tokens".into(),
                    "must be positive".into(),
                ));
            }
            if let Some(r) = &l.redis {
                if let Err(e) = r.target() {
                    return Err(err(format!("limits.redis.{}", e.key()), e.message()));
                }
                if r.timeout.is_zero() {
                    return Err(err(
                        "limits.redis.timeout".into(),
                        "must be positive".into(),
                    ));
                }
                if r.prefix.is_empty() || r.prefix.contains(char::is_whitespace) {
                    return Err(err("limits.redis.prefix".into(), "a non-empty word".into()));
                }
            }
        } else if let Some((_, i)) = self.keys.plans().next() {
            return Err(err(
                format!("keys[{i}].plan"),
                "plans apply only with a `limits:` section".into(),
            ));
        }
        let admin_url = match &self.control_plane {
            Some(cp) => cp.validate().map_err(|(key, message)| err(key, message))?,
            None => None,
        };
        self.batches
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        Ok(Checked {
            upstreams,
            keys: self.keys.table(),
            plans: plans.unwrap_or_else(aihub_plans::PlanCatalog::builtin),
            pricing,
            admin_url,
        })
    }
}

/// A configuration's values parsed once by [`Config::check`], for the routing table and the
/// limits to be built from (nothing in it is parsed again).
#[derive(Debug)]
pub struct Checked {
    /// The upstreams in use, by name. An optional upstream whose credential variable is unset
    /// is not here, and the routes to it are left out.
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    /// The declared keys (`keys:`) as records, by hash (shared with [`Config::keys`]).
    pub keys: Arc<KeyTable>,
    /// From `limits.plans_file`, else built in.
    pub plans: aihub_plans::PlanCatalog,
    pub pricing: aihub_usage::pricing::Pricing,
    /// `control_plane.admin_url`, parsed.
    pub admin_url: Option<BaseUrl>,
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
