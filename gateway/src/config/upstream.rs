//! An upstream's section of the configuration (`upstreams.NAME`) and a route's `timeouts:`:
//! endpoints, credential, timeouts, health (passive, active checks, slow start), DNS refresh,
//! TLS material (custom CA bundle, client certificate), and their checking into an
//! [`UpstreamSpec`] (URLs parsed, credential read from the environment, PEM files loaded).
//! Reloadable like the rest of the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora_core::tls::pkey::PKey;
use pingora_core::tls::x509::X509;
use pingora_core::utils::tls::CertKey;
use serde::Deserialize;

use super::{check_api_path, default_true, RetryConfig};

/// One upstream provider: one or more equivalent endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URLs, e.g. `https://api.openai.com/v1`. The client's path after `/v1` is appended.
    pub endpoints: Vec<String>,
    /// Environment variable holding the provider credential (never the credential itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Header carrying the credential. Default `authorization` (sent as `Bearer <value>`);
    /// any other header gets the bare value (e.g. Azure's `api-key`).
    #[serde(default = "default_auth_header")]
    pub api_key_header: String,
    /// When `api_key_env` is unset: `true` leaves this upstream and its routes out (with a
    /// warning), `false` (default) is a configuration error.
    #[serde(default)]
    pub optional: bool,
    /// TCP (and TLS) connect timeout per attempt. Default 5s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence while waiting for the response header or between body reads; 504 before
    /// the header. Default 300s (long generations stream slowly). A route's `timeouts:` may
    /// set the two apart.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Idle upstream connections are kept this long for reuse. Default 60s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Verify upstream TLS certificates. Default true.
    #[serde(default = "default_true")]
    pub verify_tls: bool,
    /// For streams whose client did not ask for usage, add `stream_options.include_usage` so
    /// the upstream reports exact tokens (the extra chunk is hidden from the client). Turn off
    /// for OpenAI-compatible upstreams that reject `stream_options`; their streams are then
    /// metered by estimate unless the client asks for usage. Default true.
    #[serde(default = "default_true")]
    pub inject_stream_usage: bool,
    /// Pass account-identifying headers through: the client's `OpenAI-Organization` and
    /// `OpenAI-Project` upstream (with the platform's credential they would choose which of the
    /// platform's organizations and projects pays), and the upstream's `openai-organization`,
    /// `openai-project` and `anthropic-organization-id` back to the client (they name the
    /// platform's provider account). Default false: stripped both ways.
    #[serde(default)]
    pub forward_account_headers: bool,
    /// Paths after `/v1/` this upstream serves with `POST` (exact, e.g. `chat/completions`).
    /// Default: the paths whose usage the gateway reads exactly: `chat/completions`,
    /// `completions`, `embeddings`, `responses`, `messages`. Any other path listed here is
    /// forwarded and metered by estimate (`usage_estimated = 1`); a path no upstream lists gets
    /// 404 `unsupported_endpoint`.
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    /// How requests spread over `endpoints`: `round_robin` (in proportion to `weights`),
    /// `least_in_flight`, `latency` (two random endpoints, the lower moving average of the time
    /// to the response header times the requests in flight). Default round_robin.
    #[serde(default)]
    pub balance: crate::balance::Strategy,
    /// Relative share of each endpoint for `round_robin` (same order and length as
    /// `endpoints`, 1 to 1000 each). Default all equal.
    #[serde(default)]
    pub weights: Vec<u32>,
    /// Headers sent with every request to this upstream, replacing the client's of the same
    /// name, e.g. `anthropic-version: "2023-06-01"`. Never a credential (use `api_key_env`).
    /// Default none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// TLS material for `https` endpoints. Default: the system's CA certificates, no client
    /// certificate.
    #[serde(default)]
    pub tls: TlsFiles,
    /// Name resolution of the endpoints' hosts.
    #[serde(default)]
    pub dns: DnsConfig,
}

/// Health of each endpoint: passive (failures of real requests), optional active checks, and a
/// slow start for an endpoint coming back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures of real requests (connect errors, timeouts, 5xx answers) before the
    /// endpoint is skipped. Default 3.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long an endpoint is skipped after `failures`. Default 10s.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// After being skipped or ejected, an endpoint's share of new requests grows from a tenth
    /// to all of it over this time (0s: at once). Default 10s.
    #[serde(default = "default_slow_start", with = "humantime_serde")]
    pub slow_start: Duration,
    /// Active checks: a request sent to every endpoint each `interval`. Default none.
    #[serde(default)]
    pub check: Option<HealthCheckConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failures: default_failures(),
            cooldown: default_cooldown(),
            slow_start: default_slow_start(),
            check: None,
        }
    }
}

/// An active health check: `method path` under each endpoint's base URL (with the upstream's
/// credential, headers and base query, like a client request).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path after the base URL. Default `/models` (free at every OpenAI-compatible provider).
    #[serde(default = "default_check_path")]
    pub path: String,
    /// `GET` or `POST`. Default GET.
    #[serde(default = "default_check_method")]
    pub method: String,
    /// JSON body of a `POST` check (e.g. a one-token completion). Default none.
    #[serde(default)]
    pub body: Option<String>,
    /// Time between two checks of an endpoint. Default 10s.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A check not answered within this time fails. Default 5s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Statuses that pass. Default: any 2xx.
    #[serde(default)]
    pub expect_status: Vec<u16>,
    /// Consecutive failed checks that eject an endpoint. Default 2.
    #[serde(default = "default_two")]
    pub unhealthy: u32,
    /// Consecutive passed checks that return an ejected endpoint. Default 2.
    #[serde(default = "default_two")]
    pub healthy: u32,
}

impl HealthCheckConfig {
    /// Whether a check answered with `status` passes.
    pub fn passes(&self, status: u16) -> bool {
        if self.expect_status.is_empty() {
            (200..300).contains(&status)
        } else {
            self.expect_status.contains(&status)
        }
    }
}

/// PEM files for TLS to this upstream's `https` endpoints, relative to the configuration
/// file's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificates trusted for this upstream instead of the system's (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Certificate chain (leaf first) presented to the upstream (mutual TLS); needs
    /// `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// How the endpoints' host names are resolved: every address is used, and names are resolved
/// again every `refresh` by the system resolver (`/etc/hosts`, DNS); a failed resolution keeps
/// the addresses known.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Time between two resolutions of a host name (0s: resolved once, at load). Default 30s.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            refresh: default_dns_refresh(),
        }
    }
}

/// A route's timeouts toward its upstream (`routes[].timeouts`); each defaults to the
/// upstream's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP and TLS connect, per attempt. Default the upstream's `connect_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub connect: Option<Duration>,
    /// From the request sent to the response header, per attempt (retried when
    /// `retry.on_timeout`). Default the upstream's `read_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub first_byte: Option<Duration>,
    /// Longest silence between two body reads (stream events). Default the upstream's
    /// `read_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub idle: Option<Duration>,
    /// Whole exchange, retries and the streamed body included: past it the request ends (504
    /// before the header; a stream is cut, metered with what was delivered). Default none.
    #[serde(default, with = "humantime_serde")]
    pub total: Option<Duration>,
}

impl TimeoutsConfig {
    /// Checks the section; errors carry the key after `timeouts.`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        for (key, value) in [
            ("connect", self.connect),
            ("first_byte", self.first_byte),
            ("idle", self.idle),
            ("total", self.total),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err((key.into(), "must be positive".into()));
            }
        }
        Ok(())
    }
}

fn default_auth_header() -> String {
    "authorization".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_failures() -> u32 {
    3
}
fn default_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_slow_start() -> Duration {
    Duration::from_secs(10)
}
fn default_check_path() -> String {
    "/models".into()
}
fn default_check_method() -> String {
    "GET".into()
}
fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_two() -> u32 {
    2
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_paths() -> Vec<String> {
    crate::api::Api::METERED_PATHS
        .iter()
        .map(|p| (*p).to_owned())
        .collect()
}

/// An upstream in use, its URLs, credential and TLS files parsed.
#[derive(Debug)]
pub struct UpstreamSpec {
    /// Each endpoint: the base URL as configured, and parsed.
    pub endpoints: Vec<(String, BaseUrl)>,
    /// The credential header and its value (marked sensitive), when `api_key_env` is set.
    pub auth: Option<(http::HeaderName, http::HeaderValue)>,
    /// The PEM files of `tls:`, loaded.
    pub tls: TlsMaterial,
    /// The rest of the upstream's settings, as configured.
    pub settings: UpstreamConfig,
}

/// `tls:` loaded: what the connector needs for each connection.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// Trusted CA certificates (replacing the system's).
    pub ca: Option<Arc<Box<[X509]>>>,
    /// Client certificate chain and key.
    pub client: Option<Arc<CertKey>>,
    /// Tells connections made with different files apart in the connection pool (0: none).
    pub digest: u64,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_certificates", &self.ca.as_ref().map_or(0, |c| c.len()))
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl TlsFiles {
    /// Reads and parses the files; `dir` is the configuration file's directory. Errors carry
    /// the key after `tls.` and say what is wrong, never the key material.
    fn load(&self, dir: &Path) -> Result<TlsMaterial, (String, String)> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let read = |key: &str, path: &Path| {
            let path = dir.join(path);
            std::fs::read(&path).map_err(|e| {
                (
                    key.to_owned(),
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        let mut material = TlsMaterial::default();
        if let Some(path) = &self.ca_file {
            let pem = read("ca_file", path)?;
            pem.hash(&mut hasher);
            let certs = X509::stack_from_pem(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ("ca_file".to_owned(), "no PEM certificate in it".to_owned()))?;
            material.ca = Some(Arc::new(certs.into_boxed_slice()));
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let pem = read("client_cert_file", cert)?;
                pem.hash(&mut hasher);
                let chain = X509::stack_from_pem(&pem)
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| {
                        (
                            "client_cert_file".to_owned(),
                            "no PEM certificate in it".to_owned(),
                        )
                    })?;
                let key_pem = read("client_key_file", key)?;
                key_pem.hash(&mut hasher);
                let key = PKey::private_key_from_pem(&key_pem).map_err(|_| {
                    (
                        "client_key_file".to_owned(),
                        "not a PEM private key".to_owned(),
                    )
                })?;
                let matches = chain[0]
                    .public_key()
                    .is_ok_and(|public| public.public_eq(&key));
                if !matches {
                    return Err((
                        "client_key_file".into(),
                        "does not match the first certificate of client_cert_file".into(),
                    ));
                }
                material.client = Some(Arc::new(CertKey::new(chain, key)));
            }
            (Some(_), None) => {
                return Err((
                    "client_key_file".into(),
                    "needed with client_cert_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    "client_cert_file".into(),
                    "needed with client_key_file".into(),
                ))
            }
        }
        if material.ca.is_some() || material.client.is_some() {
            material.digest = hasher.finish().max(1);
        }
        Ok(material)
    }
}

impl UpstreamConfig {
    /// Checks this upstream, parsing what the routing table needs; `file` is the configuration
    /// file (TLS files are relative to its directory). `Ok(None)`: an optional upstream whose
    /// credential variable is unset, to be left out. Errors carry the key after
    /// `upstreams.NAME.`.
    pub(super) fn check(&self, file: &Path) -> Result<Option<UpstreamSpec>, (String, String)> {
        let err = |key: &str, message: String| Err((key.to_owned(), message));
        if self.endpoints.is_empty() {
            return err("endpoints", "at least one endpoint".into());
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, url) in self.endpoints.iter().enumerate() {
            if has_userinfo(url) {
                // Not echoed: the URL holds a credential.
                return err(
                    &format!("endpoints[{i}]"),
                    "credentials do not belong in a URL (they would show in metrics and logs): \
                     use api_key_env"
                        .into(),
                );
            }
            let base = BaseUrl::parse(url)
                .map_err(|m| (format!("endpoints[{i}]"), format!("`{url}`: {m}")))?;
            endpoints.push((url.clone(), base));
        }
        // `None`: an optional upstream whose credential is unset, left out.
        let secret = match &self.api_key_env {
            None => Some(None),
            Some(var) if var.is_empty() => return err("api_key_env", "empty".into()),
            Some(var) => match std::env::var_os(var) {
                Some(value) => Some(Some((var, value))),
                None if self.optional => None,
                None => {
                    return err(
                        "api_key_env",
                        format!("environment variable `{var}` is not set (set `optional: true` to skip this upstream when it is absent)"),
                    );
                }
            },
        };
        let header =
            http::HeaderName::try_from(self.api_key_header.to_ascii_lowercase()).map_err(|_| {
                (
                    "api_key_header".to_owned(),
                    "not a valid header name".to_owned(),
                )
            })?;
        self.check_health()?;
        for (i, path) in self.paths.iter().enumerate() {
            if let Err(m) = check_api_path(path) {
                return err(&format!("paths[{i}]"), format!("`{path}`: {m}"));
            }
        }
        self.retry
            .validate()
            .map_err(|(k, m)| (format!("retry.{k}"), m))?;
        if !self.weights.is_empty()
            && (self.weights.len() != self.endpoints.len()
                || self.weights.iter().any(|w| !(1..=1000).contains(w)))
        {
            return err("weights", "one weight per endpoint, each 1 to 1000".into());
        }
        for (name, value) in &self.headers {
            let valid = http::HeaderName::try_from(name.to_ascii_lowercase()).is_ok()
                && http::HeaderValue::try_from(value.as_str()).is_ok();
            let credential = matches!(
                name.to_ascii_lowercase().as_str(),
                "authorization"
                    | "x-api-key"
                    | "api-key"
                    | "host"
                    | "content-length"
                    | "transfer-encoding"
            );
            if !valid || credential {
                return err(
                    &format!("headers.{name}"),
                    "not a header the gateway may set (credentials go in api_key_env)".into(),
                );
            }
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        let tls = self
            .tls
            .load(dir)
            .map_err(|(k, m)| (format!("tls.{k}"), m))?;
        let auth = match secret {
            None => return Ok(None),
            Some(None) => None,
            Some(Some((var, value))) => {
                Some(credential(header, var, value).map_err(|m| ("api_key_env".to_owned(), m))?)
            }
        };
        Ok(Some(UpstreamSpec {
            endpoints,
            auth,
            tls,
            settings: self.clone(),
        }))
    }

    fn check_health(&self) -> Result<(), (String, String)> {
        let h = &self.health;
        if h.failures == 0 {
            return Err(("health.failures".into(), "must be positive".into()));
        }
        let Some(c) = &h.check else { return Ok(()) };
        let at = |k: &str| format!("health.check.{k}");
        if !c.path.starts_with('/') || c.path.contains(['?', '#', ' ']) {
            return Err((at("path"), "a path starting with `/`, no query".into()));
        }
        if !matches!(c.method.as_str(), "GET" | "POST") {
            return Err((at("method"), "GET or POST".into()));
        }
        if c.body.is_some() && c.method != "POST" {
            return Err((at("body"), "only with `method: POST`".into()));
        }
        if c.interval < Duration::from_millis(100) {
            return Err((at("interval"), "at least 100ms".into()));
        }
        if c.timeout.is_zero() {
            return Err((at("timeout"), "must be positive".into()));
        }
        if let Some(s) = c.expect_status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err((at("expect_status"), format!("`{s}` is not a status")));
        }
        if c.unhealthy == 0 || c.healthy == 0 {
            let key = if c.unhealthy == 0 {
                "unhealthy"
            } else {
                "healthy"
            };
            return Err((at(key), "must be positive".into()));
        }
        Ok(())
    }
}

/// The credential header of an upstream: `Bearer <value>` in `authorization`, the bare value in
/// any other header.
fn credential(
    header: http::HeaderName,
    var: &str,
    value: std::ffi::OsString,
) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let secret = value
        .into_string()
        .map_err(|_| format!("`{var}` is not set or not UTF-8"))?;
    let value = if header == http::header::AUTHORIZATION {
        format!("Bearer {secret}")
    } else {
        secret
    };
    let mut value = http::HeaderValue::from_str(&value)
        .map_err(|_| format!("`{var}` holds characters not allowed in a header"))?;
    value.set_sensitive(true);
    Ok((header, value))
}

/// A parsed upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash, e.g. `/v1`; may be empty.
    pub path: String,
    /// Query string sent with every request, before the client's (Azure OpenAI's
    /// `api-version=…`); may be empty.
    pub query: String,
}

/// Whether a URL carries `user[:password]@` before its host.
pub(super) fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        if has_userinfo(url) {
            return Err("credentials do not belong in a URL: use api_key_env".into());
        }
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("the scheme must be http or https".into()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
        let query = uri.query().unwrap_or("").to_owned();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path().trim_end_matches('/').to_owned();
        Ok(BaseUrl {
            tls,
            host,
            port,
            path,
            query,
        })
    }
}
