//! `/api/v1/routes` and `/api/v1/deliveries`: the routes with their backlogs, pause and
//! resume; deliveries listed, shown and replayed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::events::{parse_state, Replayed};
use super::problem::ProblemDocument;
use super::{
    json_body, page_limit, parse_time, path_id, path_name, query, ApiResult, ApiState, Caller,
    Problem, RouteInfo, Scope,
};
use crate::store::{DeliveryQuery, DeliveryReplay, EventState, StoredDelivery};
use crate::time::now_millis;

/// One delivery of an event to a route.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryItem {
    pub id: i64,
    pub event_id: i64,
    pub route: String,
    pub app: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    /// The destination's last HTTP status, when it gave one.
    pub last_status: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

impl From<&StoredDelivery> for DeliveryItem {
    fn from(d: &StoredDelivery) -> Self {
        DeliveryItem {
            id: d.id,
            event_id: d.event_id,
            route: d.route.clone(),
            app: d.app.clone(),
            state: d.state.as_str().to_owned(),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at,
            last_error: d.last_error.clone(),
            last_status: d.last_status,
            created_at: d.created_at,
            updated_at: d.updated_at,
            delivered_at: d.delivered_at,
        }
    }
}

/// A route with its backlog.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouteItem {
    pub name: String,
    /// `http`, `nats`, `amqp` or `redis`.
    pub kind: String,
    /// The destination, any password hidden.
    pub destination: String,
    /// The apps it takes events of; `null`: every app.
    pub apps: Option<Vec<String>>,
    /// The event type globs; empty: every type.
    pub events: Vec<String>,
    pub pending: u64,
    pub running: u64,
    pub retry: u64,
    pub dead: u64,
    pub oldest_due_age_ms: Option<i64>,
    /// Why it is paused (`null`: it runs).
    pub paused: Option<String>,
    pub paused_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteList {
    pub items: Vec<RouteItem>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub items: Vec<DeliveryItem>,
}

/// The filters of `GET /api/v1/deliveries`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    pub route: Option<String>,
    pub state: Option<String>,
    pub event_id: Option<i64>,
    /// Created at or after: epoch ms or RFC 3339.
    pub since: Option<String>,
    /// 1 to 500; default 50.
    pub limit: Option<u32>,
}

/// Which deliveries to replay: ids, or a route and/or a state, or a time.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryReplayFilter {
    pub ids: Option<Vec<i64>>,
    pub route: Option<String>,
    pub state: Option<String>,
    /// Created at or after: epoch ms or RFC 3339.
    pub since: Option<String>,
}

/// Whether a paused route was resumed.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouteChange {
    pub route: String,
    pub paused: bool,
    /// Whether this request changed it.
    pub changed: bool,
}

fn route<'a>(state: &'a ApiState, name: &str) -> ApiResult<&'a RouteInfo> {
    state.routes.iter().find(|r| r.name == name).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no route is called {name:?}"),
        )
    })
}

/// The configured routes with their backlogs and pauses.
#[utoipa::path(operation_id = "list_routes", get, path = "/api/v1/routes", tag = "routes", security(("bearer" = [])),
    responses((status = 200, body = RouteList), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<RouteList>> {
    Ok(Json(RouteList {
        items: items(&state, &caller).await?,
    }))
}

/// The configured routes with their backlogs and pauses (what `GET /api/v1/routes` and the
/// console show).
pub async fn items(state: &ApiState, caller: &Caller) -> ApiResult<Vec<RouteItem>> {
    caller.require(Scope::Read)?;
    let d = state.store.deliveries();
    let backlogs = d.route_backlogs(now_millis()).await?;
    let pauses = d.route_pauses().await?;
    Ok(state
        .routes
        .iter()
        .map(|r| {
            let backlog = backlogs.iter().find(|b| b.route == r.name);
            let pause = pauses.iter().find(|p| p.route == r.name);
            RouteItem {
                name: r.name.clone(),
                kind: r.kind.to_owned(),
                destination: r.destination.clone(),
                apps: r.apps.clone(),
                events: r.events.clone(),
                pending: backlog.map_or(0, |b| b.pending),
                running: backlog.map_or(0, |b| b.running),
                retry: backlog.map_or(0, |b| b.retry),
                dead: backlog.map_or(0, |b| b.dead),
                oldest_due_age_ms: backlog.and_then(|b| b.oldest_due_age_ms),
                paused: pause.map(|p| p.reason.clone()),
                paused_at: pause.map(|p| p.paused_at),
            }
        })
        .collect())
}

/// Stops a route's deliveries (they wait, nothing is lost) until it is resumed.
#[utoipa::path(operation_id = "pause_route", post, path = "/api/v1/routes/{name}/pause", tag = "routes",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = RouteChange), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn pause(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<RouteChange>> {
    let name = path_name(name, "route")?;
    Ok(Json(pause_route(&state, &caller, name).await?))
}

/// Pauses route `name` (the admin scope).
pub async fn pause_route(
    state: &ApiState,
    caller: &Caller,
    name: String,
) -> ApiResult<RouteChange> {
    caller.require(Scope::Admin)?;
    route(state, &name)?;
    let d = state.store.deliveries();
    let was = d.route_pauses().await?.iter().any(|p| p.route == name);
    if !was {
        let reason = format!("paused through the API by {}", caller.name());
        d.pause_route(&name, &reason, now_millis()).await?;
    }
    Ok(RouteChange {
        route: name,
        paused: true,
        changed: !was,
    })
}

/// Resumes a paused route (also one the circuit breaker or a 410 paused).
#[utoipa::path(operation_id = "resume_route", post, path = "/api/v1/routes/{name}/resume", tag = "routes",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = RouteChange), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn resume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<RouteChange>> {
    let name = path_name(name, "route")?;
    Ok(Json(resume_route(&state, &caller, name).await?))
}

/// Resumes route `name` (the admin scope).
pub async fn resume_route(
    state: &ApiState,
    caller: &Caller,
    name: String,
) -> ApiResult<RouteChange> {
    caller.require(Scope::Admin)?;
    route(state, &name)?;
    let changed = state.store.deliveries().resume_route(&name).await?;
    state.routing.wake_for(&name).notify_one();
    Ok(RouteChange {
        route: name,
        paused: false,
        changed,
    })
}

/// Delivers route `name`'s dead deliveries again (the replay scope, a token of every app:
/// the API's rule for a replay by filter).
pub async fn replay_dead(state: &ApiState, caller: &Caller, name: &str) -> ApiResult<u64> {
    caller.require(Scope::Replay)?;
    route(state, name)?;
    if caller.token().apps.is_some() {
        return Err(Problem::forbidden(
            "this token is limited to some apps: replay deliveries by id",
        ));
    }
    let replayed = state
        .store
        .deliveries()
        .replay_deliveries(
            &DeliveryReplay::RouteState {
                route: name.to_owned(),
                state: EventState::Dead,
            },
            now_millis(),
        )
        .await?;
    state.routing.wake_for(name).notify_one();
    Ok(replayed)
}

/// Deliveries, newest first.
#[utoipa::path(operation_id = "list_deliveries", get, path = "/api/v1/deliveries", tag = "deliveries", params(DeliveriesQuery),
    security(("bearer" = [])),
    responses((status = 200, body = DeliveryList), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn deliveries(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> ApiResult<Json<DeliveryList>> {
    caller.require(Scope::Read)?;
    let q = query(q)?;
    if let Some(name) = &q.route {
        route(&state, name)?;
    }
    let found = state
        .store
        .deliveries()
        .list_deliveries(&DeliveryQuery {
            route: q.route,
            state: parse_state(q.state.as_deref())?,
            event_id: q.event_id,
            since: q
                .since
                .as_deref()
                .map(|s| parse_time("since", s))
                .transpose()?,
            limit: Some(page_limit(q.limit)?),
        })
        .await?;
    Ok(Json(DeliveryList {
        items: found
            .iter()
            .filter(|d| caller.token().may_touch(&d.app))
            .map(DeliveryItem::from)
            .collect(),
    }))
}

async fn readable(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<StoredDelivery> {
    match state.store.deliveries().get_delivery(id).await? {
        Some(d) if caller.token().may_touch(&d.app) => Ok(d),
        _ => Err(Problem::not_found(format!("no delivery {id}"))),
    }
}

/// One delivery.
#[utoipa::path(operation_id = "show_delivery", get, path = "/api/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = DeliveryItem), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn delivery(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<DeliveryItem>> {
    caller.require(Scope::Read)?;
    let found = readable(&state, &caller, path_id(id)?).await?;
    Ok(Json(DeliveryItem::from(&found)))
}

/// Delivers one again (back to `pending`, attempts reset).
#[utoipa::path(operation_id = "replay_delivery", post, path = "/api/v1/deliveries/{id}/replay", tag = "deliveries",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = Replayed), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn replay_one(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Replayed>> {
    caller.require(Scope::Replay)?;
    let found = readable(&state, &caller, path_id(id)?).await?;
    let replayed = state
        .store
        .deliveries()
        .replay_deliveries(&DeliveryReplay::Ids(vec![found.id]), now_millis())
        .await?;
    state.routing.wake_for(&found.route).notify_one();
    Ok(Json(Replayed { replayed }))
}

/// Delivers again: ids, or every delivery of a route and/or a state, or created since.
/// Only a token for every app may replay by filter.
#[utoipa::path(operation_id = "replay_deliveries", post, path = "/api/v1/deliveries/replay", tag = "deliveries",
    request_body = DeliveryReplayFilter, security(("bearer" = [])),
    responses((status = 200, body = Replayed), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn replay_many(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Replayed>> {
    caller.require(Scope::Replay)?;
    let filter: DeliveryReplayFilter = json_body(&headers, body)?;
    let d = state.store.deliveries();
    let now = now_millis();
    if let Some(name) = &filter.route {
        route(&state, name)?;
    }
    let which = if let Some(ids) = filter.ids {
        if filter.route.is_some() || filter.state.is_some() || filter.since.is_some() {
            return Err(Problem::invalid("ids", "give ids or a filter, not both"));
        }
        if ids.is_empty() || ids.len() > 1_000 {
            return Err(Problem::invalid("ids", "give 1 to 1000 ids"));
        }
        let mut allowed = Vec::new();
        for id in ids {
            if let Some(found) = d.get_delivery(id).await? {
                if caller.token().may_touch(&found.app) {
                    allowed.push(id);
                }
            }
        }
        if allowed.is_empty() {
            return Ok(Json(Replayed { replayed: 0 }));
        }
        DeliveryReplay::Ids(allowed)
    } else {
        if caller.token().apps.is_some() {
            return Err(Problem::forbidden(
                "this token is limited to some apps: replay deliveries by id",
            ));
        }
        let delivery_state = parse_state(filter.state.as_deref())?;
        if delivery_state == Some(EventState::Running) {
            return Err(Problem::invalid(
                "state",
                "running deliveries cannot be replayed",
            ));
        }
        let since = filter
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?;
        match (filter.route, delivery_state, since) {
            (route, None, Some(since)) => DeliveryReplay::Since { since, route },
            (Some(route), Some(state), None) => DeliveryReplay::RouteState { route, state },
            (None, Some(state), None) => DeliveryReplay::State(state),
            _ => return Err(Problem::invalid(
                "state",
                "give ids, a state (with or without a route), or since (with or without a route)",
            )),
        }
    };
    let replayed = d.replay_deliveries(&which, now).await?;
    for r in &state.routes {
        state.routing.wake_for(&r.name).notify_one();
    }
    Ok(Json(Replayed { replayed }))
}
