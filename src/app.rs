//! Wiring: build the application from a [`Config`], bind, serve, shut down gracefully.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::net::TcpListener;

use crate::config::{AppSpec, Config, ConfigError, DEFAULT_APP};
use crate::dingtalk::{CallCounter, Client, CounterError};
use crate::dispatch::{AppContext, Dispatcher};
use crate::handler::{Handler, Registrations, RegistryBuilder, RegistryError};
use crate::metrics::Metrics;
use crate::ops::{self, OpsState};
use crate::server::{self, Limits, Table};
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
}

/// Collects handlers, then builds the [`Application`].
pub struct AppBuilder {
    config: Config,
    handlers: RegistryBuilder,
    /// A store given by the program instead of the one `store.url` names.
    store: Option<Arc<dyn Store>>,
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
        // Each app's built-in handlers with its own options, limited to its events; then the
        // program's own, which run for every app.
        let specs = self.config.validated_apps()?;
        let mut builtin = RegistryBuilder::new();
        for app in &specs {
            builtin = builtin.merge(
                crate::builtin::registrations(&app.handlers).for_app(&app.name, DEFAULT_APP),
            );
        }
        let registry = builtin.merge(self.handlers).build()?;
        Application::build_with(self.config, specs, registry, self.store).await
    }

    /// Uses `store` instead of opening the one `store.url` names: a store shared with other
    /// code, or one wrapped to observe or add to what the application does with it. The
    /// application closes it when it stops.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }
}

/// A built, bound application: call [`Application::run_until_stopped`] to serve.
pub struct Application {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The operator listener (`/metrics`), unless `ops.listen` is empty.
    ops_listener: Option<(TcpListener, SocketAddr)>,
    limits: Limits,
    store: Arc<dyn Store>,
    router: axum::Router,
    ops_router: axum::Router,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    client: Option<Client>,
    /// One failed-push reader per app that has a client and recovery on.
    recoveries: Vec<Recovery>,
    apps: Vec<AppSpec>,
}

impl Application {
    /// Starts building an application whose handlers are registered in code.
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            handlers: RegistryBuilder::new(),
            store: None,
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
        registry: crate::handler::Registry,
        store: Option<Arc<dyn Store>>,
    ) -> Result<Self, AppError> {
        let trusted_proxies = config.trusted_proxies()?;
        let addr = config.listen_addr()?;
        let ops_addr = config.ops_addr()?;
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
        let wake = Arc::new(tokio::sync::Notify::new());
        let body_budget = push::BodyBudget::new(config.callback.body_budget);
        let mut callbacks = axum::Router::new();
        let mut contexts = HashMap::new();
        let mut recoveries = Vec::new();
        let mut clients = BTreeMap::new();
        for spec in &specs {
            let app_store = store::scoped::for_app(Arc::clone(&store), &spec.name);
            let client = if spec.dingtalk_enabled() {
                let counter = Arc::new(StoreCallCounter(Arc::clone(&app_store)));
                Some(Client::new(spec.dingtalk.clone(), counter)?)
            } else {
                tracing::info!(
                    app = %spec.name,
                    "no DingTalk app key configured: its handlers cannot call DingTalk"
                );
                None
            };
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
            recoveries.extend(Recovery::from_config(
                &spec.name,
                &spec.recovery,
                client.clone(),
                Arc::clone(&app_store),
                Arc::clone(&metrics),
                Arc::clone(&wake),
            ));
            let push = Arc::new(PushState {
                app: spec.name.as_str().into(),
                cipher: spec.cipher()?,
                store: Arc::clone(&app_store),
                body_limit: config.callback.body_limit,
                body_budget: body_budget.clone(),
                replay_window: config.callback.replay_window,
                request_timeout: config.request_timeout,
                metrics: Arc::clone(&metrics),
                stored: Arc::clone(&wake),
            });
            callbacks = callbacks.merge(push::router(push, &spec.callback.path));
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
        // The client `client()` and the quota metrics show: the `default` app's, else the
        // first app's. (Per-app metrics are the many-apps issue's next part.)
        let client = clients
            .get(DEFAULT_APP)
            .or_else(|| clients.values().next())
            .cloned();
        let dispatcher = Arc::new(Dispatcher::new(
            Arc::clone(&store),
            registry,
            config.dispatch.clone(),
            Arc::clone(&metrics),
            Arc::clone(&wake),
            contexts,
        ));
        let ops = Arc::new(OpsState {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            clients: clients.clone().into_iter().collect(),
            probe_timeout: config.request_timeout,
        });
        // The public port answers the callback and the probes; `/metrics` is for operators.
        let router = crate::http::wrap(
            callbacks.merge(ops::probes(Arc::clone(&ops))),
            trusted_proxies.clone(),
        );
        let ops_router = crate::http::wrap(ops::router(ops), trusted_proxies);
        let (listener, local_addr) = bind(addr).await?;
        let ops_listener = match ops_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Application {
            config,
            listener,
            local_addr,
            ops_listener,
            limits,
            store,
            router,
            ops_router,
            dispatcher,
            metrics,
            client,
            recoveries,
            apps: specs,
        })
    }

    /// The DingTalk client, when an app key is configured.
    pub fn client(&self) -> Option<Client> {
        self.client.clone()
    }

    pub fn dispatcher(&self) -> Arc<Dispatcher> {
        Arc::clone(&self.dispatcher)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The operator listener's address, unless `ops.listen` is empty.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref().map(|(_, addr)| *addr)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
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
            limits,
            store,
            router,
            ops_router,
            dispatcher,
            metrics,
            client: _,
            recoveries,
            apps,
        } = self;
        let ops_addr = ops_listener.as_ref().map(|(_, addr)| *addr);
        // Each app's path, unless there are many (then at debug level, one line each).
        let mut paths: Vec<String> = apps
            .iter()
            .take(MAX_APPS_LOGGED)
            .map(|a| format!("{}={}", a.name, a.callback.path))
            .collect();
        if apps.len() > MAX_APPS_LOGGED {
            paths.push(format!("and {} more", apps.len() - MAX_APPS_LOGGED));
            for app in &apps {
                tracing::debug!(app = %app.name, path = %app.callback.path, "callback");
            }
        }
        tracing::info!(
            %local_addr,
            ops_addr = ops_addr.map(tracing::field::display),
            apps = %paths.join(" "),
            store = %crate::store::redact_url(&config.store.url),
            "dinghook listening"
        );
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let workers = if config.dispatch.enabled {
            dispatcher.start(stopping.clone())
        } else {
            Vec::new()
        };
        // Recovery stores what it reads before it stops, so it is joined with the workers,
        // before the store closes.
        let recovery: Vec<_> = recoveries
            .into_iter()
            .map(|r| r.start(stopping.clone()))
            .collect();
        let table = Table::new(limits, metrics);
        let drain = config.request_timeout;
        let mut listeners = vec![tokio::spawn(server::serve(
            "public",
            listener,
            router,
            Arc::clone(&table),
            stopping.clone(),
            drain,
        ))];
        if let Some((ops_listener, _)) = ops_listener {
            listeners.push(tokio::spawn(server::serve(
                "ops",
                ops_listener,
                ops_router,
                Arc::clone(&table),
                stopping.clone(),
                drain,
            )));
        }

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests and runs");
        let _ = stopping_tx.send(true);

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
        let tasks: Vec<_> = workers.into_iter().chain(recovery).collect();
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
