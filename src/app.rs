//! Wiring: build the application from a [`Config`], bind, serve, shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::ingress::{self, IngressState};
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
}

/// A built, bound application: call [`Application::run_until_stopped`] to serve.
pub struct Application {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Arc<dyn Store>,
    router: axum::Router,
}

impl Application {
    /// Opens the store, builds the routes and binds the listen address (port 0 picks a free
    /// port, which is how the tests run several servers at once).
    pub async fn build(config: Config) -> Result<Self, AppError> {
        config.validate()?;
        let cipher = config.cipher()?;
        let addr = config.listen_addr()?;
        let store = store::open(&config).await?;
        let state = Arc::new(IngressState {
            cipher,
            store: Arc::clone(&store),
            body_limit: config.callback.body_limit,
            replay_window: config.callback.replay_window,
            request_timeout: config.request_timeout,
        });
        let router = ingress::router(state, &config.callback.path);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| AppError::Bind { addr, source })?;
        Ok(Application {
            config,
            listener,
            local_addr,
            store,
            router,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (at most `shutdown_timeout`), and flushes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Application {
            config,
            listener,
            local_addr,
            store,
            router,
        } = self;
        tracing::info!(
            %local_addr,
            callback_path = %config.callback.path,
            store = %crate::config::redact_url(&config.store.url),
            "dinghook listening"
        );
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            let _ = stopping_tx.send(true);
        });
        let grace = config.shutdown_timeout;
        let deadline = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            r = server => r.map_err(AppError::Serve),
            () = deadline => {
                tracing::warn!(?grace, "shutdown timed out; abandoning in-flight requests");
                Ok(())
            }
        };
        store.close().await;
        tracing::info!("stopped");
        result
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
