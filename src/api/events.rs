//! `/api/v1/events`: list (keyset pages, newest first), show, replay.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::problem::ProblemDocument;
use super::routes::DeliveryItem;
use super::{
    json_body, page_limit, parse_time, path_id, query, ApiResult, ApiState, Caller, Problem, Scope,
};
use crate::store::{
    scoped, DeliveryQuery, EventRun, EventState, ListQuery, ReplaySelector, Store, StoreError,
    StoredEvent,
};
use crate::time::now_millis;

/// One event, as `dinghook events list --json` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventItem {
    pub id: i64,
    pub app: String,
    /// As DingTalk's event gives it (`eventId`, …), without the app's scope.
    pub dedup_key: String,
    pub event_type: String,
    /// `pending`, `running`, `retry`, `done` or `dead`.
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub corp_id: Option<String>,
    /// `push`, `recovery`, `internal` or `api`.
    pub source: String,
    /// Epoch ms.
    pub received_at: i64,
    pub next_attempt_at: i64,
    /// The handlers that already succeeded.
    pub handled: Vec<String>,
}

impl From<&StoredEvent> for EventItem {
    fn from(e: &StoredEvent) -> Self {
        EventItem {
            id: e.id,
            app: e.app.clone(),
            dedup_key: scoped::unscoped(&e.app, &e.dedup_key).to_owned(),
            event_type: e.event_type.clone(),
            state: e.state.as_str().to_owned(),
            attempts: e.attempts,
            last_error: e.last_error.clone(),
            corp_id: e.corp_id.clone(),
            source: e.source.clone(),
            received_at: e.received_at,
            next_attempt_at: e.next_attempt_at,
            handled: e.handled.clone(),
        }
    }
}

/// A page of events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventItem>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The filters of `GET /api/v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// One app's events (required for a token limited to several apps).
    pub app: Option<String>,
    /// `pending`, `running`, `retry`, `done` or `dead`.
    pub state: Option<String>,
    /// The event type, exactly.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Received at or after: epoch ms or RFC 3339.
    pub since: Option<String>,
    /// 1 to 500; default 50.
    pub limit: Option<u32>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
}

/// One run of an event by the dispatcher.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunItem {
    /// Which run this was (1 for the first; a replay starts again from 1).
    pub attempt: i64,
    /// When it was claimed (epoch ms).
    pub started_at: i64,
    /// When it ended (epoch ms); `null` for the run going on now.
    pub finished_at: Option<i64>,
    /// `done`, `retry`, `dead`, `released` (a stopping process gave it back unfinished),
    /// `lease_expired` (another worker took it after its lease ran out), or `running`.
    pub outcome: String,
    /// Why it failed (`retry` and `dead`).
    pub error: Option<String>,
    /// The handlers that had succeeded when it ended (empty after `done`: all of them).
    pub handled: Vec<String>,
    /// The worker that ran it.
    pub worker: Option<String>,
}

impl From<EventRun> for RunItem {
    fn from(r: EventRun) -> Self {
        RunItem {
            attempt: r.attempt,
            started_at: r.started_at,
            finished_at: r.finished_at,
            outcome: r.outcome,
            error: r.error,
            handled: r.handled,
            worker: r.worker,
        }
    }
}

/// Most runs an event's page shows (the latest).
pub const RUNS_SHOWN: u32 = 100;

/// One event with its payload, its runs and its deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: EventItem,
    /// The decrypted payload (JSON when it is JSON, else the text).
    #[schema(value_type = Object)]
    pub payload: Value,
    pub updated_at: i64,
    /// Its runs, oldest first (the last 100), the one going on now included.
    pub runs: Vec<RunItem>,
    /// One per route that takes it.
    pub deliveries: Vec<DeliveryItem>,
}

/// Which events to replay: ids, or a filter (every field optional, at least one given).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    pub ids: Option<Vec<i64>>,
    pub app: Option<String>,
    pub state: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Received at or after: epoch ms or RFC 3339.
    pub since: Option<String>,
}

/// How many were sent back to `pending`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    pub replayed: u64,
}

pub(super) fn parse_state(text: Option<&str>) -> ApiResult<Option<EventState>> {
    text.map(|s| {
        EventState::parse(s).ok_or_else(|| {
            Problem::invalid(
                "state",
                format!("unknown state {s:?}: pending, running, retry, done or dead"),
            )
        })
    })
    .transpose()
}

/// The app a listing is limited to: the one asked for (which the token must be allowed), or
/// the token's only app; a token limited to several apps must say which.
pub(super) fn listing_app(caller: &Caller, asked: Option<String>) -> ApiResult<Option<String>> {
    match asked {
        Some(app) => {
            caller.app(&app)?;
            Ok(Some(app))
        }
        None if caller.token().apps.is_none() => Ok(None),
        None => match caller.only_app() {
            Some(app) => Ok(Some(app.to_owned())),
            None => Err(Problem::invalid(
                "app",
                "this token may read several apps, not all: name one with app=",
            )),
        },
    }
}

/// Events, newest first, a page at a time.
#[utoipa::path(operation_id = "list_events", get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    security(("bearer" = [])),
    responses((status = 200, body = EventPage), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Json<EventPage>> {
    caller.require(Scope::Read)?;
    Ok(Json(page(&state, &caller, query(q)?).await?))
}

/// A page of the events `q` asks for (what `GET /api/v1/events` and the console list).
pub async fn page(state: &ApiState, caller: &Caller, q: EventsQuery) -> ApiResult<EventPage> {
    caller.require(Scope::Read)?;
    let limit = page_limit(q.limit)?;
    let before_id = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor this API gave"))
        })
        .transpose()?;
    let list = ListQuery {
        app: listing_app(caller, q.app)?,
        state: parse_state(q.state.as_deref())?,
        event_type: q.event_type,
        limit: Some(limit),
        before_id,
        since: q
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?,
    };
    let events = state.store.list(&list).await?;
    let next_cursor = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(EventPage {
        items: events.iter().map(EventItem::from).collect(),
        next_cursor,
    })
}

/// An event the caller may read, or 404 (also for another app's: no hint it exists).
async fn readable(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<StoredEvent> {
    match state.store.get(id).await? {
        Some(event) if caller.token().may_touch(&event.app) => Ok(event),
        _ => Err(Problem::not_found(format!("no event {id}"))),
    }
}

/// One event with its payload, every run and its deliveries.
#[utoipa::path(operation_id = "show_event", get, path = "/api/v1/events/{id}", tag = "events",
    params(("id" = i64, Path, description = "The event's id")),
    security(("bearer" = [])),
    responses((status = 200, body = EventDetail), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<EventDetail>> {
    Ok(Json(detail(&state, &caller, path_id(id)?).await?))
}

/// Event `id` with its payload, its runs and deliveries, when the caller may read it.
pub async fn detail(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<EventDetail> {
    caller.require(Scope::Read)?;
    let event = readable(state, caller, id).await?;
    let deliveries = state
        .store
        .deliveries()
        .list_deliveries(&DeliveryQuery {
            event_id: Some(id),
            limit: Some(1_000),
            ..DeliveryQuery::default()
        })
        .await?;
    let payload = match serde_json::from_str(&event.payload) {
        Ok(json) => crate::actions::shown_payload(&event.event_type, json),
        Err(_) => Value::String(event.payload.clone()),
    };
    let runs = runs_of(&*state.store, &event).await?;
    Ok(EventDetail {
        event: EventItem::from(&event),
        payload,
        updated_at: event.updated_at,
        runs,
        deliveries: deliveries.iter().map(DeliveryItem::from).collect(),
    })
}

/// The event whose de-duplication key is `key` as app `app` wrote it (`event:<eventId>`,
/// …), when the caller may read it.
pub async fn find_by_key(
    state: &ApiState,
    caller: &Caller,
    app: &str,
    key: &str,
) -> ApiResult<Option<EventItem>> {
    caller.require(Scope::Read)?;
    if !caller.token().may_touch(app) {
        return Ok(None);
    }
    let found = state
        .store
        .find_by_dedup_key(&scoped::scoped(app, key))
        .await?;
    Ok(found.filter(|e| e.app == app).as_ref().map(EventItem::from))
}

/// Event `event`'s runs, oldest first: the last [`RUNS_SHOWN`] that ended, and the one going
/// on now if it is `running`.
pub async fn runs_of(store: &dyn Store, event: &StoredEvent) -> Result<Vec<RunItem>, StoreError> {
    let mut runs: Vec<RunItem> = store
        .runs(event.id, RUNS_SHOWN)
        .await?
        .into_iter()
        .map(RunItem::from)
        .collect();
    if event.state == EventState::Running {
        runs.push(RunItem {
            attempt: event.attempts,
            started_at: event.updated_at,
            finished_at: None,
            outcome: "running".to_owned(),
            error: None,
            handled: event.handled.clone(),
            worker: None,
        });
    }
    Ok(runs)
}

/// Sends one event back to `pending` (every handler that has not succeeded runs again).
#[utoipa::path(operation_id = "replay_event", post, path = "/api/v1/events/{id}/replay", tag = "events",
    params(("id" = i64, Path, description = "The event's id")),
    security(("bearer" = [])),
    responses((status = 200, body = Replayed), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn replay_one(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Replayed>> {
    let replayed = replay_event(&state, &caller, path_id(id)?).await?;
    Ok(Json(Replayed { replayed }))
}

/// Sends event `id` back to `pending` (404 when the caller may not read it).
pub async fn replay_event(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<u64> {
    caller.require(Scope::Replay)?;
    readable(state, caller, id).await?;
    let replayed = state
        .store
        .replay(&ReplaySelector::Ids(vec![id]), now_millis())
        .await?;
    state.wake.notify_one();
    Ok(replayed)
}

/// Most events one filtered replay reads at a time.
const REPLAY_PAGE: u32 = 1_000;

/// Sends events back to `pending`: by ids, or every event a filter matches (running ones are
/// left alone).
#[utoipa::path(operation_id = "replay_events", post, path = "/api/v1/events/replay", tag = "events", request_body = ReplayFilter,
    security(("bearer" = [])),
    responses((status = 200, body = Replayed), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn replay_many(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Replayed>> {
    caller.require(Scope::Replay)?;
    let filter: ReplayFilter = json_body(&headers, body)?;
    let replayed = replay_matching(&state, &caller, filter).await?;
    Ok(Json(Replayed { replayed }))
}

/// Sends the events `filter` names back to `pending`: its ids (those the caller may touch),
/// or every event its filter matches but running ones.
pub async fn replay_matching(
    state: &ApiState,
    caller: &Caller,
    filter: ReplayFilter,
) -> ApiResult<u64> {
    caller.require(Scope::Replay)?;
    let now = now_millis();
    if let Some(ids) = filter.ids {
        if filter.app.is_some()
            || filter.state.is_some()
            || filter.event_type.is_some()
            || filter.since.is_some()
        {
            return Err(Problem::invalid("ids", "give ids or a filter, not both"));
        }
        if ids.is_empty() || ids.len() > REPLAY_PAGE as usize {
            return Err(Problem::invalid(
                "ids",
                format!("give 1 to {REPLAY_PAGE} ids"),
            ));
        }
        let mut allowed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(event) = state.store.get(id).await? {
                if caller.token().may_touch(&event.app) {
                    allowed.push(id);
                }
            }
        }
        let replayed = if allowed.is_empty() {
            0
        } else {
            state
                .store
                .replay(&ReplaySelector::Ids(allowed), now)
                .await?
        };
        state.wake.notify_one();
        return Ok(replayed);
    }
    let matching = Matching::of(caller, filter)?;
    // Page through what matches, newest first, replaying each page by id: the filter may
    // name an app and a type, which the store's own replay selectors do not.
    let mut replayed = 0;
    let mut before_id = None;
    loop {
        let page = state.store.list(&matching.page(before_id)).await?;
        let ids: Vec<i64> = page
            .iter()
            .filter(|e| e.state != EventState::Running)
            .map(|e| e.id)
            .collect();
        if !ids.is_empty() {
            replayed += state.store.replay(&ReplaySelector::Ids(ids), now).await?;
        }
        if page.len() < REPLAY_PAGE as usize {
            break;
        }
        before_id = page.last().map(|e| e.id);
    }
    state.wake.notify_one();
    Ok(replayed)
}

/// How many events a replay by `filter` (no ids) would send back now: exact up to `cap`,
/// else `cap` and `true` ("at least"). Counted by the same pages the replay reads, or from
/// the store's maintained counts when the filter is one app's state.
pub async fn count_matching(
    state: &ApiState,
    caller: &Caller,
    filter: ReplayFilter,
    cap: u64,
) -> ApiResult<(u64, bool)> {
    caller.require(Scope::Read)?;
    let matching = Matching::of(caller, filter)?;
    if let (Some(app), Some(event_state), None, None) = (
        &matching.app,
        matching.state,
        &matching.event_type,
        matching.since,
    ) {
        let stats = state.store.stats_for(Some(app), now_millis()).await?;
        let n = stats
            .by_app
            .get(app)
            .and_then(|a| a.by_state.get(event_state.as_str()))
            .copied()
            .unwrap_or(0);
        return Ok((n, false));
    }
    let mut counted = 0;
    let mut before_id = None;
    loop {
        let page = state.store.list(&matching.page(before_id)).await?;
        counted += page
            .iter()
            .filter(|e| e.state != EventState::Running)
            .count() as u64;
        if counted >= cap {
            return Ok((cap, true));
        }
        if page.len() < REPLAY_PAGE as usize {
            return Ok((counted, false));
        }
        before_id = page.last().map(|e| e.id);
    }
}

/// A replay filter, checked: at least one of state, type and since; never `running`; an app
/// the caller may touch (or every app, for a token of every app).
struct Matching {
    app: Option<String>,
    state: Option<EventState>,
    event_type: Option<String>,
    since: Option<i64>,
}

impl Matching {
    fn of(caller: &Caller, filter: ReplayFilter) -> ApiResult<Matching> {
        let event_state = parse_state(filter.state.as_deref())?;
        let since = filter
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?;
        if event_state.is_none() && since.is_none() && filter.event_type.is_none() {
            return Err(Problem::invalid(
                "state",
                "give ids, or a filter with at least one of state, type and since",
            ));
        }
        if event_state == Some(EventState::Running) {
            return Err(Problem::invalid(
                "state",
                "running events cannot be replayed",
            ));
        }
        Ok(Matching {
            app: listing_app(caller, filter.app)?,
            state: event_state,
            event_type: filter.event_type,
            since,
        })
    }

    fn page(&self, before_id: Option<i64>) -> ListQuery {
        ListQuery {
            app: self.app.clone(),
            state: self.state,
            event_type: self.event_type.clone(),
            limit: Some(REPLAY_PAGE),
            before_id,
            since: self.since,
        }
    }
}

/// Most dead events one discard deletes.
pub const DISCARD_MAX: usize = 1_000;

/// Which dead events to delete for good, and why (the operator's words, kept in the audit).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardRequest {
    /// 1 to 1 000 event ids; only those dead now (and of the token's apps) are deleted.
    pub ids: Vec<i64>,
    /// Why (kept in the audit record).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a discard deleted.
#[derive(Debug, Serialize, ToSchema)]
pub struct Discarded {
    pub discarded: u64,
    /// The ids deleted.
    pub ids: Vec<i64>,
}

/// Deletes the dead events among `ids` the caller may touch, with their runs and deliveries
/// (`admin` scope: it cannot be undone), and keeps an `audit` document naming who, when, how
/// many, why and which ids.
pub async fn discard(
    state: &ApiState,
    caller: &Caller,
    ids: &[i64],
    reason: Option<&str>,
) -> ApiResult<Discarded> {
    caller.require(Scope::Admin)?;
    if ids.is_empty() || ids.len() > DISCARD_MAX {
        return Err(Problem::invalid(
            "ids",
            format!("give 1 to {DISCARD_MAX} ids"),
        ));
    }
    let mut dead = Vec::with_capacity(ids.len());
    for &id in ids {
        if let Some(event) = state.store.get(id).await? {
            if event.state == EventState::Dead
                && caller.token().may_touch(&event.app)
                && !dead.contains(&id)
            {
                dead.push(id);
            }
        }
    }
    let discarded = if dead.is_empty() {
        0
    } else {
        state.store.discard(&dead).await?
    };
    // Which went (one replayed meanwhile stays).
    let mut gone = Vec::with_capacity(dead.len());
    for id in dead {
        if state.store.get(id).await?.is_none() {
            gone.push(id);
        }
    }
    let at = now_millis();
    let reason: String = reason.unwrap_or("").chars().take(500).collect();
    tracing::info!(
        target: "dinghook::audit",
        token = caller.name(),
        discarded,
        reason = %reason,
        "dead events discarded"
    );
    let record = serde_json::json!({
        "at": at,
        "token": caller.name(),
        "action": "discard",
        "discarded": discarded,
        "reason": reason,
        "ids": gone,
    });
    let key = format!("{at:013}-{}", uuid::Uuid::new_v4().simple());
    state
        .store
        .insert_document("audit", &key, &record, at)
        .await?;
    Ok(Discarded {
        discarded,
        ids: gone,
    })
}

/// Deletes dead events for good, with their runs and deliveries (`admin` scope).
#[utoipa::path(operation_id = "discard_events", post, path = "/api/v1/events/discard", tag = "events", request_body = DiscardRequest,
    security(("bearer" = [])),
    responses((status = 200, body = Discarded), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn discard_many(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Discarded>> {
    caller.require(Scope::Admin)?;
    let request: DiscardRequest = json_body(&headers, body)?;
    Ok(Json(
        discard(&state, &caller, &request.ids, request.reason.as_deref()).await?,
    ))
}
