//! Retention: what the store keeps, and for how long. Ended events (`done`, `dead`) are
//! deleted once they have been ended for their app's `retention.done` / `retention.dead`,
//! with their runs and deliveries (`Store::prune_events`); the handlers' per-event records
//! (`effect` documents) once they are older than both; API audit records after
//! `retention.audit`; console sessions a day after they could last have been used.
//!
//! One replica prunes at a time (leadership `retention`), every `retention.interval`, in
//! batches of `retention.batch` with a pause between them, so the store's writer is never
//! held for long: pruning stays off the callback's path.
//!
//! **The de-duplication floor.** Deleting an event forgets its de-duplication key, so the same
//! event arriving again would be stored and run again. Every retention is therefore at least
//! [`DEDUP_FLOOR`] (24 hours): DingTalk retries a push 10 s and 40 s after the first try,
//! puts it on the failed-push list 3–5 minutes after the last (recovery reads that list every
//! `recovery.interval`, 30 minutes by default), and Stream mode redelivers within seconds;
//! 24 hours is far beyond all of them (the protocol notes advise keeping keys ≥ 24 h).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::store::{scoped, EventState, PruneEvents, Store, StoreError};
use crate::time::{duration_str, millis, now_millis};

/// No retention may be shorter: see the module comment.
pub const DEDUP_FLOOR: Duration = Duration::from_secs(24 * 3600);

/// How long console sessions' records are kept after they were last written (they expire
/// long before: `console` sessions last hours).
const SESSIONS_KEPT: Duration = Duration::from_secs(24 * 3600);

/// The shortest pause between two batches, so callbacks waiting for the store's writer go
/// first; a batch that took longer is followed by a pause as long as it took, so pruning a
/// backlog takes at most about half of the writer's time.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

/// `[retention]`, and `[apps.NAME.retention]` for `done` and `dead`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long a `done` event is kept after it was done; `0`: for ever.
    #[serde(with = "duration_str")]
    pub done: Duration,
    /// How long a `dead` event (and a `dead` delivery) is kept after it died; `0`: for ever.
    #[serde(with = "duration_str")]
    pub dead: Duration,
    /// How long API audit records are kept; `0`: for ever. Every app's (one table).
    #[serde(with = "duration_str")]
    pub audit: Duration,
    /// Time between two prunes (the first a minute after start).
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// Most rows one statement deletes.
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            done: Duration::from_secs(7 * 86_400),
            dead: Duration::from_secs(30 * 86_400),
            audit: Duration::from_secs(90 * 86_400),
            interval: Duration::from_secs(60),
            batch: 200,
        }
    }
}

impl RetentionConfig {
    /// The first key out of range and why (`done`, `dead`, …, without the section's name).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        const YEARS_100: Duration = Duration::from_secs(100 * 365 * 86_400);
        for (key, value) in [
            ("done", self.done),
            ("dead", self.dead),
            ("audit", self.audit),
        ] {
            if !value.is_zero() && !(DEDUP_FLOOR..=YEARS_100).contains(&value) {
                return Err((
                    key,
                    format!(
                        "{} is neither 0 (keep for ever) nor between 24h and 100 years: a \
                         shorter retention would forget events DingTalk may still send again",
                        crate::time::format_duration(value)
                    ),
                ));
            }
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&self.interval) {
            return Err(("interval", "must be between 1s and 1d".to_owned()));
        }
        if !(1..=10_000).contains(&self.batch) {
            return Err(("batch", format!("{} is outside 1..=10000", self.batch)));
        }
        Ok(())
    }
}

/// One app's retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRetention {
    pub app: String,
    pub done: Duration,
    pub dead: Duration,
}

/// The pruning task: [`Retention::start`] runs it until the stop signal.
pub struct Retention {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    config: RetentionConfig,
    apps: ArcSwap<Vec<AppRetention>>,
}

/// What one pass deleted, by what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub done: u64,
    pub dead: u64,
    pub documents: u64,
}

impl Retention {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        config: RetentionConfig,
        apps: Vec<AppRetention>,
    ) -> Self {
        Retention {
            store,
            metrics,
            config,
            apps: ArcSwap::from_pointee(apps),
        }
    }

    /// The apps after a configuration reload (the next pass uses them).
    pub fn set_apps(&self, apps: Vec<AppRetention>) {
        self.apps.store(Arc::new(apps));
    }

    /// Prunes every `interval` (the first a minute after start, or `interval` if shorter)
    /// while this process leads, until `stop` turns true.
    pub fn start(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut wait = this.config.interval.min(Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    return;
                }
                wait = this.config.interval;
                match this.store.try_lead("retention").await {
                    Ok(Some(guard)) => {
                        let stopped = || *stop.borrow() || guard.lost();
                        match this.prune(now_millis(), &stopped).await {
                            Ok(pruned) if pruned != Pruned::default() => {
                                tracing::info!(
                                    done = pruned.done,
                                    dead = pruned.dead,
                                    documents = pruned.documents,
                                    "retention: pruned"
                                );
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "retention: prune failed; trying again next interval")
                            }
                        }
                        guard.release().await;
                    }
                    Ok(None) => tracing::debug!("retention: another replica prunes"),
                    Err(e) => tracing::warn!(error = %e, "retention: could not ask for leadership"),
                }
            }
        })
    }

    /// One pass at `now_ms`: every app's ended events and effects, then audit records and
    /// console sessions, a batch at a time until none is left or `stopped()`.
    pub async fn prune(
        &self,
        now_ms: i64,
        stopped: &(dyn Fn() -> bool + Sync),
    ) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let before = |keep: Duration| now_ms.saturating_sub(millis(keep.max(DEDUP_FLOOR)));
        for app in self.apps.load().iter() {
            for (state, keep) in [(EventState::Done, app.done), (EventState::Dead, app.dead)] {
                if keep.is_zero() {
                    continue;
                }
                let rule = PruneEvents {
                    app: app.app.clone(),
                    state,
                    before_ms: before(keep),
                    // A dead delivery is kept as long as a dead event.
                    dead_deliveries_before_ms: match app.dead.is_zero() {
                        true => i64::MIN,
                        false => before(app.dead),
                    },
                    limit: self.config.batch,
                };
                let n = self
                    .batches(stopped, || self.store.prune_events(&rule))
                    .await?;
                self.metrics.pruned(&app.app, state.as_str(), n);
                match state {
                    EventState::Dead => pruned.dead += n,
                    _ => pruned.done += n,
                }
            }
            // A handler's record of what it did for an event outlives the event.
            if !app.done.is_zero() && !app.dead.is_zero() {
                let collection = scoped::scoped(&app.app, "effect");
                let before = before(app.done.max(app.dead));
                let n = self
                    .batches(stopped, || {
                        self.store
                            .prune_documents(&collection, before, self.config.batch)
                    })
                    .await?;
                self.metrics.pruned(&app.app, "effect", n);
                pruned.documents += n;
            }
        }
        let mut documents = vec![("console_session", before(SESSIONS_KEPT))];
        if !self.config.audit.is_zero() {
            documents.push(("audit", before(self.config.audit)));
        }
        for (collection, before) in documents {
            let n = self
                .batches(stopped, || {
                    self.store
                        .prune_documents(collection, before, self.config.batch)
                })
                .await?;
            self.metrics.pruned(scoped::DEFAULT_APP, collection, n);
            pruned.documents += n;
        }
        Ok(pruned)
    }

    /// Runs `step` until it deletes less than a batch or `stopped()`, pausing between
    /// batches. Returns how many it deleted.
    async fn batches<F, Fut>(
        &self,
        stopped: &(dyn Fn() -> bool + Sync),
        mut step: F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<u64, StoreError>>,
    {
        let mut total = 0;
        loop {
            if stopped() {
                return Ok(total);
            }
            let started = std::time::Instant::now();
            let n = step().await?;
            total += n;
            if n < u64::from(self.config.batch) {
                return Ok(total);
            }
            tokio::time::sleep(started.elapsed().max(BATCH_PAUSE)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_under_a_day_are_refused_but_zero_keeps_for_ever() {
        assert!(RetentionConfig::default().check().is_ok());
        let short = RetentionConfig {
            done: Duration::from_secs(3600),
            ..RetentionConfig::default()
        };
        assert_eq!(short.check().unwrap_err().0, "done");
        let forever = RetentionConfig {
            done: Duration::ZERO,
            dead: Duration::ZERO,
            audit: Duration::ZERO,
            ..RetentionConfig::default()
        };
        assert!(forever.check().is_ok());
        let batch = RetentionConfig {
            batch: 0,
            ..RetentionConfig::default()
        };
        assert_eq!(batch.check().unwrap_err().0, "batch");
    }
}
