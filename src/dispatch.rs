//! The dispatcher: workers claim due events with a lease, decode them, run the handler
//! registered for their type and record the outcome (done, retry at a time from the schedule,
//! or dead). It runs beside the HTTP server and never delays an acknowledgement: the callback
//! path only pokes a [`Notify`] after a commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::event::Event;
use crate::handler::{Context, HandlerError, Registered, Registry};
use crate::metrics::Metrics;
use crate::store::{Store, StoredEvent};
use crate::time::now_millis;

/// `[dispatch]`: workers that claim stored events and run their handlers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Off: this process only receives (another replica, or a later start, dispatches).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    #[serde(deserialize_with = "crate::setting::number")]
    pub workers: usize,
    /// Events claimed at once by one worker.
    #[serde(deserialize_with = "crate::setting::number")]
    pub batch_size: u32,
    /// How long a claim lasts; a crashed worker's events come back after it.
    #[serde(with = "crate::time::duration_str")]
    pub lease: Duration,
    /// How often an idle worker looks for due events (new events wake it at once).
    #[serde(with = "crate::time::duration_str")]
    pub poll_interval: Duration,
    /// Upper bound for one handler run; must be shorter than the lease.
    #[serde(with = "crate::time::duration_str")]
    pub handler_timeout: Duration,
    /// Delay before each retry; when used up, the event is dead.
    #[serde(with = "crate::time::duration_list")]
    pub retry_schedule: Vec<Duration>,
    /// Each delay is varied by up to ± this fraction, so retries do not arrive in lockstep.
    #[serde(deserialize_with = "crate::setting::number")]
    pub retry_jitter: f64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            enabled: true,
            workers: 4,
            batch_size: 16,
            lease: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            handler_timeout: Duration::from_secs(60),
            retry_schedule: [5, 30, 120, 600, 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            retry_jitter: 0.2,
        }
    }
}

/// What happened to one claimed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// No handler is registered for the type: stored, visible, and done.
    NoHandler,
    Retry {
        at_ms: i64,
    },
    Dead,
    /// Another worker holds the event now (our lease ran out); nothing was recorded.
    LeaseLost,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::NoHandler => "no_handler",
            Outcome::Retry { .. } => "retry",
            Outcome::Dead => "dead",
            Outcome::LeaseLost => "lease_lost",
        }
    }
}

/// The delay before the next run after `attempts` runs, or `None` when the schedule is used
/// up (the event is dead). `jitter` varies the delay by up to ± that fraction.
pub fn retry_delay(schedule: &[Duration], attempts: i64, jitter: f64) -> Option<Duration> {
    let index = usize::try_from(attempts.checked_sub(1)?).ok()?;
    let base = *schedule.get(index)?;
    if jitter <= 0.0 {
        return Some(base);
    }
    let factor = 1.0 + rand::thread_rng().gen_range(-jitter..=jitter);
    Some(base.mul_f64(factor.max(0.0)))
}

/// The first pause before asking the store again to record an outcome, doubled each time up
/// to [`RECORD_MAX_PAUSE`].
const RECORD_FIRST_PAUSE: Duration = Duration::from_millis(50);
const RECORD_MAX_PAUSE: Duration = Duration::from_secs(2);

pub struct Dispatcher {
    store: Arc<dyn Store>,
    config: DispatchConfig,
    metrics: Arc<Metrics>,
    /// Names this process in leases, so a restarted process does not mistake a dead
    /// predecessor's claims for its own.
    node: String,
    /// Poked by the callback path after a commit, so new events do not wait a poll interval.
    wake: Arc<Notify>,
    /// The handlers and each app's context; a configuration reload replaces them
    /// ([`Dispatcher::replace_apps`]) while runs go on with the ones they started with.
    apps: ArcSwap<Apps>,
    /// Where the next shared claim starts among the waiting apps (see `claim_batch`).
    next_app: std::sync::atomic::AtomicUsize,
    /// The last read of the apps with waiting events, and when (see `waiting_apps`).
    waiting: tokio::sync::Mutex<Option<(tokio::time::Instant, Vec<String>)>>,
    /// The routes, told when an action ends (`dinghook.action.done` / `.dead`); `None`: a
    /// dispatcher built without them tells nothing.
    routing: Option<crate::routes::Routing>,
}

/// How long the list of apps with waiting events is reused: a new app's first event waits at
/// most this long to be shared in.
const WAITING_APPS_TTL: Duration = Duration::from_millis(100);

/// What the dispatcher runs events with, replaced as a whole on a reload.
pub struct Apps {
    pub registry: Registry,
    /// Each app's view of the store and its client, by app name.
    pub contexts: HashMap<String, AppContext>,
}

/// One app's side of a handler's [`Context`]: the store as that app sees it
/// ([`crate::store::scoped`]) and its DingTalk client (`None` without an app key).
#[derive(Clone)]
pub struct AppContext {
    pub store: Arc<dyn Store>,
    pub client: Option<crate::dingtalk::Client>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Registry,
        config: DispatchConfig,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
        apps: HashMap<String, AppContext>,
    ) -> Self {
        let simple = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("{}-{}", std::process::id(), &simple[..8]);
        Dispatcher {
            store,
            config,
            metrics,
            node,
            wake,
            apps: ArcSwap::from_pointee(Apps {
                registry,
                contexts: apps,
            }),
            next_app: std::sync::atomic::AtomicUsize::new(0),
            waiting: tokio::sync::Mutex::new(None),
            routing: None,
        }
    }

    /// Tells the routes that take them when actions end (see [`crate::actions::completion`]).
    pub fn with_routing(mut self, routing: crate::routes::Routing) -> Self {
        self.routing = Some(routing);
        self
    }

    /// Replaces the handlers and the apps (a configuration reload). Runs under way finish
    /// with what they started with; the next claims use these, and the workers change between
    /// the one-app and the shared loop at their next safe point if the number of apps crossed
    /// one.
    pub fn replace_apps(&self, registry: Registry, contexts: HashMap<String, AppContext>) {
        self.apps.store(Arc::new(Apps { registry, contexts }));
        // A worker asleep in the one-app loop learns of new apps at once.
        self.wake.notify_waiters();
    }

    /// Whether more than one app is configured (the workers share their claims among them).
    fn several_apps(&self) -> bool {
        self.apps.load().contexts.len() > 1
    }

    /// The wake-up the callback path pokes after storing; other producers (recovery) poke it
    /// too.
    pub fn wake(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Starts the workers. They stop at a safe point (between events) once `stop` turns true.
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        (0..self.config.workers)
            .map(|i| {
                let this = Arc::clone(self);
                let stop = stop.clone();
                tokio::spawn(async move { this.worker(i, stop).await })
            })
            .collect()
    }

    /// The name worker `index` holds its leases under.
    fn worker_owner(&self, index: usize) -> String {
        format!("{}-w{index}", self.node)
    }

    fn drain_owner(&self) -> String {
        format!("{}-drain", self.node)
    }

    /// Gives up every lease this dispatcher's workers (and `drain`) hold: what they were
    /// running goes back to `pending`, so it runs again at once (here after a restart, or on
    /// another replica) instead of after the lease. Only once they have stopped or been
    /// abandoned: shutdown calls it when the grace period ran out.
    pub async fn release_leases(&self) -> Result<u64, crate::store::StoreError> {
        let owners: Vec<String> = (0..self.config.workers)
            .map(|i| self.worker_owner(i))
            .chain([self.drain_owner()])
            .collect();
        self.store.release(&owners, now_millis()).await
    }

    /// A worker: the one-app loop or the shared one, as many apps as are configured; a reload
    /// that crosses one app switches it at the loop's next safe point.
    async fn worker(self: Arc<Self>, index: usize, stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            if self.several_apps() {
                Arc::clone(&self).shared_worker(index, stop.clone()).await;
            } else {
                self.batch_worker(index, stop.clone()).await;
            }
        }
    }

    /// The worker loop with one app: whole batches, whose outcomes share the store's group
    /// commits. Returns on a stop, or between batches once several apps are configured.
    async fn batch_worker(&self, index: usize, mut stop: watch::Receiver<bool>) {
        let owner = self.worker_owner(index);
        let lease_ms = crate::time::millis(self.config.lease);
        while !*stop.borrow() && !self.several_apps() {
            let claimed = self
                .claim_batch(&owner, lease_ms, self.config.batch_size, &HashMap::new())
                .await;
            let batch = match claimed {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; trying again after the poll interval");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = self.wake.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            // The batch runs concurrently: its outcomes then share the store's group commits
            // instead of each waiting for its own. A stop lets the batch finish (each run is
            // bounded by handler_timeout) and then claims nothing more.
            futures_util::future::join_all(
                batch.into_iter().map(|record| self.run(&owner, record)),
            )
            .await;
        }
    }

    /// A worker's next batch. With one app: the oldest due events (expired leases first). With
    /// several apps waiting, the batch is shared: a first part as with one app (so expired
    /// leases and the oldest events still come first), the rest in equal shares per app with
    /// waiting events, taking the apps in turn from one further each batch. So a backlog of one
    /// app cannot hold back another's events: each batch takes some of every app's.
    ///
    /// `running` counts this worker's runs in flight per app; an app at [`Self::app_cap`] gets
    /// no share, and while one is, the first part is left out too (it could be anyone's).
    async fn claim_batch(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: u32,
        running: &HashMap<String, usize>,
    ) -> Result<Vec<StoredEvent>, crate::store::StoreError> {
        let now = now_millis();
        if !self.several_apps() {
            return self.store.claim(owner, limit, lease_ms, now).await;
        }
        let cap = self.app_cap();
        let at_cap = |app: &str| running.get(app).is_some_and(|&n| n >= cap);
        let waiting: Vec<String> = self
            .waiting_apps()
            .await?
            .into_iter()
            .filter(|app| !at_cap(app))
            .collect();
        let saturated = running.values().any(|&n| n >= cap);
        if waiting.is_empty() {
            // Nothing to share; expired leases (anyone's) unless an app is at its cap.
            return if saturated {
                Ok(Vec::new())
            } else {
                self.store.claim(owner, limit, lease_ms, now).await
            };
        }
        let parts = u32::try_from(waiting.len() + 1).unwrap_or(u32::MAX);
        let share = (limit / parts).max(1);
        let mut batch = if saturated {
            Vec::new()
        } else {
            self.store.claim(owner, share, lease_ms, now).await?
        };
        let start = self
            .next_app
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Each waiting app's share, taking the apps in turn until the batch is full; one
        // statement claims them all (one commit, whatever the number of apps).
        let left = limit.saturating_sub(batch.len() as u32);
        let mut shares = Vec::new();
        let mut asked = 0_u32;
        for i in 0..waiting.len() {
            if asked >= left {
                break;
            }
            let app = &waiting[(start + i) % waiting.len()];
            let room = cap.saturating_sub(running.get(app.as_str()).copied().unwrap_or(0));
            let take = share
                .min(left - asked)
                .min(u32::try_from(room).unwrap_or(u32::MAX));
            if take > 0 {
                shares.push((app.clone(), take));
                asked += take;
            }
        }
        if !shares.is_empty() {
            batch.extend(self.store.claim_apps(owner, &shares, lease_ms, now).await?);
        }
        Ok(batch)
    }

    /// The apps with waiting events, read at most every [`WAITING_APPS_TTL`] for all workers
    /// (each run that ends asks again, and the read is a query).
    async fn waiting_apps(&self) -> Result<Vec<String>, crate::store::StoreError> {
        let mut cached = self.waiting.lock().await;
        if let Some((at, apps)) = cached.as_ref() {
            if at.elapsed() < WAITING_APPS_TTL {
                return Ok(apps.clone());
            }
        }
        let apps = self.store.waiting_apps().await?;
        *cached = Some((tokio::time::Instant::now(), apps.clone()));
        Ok(apps)
    }

    /// With several apps, how many runs of one app a worker keeps in flight at most: half its
    /// batch, so an app whose runs hang (its DingTalk not answering) leaves the other half to
    /// the other apps.
    fn app_cap(&self) -> usize {
        (self.config.batch_size as usize / 2).max(1)
    }

    /// The worker loop with several apps: runs are not waited for as a batch, but claimed as
    /// room frees up (a run ends, new events arrive), with at most [`Self::app_cap`] of one app
    /// in flight. So one app's slow or hanging runs hold at most half of each worker, and never
    /// the other apps' events behind them. With one app, `worker` keeps whole batches, whose
    /// outcomes share the store's group commits.
    async fn shared_worker(self: Arc<Self>, index: usize, mut stop: watch::Receiver<bool>) {
        let owner = self.worker_owner(index);
        let lease_ms = crate::time::millis(self.config.lease);
        let capacity = self.config.batch_size as usize;
        // Tasks, not futures polled by this loop: a run must go on (and give its store
        // connection back) while the loop waits for a claim. Dropping the set (an abandoned
        // worker) aborts them.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut running: HashMap<String, usize> = HashMap::new();
        // Claim when half the worker is free, when there may be new events (a wake-up, the
        // poll interval), or when it is idle; not for every run that ends, which would be a
        // claim per event.
        let mut look = true;
        loop {
            // After a reload down to one app, this loop hands over to the one-app loop once
            // its runs have ended; it claims nothing more meanwhile, as when stopping.
            let stopping = *stop.borrow() || !self.several_apps();
            if stopping && in_flight.is_empty() {
                break;
            }
            let free = capacity.saturating_sub(in_flight.len());
            let mut claimed_any = false;
            if !stopping && free > 0 && (look || free * 2 >= capacity || in_flight.is_empty()) {
                look = false;
                let limit = u32::try_from(free).unwrap_or(u32::MAX);
                match self.claim_batch(&owner, lease_ms, limit, &running).await {
                    Ok(batch) => {
                        claimed_any = !batch.is_empty();
                        for record in batch {
                            let app = record.app.clone();
                            *running.entry(app.clone()).or_insert(0) += 1;
                            let (this, owner) = (Arc::clone(&self), owner.clone());
                            in_flight.spawn(async move {
                                this.run(&owner, record).await;
                                app
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claim failed; trying again after the poll interval");
                    }
                }
            }
            if claimed_any && in_flight.len() < capacity {
                // There may be more waiting: ask again before sleeping.
                continue;
            }
            let room = in_flight.len() < capacity && !stopping;
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match done {
                        Ok(app) => {
                            if let Some(n) = running.get_mut(&app) {
                                *n = n.saturating_sub(1);
                            }
                        }
                        // `run` does not panic (handler panics are caught inside it); should
                        // it, the count is rebuilt from what is still in flight.
                        Err(e) => {
                            tracing::error!(error = %e, "a run's task failed");
                            running.clear();
                        }
                    }
                }
                () = tokio::time::sleep(self.config.poll_interval), if room => look = true,
                () = self.wake.notified(), if room => look = true,
                _ = stop.changed(), if !stopping => {}
            }
        }
    }

    /// Runs the handlers of one claimed event that have not succeeded for it yet, and
    /// records the outcome with the names of those that have.
    pub async fn run(&self, owner: &str, record: StoredEvent) -> Outcome {
        let id = record.id;
        let event_type = record.event_type.clone();
        let app = record.app.clone();
        let attempts = record.attempts;
        // A claim stamps `updated_at`; the lease lasts `lease` from then.
        let lease_until = crate::time::after(record.updated_at, self.config.lease);
        // An action's completion is told to the routes that take it: kept for after the run.
        let action = (record.event_type == crate::actions::ACTION_EVENT && self.routing.is_some())
            .then(|| record.clone());
        let run = self.invoke(record).await;
        let now = now_millis();
        let (outcome, error) = match run.result {
            Ok(true) => (Outcome::Done, None),
            Ok(false) => (Outcome::NoHandler, None),
            Err(HandlerError::Permanent(message)) => {
                (Outcome::Dead, Some(format!("permanent: {message}")))
            }
            Err(HandlerError::Transient(message)) => match retry_delay(
                &self.config.retry_schedule,
                attempts,
                self.config.retry_jitter,
            ) {
                Some(delay) => (
                    Outcome::Retry {
                        at_ms: crate::time::after(now, delay),
                    },
                    Some(message),
                ),
                None => (
                    Outcome::Dead,
                    Some(format!("{message} (gave up after {attempts} attempts)")),
                ),
            },
        };
        // The completion is stored before the outcome, so an action cannot end untold; if it
        // cannot be stored, the outcome is not recorded either and the action runs again
        // when its lease ends (its DingTalk call is not repeated: `effect_once`).
        let told = match (&action, &outcome) {
            (Some(action), Outcome::Done) => self.tell_routes(action, None, lease_until).await,
            (Some(action), Outcome::Dead) => {
                let why = error.as_deref().unwrap_or("dead");
                self.tell_routes(action, Some(why), lease_until).await
            }
            _ => Ok(()),
        };
        let recorded = match told {
            Ok(()) => {
                self.record(
                    id,
                    owner,
                    &outcome,
                    error.as_deref(),
                    &run.handled,
                    lease_until,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let outcome = match recorded {
            Ok(true) => outcome,
            Ok(false) => {
                tracing::warn!(id, %event_type, "lease lost before the outcome was recorded");
                Outcome::LeaseLost
            }
            Err(e) => {
                // The lease will run out and the event will run again; handlers are idempotent.
                tracing::error!(id, %event_type, error = %e, "could not record the outcome");
                Outcome::LeaseLost
            }
        };
        match &outcome {
            Outcome::Dead => {
                tracing::error!(id, %event_type, attempts, handled = ?run.handled, "event is dead")
            }
            Outcome::Retry { at_ms } => {
                tracing::warn!(id, %event_type, attempts, retry_at = at_ms, handled = ?run.handled, "handler failed; will retry")
            }
            _ => tracing::debug!(id, %event_type, outcome = outcome.label(), "event handled"),
        }
        self.metrics.handler_run(&app, &event_type, outcome.label());
        outcome
    }

    /// Records `outcome` for the event `id` held by `owner`. A store that refuses (a database
    /// restarting, a full disk) is asked again, with growing pauses, for as long as the lease
    /// is safely ours: giving up at once would leave the event `running` until the lease runs
    /// out (minutes by default), although its outcome is known. Asking again is harmless:
    /// the update only applies while `owner` holds the lease; if an earlier try did commit
    /// and only its answer was lost, the next one finds no lease and says so.
    async fn record(
        &self,
        id: i64,
        owner: &str,
        outcome: &Outcome,
        error: Option<&str>,
        handled: &[String],
        lease_until: i64,
    ) -> Result<bool, crate::store::StoreError> {
        let error = error.unwrap_or_default();
        // Past the lease the event may be claimed and run again, and that run records its
        // own outcome: this worker moves on.
        let give_up_at = lease_until;
        let mut pause = RECORD_FIRST_PAUSE;
        loop {
            let now = now_millis();
            let result = match outcome {
                Outcome::Done | Outcome::NoHandler => self.store.mark_done(id, owner, now).await,
                Outcome::Retry { at_ms } => {
                    self.store
                        .mark_retry(id, owner, *at_ms, error, handled, now)
                        .await
                }
                Outcome::Dead => self.store.mark_dead(id, owner, error, handled, now).await,
                Outcome::LeaseLost => return Ok(false),
            };
            let pause_ms = crate::time::millis(pause);
            match result {
                Err(e) if now_millis().saturating_add(pause_ms) < give_up_at => {
                    tracing::warn!(id, error = %e, retry_in = ?pause, "could not record the outcome; asking the store again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECORD_MAX_PAUSE);
                }
                other => return other,
            }
        }
    }

    /// Stores the completion of the action `record` (`error`: dead, why) for the routes that
    /// take its type, if any, asking the store again like [`Dispatcher::record`] while the
    /// lease is ours.
    async fn tell_routes(
        &self,
        record: &StoredEvent,
        error: Option<&str>,
        lease_until: i64,
    ) -> Result<(), crate::store::StoreError> {
        let Some(routing) = &self.routing else {
            return Ok(());
        };
        let event_type = match error {
            None => crate::actions::ACTION_DONE_EVENT,
            Some(_) => crate::actions::ACTION_DEAD_EVENT,
        };
        let routes = routing.matching(&record.app, event_type);
        if routes.is_empty() {
            return Ok(());
        }
        let store = match self.apps.load().contexts.get(&record.app) {
            Some(app) => Arc::clone(&app.store),
            None => crate::store::scoped::for_app(Arc::clone(&self.store), &record.app),
        };
        let mut pause = RECORD_FIRST_PAUSE;
        loop {
            let result = async {
                let mut event =
                    crate::actions::completion(store.as_ref(), record, error, now_millis()).await?;
                event.routes = routes.clone();
                store.insert(event).await
            }
            .await;
            let pause_ms = crate::time::millis(pause);
            match result {
                Ok(_) => {
                    routing.stored(&routes);
                    return Ok(());
                }
                Err(e) if now_millis().saturating_add(pause_ms) < lease_until => {
                    tracing::warn!(id = record.id, error = %e, retry_in = ?pause, "could not store the action's completion; asking the store again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECORD_MAX_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes the event once and runs its handlers that have not succeeded for it yet,
    /// concurrently, each bounded by `handler_timeout`. `Ok(false)`: no handler is registered
    /// for the type. A permanent failure of any handler is the event's; otherwise a
    /// transient one is.
    async fn invoke(&self, record: StoredEvent) -> Run {
        let app_name = record.app.clone();
        let apps = self.apps.load_full();
        let registered: Vec<&Registered> = apps
            .registry
            .for_event(&record.event_type, &app_name)
            .collect();
        let mut handled = record.handled.clone();
        if registered.is_empty() {
            return Run {
                result: Ok(false),
                handled,
            };
        }
        let pending: Vec<&Registered> = registered
            .iter()
            .copied()
            .filter(|r| !handled.iter().any(|h| **h == *r.name))
            .collect();
        if pending.is_empty() {
            // Every handler succeeded in an earlier run whose outcome was not recorded.
            return Run {
                result: Ok(true),
                handled,
            };
        }
        let event = match Event::decode_stored(&record.event_type, &record.payload) {
            Ok(event) => event,
            Err(e) => {
                return Run {
                    result: Err(HandlerError::permanent(e)),
                    handled,
                }
            }
        };
        let Some(app) = apps.contexts.get(&record.app) else {
            // Its app was removed from the configuration (or is configured on other replicas
            // only): the event waits on the retry schedule, and can be replayed.
            return Run {
                result: Err(HandlerError::transient(format!(
                    "app {:?} is not configured in this process",
                    record.app
                ))),
                handled,
            };
        };
        let ctx = Context {
            store: Arc::clone(&app.store),
            record: Arc::new(record),
            client: app.client.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let runs = pending.iter().map(|r| {
            let (handler, event, ctx) = (Arc::clone(&r.handler), event.clone(), ctx.clone());
            // A panicking handler is a failed run, not a dead worker. The guard ends the run
            // with its worker: an abandoned worker (shutdown) must not leave the handler
            // going on behind a lease that is being given up.
            let run = AbortOnDrop(tokio::spawn(
                async move { handler.handle(event, ctx).await },
            ));
            async move {
                match tokio::time::timeout(self.config.handler_timeout, run).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => {
                        Err(HandlerError::transient(format!("handler panicked: {join}")))
                    }
                    Err(_) => Err(HandlerError::transient(format!(
                        "handler timed out after {:?}",
                        self.config.handler_timeout
                    ))),
                }
            }
        });
        let results = futures_util::future::join_all(runs).await;
        let several = registered.len() > 1;
        let (mut permanent, mut transient) = (Vec::new(), Vec::new());
        for (r, result) in pending.iter().zip(results) {
            // With one handler the error reads as before; with several it names its handler.
            let label = |message: String| {
                if several {
                    format!("{}: {message}", r.name)
                } else {
                    message
                }
            };
            match result {
                Ok(()) => handled.push(r.name.to_string()),
                Err(HandlerError::Permanent(m)) => permanent.push(label(m)),
                Err(HandlerError::Transient(m)) => transient.push(label(m)),
            }
        }
        let result = if !permanent.is_empty() {
            permanent.extend(transient);
            Err(HandlerError::Permanent(permanent.join("; ")))
        } else if !transient.is_empty() {
            Err(HandlerError::Transient(transient.join("; ")))
        } else {
            Ok(true)
        };
        Run { result, handled }
    }

    /// Runs every event that is due now, until none is left; returns how many ran. For tests
    /// and one-shot tools: the workers do the same continuously.
    pub async fn drain(&self) -> Result<usize, crate::store::StoreError> {
        let owner = self.drain_owner();
        let lease_ms = crate::time::millis(self.config.lease);
        let mut total = 0;
        loop {
            let batch = self
                .store
                .claim(&owner, self.config.batch_size, lease_ms, now_millis())
                .await?;
            if batch.is_empty() {
                return Ok(total);
            }
            total += batch.len();
            futures_util::future::join_all(
                batch.into_iter().map(|record| self.run(&owner, record)),
            )
            .await;
        }
    }
}

/// What running an event's handlers came to.
struct Run {
    /// `Ok(false)`: no handler is registered for the type.
    result: Result<bool, HandlerError>,
    /// The handlers that have succeeded for the event, this run and earlier ones.
    handled: Vec<String>,
}

/// A spawned task that is aborted when this handle is dropped (tokio's `JoinHandle` detaches
/// instead).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_followed_then_used_up() {
        let schedule = [5, 30, 120].map(Duration::from_secs);
        assert_eq!(retry_delay(&schedule, 1, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_delay(&schedule, 3, 0.0),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_delay(&schedule, 4, 0.0), None);
        assert_eq!(retry_delay(&schedule, 0, 0.0), None);
        for _ in 0..100 {
            let d = retry_delay(&schedule, 2, 0.2).unwrap();
            assert!(
                d >= Duration::from_secs(24) && d <= Duration::from_secs(36),
                "{d:?}"
            );
        }
    }
}
