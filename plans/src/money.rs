//! USD amounts as every API, page and invoice shows them: exact decimal strings with at least
//! two decimals.

use rust_decimal::Decimal;

/// A USD amount as shown: at least two decimals (`"29.00"`, `"0.50"`, `"0.125"`).
pub fn usd_string(d: Decimal) -> String {
    let mut d = d.normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    d.to_string()
}

/// Nano-USD as a USD decimal string.
pub fn usd_from_nanos(nanos: i64) -> String {
    usd_string(Decimal::new(nanos, 9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(usd_string(Decimal::new(29, 0)), "29.00");
        assert_eq!(usd_string(Decimal::new(5, 1)), "0.50");
        assert_eq!(usd_string(Decimal::new(125, 3)), "0.125");
        assert_eq!(usd_from_nanos(1), "0.000000001");
        assert_eq!(usd_from_nanos(1_500_000_000), "1.50");
        assert_eq!(usd_from_nanos(50_000_000_000), "50.00");
        assert_eq!(usd_from_nanos(125_000_000), "0.125");
        assert_eq!(usd_from_nanos(0), "0.00");
    }
}
