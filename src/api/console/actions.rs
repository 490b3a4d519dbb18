//! The actions pages: the outbox (what the user's systems asked dinghook to do on DingTalk),
//! newest first with keyset pages, by state and app; one action (its request as the API shows
//! it, DingTalk's result or the error); retrying a dead one. The data is `api::actions`'.

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use super::super::actions::{self as api, ActionView, ActionsQuery};
use super::super::{path_id, ApiState, Scope};
use super::{excerpt, problem_page, query_string, redirect, render, time, Chrome, Viewer};

/// Actions per page.
const PAGE: u32 = 50;

/// The states the filter offers (`queued`: pending or waiting for a retry).
const STATES: [&str; 4] = ["queued", "running", "done", "dead"];

/// The list's filters, as the form sends them (empty fields are no filter).
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    app: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    cursor: String,
}

/// One row of the actions table.
struct ActionRow {
    id: i64,
    app: String,
    kind: String,
    key: String,
    by: String,
    state: String,
    attempts: i64,
    received: String,
    /// DingTalk's result (compact JSON), or empty.
    result: String,
    error: String,
}

impl From<&ActionView> for ActionRow {
    fn from(a: &ActionView) -> Self {
        ActionRow {
            id: a.id,
            app: a.app.clone(),
            kind: a.kind.clone(),
            key: a.idempotency_key.clone(),
            by: a.requested_by.clone(),
            state: a.state.clone(),
            attempts: a.attempts,
            received: time(Some(a.received_at)),
            result: a
                .result
                .as_ref()
                .map(|r| excerpt(&r.to_string(), 160))
                .unwrap_or_default(),
            error: excerpt(a.error.as_deref().unwrap_or(""), 160),
        }
    }
}

#[derive(Template)]
#[template(path = "actions.html")]
struct ActionsPage {
    c: Chrome,
    f: Filters,
    apps: Vec<String>,
    all_apps: bool,
    states: &'static [&'static str],
    error: Option<String>,
    live: bool,
    rows: Vec<ActionRow>,
    first_page: bool,
    newest_link: String,
    next_link: Option<String>,
}

/// Actions newest first, 50 a page, by state and app.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    f: Result<Query<Filters>, QueryRejection>,
) -> Response {
    let mut f = f.map(|Query(f)| f).unwrap_or_default();
    let c = viewer.chrome("actions");
    if let Err(p) = viewer.caller().require(Scope::Read) {
        return problem_page(c, &p);
    }
    let apps: Vec<String> = state
        .apps
        .load()
        .keys()
        .filter(|a| viewer.caller().token().may_touch(a))
        .cloned()
        .collect();
    let all_apps = viewer.caller().token().apps.is_none();
    if f.app.is_empty() && !all_apps {
        if let Some(first) = apps.first() {
            f.app = first.clone();
        }
    }
    let query = ActionsQuery {
        app: Some(f.app.clone()).filter(|a| !a.is_empty()),
        state: Some(f.state.clone()).filter(|s| !s.is_empty()),
        limit: Some(PAGE),
        cursor: Some(f.cursor.clone()).filter(|c| !c.is_empty()),
    };
    let filters = query_string(&[("app", &f.app), ("state", &f.state)]);
    let mut page = ActionsPage {
        c,
        apps,
        all_apps,
        states: &STATES,
        error: None,
        live: false,
        rows: Vec::new(),
        first_page: f.cursor.is_empty(),
        newest_link: format!("/console/actions?{filters}"),
        next_link: None,
        f,
    };
    match api::page(&state, viewer.caller(), query).await {
        Ok(found) => {
            page.rows = found.items.iter().map(ActionRow::from).collect();
            page.next_link = found.next_cursor.map(|cursor| {
                format!(
                    "/console/actions?{}",
                    query_string(&[
                        ("app", &page.f.app),
                        ("state", &page.f.state),
                        ("cursor", &cursor)
                    ])
                )
            });
        }
        Err(p) => page.error = Some(p.detail),
    }
    page.live = page.first_page && page.error.is_none();
    render(&page)
}

#[derive(Template)]
#[template(path = "action.html")]
struct ActionPage {
    c: Chrome,
    a: ActionRow,
    live: bool,
    can_retry: bool,
    updated: String,
    request: String,
    result: String,
    error: String,
}

/// One action: its fields, the request (session webhooks as `[set]`), DingTalk's result or
/// the error; retry when dead.
pub async fn show(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<super::NoticeOnly>, QueryRejection>,
) -> Response {
    let mut c = viewer.chrome("actions");
    if let Some(notice) = q
        .ok()
        .and_then(|Query(q)| q.text(viewer.lang, "retried", "action.retried"))
    {
        c.notice = notice;
    }
    let found = match path_id(id) {
        Ok(id) => api::action(&state, viewer.caller(), id).await,
        Err(p) => Err(p),
    };
    let action = match found {
        Ok(a) => a,
        Err(p) => return problem_page(c, &p),
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    render(&ActionPage {
        live: matches!(action.state.as_str(), "queued" | "running"),
        can_retry: viewer.can(Scope::Replay) && action.state == "dead",
        updated: time(Some(action.updated_at)),
        request: pretty(&action.request),
        result: action.result.as_ref().map(pretty).unwrap_or_default(),
        error: action.error.clone().unwrap_or_default(),
        a: ActionRow::from(&action),
        c,
    })
}

/// Retries a dead action (its event replayed), then shows it again.
pub async fn retry(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let result = match path_id(id) {
        Ok(id) => api::retry(&state, viewer.caller(), id)
            .await
            .map(|n| (id, n)),
        Err(p) => Err(p),
    };
    match result {
        Ok((id, n)) => redirect(&format!("/console/actions/{id}?notice=retried&n={n}")),
        Err(p) => problem_page(viewer.chrome("actions"), &p),
    }
}
