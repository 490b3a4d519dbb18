//! The admin side: the `/_fake/…` routes that script the fake over HTTP (JSON in, JSON out).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{FakeDingTalk, FakeSendResult, FaultSpec};

pub(crate) fn routes() -> Router<FakeDingTalk> {
    Router::new()
        .route("/calls", get(admin_calls).delete(admin_clear_calls))
        .route("/state", get(admin_state))
        .route("/reset", post(admin_reset))
        .route("/faults", post(admin_faults).delete(admin_clear_faults))
        .route("/delay", post(admin_delay))
        .route("/token/expire", post(admin_expire_token))
        .route("/token/ttl", post(admin_token_ttl))
        .route("/credentials", post(admin_credentials))
        .route("/qps", post(admin_qps))
        .route("/quota", post(admin_quota))
        .route("/ban", post(admin_ban))
        .route("/failed-callbacks", post(admin_failed_callbacks))
        .route("/users", post(admin_users))
        .route("/groups", post(admin_groups))
        .route("/templates", post(admin_templates))
        .route("/todos", post(admin_todos))
        .route("/work-records", post(admin_work_records))
        .route("/attendance/update-data", post(admin_attendance_update))
        .route("/attendance/list", post(admin_attendance_list))
        .route("/attendance/list/users", post(admin_attendance_list_users))
        .route("/attendance/records", post(admin_attendance_records))
        .route("/send-results/{task_id}", post(admin_send_result))
        .route("/send-results", delete(admin_clear_send_results))
        .route("/send-progress/{task_id}", post(admin_send_progress))
        .route("/robot/sessions", post(admin_robot_session))
        .nest("/stream", crate::stream::admin_routes())
}

/// An admin body that is not the JSON expected.
pub(crate) struct BadBody(String);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        let body = json!({"error": format!("bad JSON body: {}", self.0)});
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
}

/// Parses an admin body without insisting on a `Content-Type`, so `curl -d` works as is.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, BadBody> {
    let text: &[u8] = if body.is_empty() { b"null" } else { body };
    serde_json::from_slice(text).map_err(|e| BadBody(e.to_string()))
}

fn ok() -> Response {
    axum::Json(json!({"ok": true})).into_response()
}

#[derive(Deserialize)]
struct CallsFilter {
    path: Option<String>,
}

async fn admin_calls(
    State(fake): State<FakeDingTalk>,
    Query(filter): Query<CallsFilter>,
) -> Response {
    let calls = match filter.path {
        Some(path) => fake.calls_to(&path),
        None => fake.calls(),
    };
    axum::Json(calls).into_response()
}

async fn admin_clear_calls(State(fake): State<FakeDingTalk>) -> Response {
    fake.clear_calls();
    ok()
}

async fn admin_state(State(fake): State<FakeDingTalk>) -> Response {
    axum::Json(fake.summary()).into_response()
}

#[derive(Deserialize, Default)]
struct SessionSpec {
    #[serde(default)]
    expires_at: Option<i64>,
}

async fn admin_robot_session(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let spec: Option<SessionSpec> = match parse_body(&body) {
        Ok(spec) => spec,
        Err(bad) => return bad.into_response(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let expires_at = spec
        .unwrap_or_default()
        .expires_at
        .unwrap_or(now + crate::SESSION_TTL_MS);
    let url = fake.robot_session(expires_at);
    axum::Json(json!({"session_webhook": url, "expires_at": expires_at})).into_response()
}

async fn admin_reset(State(fake): State<FakeDingTalk>) -> Response {
    fake.reset();
    ok()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    // Tried in order: a list first, since `Value` (and even a struct) would accept a list too.
    Many(Vec<T>),
    One(T),
}

async fn admin_faults(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<OneOrMany<FaultSpec>>(&body) {
        Ok(OneOrMany::One(fault)) => fake.fail_next(fault),
        Ok(OneOrMany::Many(faults)) => faults.into_iter().for_each(|f| fake.fail_next(f)),
        Err(response) => return response.into_response(),
    }
    ok()
}

async fn admin_clear_faults(State(fake): State<FakeDingTalk>) -> Response {
    fake.clear_faults();
    ok()
}

#[derive(Deserialize)]
struct DelayBody {
    ms: u64,
    path: Option<String>,
}

async fn admin_delay(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    let body: DelayBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let delay = (body.ms > 0).then(|| Duration::from_millis(body.ms));
    match body.path {
        Some(path) => fake.set_path_delay(&path, delay),
        None => fake.set_delay(delay),
    }
    ok()
}

async fn admin_expire_token(State(fake): State<FakeDingTalk>) -> Response {
    fake.expire_token();
    ok()
}

#[derive(Deserialize)]
struct TtlBody {
    secs: u64,
}

async fn admin_token_ttl(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<TtlBody>(&body) {
        Ok(b) => fake.set_token_ttl(Duration::from_secs(b.secs)),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct CredentialsBody {
    app_key: String,
    app_secret: String,
}

async fn admin_credentials(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<CredentialsBody>(&body) {
        Ok(b) => fake.set_credentials(&b.app_key, &b.app_secret),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct LimitBody {
    limit: Option<u64>,
    used: Option<u64>,
}

async fn admin_qps(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<LimitBody>(&body) {
        Ok(b) => fake.set_qps_limit(b.limit.map(|l| l.min(u64::from(u32::MAX)) as u32)),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_quota(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<LimitBody>(&body) {
        Ok(b) => {
            fake.set_monthly_quota(b.limit);
            if let Some(used) = b.used {
                fake.set_quota_used(used);
            }
        }
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct BanBody {
    /// The JSON body's `wait` (DingTalk's example: 5).
    #[serde(default = "five")]
    wait: u64,
    #[serde(default = "one")]
    times: u32,
    /// An HTML page instead of the JSON body.
    #[serde(default)]
    html: bool,
}

fn one() -> u32 {
    1
}

fn five() -> u64 {
    5
}

async fn admin_ban(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<BanBody>(&body) {
        Ok(b) if b.html => fake.ban_next_with_page(b.times),
        Ok(b) => fake.ban_next(b.wait, b.times),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct FailedCallbacksBody {
    entries: Vec<Value>,
    page_size: Option<usize>,
}

async fn admin_failed_callbacks(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<FailedCallbacksBody>(&body) {
        Ok(b) => {
            if let Some(size) = b.page_size {
                fake.set_failed_page_size(size);
            }
            fake.load_failed_callbacks(b.entries);
        }
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_users(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<OneOrMany<Value>>(&body) {
        Ok(OneOrMany::One(user)) => fake.add_user(user),
        Ok(OneOrMany::Many(users)) => users.into_iter().for_each(|u| fake.add_user(u)),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_groups(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<OneOrMany<Value>>(&body) {
        Ok(OneOrMany::One(group)) => fake.add_group(group),
        Ok(OneOrMany::Many(groups)) => groups.into_iter().for_each(|g| fake.add_group(g)),
        Err(r) => return r.into_response(),
    }
    ok()
}

/// A group template to register: its id, or `{"template_id": "…"}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateEntry {
    Id(String),
    Object { template_id: String },
}

impl TemplateEntry {
    fn id(&self) -> &str {
        match self {
            TemplateEntry::Id(id) | TemplateEntry::Object { template_id: id } => id,
        }
    }
}

async fn admin_templates(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<OneOrMany<TemplateEntry>>(&body) {
        Ok(OneOrMany::One(entry)) => fake.add_scene_template(entry.id()),
        Ok(OneOrMany::Many(entries)) => entries
            .iter()
            .for_each(|entry| fake.add_scene_template(entry.id())),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct TodoBody {
    union_id: String,
    task: Value,
}

async fn admin_todos(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<TodoBody>(&body) {
        Ok(b) => fake.add_todo_task(&b.union_id, b.task),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct WorkRecordsBody {
    userid: String,
    records: Vec<Value>,
}

async fn admin_work_records(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<WorkRecordsBody>(&body) {
        Ok(b) => fake.set_work_records(&b.userid, b.records),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct AttendanceUpdateBody {
    userid: String,
    work_date: String,
    result: Value,
}

async fn admin_attendance_update(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<AttendanceUpdateBody>(&body) {
        Ok(b) => fake.set_attendance_update_data(&b.userid, &b.work_date, b.result),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_attendance_list(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<Vec<Value>>(&body) {
        Ok(records) => fake.set_attendance_list(records),
        Err(r) => return r.into_response(),
    }
    ok()
}

#[derive(Deserialize)]
struct AttendanceListUsersBody {
    user_ids: Vec<String>,
    records: Vec<Value>,
}

async fn admin_attendance_list_users(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<AttendanceListUsersBody>(&body) {
        Ok(b) => fake.set_attendance_list_for_users(&b.user_ids, &b.records),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_attendance_records(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<Vec<Value>>(&body) {
        Ok(records) => fake.set_attendance_records(records),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_send_result(
    State(fake): State<FakeDingTalk>,
    Path(task_id): Path<i64>,
    body: Bytes,
) -> Response {
    match parse_body::<FakeSendResult>(&body) {
        Ok(result) => fake.set_send_result(task_id, result),
        Err(r) => return r.into_response(),
    }
    ok()
}

async fn admin_clear_send_results(State(fake): State<FakeDingTalk>) -> Response {
    fake.state().send_results.clear();
    ok()
}

#[derive(Deserialize)]
struct SendProgressBody {
    progress_in_percent: i64,
    status: i64,
}

async fn admin_send_progress(
    State(fake): State<FakeDingTalk>,
    Path(task_id): Path<i64>,
    body: Bytes,
) -> Response {
    match parse_body::<SendProgressBody>(&body) {
        Ok(b) => fake.set_send_progress(task_id, b.progress_in_percent, b.status),
        Err(r) => return r.into_response(),
    }
    ok()
}
