//! Display formatting for people: grouped integers, USD amounts, percentages, timestamps. The
//! portal's pages turn the JSON API's figures into these strings before rendering, so templates
//! only place text; the printable invoice groups its numbers the same way.

use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// `1234567` → `1,234,567`.
pub fn int(n: impl Into<i128>) -> String {
    let n: i128 = n.into();
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An exact USD decimal string as shown to people: cents from $1 up, four decimals below (so
/// a few cheap requests are not shown as $0.00), grouped thousands. `12.345678901` → `$12.35`,
/// `0.000123` → `$0.0001`.
pub fn usd(exact: &str) -> String {
    let Ok(d) = Decimal::from_str(exact) else {
        return format!("${exact}");
    };
    usd_of(d)
}

pub fn usd_of(d: Decimal) -> String {
    let dp = if d.abs() >= Decimal::ONE || d.is_zero() {
        2
    } else {
        4
    };
    let mut r = d.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(dp);
    let text = r.abs().to_string();
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let whole: i128 = whole.parse().unwrap_or(0);
    let sign = if r.is_sign_negative() && !r.is_zero() {
        "-"
    } else {
        ""
    };
    format!("{sign}${}.{frac}", int(whole))
}

/// An exact USD decimal string with every digit kept (invoice lines): `8.7` → `$8.70`,
/// `0.000123` → `$0.000123`.
pub fn usd_exact(exact: &str) -> String {
    let Ok(mut d) = Decimal::from_str(exact) else {
        return format!("${exact}");
    };
    d = d.normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    let text = d.abs().to_string();
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let sign = if d.is_sign_negative() && !d.is_zero() {
        "-"
    } else {
        ""
    };
    format!("{sign}${}.{frac}", int(whole.parse::<i128>().unwrap_or(0)))
}

/// An RFC 3339 timestamp as `YYYY-MM-DD HH:MM UTC`.
pub fn when(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..16)) {
        (Some(d), Some(t)) => format!("{d} {t} UTC"),
        _ => rfc3339.to_owned(),
    }
}

/// An RFC 3339 timestamp's date.
pub fn day(rfc3339: &str) -> String {
    rfc3339.get(..10).unwrap_or(rfc3339).to_owned()
}

/// Milliseconds with no decimals (`—` when unknown).
pub fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{} ms", int(v.round() as i64)),
        _ => "—".into(),
    }
}

/// A change in percent (`"12.50"`) as `+12.5 %` with its direction, or `None`.
pub fn change(pct: Option<&str>) -> Option<(String, &'static str)> {
    let d = Decimal::from_str(pct?).ok()?;
    let shown = d.round_dp(1).normalize();
    let class = if d.is_sign_negative() { "down" } else { "up" };
    let sign = if d.is_sign_negative() { "" } else { "+" };
    Some((format!("{sign}{shown} %"), class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(int(-1_000), "-1,000");
        assert_eq!(usd("12.345678901"), "$12.35");
        assert_eq!(usd("1234.5"), "$1,234.50");
        assert_eq!(usd("0.000123"), "$0.0001");
        assert_eq!(usd("0"), "$0.00");
        assert_eq!(usd("-3.2"), "-$3.20");
        assert_eq!(usd_exact("8.7"), "$8.70");
        assert_eq!(usd_exact("1234.000123"), "$1,234.000123");
        assert_eq!(when("2026-12-04T13:15:34.123Z"), "2026-12-04 13:15 UTC");
        assert_eq!(ms(Some(12.6)), "13 ms");
        assert_eq!(ms(None), "—");
        assert_eq!(change(Some("-20.00")), Some(("-20 %".into(), "down")));
        assert_eq!(change(Some("12.50")), Some(("+12.5 %".into(), "up")));
        assert_eq!(change(None), None);
    }
}
