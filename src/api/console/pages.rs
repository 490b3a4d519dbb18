//! Sign-in and sign-out, the language switch, the overview, routes and apps.

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Extension;

use super::super::apps::AppHealth;
use super::super::routes::RouteItem;
use super::super::{apps, path_name, routes, ApiState, Problem, Scope};
use super::chart::{self, Chart};
use super::i18n::{self, Lang};
use super::{
    age, excerpt, language, over_tls, problem_page, redirect, render, safe_back, same_origin,
    session, time, Chrome, FormData, Viewer,
};
use crate::store::{DeliveryQuery, EventState};
use crate::time::now_millis;

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    c: Chrome,
    next: String,
    failed: bool,
}

#[derive(serde::Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn sign_in_form(
    headers: axum::http::HeaderMap,
    next: Result<Query<NextQuery>, QueryRejection>,
) -> Response {
    let next = safe_back(next.as_ref().ok().and_then(|q| q.next.as_deref()));
    render(&SignInPage {
        c: Chrome::anonymous(language(&headers)),
        next,
        failed: false,
    })
}

/// Checks the token the form gives; opens a session and goes on to `next`, or shows the form
/// again (401) without saying more than "not valid".
pub async fn sign_in(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let lang = language(request.headers());
    if !same_origin(request.headers()) {
        return problem_page(
            Chrome::anonymous(lang),
            &Problem::forbidden("this request came from another site: refused"),
        );
    }
    let secure = over_tls(&state, &request);
    let Ok(body) = axum::body::to_bytes(request.into_body(), 16 * 1024).await else {
        return problem_page(
            Chrome::anonymous(lang),
            &Problem::invalid("token", "the form is too large"),
        );
    };
    let form = FormData::parse(&body);
    let next = safe_back(form.get("next"));
    let token = form.get("token").unwrap_or("").trim();
    let caller = match state.tokens.authenticate_token(token) {
        Ok(caller) => caller,
        Err(_) => {
            tracing::warn!(target: "dinghook::audit", "console sign-in refused: not a valid token");
            let mut response = render(&SignInPage {
                c: Chrome::anonymous(lang),
                next,
                failed: true,
            });
            *response.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
            return response;
        }
    };
    match session::open(&state, &caller).await {
        Ok((id, _)) => {
            tracing::info!(target: "dinghook::audit", token = caller.name(), "console sign-in");
            let mut response = redirect(&next);
            if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(&id, secure)) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(e) => problem_page(Chrome::anonymous(lang), &Problem::from(e)),
    }
}

pub async fn sign_out(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    request: Request,
) -> Response {
    let secure = over_tls(&state, &request);
    if let Err(e) = session::close(&state, &viewer.session).await {
        return problem_page(viewer.chrome(""), &Problem::from(e));
    }
    let mut response = redirect("/console/sign-in");
    if let Ok(cookie) = HeaderValue::from_str(&session::clear_cookie(secure)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(serde::Deserialize)]
pub struct BackQuery {
    back: Option<String>,
}

/// Sets the `lang` cookie and goes back.
pub async fn switch_language(
    lang: Result<Path<String>, PathRejection>,
    back: Result<Query<BackQuery>, QueryRejection>,
) -> Response {
    let back = safe_back(back.as_ref().ok().and_then(|q| q.back.as_deref()));
    let mut response = redirect(&back);
    if let Some(lang) = lang.ok().and_then(|Path(l)| Lang::parse(&l)) {
        let cookie = format!(
            "lang={}; Path=/console; SameSite=Strict; Max-Age=31536000",
            lang.code()
        );
        if let Ok(cookie) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
    }
    response
}

/// One app on the overview.
struct AppView {
    name: String,
    callback_path: String,
    pending: u64,
    running: u64,
    retry: u64,
    done: u64,
    dead: u64,
    oldest: String,
    charts: Vec<Chart>,
    refusals: Vec<(String, u64)>,
    quota: Option<QuotaView>,
    qps: u32,
    recovery: String,
    stream: String,
    last_event: String,
}

struct QuotaView {
    used: u64,
    limit: u64,
    projected: u64,
    /// The month's pace reaches the notification reserve (or the limit).
    warn: bool,
}

/// One route, on the overview and the routes page.
struct RouteView {
    name: String,
    /// `delivering`, `idle`, `failing`, `paused` or `circuit` (the CSS class).
    state: &'static str,
    /// Its message id.
    state_text: &'static str,
    kind: String,
    destination: String,
    apps: String,
    events: String,
    pending: u64,
    running: u64,
    retry: u64,
    dead: u64,
    backlog: u64,
    oldest: String,
    paused: String,
    errors: Vec<DeliveryError>,
}

struct DeliveryError {
    id: i64,
    event_id: i64,
    status: String,
    at: String,
    error: String,
}

fn route_view(r: RouteItem) -> RouteView {
    let (state, state_text) = match &r.paused {
        Some(reason) if reason.contains(crate::routes::runner::BREAKER_REASON) => {
            ("circuit", "routes.s.circuit")
        }
        Some(_) => ("paused", "routes.s.paused"),
        None if r.retry > 0 => ("failing", "routes.s.failing"),
        None if r.pending + r.running > 0 => ("delivering", "routes.s.delivering"),
        None => ("idle", "routes.s.idle"),
    };
    RouteView {
        state,
        state_text,
        kind: r.kind,
        destination: r.destination,
        apps: r.apps.map_or_else(|| "*".to_owned(), |a| a.join(", ")),
        events: if r.events.is_empty() {
            "*".to_owned()
        } else {
            r.events.join(", ")
        },
        backlog: r.pending + r.running + r.retry,
        pending: r.pending,
        running: r.running,
        retry: r.retry,
        dead: r.dead,
        oldest: age(r.oldest_due_age_ms),
        paused: r.paused.unwrap_or_default(),
        errors: Vec::new(),
        name: r.name,
    }
}

fn app_view(lang: Lang, state: &ApiState, h: AppHealth) -> AppView {
    let figure = |s: &str| h.queue.get(s).copied().unwrap_or(0);
    let (received, refused) = state.metrics.callbacks_per_minute(&h.name);
    let reserve = state
        .apps
        .load()
        .get(&h.name)
        .map_or(0, |a| a.quota_reserve);
    let stream = match &h.stream {
        None => i18n::text(lang, "overview.push_only").to_owned(),
        Some(value) => value
            .get("state")
            .and_then(|s| s.as_str())
            .map_or_else(|| value.to_string(), str::to_owned),
    };
    AppView {
        callback_path: h.callback_path.clone(),
        pending: figure("pending"),
        running: figure("running"),
        retry: figure("retry"),
        done: figure("done"),
        dead: h.dead_letters,
        oldest: age(h.oldest_pending_age_ms),
        charts: vec![
            chart::per_minute(
                i18n::text(lang, "overview.callbacks").to_owned(),
                &received,
                "ok",
            ),
            chart::per_minute(
                i18n::text(lang, "overview.refused_chart").to_owned(),
                &refused,
                "bad",
            ),
        ],
        refusals: h.callback_errors_last_hour.clone().into_iter().collect(),
        quota: h.quota.as_ref().map(|q| QuotaView {
            used: q.used,
            limit: q.limit,
            projected: q.projected_month_end,
            warn: q.projected_month_end.saturating_add(reserve) >= q.limit,
        }),
        qps: h.qps,
        recovery: if !h.recovery.enabled {
            i18n::text(lang, "overview.off").to_owned()
        } else {
            match (&h.recovery.last_run_at, &h.recovery.last_outcome) {
                (Some(at), Some(outcome)) => format!("{} ({outcome})", time(Some(*at))),
                _ => i18n::text(lang, "overview.never").to_owned(),
            }
        },
        stream,
        last_event: h.last_event_received_at.map_or_else(
            || i18n::text(lang, "overview.never").to_owned(),
            |t| time(Some(t)),
        ),
        name: h.name,
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    c: Chrome,
    now: String,
    apps: Vec<AppView>,
    routes: Vec<RouteView>,
}

/// Per app: the same figures as `GET /api/v1/apps` (the same function), with the last hour's
/// callbacks per minute; then each route's state and backlog.
pub async fn overview(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let healths = match apps::healths(&state, viewer.caller()).await {
        Ok(h) => h,
        Err(p) => return problem_page(viewer.chrome("overview"), &p),
    };
    let routes = match routes::items(&state, viewer.caller()).await {
        Ok(r) => r,
        Err(p) => return problem_page(viewer.chrome("overview"), &p),
    };
    render(&OverviewPage {
        now: time(Some(now_millis())),
        apps: healths
            .into_iter()
            .map(|h| app_view(viewer.lang, &state, h))
            .collect(),
        routes: routes.into_iter().map(route_view).collect(),
        c: viewer.chrome("overview"),
    })
}

#[derive(Template)]
#[template(path = "routes.html")]
struct RoutesPage {
    c: Chrome,
    routes: Vec<RouteView>,
    can_admin: bool,
    can_replay_dead: bool,
}

#[derive(serde::Deserialize)]
pub struct NoticeQuery {
    notice: Option<String>,
    n: Option<u64>,
}

/// A message about what the last action did, from the redirect's query (ids only: no text
/// from the URL is ever shown).
pub fn notice(lang: Lang, q: Option<&NoticeQuery>) -> String {
    let Some(q) = q else {
        return String::new();
    };
    let n = q.n.unwrap_or(0);
    match q.notice.as_deref() {
        Some("replayed") => i18n::count(lang, "events.replayed", n),
        Some("redelivered") => i18n::count(lang, "routes.replayed", n),
        Some("paused") => i18n::text(lang, "routes.paused").to_owned(),
        Some("resumed") => i18n::text(lang, "routes.resumed").to_owned(),
        _ => String::new(),
    }
}

/// Each route with its state, backlog and last errors; pause, resume, deliver the dead again.
pub async fn routes(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    q: Result<Query<NoticeQuery>, QueryRejection>,
) -> Response {
    let mut c = viewer.chrome("routes");
    c.notice = notice(viewer.lang, q.as_deref().ok());
    let items = match routes::items(&state, viewer.caller()).await {
        Ok(r) => r,
        Err(p) => return problem_page(c, &p),
    };
    let mut views = Vec::with_capacity(items.len());
    for item in items {
        let mut view = route_view(item);
        let failed = state
            .store
            .deliveries()
            .list_deliveries(&DeliveryQuery {
                route: Some(view.name.clone()),
                state: Some(EventState::Dead),
                limit: Some(5),
                ..DeliveryQuery::default()
            })
            .await;
        let mut errors: Vec<DeliveryError> = match failed {
            Ok(found) => found
                .iter()
                .filter(|d| viewer.caller().token().may_touch(&d.app))
                .map(|d| DeliveryError {
                    id: d.id,
                    event_id: d.event_id,
                    status: d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                    at: time(Some(d.updated_at)),
                    error: excerpt(d.last_error.as_deref().unwrap_or(""), 200),
                })
                .collect(),
            Err(e) => return problem_page(c, &Problem::from(e)),
        };
        errors.truncate(5);
        view.errors = errors;
        views.push(view);
    }
    render(&RoutesPage {
        can_admin: viewer.can(Scope::Admin),
        can_replay_dead: viewer.can(Scope::Replay) && viewer.caller().token().apps.is_none(),
        routes: views,
        c,
    })
}

fn route_name(name: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    path_name(name, "route")
}

pub async fn pause_route(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let result = match route_name(name) {
        Ok(name) => routes::pause_route(&state, viewer.caller(), name).await,
        Err(p) => Err(p),
    };
    match result {
        Ok(change) => redirect(&format!(
            "/console/routes?notice=paused#r-{}",
            super::encode(&change.route)
        )),
        Err(p) => problem_page(viewer.chrome("routes"), &p),
    }
}

pub async fn resume_route(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let result = match route_name(name) {
        Ok(name) => routes::resume_route(&state, viewer.caller(), name).await,
        Err(p) => Err(p),
    };
    match result {
        Ok(change) => redirect(&format!(
            "/console/routes?notice=resumed#r-{}",
            super::encode(&change.route)
        )),
        Err(p) => problem_page(viewer.chrome("routes"), &p),
    }
}

pub async fn replay_dead(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let result = match route_name(name) {
        Ok(name) => routes::replay_dead(&state, viewer.caller(), &name).await,
        Err(p) => Err(p),
    };
    match result {
        Ok(n) => redirect(&format!("/console/routes?notice=redelivered&n={n}")),
        Err(p) => problem_page(viewer.chrome("routes"), &p),
    }
}

/// One app's configuration, secrets only as "set".
struct AppConfigView {
    name: String,
    /// `api.public_url` + the path; empty without `public_url`.
    callback_url: String,
    callback_path: String,
    client: &'static str,
    qps: u32,
    recovery: &'static str,
    /// It has callback keys: the URL check can run.
    checkable: bool,
}

/// A URL check's result, as the apps page shows it.
struct CheckView {
    app: String,
    path: String,
    status: String,
    elapsed: String,
    success: bool,
    error: String,
}

#[derive(Template)]
#[template(path = "apps.html")]
struct AppsPage {
    c: Chrome,
    apps: Vec<AppConfigView>,
    public_url: bool,
    can_check: bool,
    check: Option<CheckView>,
}

/// The apps page, with a URL check's result when there is one.
fn apps_page(state: &ApiState, viewer: &Viewer, check: Option<CheckView>) -> Response {
    if let Err(p) = viewer.caller().require(Scope::Read) {
        return problem_page(viewer.chrome("apps"), &p);
    }
    let public_url = state.public_url.clone();
    let apps = state.apps.load_full();
    let views = apps
        .values()
        .filter(|a| viewer.caller().token().may_touch(&a.name))
        .map(|a| AppConfigView {
            name: a.name.clone(),
            callback_url: public_url
                .as_deref()
                .map(|base| format!("{base}{}", a.callback_path))
                .unwrap_or_default(),
            callback_path: a.callback_path.clone(),
            client: if a.client.is_some() {
                "apps.yes"
            } else {
                "apps.no"
            },
            qps: a.qps,
            recovery: if a.recovery { "apps.on" } else { "apps.off" },
            checkable: a.cipher.is_some(),
        })
        .collect();
    render(&AppsPage {
        c: viewer.chrome("apps"),
        apps: views,
        public_url: public_url.is_some(),
        can_check: viewer.can(Scope::Admin),
        check,
    })
}

/// Each app the token may touch: the callback URL to paste into DingTalk's console
/// (`api.public_url` and the path), whether it has a client; no secret.
pub async fn apps(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    apps_page(&state, &viewer, None)
}

/// Sends the app a `check_url` as DingTalk does (through this process's own public listener)
/// and shows what came back (`admin` scope).
pub async fn check_app(
    State(state): State<Arc<ApiState>>,
    Extension(viewer): Extension<Viewer>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let checked = match path_name(name, "app") {
        Ok(name) => apps::check_url(&state, viewer.caller(), &name).await,
        Err(p) => Err(p),
    };
    match checked {
        Ok(check) => {
            let view = CheckView {
                status: check
                    .status
                    .map_or_else(|| "—".to_owned(), |s| s.to_string()),
                elapsed: format!("{} ms", check.elapsed_ms),
                success: check.success,
                error: check.error.unwrap_or_default(),
                app: check.app,
                path: check.path,
            };
            apps_page(&state, &viewer, Some(view))
        }
        Err(p) => problem_page(viewer.chrome("apps"), &p),
    }
}
