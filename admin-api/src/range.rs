//! The time range of a usage or analytics request: a billing period (`period=YYYY-MM`, the
//! current one by default) or whole UTC days (`from=YYYY-MM-DD&to=YYYY-MM-DD`, both inclusive),
//! validated into a [`DayRange`]. Also the small calendar helpers the queries need.

use aihub_plans::Period;
pub use aihub_usage::read::{date_string, datetime_sql, Days, MS_PER_DAY, MS_PER_HOUR};

use crate::error::{AppError, FieldError};

/// Longest `from`/`to` range of the JSON endpoints, in days.
pub const MAX_RANGE_DAYS: i64 = 400;
/// Longest range of an hourly series, in days.
pub const MAX_HOURLY_DAYS: i64 = 31;

/// Whole UTC days `from..=to` (days since 1970-01-01), and the period they make up when the
/// request named one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayRange {
    pub from: i64,
    pub to: i64,
    pub period: Option<Period>,
}

impl DayRange {
    pub fn of_period(p: Period) -> DayRange {
        DayRange {
            from: p.start_ms() / MS_PER_DAY,
            to: p.end_ms() / MS_PER_DAY - 1,
            period: Some(p),
        }
    }

    pub fn days(&self) -> i64 {
        self.to - self.from + 1
    }

    /// The days, as the usage queries take them.
    pub fn window(&self) -> Days {
        Days {
            first: self.from,
            last: self.to,
        }
    }

    /// First instant, unix ms.
    pub fn start_ms(&self) -> i64 {
        self.from * MS_PER_DAY
    }

    /// First instant after the range, unix ms.
    pub fn end_ms(&self) -> i64 {
        (self.to + 1) * MS_PER_DAY
    }

    /// `YYYY-MM-DD` of the first and last day.
    pub fn first_date(&self) -> String {
        date_string(self.from)
    }

    pub fn last_date(&self) -> String {
        date_string(self.to)
    }

    /// The range cut at `now_ms`'s day (a range wholly in the future stays as it is, empty of
    /// data).
    pub fn until(&self, now_ms: i64) -> DayRange {
        let today = now_ms.div_euclid(MS_PER_DAY);
        DayRange {
            to: self.to.min(today).max(self.from),
            ..*self
        }
    }
}

/// The range parameters every usage and analytics endpoint takes.
pub struct RangeParams<'a> {
    pub period: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
}

impl RangeParams<'_> {
    /// Validates the parameters: `period` or `from` + `to` (not both), real dates, `from` ≤
    /// `to`, at most `max_days` days (`None`: any length). No parameter: the current period.
    pub fn resolve(&self, max_days: Option<i64>, now_ms: i64) -> Result<DayRange, AppError> {
        let mut errors = Vec::new();
        let range = match (self.period, self.from, self.to) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                errors.push(FieldError::new(
                    "period",
                    "give either period or from and to, not both",
                ));
                None
            }
            (Some(p), None, None) => match parse_period(p) {
                Some(p) => Some(DayRange::of_period(p)),
                None => {
                    errors.push(FieldError::new("period", "must be a month, YYYY-MM"));
                    None
                }
            },
            (None, None, None) => Some(DayRange::of_period(Period::of_unix_ms(now_ms))),
            (None, from, to) => {
                let from = date_param("from", from, &mut errors);
                let to = date_param("to", to, &mut errors);
                match (from, to) {
                    (Some(from), Some(to)) if to < from => {
                        errors.push(FieldError::new("to", "must not be before from"));
                        None
                    }
                    (Some(from), Some(to)) => match max_days {
                        Some(max) if to - from + 1 > max => {
                            errors.push(FieldError::new(
                                "to",
                                format!("the range may span at most {max} days"),
                            ));
                            None
                        }
                        _ => Some(DayRange {
                            from,
                            to,
                            period: None,
                        }),
                    },
                    _ => None,
                }
            }
        };
        AppError::check(errors)?;
        Ok(range.expect("a range when there is no error"))
    }
}

fn date_param(field: &str, value: Option<&str>, errors: &mut Vec<FieldError>) -> Option<i64> {
    match value {
        None => {
            let other = if field == "from" { "to" } else { "from" };
            errors.push(FieldError::new(
                field,
                format!("is required with {other} (or give period)"),
            ));
            None
        }
        Some(v) => {
            let d = parse_date(v);
            if d.is_none() {
                errors.push(FieldError::new(
                    field,
                    "must be a date, YYYY-MM-DD (UTC), between 1970 and 2100",
                ));
            }
            d
        }
    }
}

/// Years a range may touch (ClickHouse `Date` ends in 2105).
const YEARS: std::ops::RangeInclusive<i32> = 1970..=2100;

fn parse_period(s: &str) -> Option<Period> {
    Period::parse(s).filter(|p| YEARS.contains(&p.year))
}

/// `YYYY-MM-DD` → days since 1970-01-01; `None` unless it is exactly that shape and a real date.
pub fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[7] != b'-' {
        return None;
    }
    let period = parse_period(&s[..7])?;
    if !b[8..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let day: i64 = s[8..].parse().ok()?;
    let first = period.start_ms() / MS_PER_DAY;
    let len = (period.end_ms() - period.start_ms()) / MS_PER_DAY;
    (1..=len).contains(&day).then_some(first + day - 1)
}

/// Unix ms → RFC 3339 UTC with seconds (`2026-11-25T09:00:00Z`), for bucket starts.
pub fn rfc3339_s(ms: i64) -> String {
    datetime_sql(ms).replace(' ', "T") + "Z"
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_608_000_000; // 2026-11-25T12:00:00Z

    fn resolve(p: Option<&str>, f: Option<&str>, t: Option<&str>) -> Result<DayRange, String> {
        RangeParams {
            period: p,
            from: f,
            to: t,
        }
        .resolve(Some(MAX_RANGE_DAYS), NOW)
        .map_err(|e| match e {
            AppError::Validation(f) => format!("{}: {}", f[0].field, f[0].message),
            other => other.to_string(),
        })
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2026-11-25"), Some(NOW / MS_PER_DAY));
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-11-31",
            "2026-11-00",
            "2026-1-01",
            "2026-11-1",
            "26-11-01",
            "2026/11/01",
            "2026-11-+1",
            "2026-+1-01",
            "+026-11-01",
            "1969-12-31",
            "2101-01-01",
            "",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert_eq!(date_string(19_782), "2024-02-29");
        assert_eq!(datetime_sql(NOW), "2026-11-25 12:00:00");
        assert_eq!(rfc3339_s(NOW), "2026-11-25T12:00:00Z");
    }

    #[test]
    fn ranges() {
        let current = resolve(None, None, None).unwrap();
        assert_eq!(current.first_date(), "2026-11-01");
        assert_eq!(current.last_date(), "2026-11-30");
        assert_eq!(current.period.unwrap().to_string(), "2026-11");
        assert_eq!(current.until(NOW).last_date(), "2026-11-25");
        let feb = resolve(Some("2024-02"), None, None).unwrap();
        assert_eq!((feb.days(), feb.last_date().as_str()), (29, "2024-02-29"));
        let r = resolve(None, Some("2026-01-01"), Some("2026-01-01")).unwrap();
        assert_eq!((r.days(), r.period), (1, None));
        assert!(resolve(None, Some("2025-01-01"), Some("2026-02-04")).is_ok()); // 400 days

        assert_eq!(
            resolve(Some("2026-11"), Some("2026-11-01"), None).unwrap_err(),
            "period: give either period or from and to, not both"
        );
        assert!(resolve(Some("2026-1"), None, None)
            .unwrap_err()
            .starts_with("period:"));
        assert!(resolve(Some("1969-12"), None, None).is_err());
        assert!(resolve(None, Some("2026-11-01"), None)
            .unwrap_err()
            .starts_with("to: is required"));
        assert!(resolve(None, None, Some("2026-11-01"))
            .unwrap_err()
            .starts_with("from: is required"));
        assert!(resolve(None, Some("2026-11-31"), Some("2026-12-01"))
            .unwrap_err()
            .starts_with("from: must be a date"));
        assert_eq!(
            resolve(None, Some("2026-11-02"), Some("2026-11-01")).unwrap_err(),
            "to: must not be before from"
        );
        assert_eq!(
            resolve(None, Some("2025-01-01"), Some("2026-02-05")).unwrap_err(),
            "to: the range may span at most 400 days"
        );
    }
}
