//! Wall-clock time as unix milliseconds: the one clock every module reads (a leaf: it imports
//! nothing from the crate).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds of a system time (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The current time in unix milliseconds.
#[inline]
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}
