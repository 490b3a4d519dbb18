//! The monthly API call counter: persisted behind [`CallCounter`], warned about at a threshold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

/// Where the monthly call count lives. The stores implement it (SQLite, PostgreSQL) so the count
/// survives restarts and is shared by replicas; [`MemoryCounter`] is for tests.
///
/// `month` is the UTC month as `"YYYY-MM"` (see [`current_month`]).
#[async_trait]
pub trait CallCounter: Send + Sync + 'static {
    /// Adds `n` calls to `month` and returns the new total.
    async fn add_calls(&self, month: &str, n: u64) -> Result<u64, CounterError>;
    /// The current total for `month` (0 when nothing was counted).
    async fn calls(&self, month: &str) -> Result<u64, CounterError>;
}

/// A counter back-end failed. The client logs it and carries on: bookkeeping never fails a call.
#[derive(Debug, thiserror::Error)]
#[error("call counter: {0}")]
pub struct CounterError(pub String);

/// An in-memory [`CallCounter`], for tests and for running without a store.
#[derive(Debug, Default)]
pub struct MemoryCounter {
    /// A std mutex: held only for a map update, never across an await.
    months: Mutex<HashMap<String, u64>>,
}

impl MemoryCounter {
    /// An empty counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a month's total, e.g. to simulate calls made by another replica.
    pub fn set(&self, month: &str, total: u64) {
        let mut months = self.months.lock().unwrap_or_else(|p| p.into_inner());
        months.insert(month.to_owned(), total);
    }
}

#[async_trait]
impl CallCounter for MemoryCounter {
    async fn add_calls(&self, month: &str, n: u64) -> Result<u64, CounterError> {
        let mut months = self.months.lock().unwrap_or_else(|p| p.into_inner());
        let total = months.entry(month.to_owned()).or_insert(0);
        *total += n;
        Ok(*total)
    }

    async fn calls(&self, month: &str) -> Result<u64, CounterError> {
        let months = self.months.lock().unwrap_or_else(|p| p.into_inner());
        Ok(months.get(month).copied().unwrap_or(0))
    }
}

/// How much of the monthly quota is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaStatus {
    /// The month counted, `"YYYY-MM"` UTC.
    pub month: String,
    /// Calls counted this month (by every replica sharing the store).
    pub used: u64,
    /// The configured monthly quota.
    pub limit: u64,
    /// `limit - used`, never below zero.
    pub remaining: u64,
}

/// The current UTC month as `"YYYY-MM"`.
pub fn current_month() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    month_of(secs)
}

/// The UTC month `"YYYY-MM"` that contains `epoch_secs` (seconds since 1970-01-01T00:00:00Z).
pub fn month_of(epoch_secs: u64) -> String {
    let (year, month) = year_month_from_days((epoch_secs / 86_400) as i64);
    format!("{year:04}-{month:02}")
}

/// Civil (proleptic Gregorian) year and month of a day count since 1970-01-01.
///
/// Counts in 400-year eras of 146 097 days, with the year starting on 1 March so the leap day
/// falls at the end of the year and the month lengths before it are fixed.
fn year_month_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468; // shift the epoch to 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_based_month = (5 * day_of_year + 2) / 153; // 0 = March … 11 = February
    let month = if march_based_month < 10 {
        march_based_month + 3
    } else {
        march_based_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32)
}

/// Warning levels already logged for one month, so each is logged once per process.
#[derive(Debug, Default)]
struct Warned {
    month: String,
    level: u8,
}

/// The client's side of the quota: counts through the [`CallCounter`], keeps the last total for
/// `/metrics`, logs once when the warning threshold and once when the quota is crossed.
pub(crate) struct QuotaTracker {
    counter: Arc<dyn CallCounter>,
    limit: u64,
    warn_ratio: f64,
    /// Last total seen from the counter, so `/metrics` can read it without a store round trip.
    last_used: AtomicU64,
    /// How many threshold warnings were logged (observable by tests and metrics).
    warnings: AtomicU64,
    /// A std mutex: only compared and updated, never held across an await.
    warned: Mutex<Warned>,
}

impl QuotaTracker {
    pub(crate) fn new(counter: Arc<dyn CallCounter>, limit: u64, warn_ratio: f64) -> Self {
        QuotaTracker {
            counter,
            limit,
            warn_ratio,
            last_used: AtomicU64::new(0),
            warnings: AtomicU64::new(0),
            warned: Mutex::new(Warned::default()),
        }
    }

    /// Counts one metered call. Counter failures are logged, never returned.
    pub(crate) async fn record_call(&self) {
        let month = current_month();
        match self.counter.add_calls(&month, 1).await {
            Ok(total) => {
                self.last_used.store(total, Ordering::Relaxed);
                self.check_thresholds(&month, total);
            }
            Err(err) => tracing::warn!(error = %err, "could not count a DingTalk API call"),
        }
    }

    /// Used, limit and remaining for the current month. Falls back to the last known total when
    /// the counter cannot be read.
    pub(crate) async fn status(&self) -> QuotaStatus {
        let month = current_month();
        let used = match self.counter.calls(&month).await {
            Ok(total) => {
                self.last_used.store(total, Ordering::Relaxed);
                self.check_thresholds(&month, total);
                total
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not read the DingTalk call counter");
                self.last_used.load(Ordering::Relaxed)
            }
        };
        QuotaStatus {
            month,
            used,
            limit: self.limit,
            remaining: self.limit.saturating_sub(used),
        }
    }

    pub(crate) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    pub(crate) fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Relaxed)
    }

    fn check_thresholds(&self, month: &str, used: u64) {
        let level = if self.limit > 0 && used >= self.limit {
            2
        } else if (used as f64) >= (self.limit as f64) * self.warn_ratio {
            1
        } else {
            0
        };
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.month != month {
            *warned = Warned {
                month: month.to_owned(),
                level: 0,
            };
        }
        if level <= warned.level {
            return;
        }
        warned.level = level;
        drop(warned);
        self.warnings.fetch_add(1, Ordering::Relaxed);
        let percent = if self.limit == 0 {
            100.0
        } else {
            used as f64 * 100.0 / self.limit as f64
        };
        if level == 2 {
            tracing::warn!(
                month,
                used,
                limit = self.limit,
                "DingTalk monthly API quota used up; further calls will be refused with 90020"
            );
        } else {
            tracing::warn!(
                month,
                used,
                limit = self.limit,
                percent = format!("{percent:.0}"),
                "DingTalk monthly API quota above the warning threshold"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_from_epoch_seconds() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(951_782_400), "2000-02"); // 2000-02-29T00:00:00Z, leap day
        assert_eq!(month_of(951_868_799), "2000-02"); // 2000-02-29T23:59:59Z
        assert_eq!(month_of(951_868_800), "2000-03");
        assert_eq!(month_of(1_735_689_599), "2024-12"); // 2024-12-31T23:59:59Z
        assert_eq!(month_of(1_735_689_600), "2025-01");
        assert_eq!(month_of(1_793_404_800), "2026-10"); // 2026-10-31T00:00:00Z
        assert_eq!(month_of(1_793_491_199), "2026-10"); // 2026-10-31T23:59:59Z
        assert_eq!(month_of(1_793_491_200), "2026-11"); // 2026-11-01T00:00:00Z
        assert_eq!(month_of(4_107_542_399), "2100-02"); // 2100-02-28T23:59:59Z: no 29th
        assert_eq!(month_of(4_107_542_400), "2100-03");
    }

    #[test]
    fn every_day_of_four_centuries_has_a_sane_month() {
        let mut previous = (1970, 1);
        for day in 0..(400 * 366) {
            let current = year_month_from_days(day);
            assert!(
                current == previous || next_month(previous) == current,
                "day {day}"
            );
            previous = current;
        }
    }

    fn next_month((y, m): (i64, u32)) -> (i64, u32) {
        if m == 12 {
            (y + 1, 1)
        } else {
            (y, m + 1)
        }
    }

    #[tokio::test]
    async fn tracker_warns_once_per_level() {
        let counter = Arc::new(MemoryCounter::new());
        let tracker = QuotaTracker::new(counter.clone(), 10, 0.8);
        for _ in 0..7 {
            tracker.record_call().await;
        }
        assert_eq!(tracker.warnings(), 0);
        tracker.record_call().await; // 8 of 10
        tracker.record_call().await; // 9 of 10
        assert_eq!(tracker.warnings(), 1);
        tracker.record_call().await; // 10 of 10
        assert_eq!(tracker.warnings(), 2);
        let status = tracker.status().await;
        assert_eq!((status.used, status.remaining), (10, 0));
    }
}
