//! The QPS limiter every call passes through, and the retry back-off.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A sliding-window limiter with even spacing: at most `limit` permits in any window of
/// `window`, and consecutive permits at least `spacing` apart.
///
/// DingTalk counts calls per app per second but does not say how (fixed one-second buckets, a
/// sliding window, a leaky bucket). A token bucket would allow a full burst right after a second
/// of steady traffic, i.e. up to twice the limit inside one second. Spacing permits evenly
/// (`1 s / qps`) stays under every one of those schemes, and remembering the times of the
/// permits of the last window makes "never more than `limit` in any window" hold exactly, with
/// a small guard for network jitter. Each caller *reserves* its slot and sleeps outside the
/// lock, so waiters are served in arrival order and nobody spins.
///
/// The rate can change while calls wait ([`QpsLimiter::set_per_second`]: replicas sharing one
/// budget, see [`QpsShare`]). A change drops the reservations not yet due and wakes their
/// waiters, who book again under the new rate; the starts already made stay, so a lower rate
/// holds at once (the next start waits until the window after the `limit`-th newest start)
/// and no change can make a burst. Rate 0 holds every call until a rate is given.
#[derive(Debug)]
pub(crate) struct QpsLimiter {
    window: Duration,
    /// A std mutex: it is held only to read and push an `Instant`, never across an await.
    state: Mutex<Slots>,
    /// Wakes the waiters when the rate changes: their reservations were dropped (or they wait
    /// for a rate above 0). Only waiters with something to wait for register, so a call that
    /// is due at once does not touch it.
    changed: Notify,
}

#[derive(Debug)]
struct Slots {
    /// Permits in any window; 0 holds every call.
    limit: usize,
    spacing: Duration,
    /// Start times of the permits of the last window, oldest first (reserved future slots
    /// included). Sorted, since reservations are handed out in increasing order.
    times: VecDeque<Instant>,
    /// Bumped by every rate change, so a waiter knows its reservation may be gone.
    generation: u64,
}

/// Slack added to the one-second window. The server counts arrival times, and two requests sent
/// 1 s apart can arrive less than 1 s apart when the first is delayed a little on the way.
const WINDOW_GUARD: Duration = Duration::from_millis(20);

/// The window of [`QpsLimiter::per_second`]: one second and the guard.
pub(crate) const QPS_WINDOW: Duration =
    Duration::from_millis(1000 + WINDOW_GUARD.as_millis() as u64);

impl QpsLimiter {
    /// A limiter for `qps` calls per second (at least 1).
    pub(crate) fn per_second(qps: u32) -> Self {
        let qps = qps.max(1);
        Self::new(qps as usize, QPS_WINDOW, Duration::from_secs(1) / qps)
    }

    pub(crate) fn new(limit: usize, window: Duration, spacing: Duration) -> Self {
        QpsLimiter {
            window,
            state: Mutex::new(Slots {
                limit: limit.max(1),
                spacing,
                // Grows to the calls made in one window; a huge QPS does not pre-allocate.
                times: VecDeque::with_capacity(limit.clamp(1, 1024)),
                generation: 0,
            }),
            changed: Notify::new(),
        }
    }

    /// Changes the rate to `qps` calls per second (0: no call until the rate is raised).
    /// Lowering holds for the very next call; raising frees the waiters at once, so a raise is
    /// the caller's to time (see [`QpsShare`]).
    pub(crate) fn set_per_second(&self, qps: u32) {
        let now = Instant::now();
        {
            let mut slots = self.lock();
            if slots.limit == qps as usize {
                return;
            }
            slots.limit = qps as usize;
            slots.spacing = if qps == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(1) / qps
            };
            // Reservations not yet due were made under the old rate: drop them, their waiters
            // book again. Starts already made stay and count against the new limit.
            while slots.times.back().is_some_and(|t| *t > now) {
                slots.times.pop_back();
            }
            slots.generation += 1;
        }
        self.changed.notify_waiters();
    }

    /// Waits until a call may start.
    pub(crate) async fn acquire(&self) {
        loop {
            let now = Instant::now();
            let (at, generation) = self.reserve(now);
            // Only sleep when there is something to wait for: tokio's timer rounds every sleep
            // up to its next millisecond tick, so an "already due" sleep would still cost ~1 ms
            // a call.
            if at.is_some_and(|at| at <= now) {
                return;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().generation != generation {
                // The rate changed between the booking and the registration: book again.
                continue;
            }
            match at {
                None => changed.await,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            if self.lock().generation == generation {
                                return;
                            }
                            // Changed as the slot came: it may have been dropped, book again
                            // (at worst a slot booked twice, which only slows).
                        }
                        () = &mut changed => {}
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A poisoned lock only means another caller panicked between two plain pushes; the
        // queue is still a valid list of instants, so keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Books the earliest slot at or after `now` and returns its time (`None` at rate 0) and
    /// the rate's generation.
    fn reserve(&self, now: Instant) -> (Option<Instant>, u64) {
        let mut slots = self.lock();
        let generation = slots.generation;
        if slots.limit == 0 {
            return (None, generation);
        }
        // Starts a window old count for no future window.
        while slots.times.front().is_some_and(|t| *t + self.window <= now) {
            slots.times.pop_front();
        }
        let mut at = match slots.times.back() {
            Some(last) => now.max(*last + slots.spacing),
            None => now,
        };
        let len = slots.times.len();
        if len >= slots.limit {
            // The new call may also start only once the `limit`-th newest start is a window
            // old.
            at = at.max(slots.times[len - slots.limit] + self.window);
        }
        slots.times.push_back(at);
        (Some(at), generation)
    }
}

/// How often a replica sharing a QPS budget writes its heartbeat and reads the members.
pub const SHARE_HEARTBEAT: Duration = Duration::from_secs(1);

/// A member not seen for this long is gone, and its share goes to the others: three
/// heartbeats, so one slow statement does not evict a live replica.
pub const SHARE_LIVE: Duration = Duration::from_secs(3);

/// How long a higher share must stand before it is used: one heartbeat (by then every other
/// member has read the membership this share comes from, and lowered its own share if it had
/// to), one window (by then their calls at the old rate have left every window) and half a
/// second for the heartbeat statements' own time. Lowering is never delayed.
pub(crate) const SHARE_RAISE_DELAY: Duration =
    Duration::from_millis(SHARE_HEARTBEAT.as_millis() as u64 + QPS_WINDOW.as_millis() as u64 + 500);

/// One member's part of a QPS budget shared by several: `qps` divided among the `members` (in
/// their order, the remainder to the first ones). A member not in the list has no share.
/// When there are more members than calls per second, the last ones get 0 and hold their calls.
pub(crate) fn share_of(qps: u32, members: &[String], me: &str) -> u32 {
    let Some(rank) = members.iter().position(|m| m == me) else {
        return 0;
    };
    let n = u32::try_from(members.len()).unwrap_or(u32::MAX);
    let rank = u32::try_from(rank).unwrap_or(u32::MAX);
    qps / n + u32::from(rank < qps % n)
}

/// The share this member uses, moved toward the share the membership gives: down at once, up
/// only once the higher share has stood for [`SHARE_RAISE_DELAY`]. The members' views of the
/// membership differ for up to a heartbeat; a member lowering late or raising early is what
/// could put the sum over the budget, so a raise waits until every other member has read the
/// same membership and its calls at the old rate are out of the window.
#[derive(Debug)]
pub(crate) struct QpsShare {
    /// The share in use.
    pub(crate) applied: u32,
    /// A higher share offered, and since when it has been offered without a change.
    pending: Option<(u32, Instant)>,
    /// Whether a membership was offered yet.
    seen: bool,
}

impl QpsShare {
    pub(crate) fn new(applied: u32) -> Self {
        QpsShare {
            applied,
            pending: None,
            seen: false,
        }
    }

    /// Offers the share of the first membership read, which had `members` members. A replica
    /// that finds itself alone uses it at once: no live member is there to make room (one
    /// starting at the same moment reads this one and waits), so a lone replica, or one
    /// restarted after its old row expired, does not wait for nothing. Otherwise as
    /// [`QpsShare::offer`].
    pub(crate) fn offer_first(&mut self, target: u32, members: usize, now: Instant) -> Option<u32> {
        let first = !self.seen;
        self.seen = true;
        if first && members == 1 && target > self.applied {
            self.applied = target;
            self.pending = None;
            return Some(target);
        }
        self.offer(target, now)
    }

    /// Offers the share the membership gives now; returns the share to use when it changed.
    pub(crate) fn offer(&mut self, target: u32, now: Instant) -> Option<u32> {
        if target <= self.applied {
            self.pending = None;
            if target < self.applied {
                self.applied = target;
                return Some(target);
            }
            return None;
        }
        match self.pending {
            Some((offered, since)) if offered == target => {
                if now.duration_since(since) >= SHARE_RAISE_DELAY {
                    self.applied = target;
                    self.pending = None;
                    return Some(target);
                }
                None
            }
            // A new higher share (another member came or went meanwhile): its own wait.
            _ => {
                self.pending = Some((target, now));
                None
            }
        }
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

    /// Starts `n` callers of `limiter` and returns their handles (each yields its start time).
    fn callers(
        limiter: &std::sync::Arc<QpsLimiter>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Instant>> {
        (0..n)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire().await;
                    Instant::now()
                })
            })
            .collect()
    }

    /// The most starts in any window of `window` among `times` (sorted).
    fn busiest(times: &[Instant], window: Duration) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|u| **u < times[i] + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_rate_holds_at_once_and_drops_the_reservations() {
        let limiter = std::sync::Arc::new(QpsLimiter::per_second(20));
        let start = Instant::now();
        // 60 callers at 20/s: reservations reach three seconds ahead.
        let tasks = callers(&limiter, 60);
        tokio::time::sleep(Duration::from_millis(525)).await;
        limiter.set_per_second(5);
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times.sort();
        // Before the change: 0, 50, … 500 ms (11 starts). After: no window holds more than 5
        // starts that came after the change, and none holds more than 5 at all once the
        // window before the change has passed.
        let changed = start + Duration::from_millis(525);
        let before = times.iter().filter(|t| **t <= changed).count();
        assert_eq!(
            before,
            11,
            "{:?}",
            times.iter().map(|t| *t - start).collect::<Vec<_>>()
        );
        let after: Vec<Instant> = times.iter().copied().filter(|t| *t > changed).collect();
        assert!(busiest(&after, QPS_WINDOW) <= 5);
        let late: Vec<Instant> = times
            .iter()
            .copied()
            .filter(|t| *t >= start + QPS_WINDOW)
            .collect();
        assert!(busiest(&late, QPS_WINDOW) <= 5);
        // The first start after the change waits for the window after the 5th-newest start
        // (300 ms): 1.32 s, not 550 ms.
        assert_eq!(after[0] - start, Duration::from_millis(300) + QPS_WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_zero_holds_every_call_until_a_rate_is_given() {
        let limiter = std::sync::Arc::new(QpsLimiter::per_second(10));
        limiter.set_per_second(0);
        let start = Instant::now();
        let tasks = callers(&limiter, 3);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(tasks.iter().all(|t| !t.is_finished()));
        limiter.set_per_second(10);
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap() - start);
        }
        times.sort();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(times, vec![ms(5000), ms(5100), ms(5200)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_raise_frees_the_waiters_at_the_new_rate() {
        let limiter = std::sync::Arc::new(QpsLimiter::per_second(1));
        let start = Instant::now();
        let tasks = callers(&limiter, 11);
        tokio::time::sleep(Duration::from_millis(10)).await;
        limiter.set_per_second(10);
        let mut last = start;
        for task in tasks {
            last = last.max(task.await.unwrap());
        }
        // One start at 0, then ten at 100 ms spacing, the tenth held to the window after the
        // first; at 1/s the last would start at 10 s.
        assert_eq!(last - start, QPS_WINDOW);
    }

    #[test]
    fn shares_add_up_to_the_budget() {
        let names = |n: usize| (0..n).map(|i| format!("m{i:02}")).collect::<Vec<_>>();
        let members = names(3);
        let shares: Vec<u32> = members.iter().map(|m| share_of(20, &members, m)).collect();
        assert_eq!(shares, vec![7, 7, 6]);
        assert_eq!(share_of(20, &members, "stranger"), 0);
        assert_eq!(share_of(20, &names(1), "m00"), 20);
        // Fewer calls than members: the last ones hold theirs.
        let shares: Vec<u32> = members.iter().map(|m| share_of(2, &members, m)).collect();
        assert_eq!(shares, vec![1, 1, 0]);
        for n in 1..12 {
            let members = names(n);
            for qps in 0..60 {
                let sum: u32 = members.iter().map(|m| share_of(qps, &members, m)).sum();
                assert_eq!(sum, qps, "{qps} among {n}");
            }
        }
    }

    #[test]
    fn a_share_drops_at_once_and_rises_after_the_delay() {
        let t0 = Instant::now();
        let mut share = QpsShare::new(0);
        // A joining member: its share stands for the delay before it is used.
        assert_eq!(share.offer(10, t0), None);
        assert_eq!(share.offer(10, t0 + Duration::from_secs(1)), None);
        assert_eq!(share.offer(10, t0 + SHARE_RAISE_DELAY), Some(10));
        // Another member came: lower at once.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(share.offer(7, t1), Some(7));
        assert_eq!(share.offer(7, t1 + Duration::from_secs(1)), None);
        // A member went, then another share came before the wait ended: the wait starts over.
        assert_eq!(share.offer(10, t1 + Duration::from_secs(2)), None);
        assert_eq!(share.offer(20, t1 + Duration::from_secs(3)), None);
        assert_eq!(
            share.offer(20, t1 + Duration::from_secs(3) + SHARE_RAISE_DELAY / 2),
            None
        );
        assert_eq!(
            share.offer(20, t1 + Duration::from_secs(3) + SHARE_RAISE_DELAY),
            Some(20)
        );
        // A lower offer in the middle of a wait cancels it.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(share.offer(5, t2), Some(5));
        assert_eq!(share.offer(10, t2), None);
        assert_eq!(share.offer(5, t2 + Duration::from_secs(1)), None);
        assert_eq!(share.offer(10, t2 + SHARE_RAISE_DELAY), None);
        assert_eq!(share.applied, 5);
    }

    #[test]
    fn a_replica_alone_at_its_first_heartbeat_takes_its_share_at_once() {
        let t0 = Instant::now();
        let mut alone = QpsShare::new(0);
        assert_eq!(alone.offer_first(20, 1, t0), Some(20));
        // Later on, alone again (the others went): the usual wait.
        assert_eq!(alone.offer_first(10, 2, t0), Some(10));
        assert_eq!(alone.offer_first(20, 1, t0), None);
        assert_eq!(alone.offer_first(20, 1, t0 + SHARE_RAISE_DELAY), Some(20));
        // Not alone at the first heartbeat: the others must see it first.
        let mut joining = QpsShare::new(0);
        assert_eq!(joining.offer_first(10, 2, t0), None);
        assert_eq!(joining.offer_first(10, 2, t0 + SHARE_RAISE_DELAY), Some(10));
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
