//! `POST /api/v1/apps/{app}/actions` and `GET /api/v1/actions/{id}`: act on DingTalk through
//! dinghook. An action is stored (durably, as an inbox event) before the 202; the same
//! `Idempotency-Key` with the same body answers the same action (200), with another body 409.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::problem::ProblemDocument;
use super::{json_body, path_id, path_name, ApiApp, ApiResult, ApiState, Caller, Problem, Scope};
use crate::actions::{self, Action, StoredAction, ACTION_EFFECT, ACTION_EVENT, ACTION_KEY_PREFIX};
use crate::store::{EventState, Inserted, ListQuery, NewEvent, Source, Store, StoredEvent};
use crate::time::now_millis;

/// The header that makes a submission safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest idempotency key.
const MAX_KEY_LEN: usize = 255;

/// An action and where it is.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionView {
    pub id: i64,
    pub app: String,
    /// `work_notification`, `status_bar`, `recall`, `group_message`, `todo_update`, `war_room`,
    /// `robot_reply`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `queued`, `running`, `done` or `dead`.
    pub state: String,
    pub attempts: i64,
    pub idempotency_key: String,
    /// The token that asked for it.
    pub requested_by: String,
    pub received_at: i64,
    pub updated_at: i64,
    /// DingTalk's result once done (`task_id`, `process_query_key`, `open_conversation_id`
    /// and `chat_id`, …).
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Why it failed (the last attempt), DingTalk's reason included.
    pub error: Option<String>,
    /// The body as submitted, except a robot reply's `session_webhook` (a credential),
    /// shown as `"[set]"`.
    #[schema(value_type = Object)]
    pub request: Value,
}

/// The answer to a new action.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionAccepted {
    pub id: i64,
    /// `queued`.
    pub state: String,
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<String> {
    let missing = || {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            format!("send an Idempotency-Key header (1 to {MAX_KEY_LEN} visible ASCII characters)"),
        )
    };
    let value = headers.get(IDEMPOTENCY_KEY).ok_or_else(missing)?;
    let key = value.to_str().map_err(|_| missing())?.trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(missing());
    }
    Ok(key.to_owned())
}

/// Queues an action for `app`: validated, stored, then run by the dispatcher through the
/// app's client.
#[utoipa::path(operation_id = "submit_action", post, path = "/api/v1/apps/{app}/actions", tag = "actions",
    params(("app" = String, Path), ("Idempotency-Key" = String, Header, description = "The same key with the same body returns the same action")),
    request_body(content = Object, description = "One action: {\"type\": \"work_notification\" | \"status_bar\" | \"recall\" | \"group_message\" | \"todo_update\" | \"war_room\" | \"robot_reply\", …} with DingTalk's own field names (see README, HTTP API)"),
    security(("bearer" = [])),
    responses((status = 202, body = ActionAccepted), (status = 200, body = ActionView, description = "This key was used before with this body"),
        (status = 409, body = ProblemDocument, content_type = "application/problem+json", description = "This key was used before with another body"),
        (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(Scope::Act)?;
    let name = path_name(name, "app")?;
    let app = state.app(&caller, &name)?;
    let key = idempotency_key(&headers)?;
    let request: Value = json_body(&headers, body)?;
    let outcome = submit_action(&state.store, &app, caller.name(), &key, request).await?;
    Ok(match outcome {
        Submitted::Queued(id) => {
            state.wake.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(ActionAccepted {
                    id,
                    state: "queued".into(),
                }),
            )
                .into_response()
        }
        Submitted::Existing(view) => (StatusCode::OK, Json(*view)).into_response(),
    })
}

/// What a submission did.
pub enum Submitted {
    /// Stored as a new action, with this id.
    Queued(i64),
    /// The key was used before with the same body: that action.
    Existing(Box<ActionView>),
}

/// Validates and stores an action of `app` (the path `dinghook act` shares): 422 for an
/// invalid action or an app without a DingTalk client, 409 for a key used with another body.
pub async fn submit_action(
    store: &Arc<dyn Store>,
    app: &ApiApp,
    requested_by: &str,
    key: &str,
    request: Value,
) -> ApiResult<Submitted> {
    let action = Action::parse(&request).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_action",
            e.reason.clone(),
        )
        .with_field(e.field)
    })?;
    if app.client.is_none() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_dingtalk_client",
            format!("app {:?} has no app key: it cannot call DingTalk", app.name),
        ));
    }
    let stored = StoredAction {
        action: request,
        idempotency_key: key.to_owned(),
        requested_by: requested_by.to_owned(),
    };
    let payload = serde_json::to_string(&stored).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_action",
            e.to_string(),
        )
    })?;
    let event = NewEvent {
        app: app.name.clone(),
        dedup_key: format!("{ACTION_KEY_PREFIX}{key}"),
        event_type: ACTION_EVENT.to_owned(),
        corp_id: None,
        payload,
        source: Source::Api,
        received_at: now_millis(),
        routes: Vec::new(),
    };
    match app.store.insert(event).await? {
        Inserted::Stored { id } => {
            tracing::info!(app = %app.name, id, action = action.kind(), by = requested_by, "action queued");
            Ok(Submitted::Queued(id))
        }
        Inserted::Duplicate { id } => {
            let existing = store
                .get(id)
                .await?
                .ok_or_else(|| Problem::not_found(format!("no action {id}")))?;
            let before: StoredAction = serde_json::from_str(&existing.payload).map_err(|e| {
                Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    format!("the key names a stored record that is not an action: {e}"),
                )
            })?;
            if before.action != stored.action {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    format!("Idempotency-Key {key:?} was used for another request (action {id})"),
                ));
            }
            Ok(Submitted::Existing(Box::new(view(app, &existing).await?)))
        }
    }
}

/// The API's view of a stored action.
async fn view(app: &ApiApp, event: &StoredEvent) -> ApiResult<ActionView> {
    view_in(Some(&*app.store), event).await
}

/// The view of a stored action, its result read from `store` (the app's view of the store;
/// `None` for an app no longer configured: no result shown).
async fn view_in(store: Option<&dyn Store>, event: &StoredEvent) -> ApiResult<ActionView> {
    let stored: StoredAction = serde_json::from_str(&event.payload)
        .map_err(|_| Problem::not_found(format!("no action {}", event.id)))?;
    let effect_key = format!("{}/{ACTION_EFFECT}", event.dedup_key);
    let result = match store {
        Some(store) => store
            .get_document("effect", &effect_key)
            .await?
            .map(|d| d.body),
        None => None,
    };
    Ok(ActionView {
        id: event.id,
        app: event.app.clone(),
        kind: stored
            .action
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        state: actions::state_name(event.state).to_owned(),
        attempts: event.attempts,
        idempotency_key: stored.idempotency_key,
        requested_by: stored.requested_by,
        received_at: event.received_at,
        updated_at: event.updated_at,
        result,
        error: event.last_error.clone(),
        request: actions::redacted(&stored.action),
    })
}

/// An action: its state, attempts, DingTalk's result or the error.
#[utoipa::path(operation_id = "show_action", get, path = "/api/v1/actions/{id}", tag = "actions",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = ActionView), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<ActionView>> {
    caller.require(Scope::Read)?;
    Ok(Json(action(&state, &caller, path_id(id)?).await?))
}

/// Action `id`, when the caller may read it (404 for an event that is not an action, or
/// another app's: what `GET /api/v1/actions/{id}` and the console show).
pub async fn action(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<ActionView> {
    caller.require(Scope::Read)?;
    let event = action_event(state, caller, id).await?;
    let app = state
        .app(caller, &event.app)
        .map_err(|_| Problem::not_found(format!("no action {id}")))?;
    view(&app, &event).await
}

/// The stored event of action `id`, when the caller may read it; else 404.
async fn action_event(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<StoredEvent> {
    let not_found = || Problem::not_found(format!("no action {id}"));
    let event = state.store.get(id).await?.ok_or_else(not_found)?;
    if event.event_type != ACTION_EVENT || !caller.token().may_touch(&event.app) {
        return Err(not_found());
    }
    Ok(event)
}

/// Sends dead action `id` back to the queue (its event replayed: `replay` scope); 409 for an
/// action that is not dead.
pub async fn retry(state: &ApiState, caller: &Caller, id: i64) -> ApiResult<u64> {
    caller.require(Scope::Replay)?;
    let event = action_event(state, caller, id).await?;
    if event.state != EventState::Dead {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_dead",
            format!(
                "action {id} is {}: only a dead action is retried",
                actions::state_name(event.state)
            ),
        ));
    }
    super::events::replay_event(state, caller, id).await
}

/// The filters of a list of actions.
#[derive(Debug, Default, Deserialize)]
pub struct ActionsQuery {
    /// One app's actions (required for a token limited to several apps).
    pub app: Option<String>,
    /// `queued` (pending or retry), `running`, `done` or `dead`.
    pub state: Option<String>,
    /// 1 to 500; default 50.
    pub limit: Option<u32>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
}

/// A page of actions, newest first.
#[derive(Debug, Serialize)]
pub struct ActionPage {
    pub items: Vec<ActionView>,
    /// For the next (older) page; `None` on the last.
    pub next_cursor: Option<String>,
}

/// The event states an action state names.
fn action_states(state: Option<&str>) -> ApiResult<Vec<Option<EventState>>> {
    Ok(match state {
        None | Some("") => vec![None],
        Some("queued") => vec![Some(EventState::Pending), Some(EventState::Retry)],
        Some("running") => vec![Some(EventState::Running)],
        Some("done") => vec![Some(EventState::Done)],
        Some("dead") => vec![Some(EventState::Dead)],
        Some(other) => {
            return Err(Problem::invalid(
                "state",
                format!("unknown state {other:?}: queued, running, done or dead"),
            ))
        }
    })
}

/// Actions (the `dinghook_action` events), newest first, a keyset page at a time: what the
/// console's actions page lists.
pub async fn page(state: &ApiState, caller: &Caller, q: ActionsQuery) -> ApiResult<ActionPage> {
    caller.require(Scope::Read)?;
    let limit = super::page_limit(q.limit)?;
    let before_id = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor this API gave"))
        })
        .transpose()?;
    let app = super::events::listing_app(caller, q.app.filter(|a| !a.is_empty()))?;
    // `queued` is two states: one keyset page of each, merged newest first, is the page.
    let mut events: Vec<StoredEvent> = Vec::new();
    for event_state in action_states(q.state.as_deref())? {
        let list = ListQuery {
            app: app.clone(),
            state: event_state,
            event_type: Some(ACTION_EVENT.to_owned()),
            limit: Some(limit),
            before_id,
            since: None,
        };
        events.extend(state.store.list(&list).await?);
    }
    events.sort_by_key(|e| std::cmp::Reverse(e.id));
    events.dedup_by_key(|e| e.id);
    events.truncate(limit as usize);
    let next_cursor = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.id.to_string()))
        .flatten();
    let apps = state.apps.load();
    let mut items = Vec::with_capacity(events.len());
    for event in &events {
        let store = apps.get(&event.app).map(|a| &*a.store);
        // A record that is not an action (it cannot be: the type says so) is left out.
        if let Ok(view) = view_in(store, event).await {
            items.push(view);
        }
    }
    Ok(ActionPage { items, next_cursor })
}
