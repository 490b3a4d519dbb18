//! The front door: the accept loop every listener runs. It is what stands between the public
//! port and a hostile client, before any route sees a request:
//!
//! - a connection must send a whole request head within `server.header_timeout`, counted from
//!   when it opens or its previous response went out (so an idle keep-alive connection is
//!   closed after the same time);
//! - at most `server.max_connections` are open at once, and at most
//!   `server.max_connections_per_client` from one address (a trusted proxy's own address is
//!   not capped per client: every client behind it shares it);
//! - at a cap, the oldest connection *between requests* (idle, or still sending its head) in
//!   that scope is closed to make room, so idle and slow sockets can never keep a real
//!   callback out; only when every connection in scope has a request in flight is the new one
//!   refused;
//! - accept errors (out of file descriptors) are logged at most once a second and counted,
//!   and the loop backs off instead of spinning;
//! - on shutdown, connections between requests close at once; those with a request in flight
//!   finish it (a request is bounded by `request_timeout`) and then close.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::forwarded::TrustedProxies;
use crate::metrics::Metrics;

/// `[server]`: how the listeners treat connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// How long a connection may take to send a request head, counted from when it opens or
    /// its previous response went out: also how long an idle keep-alive connection is kept.
    #[serde(with = "crate::time::duration_str")]
    pub header_timeout: Duration,
    /// Open connections at most, all listeners together; unset: three quarters of the open-file
    /// limit (raised to its hard limit at start), at most 10 000.
    #[serde(deserialize_with = "crate::setting::optional_number")]
    pub max_connections: Option<i64>,
    /// Open connections at most from one client address (trusted proxies excepted).
    #[serde(deserialize_with = "crate::setting::number")]
    pub max_connections_per_client: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: Duration::from_secs(10),
            max_connections: None,
            max_connections_per_client: 256,
        }
    }
}

/// Connections this far below the open-file limit are left for everything else the process
/// opens (store files and connections, DingTalk's, logs).
const AUTO_SHARE_NUM: u64 = 3;
const AUTO_SHARE_DEN: u64 = 4;
const AUTO_MAX: u64 = 10_000;

/// How long the accept loop waits after an error such as "too many open files" before it
/// accepts again: the condition passes as connections close, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Raises this process's open-file soft limit to its hard limit and returns the limit in force
/// (`None` where there is no such limit to read).
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => Some(limit),
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open-file limit");
                rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// What the accept loop enforces, resolved from [`ServerConfig`] and the open-file limit.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_per_client: usize,
    /// Peers not capped per client (the trusted proxies).
    pub uncapped: TrustedProxies,
}

impl Limits {
    /// `open_files` is the limit [`raise_open_file_limit`] returned.
    pub fn resolve(
        config: &ServerConfig,
        open_files: Option<u64>,
        uncapped: TrustedProxies,
    ) -> Self {
        let auto = open_files
            .map(|n| (n * AUTO_SHARE_NUM / AUTO_SHARE_DEN).clamp(1, AUTO_MAX))
            .unwrap_or(AUTO_MAX);
        let max_connections = match config.max_connections {
            Some(n) => {
                let n = u64::try_from(n).unwrap_or(1).max(1);
                if let Some(files) = open_files.filter(|&files| n > files) {
                    tracing::warn!(
                        max_connections = n,
                        open_file_limit = files,
                        "server.max_connections is above the open-file limit; \
                         connections beyond it fail to be accepted"
                    );
                }
                n
            }
            None => auto,
        };
        Limits {
            header_timeout: config.header_timeout,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            max_per_client: config.max_connections_per_client.max(1),
            uncapped,
        }
    }
}

/// The routes of a listener, which a configuration reload may replace: each request is
/// served by the routes current when it arrived, so requests under way finish on the old ones.
pub type SharedRouter = Arc<arc_swap::ArcSwap<Router>>;

/// One listener's name in logs and metrics (`public`, `ops`).
pub type ListenerName = &'static str;

/// Serves `router` on `listener` until `shutdown` turns true, then drains as the module
/// comment says, waiting at most `drain_timeout` for requests in flight. Connection slots are
/// shared through `table` by every listener of the process.
pub async fn serve(
    name: ListenerName,
    listener: TcpListener,
    router: SharedRouter,
    table: Arc<Table>,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let metrics = Arc::clone(&table.metrics);
    let tracker = TaskTracker::new();
    let mut error_log = RateLimitedLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if is_per_connection(&e) {
                        continue;
                    }
                    metrics.accept_error();
                    error_log.warn(name, &e);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match table.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics.connection_refused(refused.reason());
                tracing::debug!(listener = name, %peer, reason = refused.reason(), "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(
            stream,
            peer,
            Arc::clone(&router),
            slot,
            table.header_timeout(),
            shutdown.clone(),
            drain_timeout,
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            ?drain_timeout,
            "requests still in flight at the drain deadline; closing their connections"
        );
    }
}

/// Completes when `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    )
}

#[derive(Default)]
struct RateLimitedLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, listener: ListenerName, e: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            listener,
            error = %e,
            same_errors_since_last_line = self.suppressed,
            "could not accept a connection"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: SharedRouter,
    slot: Slot,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let conn_state = Arc::clone(&slot.state);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let busy = Busy::start(Arc::clone(&conn_state));
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = Router::clone(&router.load());
        async move {
            let response = router.oneshot(req.map(Body::new)).await?;
            // The connection counts as busy until hyper has written the whole response and
            // drops its body, so it is never closed to make room half-way through.
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _busy = &busy;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let state = Arc::clone(&slot.state);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        () = state.evict.notified() => {}
        () = stopped(&mut shutdown) => {}
    }
    if !state.is_busy() {
        return;
    }
    // A request is in flight (it may have begun just after the table chose this connection to
    // make room): let it finish, then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(drain_timeout, conn).await;
    drop(slot);
}

/// One connection's shared state: how many of its requests are in flight, and the signal
/// that closes it to make room.
#[derive(Default)]
struct ConnState {
    busy: AtomicUsize,
    evict: Notify,
}

impl ConnState {
    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }
}

struct Busy(Arc<ConnState>);

impl Busy {
    fn start(state: Arc<ConnState>) -> Self {
        state.busy.fetch_add(1, Ordering::AcqRel);
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its client already has `max_connections_per_client`, every one with a request in flight.
    PerClient,
    /// `max_connections` are open, every one with a request in flight.
    Total,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::PerClient => "per_client",
            Refused::Total => "total",
        }
    }
}

/// The open connections of every listener, oldest first, for the caps.
pub struct Table {
    limits: Limits,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By id, which grows with age: the first entry is the oldest.
    open: BTreeMap<u64, Entry>,
    by_client: HashMap<IpAddr, BTreeSet<u64>>,
}

struct Entry {
    client: IpAddr,
    state: Arc<ConnState>,
}

impl Inner {
    /// Takes `id` out of the table and tells its task to close it.
    fn evict(&mut self, id: u64) {
        if let Some(entry) = self.remove(id) {
            entry.state.evict.notify_one();
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(ids) = self.by_client.get_mut(&entry.client) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_client.remove(&entry.client);
            }
        }
        Some(entry)
    }

    fn oldest_idle<'a>(&self, mut ids: impl Iterator<Item = &'a u64>) -> Option<u64> {
        ids.find(|id| self.open.get(id).is_some_and(|e| !e.state.is_busy()))
            .copied()
    }
}

impl Table {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Table {
            limits,
            metrics,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn header_timeout(&self) -> Duration {
        self.limits.header_timeout
    }

    /// A slot for a new connection from `client`, making room as the module comment says.
    fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refused> {
        let metrics = &self.metrics;
        let client = client.to_canonical();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !self.limits.uncapped.contains(client) {
            let ids = inner.by_client.get(&client);
            if ids.is_some_and(|ids| ids.len() >= self.limits.max_per_client) {
                let victim = ids.and_then(|ids| inner.oldest_idle(ids.iter()));
                match victim {
                    Some(id) => {
                        inner.evict(id);
                        metrics.connection_evicted(Refused::PerClient.reason());
                    }
                    None => return Err(Refused::PerClient),
                }
            }
        }
        if inner.open.len() >= self.limits.max_connections {
            match inner.oldest_idle(inner.open.keys()) {
                Some(id) => {
                    inner.evict(id);
                    metrics.connection_evicted(Refused::Total.reason());
                }
                None => return Err(Refused::Total),
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let state = Arc::new(ConnState::default());
        inner.open.insert(
            id,
            Entry {
                client,
                state: Arc::clone(&state),
            },
        );
        inner.by_client.entry(client).or_default().insert(id);
        metrics.set_connections_open(inner.open.len());
        Ok(Slot {
            id,
            state,
            table: Arc::clone(self),
        })
    }

    fn release(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.remove(id);
        self.metrics.set_connections_open(inner.open.len());
    }
}

/// A connection's place in the [`Table`], given back when the connection's task ends.
struct Slot {
    id: u64,
    state: Arc<ConnState>,
    table: Arc<Table>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}
