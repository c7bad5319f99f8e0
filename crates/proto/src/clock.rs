//! Wall-clock time as Unix seconds, and its RFC 3339 / calendar forms (no date crate needed):
//! the timestamps both ends print (`ven status`, the PCE admin API) come from here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
/// A clock before this (2025-01-01) cannot be right: no certificate of ours would be valid yet.
pub const EARLIEST_SANE_CLOCK: u64 = 1_735_689_600;

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The UTC calendar date of a Unix time: (year, month 1-12, day 1-31).
pub fn date(secs: u64) -> (i32, u8, u8) {
    // Howard Hinnant's days-to-civil algorithm, for days since 1970-01-01.
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u8;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u8;
    let year = (year_of_era + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// `2026-11-27T12:00:00Z`.
pub fn rfc3339(secs: u64) -> String {
    let (year, month, day) = date(secs);
    let in_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_780_800), "2026-11-27T12:00:00Z");
        assert_eq!(date(4_102_444_799), (2099, 12, 31));
    }
}
