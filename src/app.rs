//! Wiring: build the application from a [`Config`], bind, serve, shut down gracefully.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{AppSpec, Config, ConfigError, DEFAULT_APP};
use crate::dingtalk::{CallCounter, Client, CounterError};
use crate::dispatch::{AppContext, Dispatcher};
use crate::forwarded::TrustedProxies;
use crate::handler::{Handler, Registrations, RegistryBuilder, RegistryError};
use crate::metrics::Metrics;
use crate::ops::{self, OpsState};
use crate::server::{self, Limits, SharedRouter, Table};
use crate::sources::push::{self, PushState};
use crate::sources::recovery::Recovery;
use crate::store::{self, Store, StoreError};

/// Why the application could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("DingTalk client: {0}")]
    Client(#[from] crate::dingtalk::Error),
    #[error(transparent)]
    Route(#[from] crate::routes::RouteError),
}

/// Reads the configuration again for a reload: in `dinghook serve`, the file and environment
/// it started from.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Collects handlers, then builds the [`Application`].
pub struct AppBuilder {
    config: Config,
    handlers: RegistryBuilder,
    /// A store given by the program instead of the one `store.url` names.
    store: Option<Arc<dyn Store>>,
    /// Where a reload reads the configuration; without one, reloads are refused.
    source: Option<ConfigSource>,
}

impl Registrations for AppBuilder {
    fn on(mut self, event_type: &str, handler: impl Handler) -> Self {
        self.handlers = self.handlers.on(event_type, handler);
        self
    }

    fn named(mut self, name: &str) -> Self {
        self.handlers = self.handlers.named(name);
        self
    }
}

impl AppBuilder {
    /// Adds all registrations of `handlers`.
    pub fn handlers(mut self, handlers: RegistryBuilder) -> Self {
        self.handlers = self.handlers.merge(handlers);
        self
    }

    /// Validates the configuration and the registrations (two handlers with one name is an
    /// error), opens the store and binds the listen address. The built-in handlers the
    /// configuration enables (`[handlers]`) are registered first, then this builder's.
    pub async fn build(self) -> Result<Application, AppError> {
        let specs = self.config.validated_apps()?;
        Application::build_with(self.config, specs, self.handlers, self.store, self.source).await
    }

    /// Uses `store` instead of opening the one `store.url` names: a store shared with other
    /// code, or one wrapped to observe or add to what the application does with it. The
    /// application closes it when it stops.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where [`Reloader::reload`] (SIGHUP, `POST /reload` on the operator listener) reads the
    /// configuration again. `dinghook serve` gives the file and environment it started from.
    pub fn config_source(
        mut self,
        source: impl Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
}

/// Each app's built-in handlers with its own options, limited to its events; then the
/// program's own, which run for every app.
fn registry(
    specs: &[AppSpec],
    program: &RegistryBuilder,
) -> Result<crate::handler::Registry, RegistryError> {
    let mut builtin = RegistryBuilder::new();
    for app in specs {
        builtin = builtin
            .merge(crate::builtin::registrations(&app.handlers).for_app(&app.name, DEFAULT_APP))
            // Actions run whatever `[handlers]` says: the API asked for them.
            .merge(
                crate::builtin::action::register(RegistryBuilder::new(), &app.handlers)
                    .for_app(&app.name, DEFAULT_APP),
            );
    }
    builtin.merge(program.clone()).build()
}

/// A built, bound application: call [`Application::run_until_stopped`] to serve.
pub struct Application {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The operator listener (`/metrics`), unless `ops.listen` is empty.
    ops_listener: Option<(TcpListener, SocketAddr)>,
    /// The HTTP API's listener and routes, when `api.listen` is set.
    api_listener: Option<((TcpListener, SocketAddr), axum::Router)>,
    limits: Limits,
    ops_router: axum::Router,
    live: Arc<Live>,
    /// One per route, started with the application.
    runners: Vec<crate::routes::runner::RouteRunner>,
}

/// What the apps share and keeps for the process's life: a reload changes none of it.
struct Fixed {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Poked after an event is stored (callbacks, recovery), so the workers claim at once.
    wake: Arc<tokio::sync::Notify>,
    body_budget: push::BodyBudget,
    trusted_proxies: TrustedProxies,
    request_timeout: std::time::Duration,
    /// The program's own handlers, registered again with each configuration's built-ins.
    program: RegistryBuilder,
    ops: Arc<OpsState>,
    /// Which routes take an event, for the sources; the runners' wake-up.
    routing: crate::routes::Routing,
    /// The HTTP API's state, when `api.listen` is set.
    api: Option<Arc<crate::api::ApiState>>,
}

/// What one configuration of apps makes: each app's client, store view and callback route,
/// and the handlers. Built at start and again by each reload.
struct AppSet {
    specs: Vec<AppSpec>,
    clients: BTreeMap<String, Client>,
    contexts: HashMap<String, AppContext>,
    registry: crate::handler::Registry,
    /// The public listener's routes: every app's callback path and the probes.
    router: axum::Router,
}

impl AppSet {
    /// Builds the apps of `config`. An app whose DingTalk settings are those of `previous`'s
    /// app of that name keeps its client (its token, QPS limiter and quota state).
    fn build(
        fixed: &Fixed,
        config: &Config,
        specs: Vec<AppSpec>,
        previous: Option<&AppSet>,
    ) -> Result<AppSet, AppError> {
        let before: HashMap<&str, &AppSpec> = previous
            .map(|p| p.specs.iter().map(|s| (s.name.as_str(), s)).collect())
            .unwrap_or_default();
        let mut callbacks = axum::Router::new();
        let mut robots = crate::sources::robot::RobotApps::new();
        let mut contexts = HashMap::new();
        let mut clients = BTreeMap::new();
        for spec in &specs {
            let old = before.get(spec.name.as_str()).copied();
            let app_store = store::scoped::for_app(Arc::clone(&fixed.store), &spec.name);
            let kept = old
                .filter(|old| old.same_client(spec))
                .and_then(|_| previous?.clients.get(&spec.name).cloned());
            let client = match kept {
                Some(client) => Some(client),
                None if spec.dingtalk_enabled() => {
                    let counter = Arc::new(StoreCallCounter(Arc::clone(&app_store)));
                    Some(Client::new(spec.dingtalk.clone(), counter)?)
                }
                None => None,
            };
            if old.is_none_or(|old| !old.same_as(spec)) {
                log_app_notes(spec);
            }
            // An app in Stream mode without callback keys has no callback route.
            if spec.push_enabled() {
                let push = Arc::new(PushState {
                    app: spec.name.as_str().into(),
                    cipher: spec.cipher()?,
                    store: Arc::clone(&app_store),
                    body_limit: config.callback.body_limit,
                    body_budget: fixed.body_budget.clone(),
                    replay_window: config.callback.replay_window,
                    request_timeout: fixed.request_timeout,
                    metrics: Arc::clone(&fixed.metrics),
                    stored: Arc::clone(&fixed.wake),
                    routing: fixed.routing.clone(),
                });
                callbacks = callbacks.merge(push::router(push, &spec.callback.path));
            }
            // Robot messages over HTTP are signed with the AppSecret: an app with one has a
            // robot endpoint (`/dingtalk/robot/<app>`).
            if !spec.dingtalk.app_secret.is_empty() {
                let cipher = if spec.callback.aes_key.is_empty() {
                    None
                } else {
                    Some(spec.cipher()?)
                };
                let robot = crate::sources::robot::RobotState {
                    app: spec.name.as_str().into(),
                    app_secret: spec.dingtalk.app_secret.clone(),
                    cipher,
                    store: Arc::clone(&app_store),
                    body_limit: config.callback.body_limit,
                    body_budget: fixed.body_budget.clone(),
                    request_timeout: fixed.request_timeout,
                    metrics: Arc::clone(&fixed.metrics),
                    stored: Arc::clone(&fixed.wake),
                    routing: fixed.routing.clone(),
                };
                robots.insert(spec.name.clone(), Arc::new(robot));
            }
            if let Some(client) = &client {
                clients.insert(spec.name.clone(), client.clone());
            }
            contexts.insert(
                spec.name.clone(),
                AppContext {
                    store: app_store,
                    client,
                },
            );
        }
        if !robots.is_empty() {
            callbacks = callbacks.merge(crate::sources::robot::router(robots));
        }
        let registry = registry(&specs, &fixed.program)?;
        // The public port answers the callbacks and the probes; `/metrics` is for operators.
        let router = crate::http::wrap(
            callbacks.merge(ops::probes(Arc::clone(&fixed.ops))),
            fixed.trusted_proxies.clone(),
        );
        Ok(AppSet {
            specs,
            clients,
            contexts,
            registry,
            router,
        })
    }

    /// What the HTTP API knows of these apps.
    fn api_apps(&self) -> crate::api::ApiApps {
        self.specs
            .iter()
            .filter_map(|spec| {
                let context = self.contexts.get(&spec.name)?;
                Some((
                    spec.name.clone(),
                    crate::api::ApiApp {
                        name: spec.name.clone(),
                        callback_path: spec.callback.path.clone(),
                        client: context.client.clone(),
                        store: Arc::clone(&context.store),
                        qps: spec.dingtalk.qps,
                        recovery: spec.recovery.enabled && context.client.is_some(),
                        quota_reserve: spec.handlers.notify_quota_reserve,
                        cipher: if spec.push_enabled() {
                            spec.cipher().ok()
                        } else {
                            None
                        },
                    },
                ))
            })
            .collect()
    }

    /// The failed-push reader of app `spec` (with this set's client), when it has one.
    fn recovery(&self, fixed: &Fixed, spec: &AppSpec) -> Option<Recovery> {
        let context = self.contexts.get(&spec.name)?;
        Recovery::from_config(
            &spec.name,
            &spec.recovery,
            context.client.clone(),
            Arc::clone(&context.store),
            Arc::clone(&fixed.metrics),
            Arc::clone(&fixed.wake),
        )
        .map(|r| r.with_routing(fixed.routing.clone()))
    }

    /// The Stream client of app `spec`, when it is in Stream mode.
    fn stream(
        &self,
        fixed: &Fixed,
        spec: &AppSpec,
    ) -> Option<crate::sources::stream::StreamSource> {
        let context = self.contexts.get(&spec.name)?;
        spec.stream.enabled.then(|| {
            crate::sources::stream::StreamSource::new(
                &spec.name,
                spec.stream.clone(),
                &spec.dingtalk.app_key,
                spec.dingtalk.app_secret.clone(),
                &spec.dingtalk.api_url,
                Arc::clone(&context.store),
                Arc::clone(&fixed.metrics),
                Arc::clone(&fixed.wake),
            )
            .with_routing(fixed.routing.clone())
        })
    }
}

/// What start-up (and a reload, for a new or changed app) says about an app's settings.
fn log_app_notes(spec: &AppSpec) {
    if !spec.dingtalk_enabled() {
        tracing::info!(
            app = %spec.name,
            "no DingTalk app key configured: its handlers cannot call DingTalk"
        );
    }
    if let Some((reads, quota)) = spec.recovery_quota_share() {
        tracing::warn!(
            app = %spec.name,
            reads_per_month = reads,
            monthly_quota = quota,
            interval = %crate::time::format_duration(spec.recovery.interval),
            "the failed-push reads alone take more than half the monthly DingTalk \
             quota; raise recovery.interval"
        );
    }
}

/// The running application's replaceable part, shared by the server, the workers and
/// [`Reloader`].
struct Live {
    fixed: Fixed,
    /// Prunes ended events and old records; a reload gives it the apps' retentions.
    retention: Arc<crate::retention::Retention>,
    /// The public listener's routes, which a reload swaps.
    router: SharedRouter,
    dispatcher: Arc<Dispatcher>,
    source: Option<ConfigSource>,
    /// Held by a reload from start to end, so reloads happen one at a time.
    state: tokio::sync::Mutex<LiveState>,
}

struct LiveState {
    /// The configuration the process started with: what a reload cannot change is compared
    /// with it.
    started: Config,
    apps: AppSet,
    recoveries: Recoveries,
    streams: crate::sources::stream::StreamClients,
}

/// The failed-push readers, one per app that has one, each with its own stop so a reload can
/// replace one without touching the others.
#[derive(Default)]
struct Recoveries {
    /// Built before the application runs, started with it.
    waiting: HashMap<String, Recovery>,
    running: HashMap<String, (tokio::sync::watch::Sender<bool>, JoinHandle<()>)>,
    /// Stopped by a reload; joined at shutdown, as they store what they read before ending.
    retired: Vec<JoinHandle<()>>,
    started: bool,
    stopped: bool,
}

impl Recoveries {
    /// Puts `recovery` in the place of `app`'s (stopping the one running), or just stops it.
    fn replace(&mut self, app: &str, recovery: Option<Recovery>) {
        self.waiting.remove(app);
        if let Some((stop, task)) = self.running.remove(app) {
            let _ = stop.send(true);
            self.retired.retain(|t| !t.is_finished());
            self.retired.push(task);
        }
        if let Some(recovery) = recovery {
            if self.started && !self.stopped {
                self.launch(app, recovery);
            } else if !self.stopped {
                self.waiting.insert(app.to_owned(), recovery);
            }
        }
    }

    fn launch(&mut self, app: &str, recovery: Recovery) {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        self.running
            .insert(app.to_owned(), (stop, recovery.start(stopping)));
    }

    fn start_all(&mut self) {
        self.started = true;
        for (app, recovery) in std::mem::take(&mut self.waiting) {
            self.launch(&app, recovery);
        }
    }

    /// Stops every reader; returns their tasks to join.
    fn stop_all(&mut self) -> Vec<JoinHandle<()>> {
        self.stopped = true;
        self.waiting.clear();
        let mut tasks = std::mem::take(&mut self.retired);
        for (_, (stop, task)) in self.running.drain() {
            let _ = stop.send(true);
            tasks.push(task);
        }
        tasks
    }
}

/// Why a reload did not happen. The running configuration is kept.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this application was built without a configuration source to read again")]
    Unavailable,
    #[error(transparent)]
    Refused(#[from] AppError),
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        ReloadError::Refused(AppError::Config(e))
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reloaded {
    /// Apps now served that were not.
    pub added: Vec<String>,
    /// Apps served before and after with some setting changed.
    pub changed: Vec<String>,
    /// Apps no longer served (their stored events and documents stay).
    pub removed: Vec<String>,
    /// How many apps are as they were.
    pub unchanged: usize,
    /// Settings that differ from the running ones but take a restart to change (listen
    /// addresses, store, workers, …); the running values are kept.
    pub restart_needed: Vec<&'static str>,
}

/// Reloads the configuration of a running [`Application`]: apps added, changed or removed,
/// without dropping a request or an event. Get one with [`Application::reloader`].
#[derive(Clone)]
pub struct Reloader(Arc<Live>);

impl Reloader {
    /// Reads the configuration from the application's [`ConfigSource`] and applies it.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let Some(source) = &self.0.source else {
            return Err(ReloadError::Unavailable);
        };
        match source() {
            Ok(config) => self.apply(config).await,
            Err(e) => Err(self.refused(e.into())),
        }
    }

    /// Applies `config`: each app's callback path, keys, client, handler options and recovery
    /// as it says. Requests under way finish with the settings they started with; events
    /// already stored are kept (a removed app's too). A configuration with an error changes
    /// nothing.
    pub async fn apply(&self, config: Config) -> Result<Reloaded, ReloadError> {
        match self.0.apply(config).await {
            Ok(done) => {
                self.0.fixed.metrics.config_reload("ok");
                tracing::info!(
                    added = %names(&done.added),
                    changed = %names(&done.changed),
                    removed = %names(&done.removed),
                    unchanged = done.unchanged,
                    "configuration reloaded"
                );
                if !done.restart_needed.is_empty() {
                    tracing::warn!(
                        settings = %done.restart_needed.join(" "),
                        "these settings changed but take a restart; their running values are kept"
                    );
                }
                Ok(done)
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    fn refused(&self, e: ReloadError) -> ReloadError {
        self.0.fixed.metrics.config_reload("refused");
        tracing::error!(error = %e, "configuration reload refused; the running configuration is kept");
        e
    }
}

/// At most [`MAX_APPS_LOGGED`] names, then how many more.
fn names(list: &[String]) -> String {
    let mut shown: Vec<&str> = list
        .iter()
        .take(MAX_APPS_LOGGED)
        .map(String::as_str)
        .collect();
    let more = list.len().saturating_sub(MAX_APPS_LOGGED);
    let more = format!("and {more} more");
    if list.len() > MAX_APPS_LOGGED {
        shown.push(&more);
    }
    shown.join(" ")
}

impl Live {
    async fn apply(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let mut state = self.state.lock().await;
        let specs = config.validated_apps()?;
        let restart_needed = restart_needed(&state.started, &config);
        let apps = AppSet::build(&self.fixed, &config, specs, Some(&state.apps))?;
        let mut done = Reloaded {
            restart_needed,
            ..Reloaded::default()
        };
        let before: HashMap<&str, &AppSpec> = state
            .apps
            .specs
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut recoveries = Vec::new();
        let mut streams = Vec::new();
        for spec in &apps.specs {
            match before.get(spec.name.as_str()) {
                None => done.added.push(spec.name.clone()),
                Some(old) if old.same_as(spec) => done.unchanged += 1,
                Some(_) => done.changed.push(spec.name.clone()),
            }
            let same = before
                .get(spec.name.as_str())
                .is_some_and(|old| old.same_recovery(spec));
            if !same {
                recoveries.push((spec.name.clone(), apps.recovery(&self.fixed, spec)));
            }
            if !before
                .get(spec.name.as_str())
                .is_some_and(|old| old.same_stream(spec))
            {
                streams.push((spec.name.clone(), apps.stream(&self.fixed, spec)));
            }
        }
        let now: std::collections::HashSet<&str> =
            apps.specs.iter().map(|s| s.name.as_str()).collect();
        done.removed = before
            .keys()
            .filter(|name| !now.contains(*name))
            .map(|name| (*name).to_owned())
            .collect();
        done.removed.sort();
        // Nothing can fail from here: swap the routes, the workers' apps, the metrics' clients
        // and the readers.
        self.router.store(Arc::new(apps.router.clone()));
        self.dispatcher
            .replace_apps(apps.registry.clone(), apps.contexts.clone());
        self.fixed.ops.clients.store(Arc::new(apps.clients.clone()));
        if let Some(api) = &self.fixed.api {
            api.apps.store(Arc::new(apps.api_apps()));
        }
        self.fixed.metrics.set_apps(apps.specs.len());
        for gone in state.apps.clients.keys() {
            if !apps.clients.contains_key(gone) {
                self.fixed.metrics.forget_client(gone);
            }
        }
        for (app, recovery) in recoveries {
            state.recoveries.replace(&app, recovery);
        }
        for app in &done.removed {
            state.recoveries.replace(app, None);
            state.streams.replace(app, None);
        }
        for (app, stream) in streams {
            state.streams.replace(&app, stream);
        }
        self.retention.set_apps(retentions(&apps.specs));
        state.apps = apps;
        Ok(done)
    }
}

/// Each app's retention, for [`crate::retention::Retention`].
fn retentions(specs: &[AppSpec]) -> Vec<crate::retention::AppRetention> {
    specs
        .iter()
        .map(|spec| crate::retention::AppRetention {
            app: spec.name.clone(),
            done: spec.retention.done,
            dead: spec.retention.dead,
        })
        .collect()
}

/// The settings a reload cannot change that `new` has otherwise than `started`.
fn restart_needed(started: &Config, new: &Config) -> Vec<&'static str> {
    fn value(v: &impl serde::Serialize) -> Option<serde_json::Value> {
        serde_json::to_value(v).ok()
    }
    let (a, b) = (started, new);
    let checks: [(&'static str, bool); 14] = [
        // Until the route workers follow a reload.
        ("routes", value(&a.routes) == value(&b.routes)),
        ("listen", a.listen == b.listen),
        ("ops.listen", a.ops.listen == b.ops.listen),
        (
            "api",
            a.api.listen == b.api.listen
                && a.api.token == b.api.token
                && value(&a.api.tokens) == value(&b.api.tokens)
                && a.api.body_limit == b.api.body_limit
                && a.api.requests_per_second == b.api.requests_per_second,
        ),
        ("log_format", value(&a.log_format) == value(&b.log_format)),
        ("log_level", a.log_level == b.log_level),
        ("shutdown_timeout", a.shutdown_timeout == b.shutdown_timeout),
        ("request_timeout", a.request_timeout == b.request_timeout),
        ("server", value(&a.server) == value(&b.server)),
        ("store", value(&a.store) == value(&b.store)),
        ("dispatch", value(&a.dispatch) == value(&b.dispatch)),
        // `done` and `dead` follow a reload (each app's); the rest is the pruner's own.
        (
            "retention",
            a.retention.audit == b.retention.audit
                && a.retention.interval == b.retention.interval
                && a.retention.batch == b.retention.batch,
        ),
        (
            "callback.body_budget",
            a.callback.body_budget == b.callback.body_budget,
        ),
        (
            "callback.trusted_proxies",
            a.callback.trusted_proxies == b.callback.trusted_proxies,
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| key)
        .collect()
}

impl Application {
    /// Starts building an application whose handlers are registered in code.
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            handlers: RegistryBuilder::new(),
            store: None,
            source: None,
        }
    }

    /// An application with the built-in handlers the configuration enables and no others.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        Self::builder(config).build().await
    }

    /// Opens the store, builds the routes and binds the listen address (port 0 picks a free
    /// port, which is how the tests run several servers at once).
    async fn build_with(
        config: Config,
        specs: Vec<AppSpec>,
        program: RegistryBuilder,
        store: Option<Arc<dyn Store>>,
        source: Option<ConfigSource>,
    ) -> Result<Self, AppError> {
        let trusted_proxies = config.trusted_proxies()?;
        let addr = config.listen_addr()?;
        let ops_addr = config.ops_addr()?;
        let api_addr = config.api_addr()?;
        let public_url = config.public_url()?;
        let api_tokens = config.api_tokens(&specs)?;
        // Registration problems (two handlers with one name) before anything is opened.
        registry(&specs, &program)?;
        let routes = Arc::new(config.routes_for(&specs)?);
        let destinations = routes
            .specs
            .iter()
            .map(crate::routes::destination)
            .collect::<Result<Vec<_>, _>>()?;
        let open_files = server::raise_open_file_limit();
        let limits = Limits::resolve(&config.server, open_files, trusted_proxies.clone());
        tracing::info!(
            open_file_limit = open_files,
            max_connections = limits.max_connections,
            max_connections_per_client = limits.max_per_client,
            "connection limits"
        );
        let store = match store {
            Some(store) => store,
            None => store::open(&config.store).await?,
        };
        let metrics = Arc::new(Metrics::new());
        let ops = Arc::new(OpsState {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            clients: arc_swap::ArcSwap::default(),
            probe_timeout: config.request_timeout,
            routes: routes.specs.iter().map(|r| r.name.clone()).collect(),
        });
        let routing = crate::routes::Routing::new(Arc::clone(&routes));
        let node = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let runners = routes
            .specs
            .iter()
            .zip(destinations)
            .map(|(spec, destination)| {
                crate::routes::runner::RouteRunner::new(
                    spec.clone(),
                    destination,
                    Arc::clone(&store),
                    Arc::clone(&metrics),
                    crate::routes::runner::RunnerSettings {
                        poll_interval: config.dispatch.poll_interval,
                        node: node.clone(),
                    },
                    routing.wake_for(&spec.name),
                )
            })
            .collect();
        let wake = Arc::new(tokio::sync::Notify::new());
        let api = api_addr.map(|_| {
            let limiter =
                crate::api::RateLimiter::new(config.api.requests_per_second, api_tokens.len());
            Arc::new(crate::api::ApiState {
                limiter,
                store: Arc::clone(&store),
                metrics: Arc::clone(&metrics),
                apps: arc_swap::ArcSwap::default(),
                tokens: api_tokens,
                wake: Arc::clone(&wake),
                routes: routes
                    .specs
                    .iter()
                    .map(|r| crate::api::RouteInfo {
                        name: r.name.clone(),
                        kind: r.target.kind(),
                        destination: r.shown_url.clone(),
                        apps: r.apps.as_ref().map(|a| a.iter().cloned().collect()),
                        events: r.event_patterns.clone(),
                    })
                    .collect(),
                routing: routing.clone(),
                body_limit: config.api.body_limit,
                trusted_proxies: trusted_proxies.clone(),
                public_url: public_url.clone(),
                public_addr: std::sync::OnceLock::new(),
            })
        });
        let fixed = Fixed {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            wake,
            body_budget: push::BodyBudget::new(config.callback.body_budget),
            trusted_proxies: trusted_proxies.clone(),
            request_timeout: config.request_timeout,
            program,
            ops: Arc::clone(&ops),
            routing,
            api,
        };
        let apps = AppSet::build(&fixed, &config, specs, None)?;
        if let Some(api) = &fixed.api {
            api.apps.store(Arc::new(apps.api_apps()));
        }
        let mut recoveries = Recoveries::default();
        for spec in &apps.specs {
            recoveries.replace(&spec.name, apps.recovery(&fixed, spec));
        }
        let mut streams = crate::sources::stream::StreamClients::default();
        for spec in &apps.specs {
            streams.replace(&spec.name, apps.stream(&fixed, spec));
        }
        ops.clients.store(Arc::new(apps.clients.clone()));
        metrics.set_apps(apps.specs.len());
        let dispatcher = Arc::new(
            Dispatcher::new(
                Arc::clone(&store),
                apps.registry.clone(),
                config.dispatch.clone(),
                Arc::clone(&metrics),
                Arc::clone(&fixed.wake),
                apps.contexts.clone(),
            )
            .with_routing(fixed.routing.clone()),
        );
        let retention = Arc::new(crate::retention::Retention::new(
            Arc::clone(&store),
            Arc::clone(&metrics),
            config.retention.clone(),
            retentions(&apps.specs),
        ));
        let live = Arc::new(Live {
            retention,
            router: Arc::new(arc_swap::ArcSwap::from_pointee(apps.router.clone())),
            dispatcher,
            source,
            state: tokio::sync::Mutex::new(LiveState {
                started: config.clone(),
                apps,
                recoveries,
                streams,
            }),
            fixed,
        });
        let ops_router = crate::http::wrap(
            ops::router(ops).merge(reload_route(Reloader(Arc::clone(&live)))),
            trusted_proxies.clone(),
        );
        let (listener, local_addr) = bind(addr).await?;
        if let Some(api) = &live.fixed.api {
            // Set once, here: the cell is new.
            let _ = api.public_addr.set(local_addr);
        }
        let ops_listener = match ops_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let api_listener = match (api_addr, &live.fixed.api) {
            (Some(addr), Some(api)) => Some((
                bind(addr).await?,
                crate::http::layers(crate::api::router(Arc::clone(api)), trusted_proxies.clone()),
            )),
            _ => None,
        };
        Ok(Application {
            config,
            listener,
            local_addr,
            ops_listener,
            api_listener,
            limits,
            ops_router,
            live,
            runners,
        })
    }

    /// The `default` app's DingTalk client (else the first app's), when it has an app key.
    pub fn client(&self) -> Option<Client> {
        let clients = self.live.fixed.ops.clients.load();
        clients
            .get(DEFAULT_APP)
            .or_else(|| clients.values().next())
            .cloned()
    }

    pub fn dispatcher(&self) -> Arc<Dispatcher> {
        Arc::clone(&self.live.dispatcher)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.live.fixed.metrics)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The operator listener's address, unless `ops.listen` is empty.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The HTTP API's address, when `api.listen` is set.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_listener.as_ref().map(|((_, addr), _)| *addr)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.live.fixed.store)
    }

    /// Reloads this application's configuration while it runs (see [`Reloader`]).
    pub fn reloader(&self) -> Reloader {
        Reloader(Arc::clone(&self.live))
    }

    /// Serves until `shutdown` completes, then stops accepting and drains two things side by
    /// side, each against its own deadline: the HTTP connections (those between requests close
    /// at once, requests in flight get at most `request_timeout`), and the workers (at most
    /// `shutdown_timeout`, then their runs are abandoned). A slow client cannot eat the
    /// workers' time. Then the store is flushed and closed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Application {
            config,
            listener,
            local_addr,
            ops_listener,
            api_listener,
            limits,
            ops_router,
            live,
            runners,
        } = self;
        let ops_addr = ops_listener.as_ref().map(|(_, addr)| *addr);
        let api_addr = api_listener.as_ref().map(|((_, addr), _)| *addr);
        {
            let state = live.state.lock().await;
            let apps = &state.apps.specs;
            // Each app's path, unless there are many (then at debug level, one line each).
            let mut paths: Vec<String> = apps
                .iter()
                .take(MAX_APPS_LOGGED)
                .map(|a| format!("{}={}", a.name, a.callback.path))
                .collect();
            if apps.len() > MAX_APPS_LOGGED {
                paths.push(format!("and {} more", apps.len() - MAX_APPS_LOGGED));
                for app in apps {
                    tracing::debug!(app = %app.name, path = %app.callback.path, "callback");
                }
            }
            tracing::info!(
                %local_addr,
                ops_addr = ops_addr.map(tracing::field::display),
                api_addr = api_addr.map(tracing::field::display),
                apps = %paths.join(" "),
                store = %crate::store::redact_url(&config.store.url),
                "dinghook listening"
            );
        }
        let dispatcher = Arc::clone(&live.dispatcher);
        let store = Arc::clone(&live.fixed.store);
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let workers = if config.dispatch.enabled {
            dispatcher.start(stopping.clone())
        } else {
            Vec::new()
        };
        live.state.lock().await.recoveries.start_all();
        live.state.lock().await.streams.start_all();
        let pruner = live.retention.start(stopping.clone());
        // Routes run beside the workers (also with `dispatch.enabled = false`: that turns the
        // handlers off, not the routes), and stop with them.
        let route_owners: Vec<String> = runners.iter().map(|r| r.owner()).collect();
        let route_tasks: Vec<_> = runners
            .into_iter()
            .map(|runner| runner.start(stopping.clone()))
            .collect();
        let table = Table::new(limits, Arc::clone(&live.fixed.metrics));
        let drain = config.request_timeout;
        let mut listeners = vec![tokio::spawn(server::serve(
            "public",
            listener,
            Arc::clone(&live.router),
            Arc::clone(&table),
            stopping.clone(),
            drain,
        ))];
        if let Some((ops_listener, _)) = ops_listener {
            listeners.push(tokio::spawn(server::serve(
                "ops",
                ops_listener,
                Arc::new(arc_swap::ArcSwap::from_pointee(ops_router)),
                Arc::clone(&table),
                stopping.clone(),
                drain,
            )));
        }
        if let Some(((api_listener, _), api_router)) = api_listener {
            listeners.push(tokio::spawn(server::serve(
                "api",
                api_listener,
                Arc::new(arc_swap::ArcSwap::from_pointee(api_router)),
                Arc::clone(&table),
                stopping.clone(),
                drain,
            )));
        }

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests and runs");
        let _ = stopping_tx.send(true);
        // Recovery stores what it reads before it stops, so it is joined with the workers,
        // before the store closes.
        let recovery = live.state.lock().await.recoveries.stop_all();
        // Stream clients stop reading, finish their commits and acks, and close; before the
        // store closes.
        let streams = live.state.lock().await.streams.stop_all();

        let http = async {
            let mut result = Ok(());
            for joined in futures_util::future::join_all(listeners).await {
                if let Err(e) = joined {
                    result = Err(AppError::Serve(std::io::Error::other(e.to_string())));
                }
            }
            result
        };
        // Workers stop between events. Runs still going when the grace period ends are
        // abandoned, and their events go back to `pending` rather than wait out the lease.
        let grace = config.shutdown_timeout;
        let tasks: Vec<_> = workers
            .into_iter()
            .chain(recovery)
            .chain(streams)
            .chain(route_tasks)
            .chain(std::iter::once(pruner))
            .collect();
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all_tasks = futures_util::future::join_all(tasks);
        tokio::pin!(all_tasks);
        let workers_stopped = tokio::time::timeout(grace, &mut all_tasks);
        let (result, workers_stopped) = tokio::join!(http, workers_stopped);
        if workers_stopped.is_err() {
            tracing::warn!(
                ?grace,
                "workers did not stop in time; abandoning their runs"
            );
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            // An aborted task ends at its next await; give them a moment to get there, so no
            // handler is still going when its lease is given up.
            let _ = tokio::time::timeout(ABORT_WAIT, &mut all_tasks).await;
            match dispatcher.release_leases().await {
                Ok(n) => tracing::info!(events = n, "abandoned runs put back to pending"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not put abandoned runs back; they run again when their lease ends"
                ),
            }
            // Deliveries a route had in flight too (a destination slower than the grace).
            for owner in &route_owners {
                match store
                    .deliveries()
                    .release_deliveries(owner, crate::time::now_millis())
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(deliveries = n, "abandoned deliveries put back to pending")
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "could not put abandoned deliveries back; they go again when their lease ends"
                    ),
                }
            }
        }
        store.close().await;
        tracing::info!("stopped");
        result
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr, source })?;
    Ok((listener, local))
}

/// The DingTalk client's monthly call counter, kept in the store so restarts and replicas
/// share it. Here, in the wiring, so neither the store nor the client knows the other.
pub struct StoreCallCounter(pub Arc<dyn Store>);

#[async_trait]
impl CallCounter for StoreCallCounter {
    async fn add_calls(&self, month: &str, n: u64) -> Result<u64, CounterError> {
        self.0
            .add_api_calls(month, n)
            .await
            .map_err(|e| CounterError(e.to_string()))
    }

    async fn calls(&self, month: &str) -> Result<u64, CounterError> {
        self.0
            .api_calls(month)
            .await
            .map_err(|e| CounterError(e.to_string()))
    }
}

/// Apps whose paths the start-up line lists.
const MAX_APPS_LOGGED: usize = 10;

/// How long shutdown waits for abandoned workers to notice they were aborted.
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `POST /reload` on the operator listener: [`Reloader::reload`], answered with what changed
/// (200) or why nothing did (422 with the key and the reason; 409 without a configuration
/// source).
fn reload_route(reloader: Reloader) -> axum::Router {
    axum::Router::new()
        .route("/reload", axum::routing::post(reload))
        .with_state(reloader)
}

async fn reload(State(reloader): State<Reloader>) -> Response {
    match reloader.reload().await {
        Ok(done) => Json(json!({ "reloaded": done })).into_response(),
        Err(e) => {
            let (status, code) = match &e {
                ReloadError::Unavailable => (StatusCode::CONFLICT, "reload_unavailable"),
                ReloadError::Refused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"),
            };
            let body = json!({ "error": { "code": code, "message": e.to_string() } });
            (status, Json(body)).into_response()
        }
    }
}

/// Reloads the configuration on every SIGHUP, until the process ends. Register it before
/// the application is built, so a SIGHUP during start-up is not the default action (which
/// ends the process): `let hangups = hangups(); … tokio::spawn(reload_on_hangup(hangups, app.reloader()))`.
#[cfg(unix)]
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; use POST /reload on the operator listener");
            None
        }
    }
}

/// See [`hangups`]: each SIGHUP reloads (the result is logged by [`Reloader`]).
#[cfg(unix)]
pub async fn reload_on_hangup(hangups: Option<tokio::signal::unix::Signal>, reloader: Reloader) {
    let Some(mut hangups) = hangups else { return };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let _ = reloader.reload().await;
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
