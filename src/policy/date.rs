//! HTTP dates as a recipient reads them (RFC 9110 §5.6.7): the preferred IMF-fixdate and the
//! two obsolete formats a recipient must accept (RFC 850 and asctime), in any letter case (a
//! recipient compares the names case-insensitively), the day name not checked against the date
//! (it says nothing the date does not). Pure.

use std::time::{Duration, SystemTime};

/// Parses an HTTP date; `None` for anything else. The layout is strict (single spaces, the
/// comma, two-digit days and times); only the letter case of the names is free.
///
/// - IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`
/// - RFC 850: `Sunday, 06-Nov-94 08:49:37 GMT` (a two-digit year more than 50 years ahead is
///   in the past century, §5.6.7)
/// - asctime: `Sun Nov  6 08:49:37 1994`
pub fn parse(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (year, month, day, time) = match text.split_once(", ") {
        Some((day_name, rest)) => {
            let parts: Vec<&str> = rest.split(' ').collect();
            match parts.as_slice() {
                // IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
                [day, month, year, time, gmt] if is_day_name(day_name, false) => {
                    if !gmt.eq_ignore_ascii_case("GMT") || day.len() != 2 || year.len() != 4 {
                        return None;
                    }
                    (number(year)?, month_number(month)?, number(day)?, *time)
                }
                // RFC 850: `Sunday, 06-Nov-94 08:49:37 GMT`.
                [date, time, gmt] if is_day_name(day_name, true) => {
                    let mut dmy = date.split('-');
                    let (day, month, year) = (dmy.next()?, dmy.next()?, dmy.next()?);
                    if dmy.next().is_some() || !gmt.eq_ignore_ascii_case("GMT") || day.len() != 2 || year.len() != 2 {
                        return None;
                    }
                    (two_digit_year(number(year)?), month_number(month)?, number(day)?, *time)
                }
                _ => return None,
            }
        }
        // asctime: `Sun Nov  6 08:49:37 1994` (a day below 10 padded with a space).
        None => {
            let parts: Vec<&str> = text.split(' ').collect();
            let (day_name, month, day, time, year) = match parts.as_slice() {
                [w, m, "", d, t, y] if d.len() == 1 => (*w, *m, *d, *t, *y),
                [w, m, d, t, y] if d.len() == 2 => (*w, *m, *d, *t, *y),
                _ => return None,
            };
            if !is_day_name(day_name, false) || year.len() != 4 {
                return None;
            }
            (number(year)?, month_number(month)?, number(day)?, time)
        }
    };
    let mut hms = time.split(':');
    let (h, m, s) = (hms.next()?, hms.next()?, hms.next()?);
    if hms.next().is_some() || h.len() != 2 || m.len() != 2 || s.len() != 2 {
        return None;
    }
    let (h, m, s) = (number(h)?, number(m)?, number(s)?);
    // (60: a leap second, read as the next.)
    if h > 23 || m > 59 || s > 60 || year < 1970 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// A day name in any case: the three-letter one, or (RFC 850) the full one. Whether it is the
/// date's day is not checked: it says nothing the date does not.
fn is_day_name(name: &str, full: bool) -> bool {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    DAYS.iter().any(|d| {
        if full {
            name.eq_ignore_ascii_case(d)
        } else {
            name.eq_ignore_ascii_case(&d[..3])
        }
    })
}

/// Digits only (at most 4), as a number.
fn number(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
}

/// RFC 9110 §5.6.7: a two-digit year that would be more than 50 years in the future is in the
/// past century. Read against the year 2000 (70-99: 1900s), as common parsers do.
fn two_digit_year(yy: u64) -> u64 {
    if yy < 70 { 2000 + yy } else { 1900 + yy }
}

fn month_number(name: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    if name.len() != 3 {
        return None;
    }
    MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(name))
        .map(|i| i as u64 + 1)
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date on or after it (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_6_1994: u64 = 784_111_777;

    /// RFC 9110 §5.6.7: the three formats, in any case, and nothing else.
    #[test]
    fn http_dates_are_read_in_all_three_formats_and_any_case() {
        let at = |s| parse(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
        for ok in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun Nov 06 08:49:37 1994",
            "SUN, 06 NOV 1994 08:49:37 gmt",
            "sun nov  6 08:49:37 1994",
            "SUNDAY, 06-nov-94 08:49:37 GMT",
            // The day name is not checked against the date.
            "Thu, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(at(ok), Some(NOV_6_1994), "{ok}");
        }
        for bad in [
            "",
            "0",
            "-1",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 November 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "1994-11-06T08:49:37Z",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun, 06  Nov  1994 08:49:37 GMT",
            "Sun, 06-Nov-1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08.49.37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov   6 08:49:37 1994",
            "Sun, 06-Nov-94 08:49:37 GMT",
            "Sunday, 06 Nov 1994 08:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
        assert_eq!(at("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(at("Tue, 29 Feb 2000 00:00:00 GMT"), Some(951_782_400));
        assert_eq!(at("Wednesday, 01-Jan-25 00:00:00 GMT"), Some(1_735_689_600));
        assert_eq!(at("Thu Aug  8 02:01:18 2050"), Some(2_543_536_878));
    }
}
