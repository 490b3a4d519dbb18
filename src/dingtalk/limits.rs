//! The QPS limiter every call passes through, and the retry back-off.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// A sliding-window limiter with even spacing: at most `limit` permits in any window of
/// `window`, and consecutive permits at least `spacing` apart.
///
/// DingTalk counts calls per app per second but does not say how (fixed one-second buckets, a
/// sliding window, a leaky bucket). A token bucket would allow a full burst right after a second
/// of steady traffic, i.e. up to twice the limit inside one second. Spacing permits evenly
/// (`1 s / qps`) stays under every one of those schemes, and remembering the times of the last
/// `limit` permits makes "never more than `limit` in any window" hold exactly, with a small guard
/// for network jitter. Each caller *reserves* its slot and sleeps outside the lock, so waiters
/// are served in arrival order and nobody spins.
#[derive(Debug)]
pub(crate) struct QpsLimiter {
    limit: usize,
    window: Duration,
    spacing: Duration,
    /// Start times of the last `limit` permits, oldest first (reserved future slots included).
    /// A std mutex: it is held only to read and push an `Instant`, never across an await.
    slots: Mutex<VecDeque<Instant>>,
}

/// Slack added to the one-second window. The server counts arrival times, and two requests sent
/// 1 s apart can arrive less than 1 s apart when the first is delayed a little on the way.
const WINDOW_GUARD: Duration = Duration::from_millis(20);

impl QpsLimiter {
    /// A limiter for `qps` calls per second (at least 1).
    pub(crate) fn per_second(qps: u32) -> Self {
        let qps = qps.max(1);
        Self::new(
            qps as usize,
            Duration::from_secs(1) + WINDOW_GUARD,
            Duration::from_secs(1) / qps,
        )
    }

    pub(crate) fn new(limit: usize, window: Duration, spacing: Duration) -> Self {
        QpsLimiter {
            limit: limit.max(1),
            window,
            spacing,
            // Grows to the calls made in one window; a huge configured QPS does not pre-allocate.
            slots: Mutex::new(VecDeque::with_capacity(limit.clamp(1, 1024))),
        }
    }

    /// Waits until a call may start.
    pub(crate) async fn acquire(&self) {
        let now = Instant::now();
        let start_at = self.reserve(now);
        // Only sleep when there is something to wait for: tokio's timer rounds every sleep up
        // to its next millisecond tick, so an "already due" sleep would still cost ~1 ms a call.
        if start_at > now {
            tokio::time::sleep_until(start_at).await;
        }
    }

    /// Books the earliest slot at or after `now` and returns its time.
    fn reserve(&self, now: Instant) -> Instant {
        // A poisoned lock only means another caller panicked between two plain pushes; the
        // queue is still a valid list of instants, so keep using it.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = match slots.back() {
            Some(last) => now.max(*last + self.spacing),
            None => now,
        };
        if slots.len() >= self.limit {
            // The new call may also start only once the oldest of the last `limit` is a window
            // old. Reservations are handed out in increasing order, so the queue stays sorted.
            if let Some(oldest) = slots.pop_front() {
                at = at.max(oldest + self.window);
            }
        }
        slots.push_back(at);
        at
    }
}

/// Exponential back-off with jitter: attempt `n` (0-based) waits a random time in
/// `[d/2, d]` where `d = min(max, base * 2^n)`. The jitter keeps replicas that were throttled
/// together from coming back together.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(16));
    let full = base.saturating_mul(factor).min(max);
    let half = full / 2;
    let spread = full.saturating_sub(half).as_micros() as u64;
    let jitter = if spread == 0 {
        0
    } else {
        rand::thread_rng().gen_range(0..=spread)
    };
    half + Duration::from_micros(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_in_any_window() {
        let limiter = std::sync::Arc::new(QpsLimiter::new(
            5,
            Duration::from_secs(1),
            Duration::from_millis(100),
        ));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..23 {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                limiter.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count();
            assert!(
                in_window <= 5,
                "{in_window} permits in the window after #{i}"
            );
        }
        // Spaced 100 ms apart, but the window pushes every fifth permit to a full second after
        // the one five before it: 0, .1, .2, .3, .4, 1.0, 1.1, … so #22 starts at 4.2 s.
        assert_eq!(times[22] - start, Duration::from_millis(4200));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_evenly_and_the_first_is_not_delayed() {
        let limiter = QpsLimiter::per_second(20);
        let start = Instant::now();
        limiter.acquire().await;
        assert_eq!(Instant::now(), start);
        for _ in 1..20 {
            limiter.acquire().await;
        }
        assert_eq!(Instant::now() - start, Duration::from_millis(19 * 50));
        // The 21st waits for the window (1 s + guard) after the first, not just 50 ms.
        limiter.acquire().await;
        assert_eq!(
            Instant::now() - start,
            Duration::from_secs(1) + WINDOW_GUARD
        );
        // After an idle spell the next call goes at once.
        tokio::time::advance(Duration::from_secs(5)).await;
        let idle = Instant::now();
        limiter.acquire().await;
        assert_eq!(Instant::now(), idle);
    }

    #[tokio::test]
    async fn due_permits_do_not_touch_the_timer() {
        // Real time on purpose: tokio rounds sleeps up to a millisecond tick, so 200 permits
        // that each went through the timer would take at least 200 ms.
        let limiter = QpsLimiter::new(1_000_000, Duration::from_secs(1), Duration::ZERO);
        let start = std::time::Instant::now();
        for _ in 0..200 {
            limiter.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(100), "{elapsed:?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        for _ in 0..100 {
            let d0 = backoff(0, base, max);
            assert!(d0 >= Duration::from_millis(50) && d0 <= base, "{d0:?}");
            let d3 = backoff(3, base, max);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d10 = backoff(10, base, max);
            assert!(d10 >= Duration::from_millis(500) && d10 <= max);
        }
        assert_eq!(backoff(40, Duration::ZERO, max), Duration::ZERO);
    }
}
