//! The operator console: server-rendered pages at `/console` on the API listener (never the
//! public callback port), for people where the API is for programs.
//!
//! - **Sessions** ([`session`]): sign in with an API token once; a random id in an
//!   `HttpOnly; SameSite=Strict` cookie maps, in the store, to the token's name and a
//!   fingerprint of its digest. The token's scopes and apps (from the configuration, read on
//!   every request) decide what is shown and which buttons exist; every write goes through
//!   the same functions, scope checks and audit as the API's.
//! - **CSRF**: every POST carries the session's CSRF token (a hidden field, compared in
//!   constant time), and a POST whose `Sec-Fetch-Site` or `Origin` says another site is
//!   refused before that.
//! - **Headers**: a strict Content-Security-Policy (no inline script or style: the one
//!   script and the one style sheet are served from `/console/assets/` under names that
//!   carry their content's hash, cached for a year), `nosniff`, `same-origin` referrers,
//!   pages `no-store`.
//! - **Languages** ([`i18n`]): English and 简体中文, from the `lang` cookie (the switch link)
//!   or `Accept-Language`.
//! - Everything works without JavaScript (forms and redirects); the script only refreshes
//!   the live parts of a page and asks before a replay.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use askama::Template;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiState, Caller, Problem, Scope};

mod actions;
mod chart;
mod events;
pub mod i18n;
mod pages;
pub mod session;

use i18n::Lang;
use session::Session;

/// Every console page and action, with its own session check (the API's bearer check does
/// not apply here), CSRF check and headers.
pub fn router(state: Arc<ApiState>) -> Router<Arc<ApiState>> {
    let signed_in = Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(pages::overview))
        .route("/console/events", get(events::list))
        .route(
            "/console/events/replay",
            get(events::confirm_replay).post(events::replay_matching),
        )
        .route(
            "/console/events/replay-selected",
            post(events::replay_selected),
        )
        .route("/console/events/{id}", get(events::show))
        .route("/console/events/{id}/replay", post(events::replay_one))
        .route("/console/dead", get(events::dead_letters))
        .route("/console/dead/discard", post(events::discard))
        .route("/console/actions", get(actions::list))
        .route("/console/actions/{id}", get(actions::show))
        .route("/console/actions/{id}/retry", post(actions::retry))
        .route("/console/routes", get(pages::routes))
        .route("/console/routes/{name}/pause", post(pages::pause_route))
        .route("/console/routes/{name}/resume", post(pages::resume_route))
        .route(
            "/console/routes/{name}/replay-dead",
            post(pages::replay_dead),
        )
        .route("/console/apps", get(pages::apps))
        .route("/console/apps/{name}/check", post(pages::check_app))
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_session,
        ));
    Router::new()
        .route(
            "/console/sign-in",
            get(pages::sign_in_form).post(pages::sign_in),
        )
        .route("/console/lang/{lang}", get(pages::switch_language))
        .route("/console/assets/{name}", get(asset))
        .merge(signed_in)
        .layer(axum::middleware::from_fn(headers))
}

/// The largest form a console POST may send (a selection of 500 ids is about 6 KiB).
const FORM_LIMIT: usize = 64 * 1024;

/// Who is looking, in which language: what every signed-in handler gets.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub session: Session,
    pub lang: Lang,
    /// The page's path and query (for the language switch's way back).
    pub here: String,
}

impl Viewer {
    pub fn caller(&self) -> &Caller {
        &self.session.caller
    }

    pub fn can(&self, scope: Scope) -> bool {
        self.caller().token().has(scope)
    }

    /// The page frame for this viewer, `nav` marking the current section.
    pub fn chrome(&self, nav: &'static str) -> Chrome {
        let token = self.caller().token();
        let mut scopes: Vec<&str> = token.scopes.iter().map(|s| s.as_str()).collect();
        scopes.sort_unstable();
        let apps = match &token.apps {
            None => "*".to_owned(),
            Some(apps) => apps.join(","),
        };
        Chrome {
            lang: self.lang,
            signed_in: true,
            user: token.name.clone(),
            scopes: format!("{}; {apps}", scopes.join(",")),
            csrf: self.session.csrf.clone(),
            nav,
            back: encode(&self.here),
            css: ASSETS.css.path.as_str(),
            js: ASSETS.js.path.as_str(),
            notice: String::new(),
        }
    }
}

/// A POST's form fields (read and checked by [`require_session`]).
#[derive(Debug, Clone, Default)]
pub struct FormData(pub Vec<(String, String)>);

impl FormData {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn parse(body: &[u8]) -> FormData {
        FormData(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
}

/// What every page's frame shows (the `base.html` template's `c`).
pub struct Chrome {
    pub lang: Lang,
    pub signed_in: bool,
    pub user: String,
    pub scopes: String,
    pub csrf: String,
    pub nav: &'static str,
    /// The current page, URL-encoded, for the language switch.
    pub back: String,
    pub css: &'static str,
    pub js: &'static str,
    /// A message about what the last action did ("3 events sent back to pending").
    pub notice: String,
}

impl Chrome {
    /// The frame of a page seen without a session (sign-in, errors before one).
    pub fn anonymous(lang: Lang) -> Chrome {
        Chrome {
            lang,
            signed_in: false,
            user: String::new(),
            scopes: String::new(),
            csrf: String::new(),
            nav: "",
            back: encode("/console/"),
            css: ASSETS.css.path.as_str(),
            js: ASSETS.js.path.as_str(),
            notice: String::new(),
        }
    }

    /// Message `id` in the page's language.
    pub fn t(&self, id: &str) -> &'static str {
        i18n::text(self.lang, id)
    }

    /// An event or delivery state's name.
    pub fn state(&self, state: &str) -> &'static str {
        i18n::state(self.lang, state)
    }

    /// An action's state (`queued`, or an event state's name).
    pub fn action_state(&self, state: &str) -> &'static str {
        match state {
            "queued" => self.t("actions.s.queued"),
            other => self.state(other),
        }
    }
}

/// The query of a page that a change redirected to: which change (`notice`) and how many
/// it made (`n`), shown once as a notice.
#[derive(Debug, Default, serde::Deserialize)]
pub struct NoticeOnly {
    #[serde(default)]
    notice: String,
    #[serde(default)]
    n: u64,
}

impl NoticeOnly {
    /// The notice `message` with the count, when the change was `expected`.
    pub fn text(&self, lang: i18n::Lang, expected: &str, message: &str) -> Option<String> {
        (self.notice == expected).then(|| i18n::count(lang, message, self.n))
    }
}

/// Renders `page`, or a plain 500 when a template fails (they are checked at compile time:
/// only a formatting error of a value could).
pub fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => html_response(StatusCode::OK, html),
        Err(e) => {
            tracing::error!(error = %e, "a console template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// 303 See Other to `to` (after a POST, or to the sign-in).
pub fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Percent-encodes `text` for a query string.
pub fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A query string of the non-empty pairs.
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        out.append_pair(k, v);
    }
    out.finish()
}

/// Where a sign-in or language switch may send the browser back to: a console path only.
pub fn safe_back(path: Option<&str>) -> String {
    match path {
        Some(p)
            if p.starts_with("/console")
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.contains("://") =>
        {
            p.to_owned()
        }
        _ => "/console/".to_owned(),
    }
}

/// An error page (the API's problem, shown to a person).
#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    c: Chrome,
    status: u16,
    title: String,
    detail: String,
}

/// Renders `problem` as a page with its status.
pub fn problem_page(chrome: Chrome, problem: &Problem) -> Response {
    let status = problem.status();
    let page = ErrorPage {
        title: chrome.t(error_title(status)).to_owned(),
        c: chrome,
        status: status.as_u16(),
        detail: problem.detail.clone(),
    };
    match page.render() {
        Ok(html) => html_response(status, html),
        Err(_) => (status, problem.detail.clone()).into_response(),
    }
}

fn error_title(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "error.401",
        403 => "error.403",
        404 => "error.404",
        503 => "error.503",
        400..=499 => "error.400",
        _ => "error.500",
    }
}

/// The page's language: the `lang` cookie, else the first of `Accept-Language` we speak.
pub fn language(headers: &HeaderMap) -> Lang {
    session::cookie(headers, "lang")
        .and_then(Lang::parse)
        .unwrap_or_else(|| {
            Lang::from_accept(
                headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            )
        })
}

/// Whether the browser reached us over TLS: `X-Forwarded-Proto: https` from a trusted proxy
/// (the API listener itself speaks plain HTTP). Decides the cookie's `Secure`.
pub fn over_tls(state: &ApiState, request: &Request) -> bool {
    let from_proxy = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| state.trusted_proxies.contains(peer.ip()));
    from_proxy
        && request
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// False when the browser says the request comes from another site: `Sec-Fetch-Site` other
/// than `same-origin`/`none`, or an `Origin` whose host is not the `Host` asked for.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return false;
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        if origin_host != Some(host) {
            return false;
        }
    }
    true
}

/// The session check in front of every signed-in page: without a session, a page redirects
/// to the sign-in and a POST is 401; a POST is also checked for its origin and CSRF token
/// (403), its form read and handed on as [`FormData`], and audited like an API write.
async fn require_session(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let lang = language(request.headers());
    let here = request
        .uri()
        .path_and_query()
        .map_or("/console/", |p| p.as_str())
        .to_owned();
    let session = match session::load(&state, request.headers()).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            return if request.method() == Method::GET || request.method() == Method::HEAD {
                redirect(&format!("/console/sign-in?next={}", encode(&here)))
            } else {
                problem_page(Chrome::anonymous(lang), &Problem::unauthorized())
            };
        }
        Err(e) => return problem_page(Chrome::anonymous(lang), &Problem::from(e)),
    };
    let viewer = Viewer {
        session,
        lang,
        here,
    };
    let write = request.method() != Method::GET && request.method() != Method::HEAD;
    if !write {
        let mut request = request;
        request.extensions_mut().insert(viewer);
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let caller = viewer.caller().clone();
    let chrome = viewer.chrome("");
    let response = match checked_form(&viewer, request).await {
        Ok(mut request) => {
            request.extensions_mut().insert(viewer);
            next.run(request).await
        }
        Err(problem) => problem_page(chrome, &problem),
    };
    super::audit(&state, &caller, &method, &path, response.status());
    response
}

/// The request with its form read into [`FormData`], when it comes from our own pages: the
/// same origin, and the session's CSRF token in its `csrf` field.
async fn checked_form(viewer: &Viewer, request: Request) -> Result<Request, Problem> {
    if !same_origin(request.headers()) {
        return Err(Problem::forbidden(
            "this request came from another site: refused",
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, FORM_LIMIT).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the form is too large",
        )
    })?;
    let form = FormData::parse(&bytes);
    let presented = form.get("csrf").unwrap_or("");
    let expected = viewer.session.csrf.as_bytes();
    if presented.is_empty() || !bool::from(presented.as_bytes().ct_eq(expected)) {
        return Err(Problem::forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ));
    }
    let mut request = Request::from_parts(parts, Body::empty());
    request.extensions_mut().insert(form);
    Ok(request)
}

/// The headers of every console answer: the CSP and friends; pages (not assets) `no-store`.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// No inline script or style, nothing from elsewhere, no framing, forms only to us.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn not_found(axum::Extension(viewer): axum::Extension<Viewer>) -> Response {
    problem_page(
        viewer.chrome(""),
        &Problem::not_found("no console page here"),
    )
}

/// One embedded file, served under a name carrying its content's hash.
pub struct Asset {
    pub path: String,
    body: &'static str,
    content_type: &'static str,
}

impl Asset {
    fn new(stem: &str, ext: &str, body: &'static str, content_type: &'static str) -> Asset {
        let hash = hex::encode(&Sha256::digest(body.as_bytes())[..6]);
        Asset {
            path: format!("/console/assets/{stem}-{hash}.{ext}"),
            body,
            content_type,
        }
    }
}

/// The console's style sheet and script, in the binary.
pub struct Assets {
    pub css: Asset,
    pub js: Asset,
}

pub static ASSETS: LazyLock<Assets> = LazyLock::new(|| Assets {
    css: Asset::new(
        "console",
        "css",
        include_str!("assets/console.css"),
        "text/css; charset=utf-8",
    ),
    js: Asset::new(
        "console",
        "js",
        include_str!("assets/console.js"),
        "text/javascript; charset=utf-8",
    ),
});

async fn asset(name: Result<Path<String>, axum::extract::rejection::PathRejection>) -> Response {
    let Ok(Path(name)) = name else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = format!("/console/assets/{name}");
    let Some(asset) = [&ASSETS.css, &ASSETS.js]
        .into_iter()
        .find(|a| a.path == path)
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut response = asset.body.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // The name changes with the content: cache it for good.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    response
}

/// Epoch ms as `2026-11-29 08:00:00` UTC; empty for none.
pub fn time(ms: Option<i64>) -> String {
    ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A duration in ms as `3 s`, `4 min`, `2 h 5 min`; `—` for none.
pub fn age(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "—".to_owned();
    };
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// At most `max` characters of `text`, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_ways_back() {
        assert_eq!(
            safe_back(Some("/console/events?x=1")),
            "/console/events?x=1"
        );
        for bad in [
            None,
            Some("https://evil.example/"),
            Some("//evil.example/console"),
            Some("/api/v1/events"),
            Some("/console\\..\\x"),
        ] {
            assert_eq!(safe_back(bad), "/console/");
        }
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        assert!(same_origin(&headers(&[])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "http://127.0.0.1:8081"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "http://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[("origin", "null")])));
    }

    #[test]
    fn values_are_shown_short() {
        assert_eq!(age(None), "—");
        assert_eq!(age(Some(5_000)), "5 s");
        assert_eq!(age(Some(125_000)), "2 min");
        assert_eq!(age(Some(3_900_000)), "1 h 5 min");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("ab", 3), "ab");
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(time(None), "");
        assert!(ASSETS.css.path.starts_with("/console/assets/console-"));
    }
}
