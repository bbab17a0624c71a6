//! The admin API's YAML configuration (`config/admin.yaml` is the commented reference): serde
//! structs with documented defaults, environment overrides, and `validate()` whose errors name
//! the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use aihub_billing::BillingConfig;
pub use aihub_usage::sink::ClickHouseConfig;

pub use aihub_yamlconf::ConfigError;

mod server;
pub use server::ServerConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address. Default `127.0.0.1:8081`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long the listener waits for a client's request header and body (slow clients).
    #[serde(default)]
    pub server: ServerConfig,
    /// Base URL of the portal, used in links sent by email. Default `http://127.0.0.1:8081`.
    #[serde(default = "default_public_url")]
    pub public_url: String,
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Redis, to push key changes to gateways at once. Absent: gateways poll. Env
    /// `AIHUB_REDIS_URL` overrides.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub email: EmailConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    /// The plans file (`config/plans.yaml` is the reference): the plans operators may assign,
    /// the one new accounts get, and the limits and prices shown. Relative to this file's
    /// directory. Absent: the built-in plans (the shipped `config/plans.yaml`).
    #[serde(default)]
    pub plans_file: Option<PathBuf>,
    /// The plans themselves: read from `plans_file` once, by [`AdminConfig::load`] (the
    /// built-in plans otherwise).
    #[serde(skip, default = "aihub_plans::PlanCatalog::builtin")]
    pub plans: aihub_plans::PlanCatalog,
    /// The operator account created (or promoted) at start. Env `AIHUB_ADMIN_EMAIL` and
    /// `AIHUB_ADMIN_PASSWORD` override. Absent: no bootstrap.
    #[serde(default)]
    pub bootstrap_admin: Option<BootstrapAdmin>,
    /// The usage database the gateways write (same settings as the gateway's
    /// `metering.clickhouse`), read for usage, analytics and billing. `AIHUB_CLICKHOUSE_*`
    /// override. Absent: those endpoints answer 503 `usage_unavailable`.
    #[serde(default)]
    pub clickhouse: Option<ClickHouseConfig>,
    /// Invoice generation (see `docs/billing.md`).
    #[serde(default)]
    pub billing: BillingConfig,
    /// The web developer portal under `/portal`.
    #[serde(default)]
    pub portal: PortalConfig,
    /// Webhook delivery (`docs/webhooks.md`).
    #[serde(default)]
    pub webhooks: aihub_webhooks::WebhooksConfig,
    /// Files, OpenAI batches and async tasks (`docs/batches.md`).
    #[serde(default)]
    pub tasks: aihub_tasks::TasksConfig,
}

/// The web developer portal (`/portal`): cookie settings and what its pages tell developers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// Serve the portal. Default `true`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Mark the session and CSRF cookies `Secure` (sent over HTTPS only). Default `true`; set
    /// `false` only for a portal reached over plain http (local development).
    #[serde(default = "default_true")]
    pub secure_cookie: bool,
    /// The gateway's base URL as developers must use it (the quick-start, the docs).
    /// Default `http://127.0.0.1:8080/v1`.
    #[serde(default = "default_gateway_url")]
    pub gateway_url: String,
    /// The model the portal's first-call examples name. Default `gpt-4o-mini`.
    #[serde(default = "default_example_model")]
    pub example_model: String,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            enabled: true,
            secure_cookie: true,
            gateway_url: default_gateway_url(),
            example_model: default_example_model(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_example_model() -> String {
    "gpt-4o-mini".into()
}
fn default_gateway_url() -> String {
    "http://127.0.0.1:8080/v1".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created when missing) or `postgres://USER@HOST/DB`. Default
    /// `sqlite://data/aihub.db`. Env `AIHUB_DATABASE_URL` overrides.
    #[serde(default = "default_db_url")]
    pub url: String,
    /// Pool size. Default 16.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: default_db_url(),
            max_connections: default_max_connections(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// e.g. `redis://127.0.0.1:6379`, or `rediss://` for TLS.
    pub url: String,
    /// For `rediss://`: a private CA and a client certificate. Default: the system's roots, no
    /// client certificate.
    #[serde(default)]
    pub tls: aihub_net::tls::ClientTls,
}

impl RedisConfig {
    /// The Redis to publish to (reads the TLS files; no network I/O).
    pub fn target(
        &self,
    ) -> Result<aihub_net::redis::RedisTarget, aihub_net::redis::RedisTargetError> {
        aihub_net::redis::RedisTarget::try_new(&self.url, &self.tls)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Environment variable holding the JWT signing secret (≥ 32 bytes). Absent or unset: a
    /// random secret is generated once and kept in the database, shared by every admin node.
    #[serde(default)]
    pub jwt_secret_env: Option<String>,
    /// Lifetime of a login (JWT and its session). Default 12h.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Lifetime of an email verification link. Default 24h.
    #[serde(default = "default_verify_ttl", with = "humantime_serde")]
    pub verify_token_ttl: Duration,
    /// Lifetime of a password reset link. Default 1h.
    #[serde(default = "default_reset_ttl", with = "humantime_serde")]
    pub reset_token_ttl: Duration,
    /// Login attempts allowed per account per minute (then 429). Default 5.
    #[serde(default = "default_per_account")]
    pub login_attempts_per_account_per_minute: u32,
    /// Login, registration and reset requests allowed per client IP per minute. Default 30.
    #[serde(default = "default_per_ip")]
    pub attempts_per_ip_per_minute: u32,
    /// Argon2id memory cost in KiB. Default 19456 (OWASP's minimum recommendation).
    #[serde(default = "default_argon_memory")]
    pub argon2_memory_kib: u32,
    /// Argon2id passes. Default 2.
    #[serde(default = "default_argon_iterations")]
    pub argon2_iterations: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret_env: None,
            access_token_ttl: default_token_ttl(),
            verify_token_ttl: default_verify_ttl(),
            reset_token_ttl: default_reset_ttl(),
            login_attempts_per_account_per_minute: default_per_account(),
            attempts_per_ip_per_minute: default_per_ip(),
            argon2_memory_kib: default_argon_memory(),
            argon2_iterations: default_argon_iterations(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Sender. Default `AI Hub <no-reply@aihub.local>`.
    #[serde(default = "default_from")]
    pub from: String,
    /// Default: `file` into `data/mail`.
    #[serde(default)]
    pub transport: EmailTransport,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            from: default_from(),
            transport: EmailTransport::default(),
        }
    }
}

/// Where mail goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
pub enum EmailTransport {
    /// Each message is written as `<id>.eml` into `dir` (development and tests).
    File { dir: PathBuf },
    /// An SMTP relay.
    Smtp {
        host: String,
        /// Default: 587 with `starttls`, 465 with `tls`, 25 with `none`.
        #[serde(default)]
        port: Option<u16>,
        /// `starttls` (default), `tls` (implicit TLS) or `none` (local relays only).
        #[serde(default = "default_smtp_security")]
        security: String,
        /// With `starttls` or `tls`: a private CA and a client certificate. Default: the
        /// system's roots, no client certificate.
        #[serde(default)]
        tls: aihub_net::tls::ClientTls,
        #[serde(default)]
        username: Option<String>,
        /// Environment variable holding the SMTP password.
        #[serde(default)]
        password_env: Option<String>,
    },
}

impl Default for EmailTransport {
    fn default() -> Self {
        EmailTransport::File {
            dir: PathBuf::from("data/mail"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Lifetime of a new key when the request names none, e.g. `365d`, or `never`.
    /// Default `365d`.
    #[serde(default = "default_key_expiry")]
    pub default_expiry: KeyExpiry,
    /// Keys (not revoked) a developer may hold. Default 100.
    #[serde(default = "default_max_keys")]
    pub max_per_developer: i64,
    /// Longest grace period a rotation may give the old key. Default 7d.
    #[serde(default = "default_max_grace", with = "humantime_serde")]
    pub max_rotation_grace: Duration,
    /// The latest expiry a key may be given, from now: at creation (`expires_in_days`, the
    /// default expiry) and on update (`expires_at`). At least 1d. Default 3650d.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Whether a key may have no expiry (`never_expires` at creation, `expires_at: null` on
    /// update). Default true; `false`: every key expires within `max_lifetime`.
    #[serde(default = "default_true")]
    pub allow_never_expires: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            default_expiry: default_key_expiry(),
            max_per_developer: default_max_keys(),
            max_rotation_grace: default_max_grace(),
            max_lifetime: default_max_lifetime(),
            allow_never_expires: true,
        }
    }
}

impl KeysConfig {
    /// The rules the service layer enforces.
    pub fn rules(&self) -> aihub_control::KeyRules {
        aihub_control::KeyRules {
            default_lifetime: self.default_expiry.lifetime(),
            max_per_developer: self.max_per_developer,
            max_rotation_grace: self.max_rotation_grace,
            max_lifetime: self.max_lifetime,
            allow_never_expires: self.allow_never_expires,
        }
    }
}

/// A key lifetime as configured: `never`, or a duration such as `365d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyExpiry {
    Never,
    After(Duration),
}

impl KeyExpiry {
    /// The lifetime; `None` = never expires.
    pub fn lifetime(self) -> Option<Duration> {
        match self {
            KeyExpiry::Never => None,
            KeyExpiry::After(d) => Some(d),
        }
    }
}

impl std::fmt::Display for KeyExpiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyExpiry::Never => f.write_str("never"),
            KeyExpiry::After(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for KeyExpiry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyExpiry, D::Error> {
        let text = String::deserialize(d)?;
        if text == "never" {
            return Ok(KeyExpiry::Never);
        }
        humantime::parse_duration(&text)
            .map(KeyExpiry::After)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{text}`: expected a duration such as 365d, or never"
                ))
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapAdmin {
    pub email: String,
    /// Environment variable holding the password. Default `AIHUB_ADMIN_PASSWORD`.
    #[serde(default = "default_admin_password_env")]
    pub password_env: String,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_public_url() -> String {
    "http://127.0.0.1:8081".into()
}
fn default_db_url() -> String {
    "sqlite://data/aihub.db".into()
}
fn default_max_connections() -> u32 {
    16
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_verify_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_reset_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_per_account() -> u32 {
    5
}
fn default_per_ip() -> u32 {
    30
}
fn default_argon_memory() -> u32 {
    19 * 1024
}
fn default_argon_iterations() -> u32 {
    2
}
fn default_from() -> String {
    "AI Hub <no-reply@aihub.local>".into()
}
fn default_smtp_security() -> String {
    "starttls".into()
}
fn default_key_expiry() -> KeyExpiry {
    KeyExpiry::After(Duration::from_secs(365 * 86_400))
}
fn default_max_keys() -> i64 {
    100
}
fn default_max_grace() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(3650 * 86_400)
}
/// The longest `keys.max_lifetime` accepted (keeps expiry arithmetic far from overflow).
const LONGEST_LIFETIME: Duration = Duration::from_secs(36_500 * 86_400);
fn default_admin_password_env() -> String {
    "AIHUB_ADMIN_PASSWORD".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig::parse("{}", Path::new("<defaults>")).expect("defaults parse")
    }
}

impl AdminConfig {
    /// The service layer's rules (`keys`, `auth` token lifetimes, the default plan of
    /// `plans`).
    pub fn control(&self, plans: &aihub_plans::PlanCatalog) -> aihub_control::Config {
        aihub_control::Config {
            keys: self.keys.rules(),
            accounts: aihub_control::accounts::AccountRules {
                verify_token_ttl: self.auth.verify_token_ttl,
                reset_token_ttl: self.auth.reset_token_ttl,
            },
            plans: plans.clone(),
            webhooks: aihub_control::webhooks::WebhookRules {
                allow_http: self.webhooks.allow_http,
                policy: self.webhooks.policy(),
                max_endpoints: self.webhooks.max_endpoints_per_developer,
                secret_grace: self.webhooks.secret_grace,
                max_retries: self.webhooks.max_retries(),
            },
            tasks: self.tasks.clone(),
        }
    }

    /// Reads, applies environment overrides, reads the plans from `plans_file` (relative to
    /// the file's directory), validates.
    pub fn load(path: &Path) -> Result<AdminConfig, ConfigError> {
        let mut config = AdminConfig::parse(&aihub_yamlconf::read(path)?, path)?;
        let dir = path.parent().unwrap_or(Path::new(""));
        if let Some(p) = &config.plans_file {
            if p.is_relative() {
                config.plans_file = Some(dir.join(p));
            }
        }
        config.anchor_tls_files(dir);
        if let Some(p) = &config.plans_file {
            config.plans = aihub_plans::PlanCatalog::load(p)?;
        }
        config.apply_env();
        config.validate(path)?;
        Ok(config)
    }

    /// Makes the clients' TLS file paths relative to the configuration file's directory.
    fn anchor_tls_files(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.server.tls {
            tls.anchor(dir);
        }
        if let Some(ch) = &mut self.clickhouse {
            ch.tls.anchor(dir);
        }
        if let Some(r) = &mut self.redis {
            r.tls.anchor(dir);
        }
        if let EmailTransport::Smtp { tls, .. } = &mut self.email.transport {
            tls.anchor(dir);
        }
        self.tasks.gateway_tls.anchor(dir);
    }

    /// Parses YAML text; `file` is only used to name errors.
    pub fn parse(text: &str, file: &Path) -> Result<AdminConfig, ConfigError> {
        aihub_yamlconf::parse(text, file)
    }

    /// `AIHUB_DATABASE_URL`, `AIHUB_REDIS_URL`, `AIHUB_ADMIN_EMAIL` and (when a `clickhouse`
    /// section is present) `AIHUB_CLICKHOUSE_*` override the file.
    pub fn apply_env(&mut self) {
        if let Ok(url) = std::env::var("AIHUB_DATABASE_URL") {
            self.database.url = url;
        }
        if let Ok(url) = std::env::var("AIHUB_REDIS_URL") {
            self.redis = (!url.is_empty()).then(|| RedisConfig {
                url,
                tls: self.redis.take().map(|r| r.tls).unwrap_or_default(),
            });
        }
        if let Some(ch) = self.clickhouse.take() {
            self.clickhouse = Some(ch.with_env_overrides());
        }
        if let Ok(email) = std::env::var("AIHUB_ADMIN_EMAIL") {
            let password_env = self
                .bootstrap_admin
                .take()
                .map(|b| b.password_env)
                .unwrap_or_else(default_admin_password_env);
            self.bootstrap_admin = Some(BootstrapAdmin {
                email,
                password_env,
            });
        }
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return Err(err(
                "public_url",
                "must start with http:// or https://".into(),
            ));
        }
        if !(self.portal.gateway_url.starts_with("http://")
            || self.portal.gateway_url.starts_with("https://"))
        {
            return Err(err(
                "portal.gateway_url",
                "must start with http:// or https://".into(),
            ));
        }
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(err(
                "database.url",
                "expected sqlite://PATH or postgres://…".into(),
            ));
        }
        let srv = &self.server;
        for (key, d) in [
            ("server.header_read_timeout", srv.header_read_timeout),
            ("server.body_read_timeout", srv.body_read_timeout),
            ("server.response_write_timeout", srv.response_write_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err(err(key, "must be between 100ms and 1h".into()));
            }
        }
        if srv.proxy_protocol && srv.trusted_proxies.is_empty() {
            return Err(err(
                "server.proxy_protocol",
                "needs server.trusted_proxies: only a trusted proxy may name the client".into(),
            ));
        }
        if let Some(tls) = &srv.tls {
            tls.load()
                .map_err(|e| err(&format!("server.tls.{}", e.field), e.reason))?;
        }
        if srv.max_body_bytes < 1024 {
            return Err(err("server.max_body_bytes", "must be at least 1024".into()));
        }
        if self.database.max_connections == 0 {
            return Err(err("database.max_connections", "must be at least 1".into()));
        }
        if let Some(ch) = &self.clickhouse {
            ch.validate()
                .map_err(|(key, message)| err(&format!("clickhouse.{key}"), message))?;
        }
        self.billing
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        self.webhooks
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        self.tasks
            .validate()
            .map_err(|(key, message)| err(&format!("tasks.{key}"), message))?;
        if let Some(r) = &self.redis {
            if let Err(e) = r.target() {
                return Err(err(&format!("redis.{}", e.key()), e.message()));
            }
        }
        let a = &self.auth;
        if a.access_token_ttl < Duration::from_secs(60) {
            return Err(err("auth.access_token_ttl", "must be at least 1m".into()));
        }
        if a.login_attempts_per_account_per_minute == 0 || a.attempts_per_ip_per_minute == 0 {
            return Err(err("auth", "attempt limits must be at least 1".into()));
        }
        if a.argon2_memory_kib < 8 * 1024 || a.argon2_iterations == 0 {
            return Err(err(
                "auth.argon2_memory_kib",
                "argon2 needs at least 8192 KiB and 1 pass".into(),
            ));
        }
        if let EmailTransport::Smtp { security, tls, .. } = &self.email.transport {
            if security == "none" && !tls.is_default() {
                return Err(err(
                    "email.transport.tls",
                    "set, but `security` is `none`".into(),
                ));
            }
            if let Err(e) = tls.load() {
                return Err(err(&format!("email.transport.tls.{}", e.field), e.reason));
            }
            if !["starttls", "tls", "none"].contains(&security.as_str()) {
                return Err(err(
                    "email.transport.security",
                    format!("`{security}`: expected starttls, tls or none"),
                ));
            }
        }
        if self.email.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(err(
                "email.from",
                format!("`{}` is not a mailbox", self.email.from),
            ));
        }
        let max = self.keys.max_lifetime;
        if max < Duration::from_secs(86_400) || max > LONGEST_LIFETIME {
            return Err(err(
                "keys.max_lifetime",
                "must be at least 1d and at most 36500d".into(),
            ));
        }
        match self.keys.default_expiry.lifetime() {
            Some(d) if d > max => {
                return Err(err(
                    "keys.default_expiry",
                    format!(
                        "`{}` is longer than keys.max_lifetime ({}); lower one or raise the other",
                        self.keys.default_expiry,
                        humantime::format_duration(max)
                    ),
                ))
            }
            None if !self.keys.allow_never_expires => {
                return Err(err(
                    "keys.default_expiry",
                    "`never` needs keys.allow_never_expires: true".into(),
                ))
            }
            _ => {}
        }
        if self.keys.max_per_developer < 1 {
            return Err(err("keys.max_per_developer", "must be at least 1".into()));
        }
        if let Some(b) = &self.bootstrap_admin {
            if !b.email.contains('@') {
                return Err(err(
                    "bootstrap_admin.email",
                    format!("`{}` is not an email", b.email),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = AdminConfig::default();
        c.validate(Path::new("x")).unwrap();
        assert_eq!(
            c.keys.default_expiry.lifetime(),
            Some(Duration::from_secs(365 * 86_400))
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let e =
            AdminConfig::parse("database: {url: 1, bogus: 2}", Path::new("a.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("a.yaml: database"), "{e}");
        let e =
            AdminConfig::parse("keys: {default_expiry: soon}", Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "keys.default_expiry");
        assert!(e.message.contains("`soon`: expected a duration"), "{e}");
        let e = AdminConfig::parse("listen: nowhere", Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "listen");
    }

    #[test]
    fn server_deadlines_and_key_lifetime() {
        let c = AdminConfig::default();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.keys.max_lifetime, Duration::from_secs(3650 * 86_400));
        let c = AdminConfig::parse(
            "server: {header_read_timeout: 2s, body_read_timeout: 5s}",
            Path::new("a.yaml"),
        )
        .unwrap();
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(5));
        let e = AdminConfig::parse("server: {read_timeout: 2s}", Path::new("a.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("a.yaml: server"), "{e}");
        for (yaml, key) in [
            (
                "server: {header_read_timeout: 0s}",
                "server.header_read_timeout",
            ),
            (
                "server: {body_read_timeout: 2h}",
                "server.body_read_timeout",
            ),
            ("keys: {max_lifetime: 12h}", "keys.max_lifetime"),
            ("keys: {max_lifetime: 90d}", "keys.default_expiry"),
            (
                "keys: {allow_never_expires: false, default_expiry: never}",
                "keys.default_expiry",
            ),
        ] {
            let c = AdminConfig::parse(yaml, Path::new("a.yaml")).unwrap();
            let e = c.validate(Path::new("a.yaml")).unwrap_err();
            assert_eq!(
                (e.file.to_str(), e.key.as_str()),
                (Some("a.yaml"), key),
                "{yaml}"
            );
        }
        let c = AdminConfig::parse(
            "keys: {max_lifetime: 90d, default_expiry: 30d, allow_never_expires: false}",
            Path::new("a.yaml"),
        )
        .unwrap();
        c.validate(Path::new("a.yaml")).unwrap();
    }

    #[test]
    fn plans_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir(&conf).unwrap();
        let plans = conf.join("my-plans.yaml");
        std::fs::write(&plans, "default_plan: a\nplans: {a: {overage: true}}\n").unwrap();
        std::fs::write(conf.join("admin.yaml"), "plans_file: my-plans.yaml\n").unwrap();
        let c = AdminConfig::load(&conf.join("admin.yaml")).unwrap();
        assert_eq!(c.plans_file.as_deref(), Some(plans.as_path()));
        assert_eq!(c.plans.default_plan, "a");
        // No file: the built-in plans.
        assert_eq!(AdminConfig::default().plans.default_plan, "free");
        // A broken plans file stops the start, naming that file and its key.
        std::fs::write(&plans, "default_plan: b\nplans: {a: {overage: true}}\n").unwrap();
        let e = AdminConfig::load(&conf.join("admin.yaml")).unwrap_err();
        assert_eq!(
            (e.file.as_path(), e.key.as_str()),
            (plans.as_path(), "default_plan")
        );
    }
}
