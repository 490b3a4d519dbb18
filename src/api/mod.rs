//! The HTTP API for the user's systems (`/api/v1/…`), on its own listener (`api.listen`),
//! never on the public callback port: read and replay events and deliveries, look at apps and
//! routes, and act on DingTalk through dinghook (actions, stored before they are accepted,
//! run by the dispatcher within each app's QPS and monthly quota).
//!
//! Every request carries `Authorization: Bearer <token>` ([`auth`]); every error is
//! `application/problem+json` ([`problem`]); every write is audited (the `dinghook::audit`
//! log target, and the store's `audit` documents). `GET /api/v1/openapi.json` is the
//! document generated from these handlers ([`openapi`]); `docs/openapi.json` is its checked-in
//! copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dingtalk::Client;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::Store;

pub mod actions;
pub mod apps;
pub mod auth;
pub mod console;
pub mod events;
pub mod openapi;
pub mod problem;
pub mod routes;

pub use auth::{Caller, Scope, TokenConfig, Tokens};
pub use problem::{ApiResult, Problem};

/// `[api]`: the HTTP API's listener and tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the API listener (`DINGHOOK_API_LISTEN`); empty (the default): no API.
    pub listen: String,
    /// One token with every scope for every app (`DINGHOOK_API_TOKEN`).
    pub token: Secret,
    /// `[[api.tokens]]`: named tokens with scopes and apps.
    pub tokens: Vec<TokenConfig>,
    /// The address DingTalk reaches the public (callback) listener by, such as
    /// `https://hooks.example.com` (`DINGHOOK_PUBLIC_URL`): the console shows each app's
    /// callback URL as this plus its path. Empty (the default): the path only.
    pub public_url: String,
    /// The largest request body, in bytes.
    #[serde(deserialize_with = "crate::setting::number")]
    pub body_limit: usize,
    /// Requests each token may make per second (a burst of one second's worth); more are
    /// answered 429 with `Retry-After`. 0: no limit.
    #[serde(deserialize_with = "crate::setting::number")]
    pub requests_per_second: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: String::new(),
            token: Secret::default(),
            tokens: Vec::new(),
            public_url: String::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
        }
    }
}

/// 256 KiB: a work notification's message is at most a few KiB; a war room's members list of
/// a few hundred mobiles fits many times over.
pub const DEFAULT_BODY_LIMIT: usize = 256 * 1024;

/// Per token: far above what a system acting within DingTalk's QPS needs (actions are
/// accepted at thousands per second), low enough that one runaway client cannot take the
/// store from the callbacks.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 2_000;

/// What the API knows of one app.
#[derive(Clone)]
pub struct ApiApp {
    pub name: String,
    pub callback_path: String,
    /// `None` without an app key.
    pub client: Option<Client>,
    /// The store as this app sees it.
    pub store: Arc<dyn Store>,
    pub qps: u32,
    pub recovery: bool,
    /// The monthly calls notifications leave to other calls (`notify_quota_reserve`): the
    /// console warns before the month's pace reaches it.
    pub quota_reserve: u64,
    /// The callback keys (`None` for an app without HTTP push): the console's URL check
    /// seals DingTalk's `check_url` with them and opens the answer.
    pub cipher: Option<crate::crypto::CallbackCipher>,
}

/// The apps of the running configuration (a reload replaces them).
pub type ApiApps = BTreeMap<String, ApiApp>;

/// A route, as the API lists it.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    pub name: String,
    pub kind: &'static str,
    /// The URL with any password hidden.
    pub destination: String,
    /// `None`: every app.
    pub apps: Option<Vec<String>>,
    pub events: Vec<String>,
}

/// What every API handler reads.
pub struct ApiState {
    /// Every app's events (the apps' own views are in [`ApiApp::store`]).
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub apps: arc_swap::ArcSwap<ApiApps>,
    pub tokens: Tokens,
    /// Poked when an action is stored or events are replayed, so the workers claim at once.
    pub wake: Arc<tokio::sync::Notify>,
    pub routes: Vec<RouteInfo>,
    /// The routes' runners' wake-ups, for a replay of deliveries.
    pub routing: crate::routes::Routing,
    pub body_limit: usize,
    /// Each token's request budget.
    pub limiter: RateLimiter,
    /// The proxies whose `X-Forwarded-Proto` the console believes (its cookie's `Secure`).
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// `api.public_url` (no trailing `/`), when set.
    pub public_url: Option<String>,
    /// The public (callback) listener's bound address, once it is bound: where the console's
    /// URL check sends its `check_url`.
    pub public_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

/// A token bucket per token (by its index in [`Tokens`]): `rps` a second, at most one
/// second's worth saved up.
pub struct RateLimiter {
    rps: u32,
    buckets: Vec<std::sync::Mutex<(f64, std::time::Instant)>>,
}

impl RateLimiter {
    pub fn new(rps: u32, tokens: usize) -> RateLimiter {
        let now = std::time::Instant::now();
        RateLimiter {
            rps,
            buckets: (0..tokens)
                .map(|_| std::sync::Mutex::new((f64::from(rps), now)))
                .collect(),
        }
    }

    /// Takes one request from token `index`'s bucket, or says how long until one is there.
    fn admit(&self, index: usize) -> Result<(), std::time::Duration> {
        if self.rps == 0 {
            return Ok(());
        }
        let Some(bucket) = self.buckets.get(index) else {
            return Ok(());
        };
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let rate = f64::from(self.rps);
        let (level, at) = *bucket;
        let level = (level + now.duration_since(at).as_secs_f64() * rate).min(rate);
        if level >= 1.0 {
            *bucket = (level - 1.0, now);
            Ok(())
        } else {
            *bucket = (level, now);
            Err(std::time::Duration::from_secs_f64((1.0 - level) / rate))
        }
    }
}

impl ApiState {
    /// App `name`, when the caller may touch it: 403 before 404, so a token limited to other
    /// apps learns nothing about which exist.
    pub fn app(&self, caller: &Caller, name: &str) -> ApiResult<ApiApp> {
        caller.app(name)?;
        self.apps.load().get(name).cloned().ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_app",
                format!("no app is called {name:?}"),
            )
        })
    }
}

/// Every API route, behind the token check, with problem+json for unknown paths and methods;
/// and the operator console under `/console` ([`console`]).
pub fn router(state: Arc<ApiState>) -> Router {
    let body_limit = state.body_limit;
    Router::new()
        .route("/api/v1/events", get(events::list))
        .route("/api/v1/events/replay", post(events::replay_many))
        .route("/api/v1/events/discard", post(events::discard_many))
        .route("/api/v1/events/{id}", get(events::show))
        .route("/api/v1/events/{id}/replay", post(events::replay_one))
        .route("/api/v1/apps", get(apps::list))
        .route("/api/v1/apps/{app}", get(apps::show))
        .route("/api/v1/apps/{app}/actions", post(actions::submit))
        .route("/api/v1/actions/{id}", get(actions::show))
        .route("/api/v1/routes", get(routes::list))
        .route("/api/v1/routes/{name}/pause", post(routes::pause))
        .route("/api/v1/routes/{name}/resume", post(routes::resume))
        .route("/api/v1/deliveries", get(routes::deliveries))
        .route("/api/v1/deliveries/replay", post(routes::replay_many))
        .route("/api/v1/deliveries/{id}", get(routes::delivery))
        .route("/api/v1/deliveries/{id}/replay", post(routes::replay_one))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        // The document is public: it describes the API, not its data.
        .route("/api/v1/openapi.json", get(openapi::document))
        // The console checks its own sessions (a cookie, not a bearer token).
        .merge(console::router(Arc::clone(&state)))
        .with_state(state)
}

/// Checks the bearer token, then lets the request through with its [`Caller`]; writes (any
/// method but GET and HEAD) are audited with the answer's status.
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match state.tokens.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    if let Err(wait) = state.limiter.admit(caller.index()) {
        let seconds = wait.as_secs().max(1);
        let mut response = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this token is over api.requests_per_second ({}); try again in {seconds} s",
                state.limiter.rps
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        return response;
    }
    let write = !matches!(*request.method(), Method::GET | Method::HEAD);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    if write {
        audit(&state, &caller, &method, &path, response.status());
    }
    response
}

/// One line on the `dinghook::audit` target, and an `audit` document written in the
/// background (who, what, when, how it ended; never a body or a token).
fn audit(state: &ApiState, caller: &Caller, method: &Method, path: &str, status: StatusCode) {
    let at = crate::time::now_millis();
    tracing::info!(
        target: "dinghook::audit",
        token = caller.name(),
        %method,
        path,
        status = status.as_u16(),
        "api write"
    );
    let record = serde_json::json!({
        "at": at,
        "token": caller.name(),
        "method": method.as_str(),
        "path": path,
        "status": status.as_u16(),
    });
    let key = format!("{at:013}-{}", uuid::Uuid::new_v4().simple());
    let store = Arc::clone(&state.store);
    tokio::spawn(async move {
        if let Err(e) = store.insert_document("audit", &key, &record, at).await {
            tracing::warn!(error = %e, "could not store an audit record (it is in the log)");
        }
    });
}

async fn not_found(uri: axum::http::Uri) -> Problem {
    Problem::not_found(format!("no API route {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A JSON body: `Content-Type: application/json` (415 otherwise), at most `api.body_limit`
/// bytes (413), well-formed (400 `invalid_json`) and of the expected shape (422
/// `invalid_request`).
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<T> {
    let body = body_bytes(body)?;
    json_content_type(headers)?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            e.to_string(),
        )
    })
}

/// The body's bytes, or 413 when it is over the limit.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                status,
                "payload_too_large",
                "the body is over api.body_limit",
            )
        } else {
            Problem::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
        }
    })
}

/// 415 unless the body is declared JSON.
pub fn json_content_type(headers: &HeaderMap) -> ApiResult<()> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match declared.as_deref() {
        Some("application/json") => Ok(()),
        _ => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        )),
    }
}

/// A query string of the expected shape, or 422 naming what is wrong.
pub fn query<T>(query: Result<axum::extract::Query<T>, QueryRejection>) -> ApiResult<T> {
    query.map(|q| q.0).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            e.body_text(),
        )
    })
}

/// A text segment of the path (an app's or a route's name), or 404 naming `what`.
pub fn path_name(
    name: Result<axum::extract::Path<String>, PathRejection>,
    what: &str,
) -> ApiResult<String> {
    name.map(|p| p.0)
        .map_err(|_| Problem::not_found(format!("no such {what}")))
}

/// A numeric id in the path, or 404.
pub fn path_id(id: Result<axum::extract::Path<i64>, PathRejection>) -> ApiResult<i64> {
    id.map(|p| p.0)
        .map_err(|_| Problem::not_found("ids are numbers: no such resource"))
}

/// A time given as epoch milliseconds or as RFC 3339 (`2026-11-29T08:00:00Z`).
pub fn parse_time(field: &str, text: &str) -> ApiResult<i64> {
    if let Ok(ms) = text.trim().parse::<i64>() {
        return Ok(ms);
    }
    text.trim()
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| {
            Problem::invalid(
                field,
                format!("{text:?} is neither epoch milliseconds nor an RFC 3339 time"),
            )
        })
}

/// `limit`: 1 to [`MAX_PAGE`], default [`DEFAULT_PAGE`].
pub fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(Problem::invalid(
            "limit",
            format!("must be 1 to {MAX_PAGE}"),
        )),
    }
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;
