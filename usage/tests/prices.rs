//! One source for prices: the `pricing:` section of `config/gateway.yaml` is the source; the
//! built-in prices (used when a configuration has no such section) and the table of
//! `docs/guide/pricing.md` must say exactly the same.

use std::path::PathBuf;

use aihub_usage::pricing::{Price, Pricing, PricingConfig, Tokens};
use rust_decimal::Decimal;

fn repo(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The `pricing:` section of the shipped gateway configuration.
fn shipped() -> PricingConfig {
    let doc: serde_norway::Value = serde_norway::from_str(&repo("config/gateway.yaml")).unwrap();
    serde_norway::from_value(doc["pricing"].clone()).expect("config/gateway.yaml has `pricing:`")
}

/// USD per 1M tokens of a price: input, cached input, output.
fn per_million(p: &Price) -> [Decimal; 3] {
    let m = Decimal::from(1_000_000);
    [p.input * m, p.cached_input * m, p.output * m].map(|d| d.normalize())
}

#[test]
fn the_built_in_prices_are_the_shipped_ones() {
    assert_eq!(shipped(), PricingConfig::default());
}

#[test]
fn the_documented_prices_are_the_shipped_ones() {
    let config = shipped();
    let pricing = Pricing::from_config(&config).unwrap();
    let doc = repo("docs/guide/pricing.md");
    let table = doc
        .split("## Model prices")
        .nth(1)
        .expect("a `## Model prices` section")
        .lines()
        .filter(|l| l.starts_with("| `") || l.starts_with("| any other model"));
    let dollars = |c: &str| -> Decimal {
        c.trim_start_matches('$')
            .parse::<Decimal>()
            .unwrap()
            .normalize()
    };
    let mut documented = Vec::new();
    for row in table {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let price = [dollars(cells[1]), dollars(cells[2]), dollars(cells[3])];
        let model = cells[0].trim_matches('`');
        let shipped = if model == "any other model" {
            pricing.price("no-such-model", "")
        } else {
            documented.push(model.to_owned());
            pricing.price(model, "")
        };
        assert_eq!(price, per_million(shipped), "{row}");
    }
    let mut models: Vec<String> = config.models.keys().cloned().collect();
    models.sort();
    documented.sort();
    assert_eq!(
        documented, models,
        "every priced model is documented, and no other"
    );
    // The price applies as documented: 1M cached tokens of gpt-4o.
    let t = Tokens {
        prompt: 1_000_000,
        cached: 1_000_000,
        completion: 0,
    };
    assert_eq!(pricing.price("gpt-4o", "").cost(t), Decimal::from(15));
}
