//! The access-token cache: one token per app, refreshed ahead of expiry, one fetch in flight.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::error::Error;

/// A token and when to stop using it.
#[derive(Clone)]
pub(crate) struct AccessToken {
    pub(crate) value: Arc<str>,
    /// When we replace it: its expiry minus the refresh margin.
    refresh_at: Instant,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"[redacted]")
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

/// What a fetch returns: the token and its lifetime as DingTalk stated it.
pub(crate) struct Fetched {
    pub(crate) value: String,
    pub(crate) expires_in: Duration,
}

/// The last failed fetch, handed to every caller that was waiting on it.
struct Failure {
    generation: u64,
    error: Arc<Error>,
}

pub(crate) struct TokenCache {
    /// The token in use. A std mutex: it is only cloned or replaced, never held across an await,
    /// so the fast path (a valid token) costs one uncontended lock.
    current: Mutex<Option<AccessToken>>,
    /// Single-flight: whoever holds it is the one fetching. Callers that find no valid token
    /// queue here and, once inside, look again before fetching, so N waiters cause one fetch.
    /// A tokio mutex because it is held across the HTTP request.
    fetching: tokio::sync::Mutex<()>,
    /// Incremented when a fetch finishes. A waiter that read `g` before queueing and finds a
    /// failure numbered above `g` was waiting on that very fetch, so it shares the failure instead
    /// of hammering gettoken once per waiter.
    completed: AtomicU64,
    /// Guarded by `fetching`'s discipline; a std mutex for the same reason as `current`.
    last_failure: Mutex<Option<Failure>>,
    margin: Duration,
    fetches: AtomicU64,
}

impl TokenCache {
    pub(crate) fn new(margin: Duration) -> Self {
        TokenCache {
            current: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            completed: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            margin,
            fetches: AtomicU64::new(0),
        }
    }

    /// How many fetches were started (for metrics and tests).
    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn valid(&self, now: Instant) -> Option<AccessToken> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|t| now < t.refresh_at).cloned()
    }

    /// A valid token, fetching one with `fetch` when needed. However many callers arrive while
    /// there is no valid token, `fetch` runs once.
    pub(crate) async fn get<F, Fut>(&self, fetch: F) -> Result<AccessToken, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, Error>>,
    {
        if let Some(token) = self.valid(Instant::now()) {
            return Ok(token);
        }
        let seen = self.completed.load(Ordering::Acquire);
        let _guard = self.fetching.lock().await;
        // Someone else may have fetched while we queued.
        if let Some(token) = self.valid(Instant::now()) {
            return Ok(token);
        }
        {
            let failure = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(failure) = failure.as_ref() {
                if failure.generation > seen {
                    return Err(Error::Token(failure.error.clone()));
                }
            }
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let outcome = fetch().await;
        let generation = self.completed.fetch_add(1, Ordering::AcqRel) + 1;
        match outcome {
            Ok(fetched) => {
                // DingTalk says 7200 s; a fake or a future change may say less. Never refresh
                // earlier than half-way, or a short-lived token would be refetched on every call.
                let margin = self.margin.min(fetched.expires_in / 2);
                let token = AccessToken {
                    value: Arc::from(fetched.value),
                    refresh_at: started + fetched.expires_in - margin,
                };
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                tracing::info!(
                    expires_in_secs = fetched.expires_in.as_secs(),
                    "DingTalk access token refreshed"
                );
                Ok(token)
            }
            Err(err) => {
                let error = Arc::new(err);
                *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Failure {
                    generation,
                    error: error.clone(),
                });
                Err(Error::Token(error))
            }
        }
    }

    /// Drops `rejected` if it is still the token in use, so the next `get` fetches a new one.
    /// Comparing first means that when fifty calls are refused with the same stale token, the
    /// first drops it and the other forty-nine pick up the replacement instead of dropping it.
    pub(crate) fn invalidate(&self, rejected: &AccessToken) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(&t.value, &rejected.value))
        {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(value: &str, secs: u64) -> Result<Fetched, Error> {
        Ok(Fetched {
            value: value.to_owned(),
            expires_in: Duration::from_secs(secs),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let t1 = cache.get(|| async { fetched("a", 7200) }).await.unwrap();
        assert_eq!(&*t1.value, "a");
        tokio::time::advance(Duration::from_secs(7200 - 301)).await;
        let again = cache.get(|| async { fetched("b", 7200) }).await.unwrap();
        assert_eq!(&*again.value, "a", "still inside the validity window");
        tokio::time::advance(Duration::from_secs(2)).await;
        let t2 = cache.get(|| async { fetched("b", 7200) }).await.unwrap();
        assert_eq!(&*t2.value, "b", "replaced 5 minutes before expiry");
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_kept_half_their_life() {
        let cache = TokenCache::new(Duration::from_secs(300));
        cache.get(|| async { fetched("a", 10) }).await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        cache.get(|| async { fetched("b", 10) }).await.unwrap();
        assert_eq!(cache.fetches(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.get(|| async { fetched("b", 10) }).await.unwrap();
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_share_one_failed_fetch() {
        let cache = Arc::new(TokenCache::new(Duration::from_secs(300)));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err(Error::Config("no credentials".into()))
                    })
                    .await
            }));
        }
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Err(Error::Token(_))));
        }
        assert_eq!(cache.fetches(), 1);
        // A later caller tries again.
        cache.get(|| async { fetched("a", 7200) }).await.unwrap();
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_rejected_token() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let old = cache.get(|| async { fetched("a", 7200) }).await.unwrap();
        cache.invalidate(&old);
        let new = cache.get(|| async { fetched("b", 7200) }).await.unwrap();
        cache.invalidate(&old); // a late caller still holding "a"
        let still = cache.get(|| async { fetched("c", 7200) }).await.unwrap();
        assert_eq!(&*new.value, "b");
        assert_eq!(&*still.value, "b");
        assert_eq!(cache.fetches(), 2);
    }
}
