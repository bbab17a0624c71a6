//! The `billing:` section of the admin configuration: when invoices are generated and how long
//! late usage may still change a closed period's invoice.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Generate and finalize invoices in the background (needs `clickhouse`). Default true.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// How long after a period closes its invoices stay drafts, refreshed with late usage (a
    /// gateway's write-ahead log may deliver records late), before they are finalized.
    /// Default 72h.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace_period: Duration,
    /// How often the background job looks for invoices to create, refresh or finalize.
    /// Default 5m.
    #[serde(default = "default_run_every", with = "humantime_serde")]
    pub run_every: Duration,
}

fn default_enabled() -> bool {
    true
}
fn default_grace() -> Duration {
    Duration::from_secs(72 * 3600)
}
fn default_run_every() -> Duration {
    Duration::from_secs(300)
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            enabled: default_enabled(),
            grace_period: default_grace(),
            run_every: default_run_every(),
        }
    }
}

impl BillingConfig {
    /// Checks the values; the message names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.run_every < Duration::from_secs(1) {
            return Err(("billing.run_every", "must be at least 1s".into()));
        }
        if self.grace_period > Duration::from_secs(31 * 24 * 3600) {
            return Err(("billing.grace_period", "must be at most 31d".into()));
        }
        Ok(())
    }
}
