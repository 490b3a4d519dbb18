//! `/api/v1/apps`: each app's health at a glance.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::ProblemDocument;
use super::{path_name, ApiApp, ApiResult, ApiState, Caller, Scope};
use crate::store::{AppStats, ListQuery};
use crate::time::now_millis;

/// One app's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppHealth {
    pub name: String,
    pub callback_path: String,
    /// Whether it has an app key (handlers and actions can call DingTalk).
    pub dingtalk: bool,
    /// When its newest event was received (epoch ms); `null`: none yet.
    pub last_event_received_at: Option<i64>,
    /// Callbacks refused in the last hour by this process, by reason (`signature`,
    /// `decrypt`, `stale`, …).
    pub callback_errors_last_hour: BTreeMap<String, u64>,
    /// Its events by state (`pending`, `running`, `retry`, `done`, `dead`).
    pub queue: BTreeMap<String, u64>,
    /// How long its most overdue waiting event has been due (ms).
    pub oldest_pending_age_ms: Option<i64>,
    /// Events that failed for good.
    pub dead_letters: u64,
    /// This month's DingTalk calls (`null` without an app key).
    pub quota: Option<QuotaHealth>,
    /// The QPS budget its client keeps to.
    pub qps: u32,
    pub recovery: RecoveryHealth,
    /// The Stream mode connection (`null`: the app uses HTTP push only).
    #[schema(value_type = Option<Object>)]
    pub stream: Option<serde_json::Value>,
}

/// Quota use this month, with a projection to the month's end at the pace so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaHealth {
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub used: u64,
    pub limit: u64,
    pub remaining: u64,
    /// Calls the month will have taken at this month's pace.
    pub projected_month_end: u64,
}

/// The failed-push reader.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryHealth {
    pub enabled: bool,
    /// When its last cycle in this process ended (epoch ms).
    pub last_run_at: Option<i64>,
    /// How it ended (`ok`, `not_leader`, `dingtalk_error`, …).
    pub last_outcome: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppList {
    pub items: Vec<AppHealth>,
}

/// `used` scaled from the part of the month gone to the whole month.
fn projection(used: u64, now_ms: i64) -> u64 {
    let Ok(now) = jiff::Timestamp::from_millisecond(now_ms) else {
        return used;
    };
    let date = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let start = date.first_of_month();
    let end = date.last_of_month().tomorrow().unwrap_or(start);
    let (Ok(start), Ok(end)) = (
        start.to_zoned(jiff::tz::TimeZone::UTC),
        end.to_zoned(jiff::tz::TimeZone::UTC),
    ) else {
        return used;
    };
    let whole = (end.timestamp().as_millisecond() - start.timestamp().as_millisecond()).max(1);
    let gone = (now_ms - start.timestamp().as_millisecond()).clamp(1, whole);
    let projected = u128::from(used) * whole as u128 / gone as u128;
    u64::try_from(projected).unwrap_or(u64::MAX)
}

/// `app`'s health, with its queue `figures` (read by the caller: once for a whole list).
async fn health(state: &ApiState, app: &ApiApp, figures: AppStats) -> ApiResult<AppHealth> {
    let now = now_millis();
    let newest = state
        .store
        .list(&ListQuery {
            app: Some(app.name.clone()),
            limit: Some(1),
            ..ListQuery::default()
        })
        .await?;
    let quota = match &app.client {
        Some(client) => {
            let q = client.quota().await;
            Some(QuotaHealth {
                projected_month_end: projection(q.used, now),
                month: q.month,
                used: q.used,
                limit: q.limit,
                remaining: q.remaining,
            })
        }
        None => None,
    };
    let last = state.metrics.last_recovery_run(&app.name);
    Ok(AppHealth {
        name: app.name.clone(),
        callback_path: app.callback_path.clone(),
        dingtalk: app.client.is_some(),
        last_event_received_at: newest.first().map(|e| e.received_at),
        callback_errors_last_hour: state.metrics.refusals_last_hour(&app.name),
        dead_letters: figures.by_state.get("dead").copied().unwrap_or(0),
        queue: figures.by_state,
        oldest_pending_age_ms: figures.oldest_pending_age_ms,
        quota,
        qps: app.qps,
        recovery: RecoveryHealth {
            enabled: app.recovery,
            last_run_at: last.map(|(at, _)| at),
            last_outcome: last.map(|(_, outcome)| outcome.to_owned()),
        },
        stream: state.metrics.stream_status(&app.name),
    })
}

/// Every app the token may touch, with its health.
#[utoipa::path(operation_id = "list_apps", get, path = "/api/v1/apps", tag = "apps", security(("bearer" = [])),
    responses((status = 200, body = AppList), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<AppList>> {
    Ok(Json(AppList {
        items: healths(&state, &caller).await?,
    }))
}

/// The health of every app the caller may touch (what `GET /api/v1/apps` and the console's
/// overview show).
pub async fn healths(state: &ApiState, caller: &Caller) -> ApiResult<Vec<AppHealth>> {
    caller.require(Scope::Read)?;
    let apps = state.apps.load_full();
    // Every app's queue figures in one read, not one per app.
    let stats = state.store.stats_for(None, now_millis()).await?;
    let mut items = Vec::new();
    for app in apps.values().filter(|a| caller.token().may_touch(&a.name)) {
        let figures = stats.by_app.get(&app.name).cloned().unwrap_or_default();
        items.push(health(state, app, figures).await?);
    }
    Ok(items)
}

/// One app's health.
#[utoipa::path(operation_id = "show_app", get, path = "/api/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = AppHealth), (status = "4XX", body = ProblemDocument, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<AppHealth>> {
    caller.require(Scope::Read)?;
    let name = path_name(name, "app")?;
    let app = state.app(&caller, &name)?;
    let stats = state.store.stats_for(Some(&app.name), now_millis()).await?;
    let figures = stats.by_app.get(&app.name).cloned().unwrap_or_default();
    Ok(Json(health(&state, &app, figures).await?))
}

#[cfg(test)]
mod tests {
    use super::projection;

    #[test]
    fn the_projection_scales_to_the_whole_month() {
        // 2026-11-16T00:00:00Z: half of November (30 days) is gone.
        let mid = jiff::Timestamp::from_second(1_794_787_200).unwrap();
        assert_eq!(mid.to_string(), "2026-11-16T00:00:00Z");
        assert_eq!(projection(1_000, mid.as_millisecond()), 2_000);
        assert_eq!(projection(0, mid.as_millisecond()), 0);
    }
}

/// What a URL check found: DingTalk's `check_url`, sealed with the app's keys, sent to this
/// process's own public listener at the app's callback path.
#[derive(Debug, Clone, Serialize)]
pub struct UrlCheck {
    pub app: String,
    /// The callback path the check was sent to.
    pub path: String,
    /// The HTTP status of the answer (`None`: no answer).
    pub status: Option<u16>,
    /// How long the answer took, in ms.
    pub elapsed_ms: u64,
    /// Whether the answer opened, with the app's keys, to `success` (what DingTalk wants).
    pub success: bool,
    /// What went wrong, when it did (never a key or a body).
    pub error: Option<String>,
}

/// How long a URL check waits for the answer.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Does what DingTalk does when the callback URL is saved in its console: sends a signed,
/// encrypted `check_url` event to app `name`'s callback path on this process's own public
/// listener, and opens the answer with the app's keys (`admin` scope).
pub async fn check_url(state: &ApiState, caller: &Caller, name: &str) -> ApiResult<UrlCheck> {
    caller.require(Scope::Admin)?;
    let app = state.app(caller, name)?;
    let cipher = app.cipher.as_ref().ok_or_else(|| {
        super::Problem::new(
            axum::http::StatusCode::CONFLICT,
            "no_callback",
            format!("app {name:?} has no HTTP callback (no aes_key): nothing to check"),
        )
    })?;
    let addr = state.public_addr.get().copied().ok_or_else(|| {
        super::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_listening",
            "the public listener is not bound yet",
        )
    })?;
    let addr = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let mut check = UrlCheck {
        app: app.name.clone(),
        path: app.callback_path.clone(),
        status: None,
        elapsed_ms: 0,
        success: false,
        error: None,
    };
    let sealed = match cipher.seal(
        br#"{"EventType":"check_url"}"#,
        &now_millis().to_string(),
        &crate::crypto::random_nonce(),
    ) {
        Ok(sealed) => sealed,
        Err(e) => {
            check.error = Some(format!("could not seal the check: {e}"));
            return Ok(check);
        }
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(CHECK_TIMEOUT)
        .build()
        .map_err(|e| {
            super::Problem::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("no HTTP client: {e}"),
            )
        })?;
    let url = format!("http://{addr}{}?{}", app.callback_path, sealed.query());
    let started = std::time::Instant::now();
    let answer = client
        .post(&url)
        .header("content-type", "application/json")
        .body(sealed.body())
        .send()
        .await;
    let answer = match answer {
        Ok(response) => {
            check.status = Some(response.status().as_u16());
            response.bytes().await
        }
        Err(e) => {
            check.elapsed_ms = started.elapsed().as_millis() as u64;
            check.error = Some(format!("no answer: {}", without_url(&e)));
            return Ok(check);
        }
    };
    check.elapsed_ms = started.elapsed().as_millis() as u64;
    let body = match answer {
        Ok(body) => body,
        Err(e) => {
            check.error = Some(format!("the answer could not be read: {}", without_url(&e)));
            return Ok(check);
        }
    };
    let opened = serde_json::from_slice::<crate::crypto::Sealed>(&body)
        .map_err(|_| "the answer is not a sealed reply".to_owned())
        .and_then(|reply| {
            cipher
                .open(
                    &reply.msg_signature,
                    &reply.timestamp,
                    &reply.nonce,
                    &reply.encrypt,
                )
                .map_err(|e| format!("the answer does not open with the app's keys: {e}"))
        });
    match opened {
        Ok(msg) if msg == b"success" => check.success = true,
        Ok(_) => check.error = Some("the answer opened to something other than success".into()),
        Err(e) => check.error = Some(e),
    }
    Ok(check)
}

/// A reqwest error's text without its URL (the query carries the check's signature).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "the callback URL");
    }
    text
}
