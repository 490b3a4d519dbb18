//! The operator surface: `/healthz` (the process answers), `/readyz` (the store takes a real
//! write) and `/metrics` (Prometheus text). It reads the store and the DingTalk client; it
//! never touches an event.
//!
//! `/metrics` reads the store at most once per [`SCRAPE_CACHE_TTL`], however many scrape at
//! once ([`StoreFigures`]): a burst of scrapers costs one read, not one each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dingtalk::QuotaStatus;
use crate::metrics::Metrics;
use crate::store::{Stats, Store};
use crate::time::now_millis;

/// How long `/metrics` waits for the queue counts and the quota before it answers without
/// them.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long what a scrape read from the store is shown to the scrapes after it, instead of
/// reading again. Short next to any scrape interval; long enough that scrapers in a loop (or
/// many Prometheus replicas) cost one read a second.
const SCRAPE_CACHE_TTL: Duration = Duration::from_secs(1);

/// `[ops]`: the operator listener. `/metrics` shows event types and volumes, queue depth and
/// quota use, so it is served here, on a loopback address by default, and not on the public
/// callback port; `/healthz` and `/readyz` are served on both (load balancers probe the
/// public port).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of the operator listener; empty: no operator listener (and no `/metrics`).
    pub listen: String,
}

/// The operator listener's default address: loopback, so only the host (or, in a container,
/// what publishes the port on purpose) reaches it.
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:9464";

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: DEFAULT_OPS_LISTEN.into(),
        }
    }
}

/// What the operator routes read.
pub struct OpsState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// For the quota figures in `/metrics`: each app's client, by app name (apps without an
    /// app key have none). A configuration reload replaces them.
    pub clients: arc_swap::ArcSwap<BTreeMap<String, crate::dingtalk::Client>>,
    /// Bound on the `/readyz` probe write.
    pub probe_timeout: Duration,
    /// The configured routes, whose backlogs `/metrics` shows.
    pub routes: Vec<String>,
}

/// The probes, for the public listener. `/readyz` names each Stream connection's state and
/// the reason it last ended, not the detail (the public port is the one the internet reaches).
pub fn probes(state: Arc<OpsState>) -> Router {
    probe_routes(state, Detail::Public)
}

/// How much `/readyz` shows of each Stream connection and each route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Stream: state, since when, down since when, the last close's reason (a fixed word) and
    /// time. Routes: up or not, since when.
    Public,
    /// Also the last close's detail text and the last frame's time; a route's last success and
    /// last failure's text.
    Operator,
}

fn probe_routes(state: Arc<OpsState>, detail: Detail) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move |state: State<Arc<OpsState>>| readyz(state, detail)),
        )
        .with_state(state)
}

/// Everything operators read, for the operator listener: the probes and `/metrics`.
pub fn router(state: Arc<OpsState>) -> Router {
    let scrape = Arc::new(Scrape {
        state: Arc::clone(&state),
        figures: StoreFigures::default(),
    });
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(scrape)
        .merge(probe_routes(state, Detail::Operator))
}

/// What `/metrics` shares between scrapes: the state and the last store figures.
struct Scrape {
    state: Arc<OpsState>,
    figures: StoreFigures,
}

/// What `/metrics` reads from the store, and when.
#[derive(Debug, Clone)]
struct Figures {
    read_at: tokio::time::Instant,
    /// `None`: the store did not answer (`dinghook_store_up 0`).
    stats: Option<Stats>,
    /// Each app's whose counter read finished in time.
    quotas: Vec<(String, QuotaStatus)>,
    /// The routes' backlogs and the paused routes, when there are routes and the read
    /// finished in time.
    routes: Option<(Vec<crate::store::RouteBacklog>, Vec<String>)>,
}

impl Figures {
    /// The statistics as of now: the oldest waiting events (of all, and of each app) have
    /// aged since they were read.
    fn stats_now(&self) -> Option<Stats> {
        let mut stats = self.stats.clone()?;
        let since = i64::try_from(self.read_at.elapsed().as_millis()).unwrap_or(i64::MAX);
        let aged = |age: &mut Option<i64>| *age = age.map(|age| age.saturating_add(since));
        aged(&mut stats.oldest_pending_age_ms);
        for app in stats.by_app.values_mut() {
            aged(&mut app.oldest_pending_age_ms);
        }
        Some(stats)
    }
}

/// The store figures of `/metrics`, read once for every scrape that arrives while a read is
/// under way or within [`SCRAPE_CACHE_TTL`] of one.
#[derive(Default)]
struct StoreFigures {
    /// Held across the read (a tokio mutex, so across awaits): a scrape arriving while another
    /// reads waits here, then finds the fresh figures and reads nothing (single flight).
    last: tokio::sync::Mutex<Option<Figures>>,
}

impl StoreFigures {
    /// Fresh figures, reading the store only if the last read is older than the TTL. A failed
    /// read is kept for the TTL too, so a store in trouble is not asked by every scraper.
    async fn get(&self, state: &OpsState) -> Figures {
        let mut last = self.last.lock().await;
        if let Some(figures) = last.as_ref() {
            if figures.read_at.elapsed() < SCRAPE_CACHE_TTL {
                return figures.clone();
            }
        }
        let stats = async {
            let read = state.store.stats(now_millis());
            match tokio::time::timeout(SCRAPE_READ_TIMEOUT, read).await {
                Ok(Ok(stats)) => Some(stats),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "metrics: could not read the queue counts");
                    None
                }
                Err(_) => {
                    let timeout = SCRAPE_READ_TIMEOUT;
                    tracing::warn!(?timeout, "metrics: reading the queue counts timed out");
                    None
                }
            }
        };
        let clients = state.clients.load_full();
        let quotas =
            futures_util::future::join_all(clients.iter().map(|(app, client)| async move {
                tokio::time::timeout(SCRAPE_READ_TIMEOUT, client.quota())
                    .await
                    .ok()
                    .map(|quota| (app.clone(), quota))
            }));
        let routes = async {
            if state.routes.is_empty() {
                return None;
            }
            let deliveries = state.store.deliveries();
            let read = async {
                let backlogs = deliveries.route_backlogs(now_millis()).await?;
                let paused = deliveries.route_pauses().await?;
                Ok::<_, crate::store::StoreError>((
                    backlogs,
                    paused.into_iter().map(|p| p.route).collect(),
                ))
            };
            match tokio::time::timeout(SCRAPE_READ_TIMEOUT, read).await {
                Ok(Ok(routes)) => Some(routes),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "metrics: could not read the route backlogs");
                    None
                }
                Err(_) => None,
            }
        };
        let (stats, quotas, routes) = tokio::join!(stats, quotas, routes);
        let figures = Figures {
            read_at: tokio::time::Instant::now(),
            stats,
            quotas: quotas.into_iter().flatten().collect(),
            routes,
        };
        *last = Some(figures.clone());
        figures
    }
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn metrics(State(scrape): State<Arc<Scrape>>) -> Response {
    let state = &scrape.state;
    // The read is bounded inside; this bounds the wait for another scrape's read (whose
    // failure is shared too), and a read of our own if that scrape was cancelled.
    let bound = SCRAPE_READ_TIMEOUT + Duration::from_millis(250);
    let figures = tokio::time::timeout(bound, scrape.figures.get(state))
        .await
        .ok();
    state
        .metrics
        .set_queue(figures.as_ref().and_then(Figures::stats_now).as_ref());
    if let Some((backlogs, paused)) = figures.as_ref().and_then(|f| f.routes.as_ref()) {
        state.metrics.set_routes(&state.routes, backlogs, paused);
    }
    let clients = state.clients.load();
    for (app, quota) in figures.iter().flat_map(|f| &f.quotas) {
        if let Some(client) = clients.get(app) {
            state.metrics.set_quota(app, quota, &client.stats());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `/readyz`: ready when the store takes a real write. Each Stream connection running in
/// this process is reported under `stream` but never makes the replica unready: the load
/// balancer routes HTTP callbacks by readiness, and a replica whose Stream connection is down
/// still stores HTTP pushes and robot messages (README, "Stream mode").
async fn readyz(State(state): State<Arc<OpsState>>, detail: Detail) -> Response {
    let mut extra = serde_json::Map::new();
    if let Some(stream) = stream_report(&state.metrics, detail) {
        extra.insert("stream".into(), stream);
    }
    if let Some(routes) = route_report(&state.metrics, detail) {
        extra.insert("routes".into(), routes);
    }
    match tokio::time::timeout(state.probe_timeout, state.store.probe()).await {
        Ok(Ok(())) => {
            let mut body = json!({ "status": "ready" });
            if let Some(fields) = body.as_object_mut() {
                fields.extend(extra);
            }
            Json(body).into_response()
        }
        Ok(Err(e)) => not_ready(e.to_string(), extra),
        Err(_) => not_ready(
            format!("store probe timed out after {:?}", state.probe_timeout),
            extra,
        ),
    }
}

/// What `/readyz` says of each route's destination (`None` without routes): whether it was
/// reached the last time it was tried and since when; on the operator listener also the last
/// success and the last failure's text. A destination that is down never makes the replica
/// unready: the callbacks it takes are stored and wait for the route.
fn route_report(metrics: &Metrics, detail: Detail) -> Option<Value> {
    let statuses = metrics.route_statuses();
    if statuses.is_empty() {
        return None;
    }
    let routes = statuses
        .into_iter()
        .map(|(route, status)| {
            let keys: &[&str] = match detail {
                Detail::Public => &["up", "since"],
                Detail::Operator => &["up", "since", "last_ok_at", "last_error", "last_error_at"],
            };
            let entry = keys
                .iter()
                .filter_map(|key| Some(((*key).to_owned(), status.get(*key)?.clone())))
                .collect();
            (route, Value::Object(entry))
        })
        .collect();
    Some(Value::Object(routes))
}

/// What `/readyz` says of each app's Stream connection, `None` when no app runs one here.
fn stream_report(metrics: &Metrics, detail: Detail) -> Option<Value> {
    const PUBLIC: [&str; 7] = [
        "state",
        "since",
        "connected_since",
        "down_since",
        "reconnects",
        "last_close_reason",
        "last_close_at",
    ];
    const OPERATOR: [&str; 2] = ["last_close_detail", "last_frame_at"];
    let statuses = metrics.stream_statuses();
    if statuses.is_empty() {
        return None;
    }
    let now = now_millis();
    let apps = statuses
        .into_iter()
        .map(|(app, status)| {
            let shown = PUBLIC
                .iter()
                .chain(if detail == Detail::Operator {
                    OPERATOR.as_slice()
                } else {
                    [].as_slice()
                })
                .filter_map(|key| Some(((*key).to_owned(), status.get(*key)?.clone())));
            let mut entry: serde_json::Map<String, Value> = shown.collect();
            if let Some(down) = status.get("down_since").and_then(Value::as_i64) {
                entry.insert("down_for_ms".into(), json!(now.saturating_sub(down).max(0)));
            }
            (app, Value::Object(entry))
        })
        .collect();
    Some(Value::Object(apps))
}

fn not_ready(message: String, extra: serde_json::Map<String, Value>) -> Response {
    tracing::warn!(%message, "not ready");
    let mut body = json!({ "status": "not_ready", "error": { "code": "store_unavailable", "message": message } });
    if let Some(fields) = body.as_object_mut() {
        fields.extend(extra);
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
