//! Time, in one place: the clock, durations as milliseconds and as configuration text, and the
//! fixed UTC offsets DingTalk's dates and clock times are read and shown in.
//!
//! Instants are epoch milliseconds (`i64`) everywhere in dinghook: that is what DingTalk sends
//! and what the store keeps. The calendar arithmetic is jiff's; this module only adapts it to
//! those milliseconds and to the text forms DingTalk and the configuration use.

use std::time::Duration;

use jiff::civil::DateTime;
use jiff::tz::Offset;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Current Unix time in milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `d` in whole milliseconds, saturating at `i64::MAX` (a "forever" configured as a huge
/// duration stays forever instead of wrapping).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `now_ms + d`, saturating.
pub fn after(now_ms: i64, d: Duration) -> i64 {
    now_ms.saturating_add(millis(d))
}

/// Parses a duration written as `10s`, `5m`, `1h 30m`, `250ms`, or `0` (disabled).
/// `epoch_ms` as RFC 3339 in UTC with milliseconds (`2026-11-29T05:16:56.123Z`), clamped to
/// jiff's range (±9999 years).
pub fn rfc3339_millis(epoch_ms: i64) -> String {
    let ts = Timestamp::from_millisecond(epoch_ms).unwrap_or(if epoch_ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    format!("{ts:.3}")
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 10s, 5m or 1h ({e})"))
}

/// `d` as configuration text (`1h 30m`), the inverse of [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serde for a duration written as text (`#[serde(with = "crate::time::duration_str")]`).
/// A number is taken as seconds, so `timeout = 5` means five seconds.
pub mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Text {
            Seconds(u64),
            Text(String),
        }
        match serde::Deserialize::deserialize(d)? {
            Text::Seconds(s) => Ok(Duration::from_secs(s)),
            Text::Text(t) => super::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Serde for a list of durations: `["5s", "30s", "2m"]`, or one comma-separated string
/// `"5s,30s,2m"` (the form an environment variable gives).
pub mod duration_list {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|d| super::format_duration(*d)))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items: Vec<String> = crate::setting::list_or_csv(d)?;
        items
            .iter()
            .map(|t| super::parse_duration(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A fixed offset from UTC, written `+08:00`, `-05:30`, `+8`, `Z` or `UTC`. DingTalk's China
/// data centre works in +08:00 (no daylight saving), so that is the default wherever dates
/// are read or shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcOffset(Offset);

impl UtcOffset {
    /// China Standard Time, +08:00.
    pub const CHINA: UtcOffset = UtcOffset(Offset::constant(8));
    pub const UTC: UtcOffset = UtcOffset(Offset::UTC);

    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
            return Ok(UtcOffset::UTC);
        }
        let bad = || format!("{text:?} is not a UTC offset like +08:00 or -05:30");
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let (hours, minutes) = rest.split_once(':').unwrap_or((rest, "0"));
        let hours: i32 = hours.parse().map_err(|_| bad())?;
        let minutes: i32 = minutes.parse().map_err(|_| bad())?;
        if !(0..=14).contains(&hours) || !(0..60).contains(&minutes) {
            return Err(bad());
        }
        Offset::from_seconds(sign * (hours * 3600 + minutes * 60))
            .map(UtcOffset)
            .map_err(|_| bad())
    }

    /// The local date and time of `epoch_ms` at this offset (instants outside jiff's range,
    /// ±9999 years, are clamped to it).
    fn local(self, epoch_ms: i64) -> DateTime {
        let ts = Timestamp::from_millisecond(epoch_ms).unwrap_or(if epoch_ms < 0 {
            Timestamp::MIN
        } else {
            Timestamp::MAX
        });
        self.0.to_datetime(ts)
    }

    /// `yyyy-MM-dd` of `epoch_ms` at this offset.
    pub fn date(self, epoch_ms: i64) -> String {
        self.local(epoch_ms).date().to_string()
    }

    /// `HH:mm` of `epoch_ms` at this offset.
    pub fn clock(self, epoch_ms: i64) -> String {
        self.local(epoch_ms).strftime("%H:%M").to_string()
    }

    /// `yyyy-MM-dd HH:mm` of `epoch_ms` at this offset (how DingTalk shows a time).
    pub fn date_time(self, epoch_ms: i64) -> String {
        self.local(epoch_ms).strftime("%Y-%m-%d %H:%M").to_string()
    }

    /// A DingTalk time: epoch ms (as digits), or `yyyy-MM-dd HH:mm[:ss]` at this offset.
    pub fn parse_time(self, text: &str) -> Option<i64> {
        let t = text.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return t.parse().ok();
        }
        // A date alone is not a time.
        if !t.contains([' ', 'T']) {
            return None;
        }
        let local: DateTime = t.parse().ok()?;
        let ts = self.0.to_timestamp(local).ok()?;
        Some(ts.as_millisecond())
    }
}

impl Default for UtcOffset {
    fn default() -> Self {
        UtcOffset::CHINA
    }
}

impl std::fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.seconds();
        let sign = if secs < 0 { '-' } else { '+' };
        let minutes = secs.abs() / 60;
        write!(f, "{sign}{:02}:{:02}", minutes / 60, minutes % 60)
    }
}

impl Serialize for UtcOffset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcOffset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UtcOffset::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_at_an_offset() {
        let china = UtcOffset::CHINA;
        // 2019-10-11 11:04:40 UTC = 19:04:40 in China.
        assert_eq!(china.date(1_570_791_880_000), "2019-10-11");
        assert_eq!(china.clock(1_570_791_880_000), "19:04");
        // 2024-02-29 16:30 UTC is already 1 March in China, still 29 February in UTC.
        let t = UtcOffset::parse("Z")
            .unwrap()
            .parse_time("2024-02-29 16:30:00")
            .unwrap();
        assert_eq!(china.date(t), "2024-03-01");
        assert_eq!(UtcOffset::parse("+00:00").unwrap().date(t), "2024-02-29");
        assert_eq!(UtcOffset::parse("-05:30").unwrap().clock(t), "11:00");
        assert_eq!(china.date(-1), "1970-01-01");
        assert_eq!(UtcOffset::UTC.date(-1), "1969-12-31");
        assert_eq!(china.date(i64::MAX), "9999-12-31");
    }

    #[test]
    fn times_are_shown_in_china_standard_time_by_default() {
        let china = UtcOffset::default();
        assert_eq!(china.date_time(0), "1970-01-01 08:00");
        // 2024-02-29 15:59:59 UTC, a leap day.
        assert_eq!(china.date_time(1_709_222_399_000), "2024-02-29 23:59");
        // 2023-12-31 16:00 UTC is already the new year in Beijing.
        assert_eq!(china.date_time(1_704_038_400_000), "2024-01-01 00:00");
        assert_eq!(china.date_time(-1), "1970-01-01 07:59");
    }

    #[test]
    fn times_round_trip_and_bad_input_is_refused() {
        let china = UtcOffset::CHINA;
        for ms in [0_i64, 951_782_400_000, 1_570_791_880_000, 4_102_444_800_000] {
            let text = format!("{} {}:00", china.date(ms), china.clock(ms));
            assert_eq!(
                china.parse_time(&text),
                Some(ms - ms.rem_euclid(60_000)),
                "{text}"
            );
        }
        assert_eq!(china.parse_time("1570791880000"), Some(1_570_791_880_000));
        assert_eq!(
            china.parse_time("2019-10-11 19:04"),
            china.parse_time("2019-10-11T19:04:00")
        );
        for bad in ["", "2019-13-01 09:00:00", "2019-10-11", "09:00", "x y"] {
            assert_eq!(china.parse_time(bad), None, "{bad}");
        }
        for bad in ["8", "+15:00", "+08:60", "08:00", "+x"] {
            assert!(UtcOffset::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(UtcOffset::parse("+8").unwrap(), china);
        let shown = serde_json::to_string(&UtcOffset::parse("-05:30").unwrap()).unwrap();
        assert_eq!(shown, "\"-05:30\"");
    }

    #[test]
    fn durations_parse_and_convert() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), i64::MAX);
        assert_eq!(after(i64::MAX - 1, Duration::from_secs(1)), i64::MAX);
    }
}
