//! Attendance work dates at DingTalk's fixed UTC+08:00 (China has no daylight saving time), in
//! plain arithmetic.

const DAY_MS: i64 = 86_400_000;
/// UTC+08:00 in ms.
const CHINA_OFFSET_MS: i64 = 8 * 3_600_000;

/// The work dates `workDateFrom` to `workDateTo` cover, as `[start, end)` in epoch ms at
/// DingTalk's +08:00: whole days, whatever the time of day given (DingTalk's examples use
/// 00:00:00). Refused like DingTalk: not `yyyy-MM-dd HH:mm:ss`, reversed, or more than 7 days
/// apart.
pub(crate) fn work_date_span(from: &str, to: &str) -> Result<(i64, i64), String> {
    let (Some(start), Some(last)) = (china_day_start(from), china_day_start(to)) else {
        return Err(format!(
            "workDateFrom / workDateTo 格式应为 yyyy-MM-dd HH:mm:ss: {from:?}, {to:?}"
        ));
    };
    if last < start {
        return Err("workDateTo 早于 workDateFrom".to_owned());
    }
    if last - start > 7 * DAY_MS {
        return Err("workDateFrom 与 workDateTo 最多相隔 7 天".to_owned());
    }
    Ok((start, last + DAY_MS))
}

/// The `yyyy-MM-dd` of a `yyyy-MM-dd HH:mm:ss` with a real date and time (what
/// `getupdatedata`'s `work_date` is sent as); `None` for any other text.
pub(crate) fn day_of(text: &str) -> Option<String> {
    china_day_start(text)?;
    let (day, _) = text.trim().split_once(' ')?;
    Some(day.to_owned())
}

/// Epoch ms of the +08:00 midnight that starts the day of `yyyy-MM-dd HH:mm:ss`; `None` unless
/// the text is exactly that shape with a real date and time.
fn china_day_start(text: &str) -> Option<i64> {
    let (date, clock) = text.trim().split_once(' ')?;
    let date: Vec<&str> = date.split('-').collect();
    let clock: Vec<&str> = clock.split(':').collect();
    let ([year, month, day], [hour, minute, second]) = (date.as_slice(), clock.as_slice()) else {
        return None;
    };
    let widths = [
        (year, 4),
        (month, 2),
        (day, 2),
        (hour, 2),
        (minute, 2),
        (second, 2),
    ];
    if widths
        .iter()
        .any(|(field, width)| field.len() != *width || !field.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let number = |field: &str| field.parse::<i64>().ok();
    let (year, month, day) = (number(year)?, number(month)?, number(day)?);
    let (hour, minute, second) = (number(hour)?, number(minute)?, number(second)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * DAY_MS - CHINA_OFFSET_MS)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midnight_at_plus_eight() {
        // 2024-05-06 00:00 at +08:00 is 2024-05-05 16:00 UTC.
        assert_eq!(
            china_day_start("2024-05-06 00:00:00"),
            Some(1_714_924_800_000)
        );
        // Any time of day gives the same day.
        assert_eq!(
            china_day_start("2024-05-06 23:59:59"),
            Some(1_714_924_800_000)
        );
        assert_eq!(
            china_day_start("1970-01-01 08:00:00"),
            Some(-CHINA_OFFSET_MS)
        );
        assert_eq!(
            china_day_start("2024-02-29 12:00:00"),
            Some(1_709_136_000_000)
        );
    }

    #[test]
    fn refuses_what_is_not_yyyy_mm_dd_hh_mm_ss() {
        for text in [
            "2024-05-06",
            "2024-05-06T00:00:00",
            "2024-05-06 00:00",
            "2024-5-6 00:00:00",
            "2024-13-01 00:00:00",
            "2023-02-29 00:00:00",
            "2024-04-31 00:00:00",
            "2024-05-06 24:00:00",
            "2024-05-06 00:60:00",
            "1714924800000",
            "",
        ] {
            assert_eq!(china_day_start(text), None, "{text:?}");
        }
    }

    #[test]
    fn the_day_of_a_date_and_time() {
        assert_eq!(day_of("2026-11-02 00:00:00").as_deref(), Some("2026-11-02"));
        assert_eq!(
            day_of(" 2024-02-29 09:30:00 ").as_deref(),
            Some("2024-02-29")
        );
        for text in [
            "2026-11-02",
            "2023-02-29 00:00:00",
            "2026-11-02T00:00:00",
            "",
        ] {
            assert_eq!(day_of(text), None, "{text:?}");
        }
    }

    #[test]
    fn spans_whole_days_at_most_seven_apart() {
        let (start, end) = work_date_span("2024-05-06 00:00:00", "2024-05-06 00:00:00").unwrap();
        assert_eq!((start, end - start), (1_714_924_800_000, DAY_MS));
        let (start, end) = work_date_span("2024-05-01 10:00:00", "2024-05-08 00:00:00").unwrap();
        assert_eq!(end - start, 8 * DAY_MS);
        assert!(work_date_span("2024-05-01 00:00:00", "2024-05-09 00:00:00").is_err());
        assert!(work_date_span("2024-05-02 00:00:00", "2024-05-01 00:00:00").is_err());
        assert!(work_date_span("2024-05-02", "2024-05-03 00:00:00").is_err());
    }
}
