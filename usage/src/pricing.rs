//! Model prices and the cost of a request, in `rust_decimal` only.
//!
//! A price is either the seed's single price per 1,000 tokens (`per_1k`, applied to prompt and
//! completion tokens alike) or provider-style prices per 1,000,000 tokens for input, cached input
//! and output. Rounding: the cost is computed exactly (28 significant digits, no intermediate
//! rounding) and rounded once, half to even, to whole nano-USD for the usage record. Invoices sum
//! nano-USD and round once more, to cents, at the end (billing issue).

use std::collections::{BTreeMap, HashMap};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;

/// A price as written in YAML. Exactly one form: `per_1k`, or `input_per_1m` + `output_per_1m`
/// (+ optional `cached_input_per_1m`, default = `input_per_1m`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    #[serde(default, deserialize_with = "decimal")]
    pub per_1k: Option<Decimal>,
    #[serde(default, deserialize_with = "decimal")]
    pub input_per_1m: Option<Decimal>,
    #[serde(default, deserialize_with = "decimal")]
    pub cached_input_per_1m: Option<Decimal>,
    #[serde(default, deserialize_with = "decimal")]
    pub output_per_1m: Option<Decimal>,
}

/// An optional price ([`exact_decimal`]).
fn decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    exact_decimal(d).map(Some)
}

/// A decimal written as a YAML number or string (`deserialize_with` for prices, discounts).
/// Numbers arrive as `f64`; they are read back from their shortest decimal rendering, which is
/// exactly what was written (`0.00015` stays `0.00015`, never `0.000149999…`).
pub fn exact_decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Decimal;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a decimal number")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Decimal, E> {
            s.trim().parse().map_err(E::custom)
        }
        fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Decimal, E> {
            self.visit_str(&f.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(i))
        }
        fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(u))
        }
    }
    d.deserialize_any(V)
}

/// The `pricing:` section: prices by model name (the name clients send) and a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    #[serde(default = "seed_default")]
    pub default: PriceConfig,
    #[serde(default = "seed_models")]
    pub models: BTreeMap<String, PriceConfig>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            default: seed_default(),
            models: seed_models(),
        }
    }
}

fn per_1k(s: &str) -> PriceConfig {
    PriceConfig {
        per_1k: Some(s.parse().expect("seed prices are decimals")),
        ..PriceConfig::default()
    }
}

/// The seed's default: USD 0.001 per 1K tokens.
pub fn seed_default() -> PriceConfig {
    per_1k("0.001")
}

/// The seed's table, USD per 1K tokens, and the embedding model per 1M tokens: the built-in
/// prices when a configuration has no `pricing:` section. `config/gateway.yaml`'s section and
/// `docs/guide/pricing.md`'s table say the same (`tests/prices.rs` checks all three agree).
pub fn seed_models() -> BTreeMap<String, PriceConfig> {
    let mut models: BTreeMap<String, PriceConfig> = [
        ("gpt-4o", "0.015"),
        ("gpt-4o-mini", "0.00015"),
        ("claude-3.5-sonnet", "0.003"),
        ("llama-3.1-70b", "0.001"),
        ("gemini-1.5-pro", "0.0025"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), per_1k(p)))
    .collect();
    models.insert(
        "text-embedding-3-small".to_owned(),
        PriceConfig {
            input_per_1m: Some("0.02".parse().expect("a decimal")),
            output_per_1m: Some(Decimal::ZERO),
            ..PriceConfig::default()
        },
    );
    models
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u32,
    /// Part of `prompt` served from the provider's cache.
    pub cached: u32,
    pub completion: u32,
}

/// A price per token, ready to multiply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: Decimal,
    pub cached_input: Decimal,
    pub output: Decimal,
}

impl Price {
    pub fn from_config(c: &PriceConfig) -> Result<Price, String> {
        let thousand = Decimal::from(1_000);
        let million = Decimal::from(1_000_000);
        let negative = [
            c.per_1k,
            c.input_per_1m,
            c.cached_input_per_1m,
            c.output_per_1m,
        ]
        .iter()
        .flatten()
        .any(|d| d.is_sign_negative());
        if negative {
            return Err("prices cannot be negative".into());
        }
        match (c.per_1k, c.input_per_1m, c.output_per_1m) {
            (Some(p), None, None) if c.cached_input_per_1m.is_none() => {
                let t = p / thousand;
                Ok(Price {
                    input: t,
                    cached_input: t,
                    output: t,
                })
            }
            (None, Some(i), Some(o)) => Ok(Price {
                input: i / million,
                cached_input: c.cached_input_per_1m.unwrap_or(i) / million,
                output: o / million,
            }),
            _ => Err("give either `per_1k`, or `input_per_1m` and `output_per_1m` (and optionally `cached_input_per_1m`)".into()),
        }
    }

    /// Exact cost in USD.
    pub fn cost(&self, t: Tokens) -> Decimal {
        let cached = t.cached.min(t.prompt);
        Decimal::from(t.prompt - cached) * self.input
            + Decimal::from(cached) * self.cached_input
            + Decimal::from(t.completion) * self.output
    }
}

/// Prices by model, with the default.
#[derive(Debug, Clone)]
pub struct Pricing {
    models: HashMap<String, Price>,
    default: Price,
}

impl Pricing {
    /// Errors name the key (`pricing.models.gpt-4o`).
    pub fn from_config(c: &PricingConfig) -> Result<Pricing, (String, String)> {
        let default = Price::from_config(&c.default).map_err(|e| ("pricing.default".into(), e))?;
        let mut models = HashMap::new();
        for (m, p) in &c.models {
            let price = Price::from_config(p).map_err(|e| (format!("pricing.models.{m}"), e))?;
            models.insert(m.clone(), price);
        }
        Ok(Pricing { models, default })
    }

    /// The price of `model`, else of `fallback` (the upstream model), else the default.
    pub fn price(&self, model: &str, fallback: &str) -> &Price {
        self.models
            .get(model)
            .or_else(|| self.models.get(fallback))
            .unwrap_or(&self.default)
    }
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing::from_config(&PricingConfig::default()).expect("seed prices are valid")
    }
}

/// Rounds USD to whole nano-USD, half to even, saturating at the `i64` range.
pub fn to_nanos(usd: Decimal) -> i64 {
    let nanos = (usd * Decimal::from(1_000_000_000))
        .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven);
    i64::try_from(nanos).unwrap_or(if nanos.is_sign_negative() {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// Nano-USD back to USD, exactly.
pub fn from_nanos(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn seed_prices_per_1k() {
        let p = Pricing::default();
        let t = Tokens {
            prompt: 1000,
            cached: 0,
            completion: 500,
        };
        assert_eq!(p.price("gpt-4o", "").cost(t), d("0.0225"));
        assert_eq!(to_nanos(p.price("gpt-4o", "").cost(t)), 22_500_000);
        // gpt-4o-mini at 0.00015 / 1K: 3 tokens = 0.00000045 USD = 450 nano-USD.
        let three = Tokens {
            prompt: 2,
            cached: 0,
            completion: 1,
        };
        assert_eq!(to_nanos(p.price("gpt-4o-mini", "").cost(three)), 450);
        // Unknown model, unknown upstream model: the default 0.001 / 1K.
        assert_eq!(p.price("demo", "mock-gpt").cost(t), d("0.0015"));
    }

    #[test]
    fn split_prices_with_cache() {
        let c = PriceConfig {
            input_per_1m: Some(d("2.50")),
            cached_input_per_1m: Some(d("1.25")),
            output_per_1m: Some(d("10")),
            ..PriceConfig::default()
        };
        let p = Price::from_config(&c).unwrap();
        let t = Tokens {
            prompt: 1_000_000,
            cached: 400_000,
            completion: 100_000,
        };
        // 600k × 2.5/1M + 400k × 1.25/1M + 100k × 10/1M = 1.5 + 0.5 + 1.0
        assert_eq!(p.cost(t), d("3"));
    }

    #[test]
    fn rounding_is_half_to_even_on_nanos() {
        assert_eq!(to_nanos(d("0.0000000005")), 0);
        assert_eq!(to_nanos(d("0.0000000015")), 2);
        assert_eq!(to_nanos(d("0.0000000025")), 2);
        assert_eq!(from_nanos(22_500_000), d("0.0225"));
    }

    #[test]
    fn invalid_prices_name_the_key() {
        let mut c = PricingConfig::default();
        c.models.insert(
            "x".into(),
            PriceConfig {
                per_1k: Some(d("1")),
                output_per_1m: Some(d("1")),
                ..PriceConfig::default()
            },
        );
        assert_eq!(Pricing::from_config(&c).unwrap_err().0, "pricing.models.x");
        c.models.insert("x".into(), per_1k("-1"));
        assert!(Pricing::from_config(&c).is_err());
    }
}

#[cfg(test)]
mod yaml_tests {
    use super::*;

    #[test]
    fn yaml_numbers_become_the_decimals_written() {
        let c: PricingConfig = serde_json::from_str(
            r#"{"default": {"per_1k": 0.001}, "models": {"a": {"per_1k": 0.00015}, "b": {"input_per_1m": 2.5, "output_per_1m": "10.000001"}}}"#,
        )
        .unwrap();
        assert_eq!(c.models["a"].per_1k.unwrap().to_string(), "0.00015");
        assert_eq!(c.default.per_1k.unwrap().to_string(), "0.001");
        assert_eq!(c.models["b"].input_per_1m.unwrap().to_string(), "2.5");
        assert_eq!(
            c.models["b"].output_per_1m.unwrap().to_string(),
            "10.000001"
        );
    }
}
