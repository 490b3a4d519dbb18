//! The events pages: the list (filters, keyset pages, a search by eventId), the dead letters
//! grouped by reason, one event (payload, last run, deliveries), and replays (one, a
//! selection, everything a filter matches after a page that says how many).

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use super::super::events::{self as api, EventItem, EventsQuery, ReplayFilter};
use super::super::{path_id, ApiState, Problem, Scope};
use super::i18n::{self, Lang};
use super::{
    excerpt, problem_page, query_string, redirect, render, safe_back, time, Chrome, FormData,
    Viewer,
};
use crate::store::EventState;

/// Events per page.
const PAGE: u32 = 50;

/// Dead events the dead-letter page groups (the newest).
const DEAD_WINDOW: u32 = 500;

/// Most events the replay confirmation counts one by one.
const COUNT_CAP: u64 = 10_000;

/// The list's filters, as the form sends them (empty fields are no filter).
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    app: String,
    #[serde(default)]
    state: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    cursor: String,
    #[serde(default)]
    notice: String,
    #[serde(default)]
    n: u64,
}

fn some(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

impl Filters {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("app", self.app.clone()),
            ("state", self.state.clone()),
            ("type", self.event_type.clone()),
            ("since", self.since.clone()),
        ]
    }

    fn query(&self) -> String {
        let pairs = self.pairs();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        query_string(&refs)
    }

    fn replay_filter(&self) -> ReplayFilter {
        ReplayFilter {
            ids: None,
            app: some(&self.app),
            state: some(&self.state),
            event_type: some(&self.event_type),
            since: some(&self.since),
        }
    }
}

/// One row of an events table.
pub struct EventRow {
    id: i64,
    app: String,
    event_type: String,
    state: String,
    key: String,
    received: String,
    attempts: i64,
    error: String,
}

impl From<&EventItem> for EventRow {
    fn from(e: &EventItem) -> Self {
        EventRow {
            id: e.id,
            app: e.app.clone(),
            event_type: e.event_type.clone(),
            state: e.state.clone(),
            key: e.dedup_key.clone(),
            received: time(Some(e.received_at)),
            attempts: e.attempts,
            error: excerpt(e.last_error.as_deref().unwrap_or(""), 160),
        }
    }
}

/// Rows under one heading (none: the plain list).
pub struct Group {
    reason: String,
    rows: Vec<EventRow>,
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    c: Chrome,
    heading: &'static str,
    action: &'static str,
    f: Filters,
    apps: Vec<String>,
    all_apps: bool,
    show_state: bool,
    states: Vec<String>,
    error: Option<String>,
    live: bool,
    can_replay: bool,
    /// The dead-letter page's discard buttons (`admin`).
    can_discard: bool,
    groups: Vec<Group>,
    first_page: bool,
    newest_link: String,
    next_link: Option<String>,
    replay_filter_link: Option<String>,
}

/// The apps this viewer may read, by name.
fn readable_apps(state: &ApiState, viewer: &Viewer) -> Vec<String> {
    state
        .apps
        .load()
        .keys()
        .filter(|a| viewer.caller().token().may_touch(a))
        .cloned()
        .collect()
}

fn events_page(viewer: &Viewer, state: &ApiState, f: Filters) -> EventsPage {
    let mut c = viewer.chrome("events");
    c.notice = notice(viewer.lang, &f);
    let all_apps = viewer.caller().token().apps.is_none();
    EventsPage {
        c,
        heading: "events.title",
        action: "/console/events",
        apps: readable_apps(state, viewer),
        all_apps,
        show_state: true,
        states: EventState::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        error: None,
        live: false,
        can_replay: viewer.can(Scope::Replay),
        can_discard: false,
        groups: Vec::new(),
        first_page: f.cursor.is_empty(),
        newest_link: format!("/console/events?{}", f.query()),
        next_link: None,
        replay_filter_link: None,
        f,
    }
}

fn notice(lang: Lang, f: &Filters) -> String {
    match f.notice.as_str() {
        "replayed" => i18n::count(lang, "events.replayed", f.n),
        "discarded" => i18n::count(lang, "dead.discarded", f.n),
        _ => String::new(),
    }
}

/// A token limited to several apps must name one: the first, unless the form chose.
fn default_app(state: &ApiState, viewer: &Viewer, f: &mut Filters) {
    let token = viewer.caller().token();
    if f.app.is_empty() && token.apps.is_some() {
        if let Some(first) = readable_apps(state, viewer).into_iter().next() {
            f.app = first;
        }
    }
}

/// Events newest first, 50 a page; `q` finds one by eventId (or its number) instead.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    f: Result<Query<Filters>, QueryRejection>,
) -> Response {
    let mut f = f.map(|Query(f)| f).unwrap_or_default();
    if let Err(p) = viewer.caller().require(Scope::Read) {
        return problem_page(viewer.chrome("events"), &p);
    }
    default_app(&state, &viewer, &mut f);
    let q = f.q.trim().to_owned();
    let mut page = events_page(&viewer, &state, f);
    if !q.is_empty() {
        match search(&state, &viewer, &page.f.app, &q).await {
            Ok(rows) => page.groups.push(Group {
                reason: String::new(),
                rows,
            }),
            Err(p) => page.error = Some(p.detail),
        }
        page.c.notice = i18n::text(viewer.lang, "events.search_hint").to_owned();
        return render(&page);
    }
    let query = EventsQuery {
        app: some(&page.f.app),
        state: some(&page.f.state),
        event_type: some(&page.f.event_type),
        since: some(&page.f.since),
        limit: Some(PAGE),
        cursor: some(&page.f.cursor),
    };
    match api::page(&state, viewer.caller(), query).await {
        Ok(found) => {
            page.groups.push(Group {
                reason: String::new(),
                rows: found.items.iter().map(EventRow::from).collect(),
            });
            page.next_link = found.next_cursor.map(|cursor| {
                let mut pairs = page.f.pairs();
                pairs.push(("cursor", cursor));
                let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                format!("/console/events?{}", query_string(&refs))
            });
        }
        Err(p) => page.error = Some(p.detail),
    }
    page.live = page.first_page && page.error.is_none();
    let filtered =
        !(page.f.state.is_empty() && page.f.event_type.is_empty() && page.f.since.is_empty());
    if page.can_replay && filtered && page.f.state != "running" {
        page.replay_filter_link = Some(format!("/console/events/replay?{}", page.f.query()));
    }
    render(&page)
}

/// The event numbered `q`, or the events whose eventId is `q` (in `app`, or in every app the
/// viewer may read). A `q` with a colon is taken as a whole key (`biz:…`, `sha256:…`).
async fn search(
    state: &ApiState,
    viewer: &Viewer,
    app: &str,
    q: &str,
) -> Result<Vec<EventRow>, Problem> {
    if let Ok(id) = q.trim_start_matches('#').parse::<i64>() {
        if let Ok(detail) = api::detail(state, viewer.caller(), id).await {
            return Ok(vec![EventRow::from(&detail.event)]);
        }
    }
    let key = if q.contains(':') {
        q.to_owned()
    } else {
        format!("event:{q}")
    };
    let apps = if app.is_empty() {
        readable_apps(state, viewer)
    } else {
        vec![app.to_owned()]
    };
    let mut rows = Vec::new();
    for app in apps {
        if let Some(found) = api::find_by_key(state, viewer.caller(), &app, &key).await? {
            rows.push(EventRow::from(&found));
        }
    }
    Ok(rows)
}

/// The newest dead events, grouped by their error, each group replayable at once.
pub async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    f: Result<Query<Filters>, QueryRejection>,
) -> Response {
    let mut f = f.map(|Query(f)| f).unwrap_or_default();
    default_app(&state, &viewer, &mut f);
    let mut page = events_page(&viewer, &state, f);
    page.c.nav = "dead";
    page.heading = "dead.title";
    page.action = "/console/dead";
    page.show_state = false;
    page.can_discard = viewer.can(Scope::Admin);
    let query = EventsQuery {
        app: some(&page.f.app),
        state: Some("dead".to_owned()),
        event_type: some(&page.f.event_type),
        since: some(&page.f.since),
        limit: Some(DEAD_WINDOW),
        cursor: None,
    };
    match api::page(&state, viewer.caller(), query).await {
        Ok(found) => {
            let mut groups: Vec<Group> = Vec::new();
            for item in &found.items {
                let reason = item
                    .last_error
                    .as_deref()
                    .and_then(|e| e.lines().next())
                    .map_or_else(|| "—".to_owned(), |e| excerpt(e, 120));
                match groups.iter_mut().find(|g| g.reason == reason) {
                    Some(g) => g.rows.push(EventRow::from(item)),
                    None => groups.push(Group {
                        reason,
                        rows: vec![EventRow::from(item)],
                    }),
                }
            }
            groups.sort_by_key(|g| std::cmp::Reverse(g.rows.len()));
            if groups.is_empty() {
                groups.push(Group {
                    reason: String::new(),
                    rows: Vec::new(),
                });
            }
            page.groups = groups;
            page.c.notice = match page.c.notice.is_empty() {
                true => i18n::text(viewer.lang, "dead.window").to_owned(),
                false => page.c.notice,
            };
        }
        Err(p) => page.error = Some(p.detail),
    }
    render(&page)
}

/// One event as its page shows it.
struct EventView {
    id: i64,
    app: String,
    event_type: String,
    state: String,
    key: String,
    source: String,
    received: String,
    updated: String,
    attempts: i64,
    replayable: bool,
}

struct RunView {
    attempt: i64,
    started: String,
    /// Empty while it runs.
    ended: String,
    outcome: String,
    handled: String,
    error: String,
    worker: String,
}

struct DeliveryView {
    id: i64,
    route: String,
    state: String,
    attempts: i64,
    status: String,
    delivered: String,
    error: String,
}

#[derive(Template)]
#[template(path = "event.html")]
struct EventPage {
    c: Chrome,
    e: EventView,
    live: bool,
    can_replay: bool,
    runs: Vec<RunView>,
    deliveries: Vec<DeliveryView>,
    payload: String,
    /// An action's event: links to its action page.
    is_action: bool,
}

/// One event: its fields, payload (pretty, as text), every run and deliveries; replay.
pub async fn show(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<super::NoticeOnly>, QueryRejection>,
) -> Response {
    let mut c = viewer.chrome("events");
    if let Some(notice) = q
        .ok()
        .and_then(|Query(q)| q.text(viewer.lang, "replayed", "events.replayed"))
    {
        c.notice = notice;
    }
    let detail = match path_id(id) {
        Ok(id) => api::detail(&state, viewer.caller(), id).await,
        Err(p) => Err(p),
    };
    let detail = match detail {
        Ok(d) => d,
        Err(p) => return problem_page(c, &p),
    };
    let payload = match &detail.payload {
        serde_json::Value::String(text) => text.clone(),
        value => serde_json::to_string_pretty(value).unwrap_or_default(),
    };
    let e = &detail.event;
    let waiting = matches!(e.state.as_str(), "pending" | "running" | "retry");
    render(&EventPage {
        is_action: e.event_type == crate::actions::ACTION_EVENT,
        live: waiting,
        can_replay: viewer.can(Scope::Replay),
        e: EventView {
            id: e.id,
            app: e.app.clone(),
            event_type: e.event_type.clone(),
            state: e.state.clone(),
            key: e.dedup_key.clone(),
            source: e.source.clone(),
            received: time(Some(e.received_at)),
            updated: time(Some(detail.updated_at)),
            attempts: e.attempts,
            replayable: e.state != "running",
        },
        runs: detail
            .runs
            .iter()
            .map(|r| RunView {
                attempt: r.attempt,
                started: time(Some(r.started_at)),
                ended: time(r.finished_at),
                outcome: r.outcome.clone(),
                handled: r.handled.join(", "),
                error: r.error.clone().unwrap_or_default(),
                worker: r.worker.clone().unwrap_or_default(),
            })
            .collect(),
        deliveries: detail
            .deliveries
            .iter()
            .map(|d| DeliveryView {
                id: d.id,
                route: d.route.clone(),
                state: d.state.clone(),
                attempts: d.attempts,
                status: d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                delivered: time(d.delivered_at),
                error: excerpt(d.last_error.as_deref().unwrap_or(""), 300),
            })
            .collect(),
        payload,
        c,
    })
}

/// Replays one event, then shows it again.
pub async fn replay_one(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let result = match path_id(id) {
        Ok(id) => api::replay_event(&state, viewer.caller(), id)
            .await
            .map(|n| (id, n)),
        Err(p) => Err(p),
    };
    match result {
        Ok((id, n)) => redirect(&format!("/console/events/{id}?notice=replayed&n={n}")),
        Err(p) => problem_page(viewer.chrome("events"), &p),
    }
}

/// `back` (a console page) with `notice=replayed&n=…` in place of any it had.
fn with_notice(back: &str, n: u64) -> String {
    let (path, query) = back.split_once('?').unwrap_or((back, ""));
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "notice" && k != "n" {
            out.append_pair(&k, &v);
        }
    }
    out.append_pair("notice", "replayed");
    out.append_pair("n", &n.to_string());
    format!("{path}?{}", out.finish())
}

/// The page the form was on (from `Referer`, a console page only).
fn referer(headers: &HeaderMap) -> String {
    let path = headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.split_once("://").map(|(_, rest)| rest))
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]));
    safe_back(path)
}

/// Replays the selected events (the `id` fields), then goes back to the list.
pub async fn replay_selected(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    Extension(form): Extension<FormData>,
    headers: HeaderMap,
) -> Response {
    let ids: Vec<i64> = form.all("id").filter_map(|v| v.parse().ok()).collect();
    let filter = ReplayFilter {
        ids: Some(ids),
        app: None,
        state: None,
        event_type: None,
        since: None,
    };
    match api::replay_matching(&state, viewer.caller(), filter).await {
        Ok(n) => redirect(&with_notice(&referer(&headers), n)),
        Err(p) => problem_page(viewer.chrome("events"), &p),
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    c: Chrome,
    question: String,
    count: u64,
    filter_text: Vec<String>,
    hidden: Vec<(&'static str, String)>,
    back: String,
}

/// Says how many events a replay by this filter sends back, and asks.
pub async fn confirm_replay(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    f: Result<Query<Filters>, QueryRejection>,
) -> Response {
    let f = f.map(|Query(f)| f).unwrap_or_default();
    let c = viewer.chrome("events");
    if let Err(p) = viewer.caller().require(Scope::Replay) {
        return problem_page(c, &p);
    }
    let (count, at_least) =
        match api::count_matching(&state, viewer.caller(), f.replay_filter(), COUNT_CAP).await {
            Ok(counted) => counted,
            Err(p) => return problem_page(c, &p),
        };
    let question = if at_least {
        i18n::count(viewer.lang, "confirm.at_least", count)
    } else {
        i18n::count(viewer.lang, "confirm.question", count)
    };
    let hidden: Vec<(&'static str, String)> = f
        .pairs()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let filter_text = hidden.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    render(&ConfirmPage {
        question,
        count,
        filter_text,
        back: format!("/console/events?{}", f.query()),
        hidden,
        c,
    })
}

/// Replays everything the confirmed filter matches.
pub async fn replay_matching(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    Extension(form): Extension<FormData>,
) -> Response {
    let f = Filters {
        app: form.get("app").unwrap_or("").to_owned(),
        state: form.get("state").unwrap_or("").to_owned(),
        event_type: form.get("type").unwrap_or("").to_owned(),
        since: form.get("since").unwrap_or("").to_owned(),
        ..Filters::default()
    };
    match api::replay_matching(&state, viewer.caller(), f.replay_filter()).await {
        Ok(n) => redirect(&with_notice(&format!("/console/events?{}", f.query()), n)),
        Err(p) => problem_page(viewer.chrome("events"), &p),
    }
}

#[derive(Template)]
#[template(path = "discard.html")]
struct DiscardPage {
    c: Chrome,
    question: String,
    reason: String,
    ids: Vec<i64>,
}

/// Discards a group of dead letters (`admin`): the first POST (from the dead-letter page)
/// shows how many are dead now and asks; the second (`confirmed`) deletes them, audited.
pub async fn discard(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    Extension(form): Extension<FormData>,
) -> Response {
    let c = viewer.chrome("dead");
    if let Err(p) = viewer.caller().require(Scope::Admin) {
        return problem_page(c, &p);
    }
    let ids: Vec<i64> = form
        .all("id")
        .filter_map(|v| v.parse().ok())
        .take(api::DISCARD_MAX + 1)
        .collect();
    let reason = excerpt(form.get("reason").unwrap_or(""), 200);
    if form.get("confirmed") == Some("1") {
        return match api::discard(&state, viewer.caller(), &ids, Some(&reason)).await {
            Ok(done) => redirect(&format!(
                "/console/dead?notice=discarded&n={}",
                done.discarded
            )),
            Err(p) => problem_page(c, &p),
        };
    }
    // Count what is dead now among them (and the viewer's), as the discard will.
    let mut dead = Vec::with_capacity(ids.len());
    for id in ids.iter().take(api::DISCARD_MAX) {
        if let Ok(d) = api::detail(&state, viewer.caller(), *id).await {
            if d.event.state == "dead" {
                dead.push(*id);
            }
        }
    }
    render(&DiscardPage {
        question: i18n::count(viewer.lang, "dead.discard_question", dead.len() as u64),
        reason,
        ids: dead,
        c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_replaces_the_one_before() {
        assert_eq!(
            with_notice("/console/events?state=dead&notice=replayed&n=1", 4),
            "/console/events?state=dead&notice=replayed&n=4"
        );
        assert_eq!(
            with_notice("/console/dead", 2),
            "/console/dead?notice=replayed&n=2"
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::REFERER,
            "http://127.0.0.1:8081/console/dead?app=x".parse().unwrap(),
        );
        assert_eq!(referer(&h), "/console/dead?app=x");
        h.insert(header::REFERER, "http://evil.example/x".parse().unwrap());
        assert_eq!(referer(&h), "/console/");
    }
}
