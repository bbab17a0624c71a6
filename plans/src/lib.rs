//! Developer plans, read from YAML (`config/plans.yaml`): the limits the gateway enforces, the
//! monthly quota, and the prices billing charges. Shared by the gateway and the admin API so
//! both see the same plans.
//!
//! # Layout
//! - [`PlanCatalog`]: the file, its defaults and `validate()`; [`PlanCatalog::builtin`] is the
//!   shipped `config/plans.yaml`, used when no file is configured.
//! - [`Plan`]: one plan's price, included tokens, overage policy and rate limits.
//! - [`period`]: billing periods (calendar months, UTC).
//! - [`money`]: USD amounts as shown (exact decimal strings).

use std::collections::BTreeMap;
use std::path::Path;

use aihub_yamlconf::ConfigError;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub mod money;
pub mod period;

pub use period::Period;

/// The shipped plans file, compiled in: the plans when none is configured.
const BUILTIN: &str = include_str!("../../config/plans.yaml");

/// Every plan, the default one and the usage-alert thresholds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanCatalog {
    /// Plan of developers whose plan is not listed (and of new accounts). Required.
    pub default_plan: String,
    /// Percentages of the monthly quota that raise an `api.usage_alert`. Default `[80, 100]`.
    #[serde(default = "default_thresholds")]
    pub alert_thresholds: Vec<u32>,
    /// Plans by name (the name stored on the developer). At least one.
    pub plans: BTreeMap<String, Plan>,
}

/// One plan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Name shown to people. Default: the plan's key.
    #[serde(default)]
    pub display_name: String,
    /// Base fee per month in USD; `None` = custom (priced by contract).
    #[serde(default)]
    pub monthly_price_usd: Option<Decimal>,
    /// Tokens per month covered by the base fee; `None` = unlimited.
    #[serde(default)]
    pub included_tokens: Option<u64>,
    /// Usage beyond the included tokens is billed (true) or refused (false). Default false.
    #[serde(default)]
    pub overage: bool,
    /// Requests per minute, per developer and by default per key; `None` = unlimited.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests that may arrive at once. Default: `requests_per_minute`.
    #[serde(default)]
    pub request_burst: Option<u32>,
    /// Tokens per minute, per developer and by default per key; `None` = unlimited.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// In-flight requests per key and gateway node; `None` = unlimited.
    #[serde(default)]
    pub max_concurrent_requests: Option<u32>,
}

fn default_thresholds() -> Vec<u32> {
    vec![80, 100]
}

/// Largest alert threshold accepted, in percent (overage plans may want alerts past 100 %).
pub const MAX_THRESHOLD_PCT: u32 = 1000;

impl PlanCatalog {
    /// The shipped plans (`config/plans.yaml` as compiled in).
    pub fn builtin() -> PlanCatalog {
        Self::parse(BUILTIN, Path::new("<built-in plans>")).expect("the shipped plans are valid")
    }

    /// Reads and validates a plans file.
    pub fn load(path: &Path) -> Result<PlanCatalog, ConfigError> {
        Self::parse(&aihub_yamlconf::read(path)?, path)
    }

    /// Parses and validates plans text; `file` only names errors.
    pub fn parse(text: &str, file: &Path) -> Result<PlanCatalog, ConfigError> {
        let mut c: PlanCatalog = aihub_yamlconf::parse(text, file)?;
        for (name, plan) in &mut c.plans {
            if plan.display_name.is_empty() {
                plan.display_name = name.clone();
            }
        }
        c.validate(file)?;
        Ok(c)
    }

    /// Checks names, values and the default plan; errors name `file` and the key.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: String, msg: &str| ConfigError::new(file, key, msg);
        if self.plans.is_empty() {
            return Err(err("plans".into(), "at least one plan is needed"));
        }
        if !self.plans.contains_key(&self.default_plan) {
            return Err(err(
                "default_plan".into(),
                &format!("`{}` is not one of the plans", self.default_plan),
            ));
        }
        let mut last = 0;
        for (i, &t) in self.alert_thresholds.iter().enumerate() {
            if t == 0 || t > MAX_THRESHOLD_PCT || t <= last {
                return Err(err(
                    format!("alert_thresholds[{i}]"),
                    &format!("thresholds are increasing percentages from 1 to {MAX_THRESHOLD_PCT}"),
                ));
            }
            last = t;
        }
        for (name, p) in &self.plans {
            let key = |k: &str| format!("plans.{name}.{k}");
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(err(
                    format!("plans.{name}"),
                    "plan names are 1-64 characters of a-z, 0-9, '-' and '_'",
                ));
            }
            if p.monthly_price_usd.is_some_and(|d| d.is_sign_negative()) {
                return Err(err(key("monthly_price_usd"), "must not be negative"));
            }
            let positive = [
                ("requests_per_minute", p.requests_per_minute),
                ("request_burst", p.request_burst),
                ("tokens_per_minute", p.tokens_per_minute),
                ("max_concurrent_requests", p.max_concurrent_requests),
            ];
            for (k, v) in positive {
                if v == Some(0) {
                    return Err(err(
                        key(k),
                        "must be at least 1 (leave it out for no limit)",
                    ));
                }
            }
            if p.request_burst.is_some() && p.requests_per_minute.is_none() {
                return Err(err(key("request_burst"), "needs requests_per_minute"));
            }
            if !p.overage && p.included_tokens.is_none() {
                return Err(err(
                    key("overage"),
                    "false (a hard stop) needs included_tokens to stop at",
                ));
            }
        }
        Ok(())
    }

    /// The plan called `name`, else the default plan.
    pub fn plan(&self, name: &str) -> &Plan {
        self.plans
            .get(name)
            .unwrap_or_else(|| &self.plans[&self.default_plan])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_plans_are_the_seeds() {
        let c = PlanCatalog::builtin();
        assert_eq!(c.default_plan, "free");
        assert_eq!(c.alert_thresholds, vec![80, 100]);
        let free = c.plan("free");
        assert_eq!(free.included_tokens, Some(1000));
        assert!(!free.overage);
        assert_eq!(
            c.plan("developer").monthly_price_usd,
            Some(Decimal::from(29))
        );
        assert_eq!(c.plan("pro").included_tokens, Some(1_000_000));
        assert_eq!(c.plan("enterprise").monthly_price_usd, None);
        assert_eq!(c.plan("enterprise").display_name, "Enterprise");
        assert_eq!(c.plan("no-such-plan"), free);
    }

    #[test]
    fn errors_name_the_key() {
        let p = |t: &str| PlanCatalog::parse(t, Path::new("p.yaml")).unwrap_err().key;
        assert_eq!(
            p("default_plan: x\nplans: {a: {overage: true}}\n"),
            "default_plan"
        );
        assert_eq!(
            p("default_plan: a\nplans: {a: {overage: true, tokens_per_minute: 0}}\n"),
            "plans.a.tokens_per_minute"
        );
        assert_eq!(p("default_plan: a\nplans: {a: {}}\n"), "plans.a.overage");
        assert_eq!(
            p("default_plan: a\nalert_thresholds: [80, 50]\nplans: {a: {overage: true}}\n"),
            "alert_thresholds[1]"
        );
        assert_eq!(
            p("default_plan: a\nplans: {a: {overage: true, burst: 3}}\n"),
            "plans.a.burst"
        );
        assert_eq!(
            p("default_plan: A\nplans: {A: {overage: true}}\n"),
            "plans.A"
        );
    }
}
