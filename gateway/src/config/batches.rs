//! The `batches:` section: how the items of batches (sent through the gateway by the admin
//! API's workers with a batch token) are priced. Reloadable.

use rust_decimal::Decimal;
use serde::Deserialize;

/// Pricing of batch items.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchesConfig {
    /// Fraction taken off the price of a batch item, from 0 (none) up to but excluding 1, as a
    /// number or a string (`0.5`, `"0.25"`). The discounted cost is what the usage record says
    /// and what the quota counts. Default 0.5 (half price, OpenAI's batch discount).
    #[serde(
        default = "default_discount",
        deserialize_with = "aihub_usage::pricing::exact_decimal"
    )]
    pub discount: Decimal,
}

fn default_discount() -> Decimal {
    Decimal::new(5, 1)
}

impl Default for BatchesConfig {
    fn default() -> Self {
        BatchesConfig {
            discount: default_discount(),
        }
    }
}

impl BatchesConfig {
    /// Checks the section; errors carry the key path.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.discount.is_sign_negative() || self.discount >= Decimal::ONE {
            return Err((
                "batches.discount".into(),
                format!(
                    "`{}`: a fraction from 0 (no discount) up to but excluding 1",
                    self.discount
                ),
            ));
        }
        Ok(())
    }
}
