//! The inbox: one durable row per distinct event, behind a [`Store`] trait so SQLite (the
//! embedded default) and PostgreSQL (several replicas) behave the same.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::time::now_millis;

pub mod deliveries;
pub mod postgres;
mod rekey;
mod schema;
pub mod scoped;
pub mod sqlite;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// `[store]`: where the inbox lives.
pub struct StoreConfig {
    pub url: String,
    /// Most events committed in one group-commit transaction.
    #[serde(deserialize_with = "crate::setting::number")]
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://data/dinghook.db".into(),
            max_batch: 512,
        }
    }
}

/// Where the store lives, parsed from `store.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreLocation {
    /// `sqlite://data/x.db` is relative to the working directory, `sqlite:///abs/x.db`
    /// absolute; `postgres://…` / `postgresql://…` select PostgreSQL.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("sqlite URL has no file path (sqlite://data/dinghook.db)".into());
            }
            Ok(StoreLocation::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(url.to_owned()))
        } else {
            Err(format!(
                "unsupported store URL {:?}: use sqlite://path or postgres://…",
                redact_url(url)
            ))
        }
    }
}

/// Hides a password in a URL (`postgres://user:secret@host` → `postgres://user:***@host`).
pub fn redact_url(url: &str) -> String {
    if let (Some(scheme_end), Some(at)) = (url.find("://"), url.rfind('@')) {
        let userinfo = &url[scheme_end + 3..at];
        if let Some(colon) = userinfo.find(':') {
            return format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &userinfo[..colon],
                &url[at..]
            );
        }
    }
    url.to_owned()
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// DingTalk's HTTP Push.
    Push,
    /// DingTalk's Stream mode (the outbound WebSocket).
    Stream,
    /// The failed-callback list, pulled back by recovery.
    Recovery,
    /// Scheduled by dinghook itself (a follow-up job of a handler).
    Internal,
    /// Asked for through the HTTP API or `dinghook act` (an action).
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Push => "push",
            Source::Stream => "stream",
            Source::Recovery => "recovery",
            Source::Internal => "internal",
            Source::Api => "api",
        }
    }
}

/// Where an event is in its life: `pending → running → done | retry → dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    Pending,
    Running,
    Retry,
    Done,
    Dead,
}

impl EventState {
    pub const ALL: [EventState; 5] = [
        EventState::Pending,
        EventState::Running,
        EventState::Retry,
        EventState::Done,
        EventState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Pending => "pending",
            EventState::Running => "running",
            EventState::Retry => "retry",
            EventState::Done => "done",
            EventState::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// An event to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The app it came to ([`scoped`] sets it for apps other than `default`).
    pub app: String,
    pub dedup_key: String,
    pub event_type: String,
    pub corp_id: Option<String>,
    /// The decrypted JSON, exactly as received.
    pub payload: String,
    pub source: Source,
    /// Epoch milliseconds.
    pub received_at: i64,
    /// The routes that take it: one delivery each is created with the event, in the same
    /// transaction (none for a duplicate). [`crate::routes::Routing`] fills it in.
    pub routes: Vec<String>,
}

impl NewEvent {
    /// The event for a decrypted message: type and corp from its envelope, and the
    /// de-duplication key every source (push, recovery) shares, so a re-delivery through
    /// another path is still the same event.
    pub fn from_envelope(
        envelope: crate::event::Envelope,
        payload: String,
        source: Source,
        received_at: i64,
    ) -> Self {
        NewEvent {
            app: scoped::DEFAULT_APP.to_owned(),
            dedup_key: envelope.dedup_key(payload.as_bytes()),
            event_type: envelope.event_type,
            corp_id: envelope.corp_id,
            payload,
            source,
            received_at,
            routes: Vec::new(),
        }
    }
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new row.
    Stored { id: i64 },
    /// A re-delivery of the event in row `id`; nothing was written.
    Duplicate { id: i64 },
}

/// A stored event, as the operator commands and the dispatcher see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub id: i64,
    /// The app it came to (`default` for everything stored before apps existed).
    pub app: String,
    pub dedup_key: String,
    pub event_type: String,
    pub corp_id: Option<String>,
    pub payload: String,
    pub source: String,
    pub received_at: i64,
    pub state: EventState,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub updated_at: i64,
    /// The handlers that already succeeded on this event (empty: none), so a retry re-runs
    /// only the others. Kept by `retry` and `dead` outcomes and by `replay`; cleared by `done`.
    pub handled: Vec<String>,
}

/// One run of an event by the dispatcher: a claim and how it ended (`event_runs`, written by
/// the store in the transaction that ends the run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRun {
    /// Which run of the event this was (1 for the first; a replay starts again from 1).
    pub attempt: i64,
    /// When it was claimed (epoch ms).
    pub started_at: i64,
    /// When it ended (epoch ms); `None` for the run going on now.
    pub finished_at: Option<i64>,
    /// `done`, `retry`, `dead`; `released` (a stopping process gave it back unfinished);
    /// `lease_expired` (another worker took it after the lease ran out: the worker died or
    /// hung); `running` for the run going on now.
    pub outcome: String,
    /// Why it failed (`retry` and `dead` only).
    pub error: Option<String>,
    /// The handlers that had succeeded when it ended (empty after `done`: all of them).
    pub handled: Vec<String>,
    /// The worker (lease owner) that ran it.
    pub worker: Option<String>,
}

/// A JSON document kept by the built-in handlers (groups, to-dos, notifications, effects),
/// addressed by collection and key. SQL views (`groups`, `todos`, `notifications`) show the
/// collections as tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub collection: String,
    pub key: String,
    pub body: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Which events `replay` sends back to `pending`.
#[derive(Debug, Clone)]
pub enum ReplaySelector {
    Ids(Vec<i64>),
    State(EventState),
    /// Every event received at or after this epoch-ms time (any state but `running`).
    Since(i64),
}

/// Which ended events [`Store::prune_events`] deletes: `app`'s in `state` (`done` or `dead`)
/// unchanged since before `before_ms`, whose deliveries have all ended (none waiting), a
/// `dead` delivery counting as ended only if the event is unchanged since before
/// `dead_deliveries_before_ms` (so a dead delivery is kept as long as a dead event).
#[derive(Debug, Clone)]
pub struct PruneEvents {
    pub app: String,
    pub state: EventState,
    pub before_ms: i64,
    pub dead_deliveries_before_ms: i64,
    /// Most events deleted in one call.
    pub limit: u32,
}

/// Counts for `dinghook events stats` and `/metrics`: of every app, or of the one asked for
/// ([`Store::stats_for`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every state, zero included.
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// Event type → state → count (states with zero events left out).
    pub by_type: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// How long (ms) the most overdue event waiting to run (`pending` or `retry`) has been due:
    /// since it was received, for one not run yet; since its retry time, for a retry; 0 when
    /// none is due yet; `None` when none waits.
    pub oldest_pending_age_ms: Option<i64>,
    /// Each app that has events (and the app asked for, even without any) → its figures.
    pub by_app: std::collections::BTreeMap<String, AppStats>,
}

/// One app's part of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AppStats {
    /// Every state, zero included.
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// As [`Stats::oldest_pending_age_ms`], for this app's events.
    pub oldest_pending_age_ms: Option<i64>,
}

/// A filter for listing events.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// One app's events only.
    pub app: Option<String>,
    pub state: Option<EventState>,
    pub event_type: Option<String>,
    pub limit: Option<u32>,
    /// Only events with an id below this one (keyset pagination: the last id of the page
    /// before).
    pub before_id: Option<i64>,
    /// Only events received at or after this epoch-ms time.
    pub since: Option<i64>,
}

/// Why the store could not do what was asked. Every variant means "not durable": the
/// callback answers 503 so DingTalk retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("the store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("postgres: {}", describe_postgres_error(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No database connection could be had (pool wait or connect timed out, …).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database holds or returned something this version cannot read.
    #[error("unexpected data in the store: {0}")]
    Invalid(String),
}

/// tokio-postgres prints only the kind ("db error"); the server's message is in the source.
fn describe_postgres_error(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The inbox. Implementations commit before they return: an `Ok` from [`Store::insert`] means
/// the event survives `kill -9` and power loss.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores the event unless its de-duplication key is already present. It is due at once.
    async fn insert(&self, event: NewEvent) -> Result<Inserted, StoreError> {
        let due_at = event.received_at;
        self.schedule(event, due_at).await
    }
    /// Like [`Store::insert`], but not due before `due_at_ms` (follow-up jobs, coalescing
    /// windows). A duplicate key leaves the existing event and its due time alone.
    async fn schedule(&self, event: NewEvent, due_at_ms: i64) -> Result<Inserted, StoreError>;
    /// A real write through the same path as events, for `/readyz`.
    async fn probe(&self) -> Result<(), StoreError>;
    async fn get(&self, id: i64) -> Result<Option<StoredEvent>, StoreError>;
    async fn find_by_dedup_key(&self, key: &str) -> Result<Option<StoredEvent>, StoreError>;
    /// Newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredEvent>, StoreError>;
    async fn count(&self) -> Result<u64, StoreError>;

    // --- the dispatcher's side -------------------------------------------------------------

    /// Claims up to `limit` due events for `owner` until `now_ms + lease_ms`: `pending` or
    /// `retry` events whose `next_attempt_at <= now_ms`, and `running` events whose lease has
    /// ended (their worker died). Claimed events become `running`, `attempts` goes up by one.
    /// Oldest due first. Two concurrent claimers never get the same event.
    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Like [`Store::claim`], but for each `(app, n)` of `shares` at most `n` due events of
    /// that app (no expired leases), all in one transaction: how the dispatcher shares its
    /// claims between apps, so one app's backlog cannot hold back another's events. Each
    /// app's part costs the same whatever the other apps' backlogs.
    async fn claim_apps(
        &self,
        owner: &str,
        shares: &[(String, u32)],
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// The apps that have `pending` or `retry` events (due or not), in name order.
    async fn waiting_apps(&self) -> Result<Vec<String>, StoreError>;
    /// `running` → `done`, forgetting `handled` (a done event replayed runs every handler
    /// again). False (and no change) if `owner` no longer holds the lease.
    async fn mark_done(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError>;
    /// `running` → `retry` at `at_ms`, keeping `error` and the handlers that succeeded
    /// (`handled`; empty: none), which the next claim returns. False if the lease was lost.
    async fn mark_retry(
        &self,
        id: i64,
        owner: &str,
        at_ms: i64,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// `running` → `dead`, keeping `error` and `handled` (as [`Store::mark_retry`]). False if
    /// the lease was lost.
    async fn mark_dead(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        handled: &[String],
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Gives up the leases `owners` hold: their `running` events go back to `pending`, due as
    /// they were, and the interrupted run is not counted in `attempts` (`handled` is kept). For a process that is
    /// stopping with runs it could not finish; never while those owners are still running.
    /// Returns how many changed.
    async fn release(&self, owners: &[String], now_ms: i64) -> Result<u64, StoreError>;
    /// Sends the selected events back to `pending`, due now, with `attempts` reset to 0
    /// (`last_error` is kept until the next outcome, `handled` too: a dead event replayed
    /// re-runs only the handlers that had not succeeded). `running` events are left alone.
    /// Returns how many changed.
    async fn replay(&self, selector: &ReplaySelector, now_ms: i64) -> Result<u64, StoreError>;
    /// Deletes up to `rule.limit` events `rule` selects, oldest first, with their runs and
    /// deliveries, in one transaction (the maintained counts follow). Returns how many.
    async fn prune_events(&self, rule: &PruneEvents) -> Result<u64, StoreError>;
    /// Deletes the events among `ids` that are `dead` now (any other state, or an id not
    /// stored, is left alone), with their runs and deliveries, in one transaction (the
    /// maintained counts follow): an operator's discard of dead letters. Returns how many.
    async fn discard(&self, ids: &[i64]) -> Result<u64, StoreError>;
    /// Deletes up to `limit` documents of `collection` last changed before `before_ms`,
    /// oldest first. Returns how many.
    async fn prune_documents(
        &self,
        collection: &str,
        before_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError>;
    /// The last `limit` runs that ended of event `id`, oldest first (none for an event never
    /// run or not stored).
    async fn runs(&self, id: i64, limit: u32) -> Result<Vec<EventRun>, StoreError>;
    /// Every app's counts: the totals, and each app's in [`Stats::by_app`]. The same as
    /// `stats_for(None, now_ms)`; stores and wrappers implement [`Store::stats_for`] only.
    async fn stats(&self, now_ms: i64) -> Result<Stats, StoreError> {
        self.stats_for(None, now_ms).await
    }
    /// The counts of app `app` only (`None`: of every app, as [`Store::stats`]). Read from the
    /// maintained counts and one index entry per app with waiting events, never from the
    /// events themselves, so the cost does not grow with the number of events.
    async fn stats_for(&self, app: Option<&str>, now_ms: i64) -> Result<Stats, StoreError>;

    // --- documents kept by the built-in handlers --------------------------------------------

    /// Creates or replaces the document.
    async fn put_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Creates the document only if absent; true if it was created. This is how handlers
    /// record an effect once.
    async fn insert_document(
        &self,
        collection: &str,
        key: &str,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    async fn get_document(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, StoreError>;
    /// Most recently updated first.
    async fn list_documents(
        &self,
        collection: &str,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError>;

    // --- the DingTalk client's monthly call counter ---------------------------------------

    /// Adds `n` to the calls counted for `month` (e.g. `2026-11`); returns the new total.
    async fn add_api_calls(&self, month: &str, n: u64) -> Result<u64, StoreError>;
    /// The calls counted for `month` (0 if none).
    async fn api_calls(&self, month: &str) -> Result<u64, StoreError>;

    /// Finishes queued writes and stops background work.
    async fn close(&self);

    // --- leadership ------------------------------------------------------------------------

    /// Tries, without waiting, to become the one process (of all sharing this store) that runs
    /// the work called `name`. `None`: another process leads it now. Leadership ends when the
    /// guard is released or dropped, and with the process: a crashed leader never blocks the
    /// others.
    async fn try_lead(&self, name: &str) -> Result<Option<LeaderGuard>, StoreError>;

    // --- deliveries (routes) ---------------------------------------------------------------

    /// The deliveries of routes, in this store.
    fn deliveries(&self) -> &dyn Deliveries;
}

pub use deliveries::{
    DeliveryOutcome, DeliveryQuery, DeliveryReplay, RouteBacklog, RoutePause, StoredDelivery,
};

/// The deliveries of routes ([`deliveries`]): one per (event, route), created with the event
/// ([`NewEvent::routes`]).
#[async_trait]
pub trait Deliveries: Send + Sync {
    /// Up to `limit` of `route`'s deliveries (expired leases first, then the due ones, oldest
    /// first), leased to `owner`, each with its event.
    async fn claim_deliveries(
        &self,
        route: &str,
        owner: &str,
        limit: u32,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<(StoredDelivery, StoredEvent)>, StoreError>;
    /// Records how an attempt ended. False (and no change) if `owner` no longer holds the
    /// lease.
    async fn finish_delivery(
        &self,
        id: i64,
        owner: &str,
        outcome: &DeliveryOutcome,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// `owner`'s leases back to `pending` (a runner that stops puts back what it could not
    /// finish).
    async fn release_deliveries(&self, owner: &str, now_ms: i64) -> Result<u64, StoreError>;
    async fn get_delivery(&self, id: i64) -> Result<Option<StoredDelivery>, StoreError>;
    async fn list_deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> Result<Vec<StoredDelivery>, StoreError>;
    /// Back to `pending` with attempts reset; how many.
    async fn replay_deliveries(
        &self,
        which: &DeliveryReplay,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Delivers event `event_id` (of `app`) again to each of `routes`: a delivery created where
    /// there is none, reset to `pending` where there is one (unless running). How many.
    async fn redeliver(
        &self,
        event_id: i64,
        app: &str,
        routes: &[String],
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Every route's deliveries by state, and its oldest waiting one's age.
    async fn route_backlogs(&self, now_ms: i64) -> Result<Vec<RouteBacklog>, StoreError>;
    async fn pause_route(&self, route: &str, reason: &str, now_ms: i64) -> Result<(), StoreError>;
    /// False if it was not paused.
    async fn resume_route(&self, route: &str) -> Result<bool, StoreError>;
    async fn route_pauses(&self) -> Result<Vec<RoutePause>, StoreError>;
}

/// What `/readyz` remembers of event inserts, for both stores: a probe's own write can
/// succeed while inserts fail (a full SQLite volume has room to rewrite the probe's one row in
/// the WAL; a PostgreSQL table can refuse rows another accepts), and the probe must answer
/// 503 whenever a callback would.
#[derive(Debug, Default)]
struct InsertHealth {
    /// When an insert last failed, epoch ms; 0: the last one succeeded.
    failed_at: AtomicI64,
}

impl InsertHealth {
    /// How long after a failed insert the probe reports not ready, unless an insert has
    /// succeeded since.
    const MEMORY_MS: i64 = 10_000;

    /// Records the outcome of an event insert.
    fn record<T>(&self, result: &Result<T, StoreError>) {
        let failed_at = if result.is_ok() { 0 } else { now_millis() };
        self.failed_at.store(failed_at, Ordering::Relaxed);
    }

    /// Not ready while a failed insert is recent and none has succeeded since.
    fn check(&self, now_ms: i64) -> Result<(), StoreError> {
        let failed_at = self.failed_at.load(Ordering::Relaxed);
        let ago = now_ms.saturating_sub(failed_at);
        if failed_at != 0 && ago < Self::MEMORY_MS {
            return Err(StoreError::Unavailable(format!(
                "an event insert failed {ago} ms ago and none has succeeded since"
            )));
        }
        Ok(())
    }
}

/// Opens (creating and migrating if needed) the store the configuration names.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let location = StoreLocation::parse(&config.url).map_err(StoreError::Unsupported)?;
    match location {
        StoreLocation::Sqlite(path) => {
            let store = sqlite::SqliteStore::open(&path, config.max_batch).await?;
            Ok(Arc::new(store))
        }
        StoreLocation::Postgres(url) => {
            let store = postgres::PostgresStore::open(&url).await?;
            Ok(Arc::new(store))
        }
    }
}

// --- leadership for once-per-deployment background work (failed-push recovery) ---------------

/// What a store keeps while this process leads: dropping it must give leadership up, even
/// without [`LeaderLock::release`] (a panicking or cancelled task).
#[async_trait]
pub trait LeaderLock: Send + Sync {
    /// Gives leadership up in an orderly way.
    async fn release(self: Box<Self>);
    /// True once the lock is known to be gone (e.g. its database session died), so another
    /// replica may be leading now.
    fn lost(&self) -> bool {
        false
    }
}

/// Proof that this process leads `name` until the guard is released or dropped. From
/// [`Store::try_lead`].
pub struct LeaderGuard {
    name: String,
    /// `None` when there is nothing to give up (a single-process store).
    lock: Option<Box<dyn LeaderLock>>,
}

impl LeaderGuard {
    /// Leadership that needs no lock: the store serves one process only.
    pub fn local(name: &str) -> Self {
        LeaderGuard {
            name: name.to_owned(),
            lock: None,
        }
    }

    /// Leadership held by `lock`.
    pub fn held(name: &str, lock: Box<dyn LeaderLock>) -> Self {
        LeaderGuard {
            name: name.to_owned(),
            lock: Some(lock),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// See [`LeaderLock::lost`].
    pub fn lost(&self) -> bool {
        self.lock.as_ref().is_some_and(|l| l.lost())
    }

    /// Gives leadership up now (dropping the guard does too, less gracefully).
    pub async fn release(mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
    }
}

impl std::fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("name", &self.name)
            .field("locked", &self.lock.is_some())
            .finish()
    }
}
