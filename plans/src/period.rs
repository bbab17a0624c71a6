//! Billing periods: calendar months in UTC, named `YYYY-MM`. Quotas reset, usage alerts repeat
//! and invoices close at period boundaries.

use std::fmt;

/// A calendar month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub year: i32,
    /// 1–12.
    pub month: u32,
}

const MS_PER_DAY: i64 = 86_400_000;

impl Period {
    /// The period holding the instant `unix_ms`.
    pub fn of_unix_ms(unix_ms: i64) -> Period {
        let (year, month, _) = civil_from_days(unix_ms.div_euclid(MS_PER_DAY));
        Period { year, month }
    }

    /// First instant of the period, unix milliseconds.
    pub fn start_ms(self) -> i64 {
        days_from_civil(self.year, self.month, 1) * MS_PER_DAY
    }

    /// First instant after the period, unix milliseconds.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn prev(self) -> Period {
        if self.month == 1 {
            Period {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Period {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Period> {
        let (y, m) = s.split_once('-')?;
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if y.len() != 4 || m.len() != 2 || !digits(y) || !digits(m) {
            return None;
        }
        let year = y.parse().ok()?;
        let month = m.parse().ok()?;
        (1..=12).contains(&month).then_some(Period { year, month })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian, UTC. Howard Hinnant's
/// algorithm; also what the store's RFC 3339 timestamps are made with.
pub fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        // 2026-11-25T12:00:00Z
        let p = Period::of_unix_ms(1_795_608_000_000);
        assert_eq!(p.to_string(), "2026-11");
        assert_eq!(p.start_ms(), 1_793_491_200_000); // 2026-11-01
        assert_eq!(p.end_ms(), 1_796_083_200_000); // 2026-12-01
        assert_eq!(Period::of_unix_ms(p.end_ms()).to_string(), "2026-12");
        assert_eq!(Period::of_unix_ms(p.end_ms() - 1), p);
        assert_eq!(
            Period::parse("2026-12").unwrap().next().to_string(),
            "2027-01"
        );
        assert_eq!(Period::of_unix_ms(0).to_string(), "1970-01");
        assert_eq!(
            Period::parse("2024-02").unwrap().end_ms()
                - Period::parse("2024-02").unwrap().start_ms(),
            29 * MS_PER_DAY
        );
        assert!(Period::parse("2024-13").is_none());
        assert!(Period::parse("24-01").is_none());
        for signed in ["+026-11", "-001-05", "2026-+1", "2026-1 "] {
            assert!(Period::parse(signed).is_none(), "{signed}");
        }
    }
}
