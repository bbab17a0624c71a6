//! The `webhooks:` section of the admin configuration.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::guard::AddressPolicy;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Run the delivery engine on this admin node. Default true (several nodes share the work
    /// on PostgreSQL; on SQLite run it on one node).
    #[serde(default = "yes")]
    pub deliver: bool,
    /// Accept `http://` endpoint URLs (default false: https only).
    #[serde(default)]
    pub allow_http: bool,
    /// Networks endpoints may reach although they are private, loopback or reserved (CIDR
    /// notation, e.g. `10.20.0.0/16`, `127.0.0.1/32`). Default none.
    #[serde(default)]
    pub allow_networks: Vec<IpNet>,
    /// Deadline of one attempt (connect, TLS, request, answer header). Default 15s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// An endpoint whose every attempt failed for this long is disabled. Default 72h.
    #[serde(default = "default_disable_after", with = "humantime_serde")]
    pub disable_after: Duration,
    /// Endpoints per developer. Default 20.
    #[serde(default = "default_max_endpoints")]
    pub max_endpoints_per_developer: i64,
    /// Attempts in flight on this node, all endpoints together. Default 256.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts in flight to one endpoint. Default 16.
    #[serde(default = "default_per_endpoint")]
    pub per_endpoint_concurrency: usize,
    /// How long a claimed delivery stays with this node before others may take it. Default
    /// 60s (longer than `timeout`).
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often the engine looks for work when nothing woke it (events written by other
    /// processes, such as gateways' usage alerts). Default 50ms.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a rotated-out secret keeps signing. Default 24h.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub secret_grace: Duration,
    /// Delays before each attempt: the first (the first attempt's, `0s`) and one per retry, so
    /// its length less one is the most retries an endpoint may ask for. Default
    /// `[0s, 5s, 5m, 30m, 2h, 5h, 10h, 10h]`.
    #[serde(default = "default_schedule", deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
}

fn yes() -> bool {
    true
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_disable_after() -> Duration {
    Duration::from_secs(72 * 3600)
}
fn default_max_endpoints() -> i64 {
    20
}
fn default_concurrency() -> usize {
    256
}
fn default_per_endpoint() -> usize {
    16
}
fn default_lease() -> Duration {
    Duration::from_secs(60)
}
fn default_poll() -> Duration {
    Duration::from_millis(50)
}
fn default_grace() -> Duration {
    Duration::from_secs(86_400)
}
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let list = Vec::<humantime_serde::Serde<Duration>>::deserialize(d)?;
    Ok(list.into_iter().map(|s| s.into_inner()).collect())
}
fn default_schedule() -> Vec<Duration> {
    crate::schedule::SCHEDULE.to_vec()
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl WebhooksConfig {
    /// The most retries an endpoint may ask for.
    pub fn max_retries(&self) -> i64 {
        self.retry_schedule.len() as i64 - 1
    }

    /// The address policy.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::new(self.allow_networks.clone())
    }

    /// Checks the values; an error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(60) {
            return Err(("webhooks.timeout", "must be between 1s and 60s".into()));
        }
        if self.lease < self.timeout * 2 {
            return Err((
                "webhooks.lease",
                "must be at least twice webhooks.timeout".into(),
            ));
        }
        if self.disable_after < Duration::from_secs(1) {
            return Err(("webhooks.disable_after", "must be at least 1s".into()));
        }
        if self.retry_schedule.len() < 2 || self.retry_schedule.len() > 16 {
            return Err((
                "webhooks.retry_schedule",
                "needs 2 to 16 delays (the first attempt's, then one per retry)".into(),
            ));
        }
        if self
            .retry_schedule
            .iter()
            .any(|d| *d > Duration::from_secs(86_400))
        {
            return Err((
                "webhooks.retry_schedule",
                "each delay must be at most 24h".into(),
            ));
        }
        if self.concurrency == 0 || self.per_endpoint_concurrency == 0 {
            return Err(("webhooks.concurrency", "must be at least 1".into()));
        }
        if self.max_endpoints_per_developer < 1 {
            return Err((
                "webhooks.max_endpoints_per_developer",
                "must be at least 1".into(),
            ));
        }
        if self.poll_interval < Duration::from_millis(10)
            || self.poll_interval > Duration::from_secs(10)
        {
            return Err((
                "webhooks.poll_interval",
                "must be between 10ms and 10s".into(),
            ));
        }
        Ok(())
    }
}
