//! The operator surface: `/healthz` (the process answers), `/readyz` (the store takes a real
//! write) and `/metrics` (Prometheus text). It reads the store and the DingTalk client; it
//! never touches an event.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::metrics::Metrics;
use crate::store::Store;
use crate::time::now_millis;

/// How long `/metrics` waits for the queue counts and the quota before it answers without
/// them.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// For the quota figures in `/metrics`; `None` without an app key.
    pub client: Option<crate::dingtalk::Client>,
    /// Bound on the `/readyz` probe write.
    pub probe_timeout: Duration,
}

/// The probes, for the public listener.
pub fn probes(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Everything operators read, for the operator listener: the probes and `/metrics`.
pub fn router(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::clone(&state))
        .merge(probes(state))
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn metrics(State(state): State<Arc<OpsState>>) -> Response {
    let stats = tokio::time::timeout(SCRAPE_READ_TIMEOUT, state.store.stats(now_millis())).await;
    state
        .metrics
        .set_queue(stats.ok().and_then(Result::ok).as_ref());
    if let Some(client) = &state.client {
        if let Ok(quota) = tokio::time::timeout(SCRAPE_READ_TIMEOUT, client.quota()).await {
            state.metrics.set_quota(&quota, &client.stats());
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

async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    match tokio::time::timeout(state.probe_timeout, state.store.probe()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => not_ready(e.to_string()),
        Err(_) => not_ready(format!(
            "store probe timed out after {:?}",
            state.probe_timeout
        )),
    }
}

fn not_ready(message: String) -> Response {
    tracing::warn!(%message, "not ready");
    let body = json!({ "status": "not_ready", "error": { "code": "store_unavailable", "message": message } });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
