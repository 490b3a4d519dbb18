//! A fake DingTalk: a real HTTP server speaking the endpoints [`Client`](super::Client) calls,
//! with in-memory state, a record of every request, and knobs to make it misbehave.
//!
//! One base URL serves both the old-API paths (`/gettoken`, `/topapi/…`) and the new-API paths
//! (`/v1.0/…`), so a single fake is configured as both of the client's base URLs. It is driven
//! from Rust through [`FakeDingTalk`]'s methods, or over HTTP through the `/_fake/…` admin routes
//! (JSON in, JSON out), so curl scripts and other processes can script it too:
//!
//! | route | body | effect |
//! | --- | --- | --- |
//! | `GET /_fake/calls[?path=P]` | | recorded calls, oldest first |
//! | `DELETE /_fake/calls` | | forget recorded calls |
//! | `GET /_fake/state` | | token fetches, quota used, sent messages, … |
//! | `POST /_fake/reset` | | back to a fresh fake |
//! | `POST /_fake/faults` | [`FaultSpec`] or a list | answer the next N matching calls with it |
//! | `DELETE /_fake/faults` | | drop pending faults |
//! | `POST /_fake/delay` | `{"ms": 300, "path": "/…"?}` | answer slowly (`ms: 0` removes) |
//! | `POST /_fake/token/expire` | | the current token now answers 42001 / `InvalidAuthentication` |
//! | `POST /_fake/token/ttl` | `{"secs": 7200}` | `expires_in` of new tokens |
//! | `POST /_fake/credentials` | `{"app_key": "…", "app_secret": "…"}` | require these in gettoken |
//! | `POST /_fake/qps` | `{"limit": 20}` or `{"limit": null}` | throttle above N calls/s per path |
//! | `POST /_fake/quota` | `{"limit": 5000, "used": 0?}` | refuse metered calls beyond the quota |
//! | `POST /_fake/ban` | `{"wait": 5, "times": 1}` | answer the per-IP ban body |
//! | `POST /_fake/failed-callbacks` | `{"entries": […], "page_size": 200?}` | load the failed-push list |
//! | `POST /_fake/users` | `[{"userid", "unionid", "mobile", "name", …}]` | add users |
//! | `POST /_fake/groups` | `[{"openConversationId", "title", "coolAppCode"?, …}]` | add groups |
//! | `POST /_fake/todos` | `{"union_id": "…", "task": {"id": "…", …}}` | add a v1.0 to-do task |
//! | `POST /_fake/work-records` | `{"userid": "…", "records": […]}` | set legacy work records |
//! | `POST /_fake/attendance/update-data` | `{"userid", "work_date", "result"}` | `getupdatedata` answer |
//! | `POST /_fake/attendance/list` | `[records]` | `attendance/list` data (replaces all) |
//! | `POST /_fake/attendance/list/users` | `{"user_ids": […], "records": […]}` | each user's `attendance/list` data becomes a copy of `records` |
//! | `POST /_fake/attendance/records` | `[records]` | `attendance/listRecord` data |
//! | `POST /_fake/send-results/{task_id}` | [`FakeSendResult`] | what `getsendresult` reports |

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::client::TOKEN_HEADER;

/// Oldest calls are forgotten beyond this many, so a long benchmark cannot exhaust memory.
const MAX_RECORDED_CALLS: usize = 100_000;
/// DingTalk's page size for the failed-push list.
const DEFAULT_FAILED_PAGE_SIZE: usize = 200;

/// One request the fake received.
#[derive(Clone, Debug, Serialize)]
pub struct RecordedCall {
    /// Arrival order, from 1.
    pub seq: u64,
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Query parameters (`access_token` included: the fake's tokens are not secrets).
    pub query: BTreeMap<String, String>,
    /// The `x-acs-dingtalk-access-token` header.
    pub token_header: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body: parsed JSON, a string if it was not JSON, absent if empty.
    pub body: Option<Value>,
    /// Milliseconds since the fake started.
    pub at_ms: f64,
    /// Arrival time, for sliding-window checks in tests.
    #[serde(skip)]
    pub at: Instant,
    /// HTTP status answered (absent while the answer is pending).
    pub status: Option<u16>,
    /// `errcode` (old API) or `code` (new API) answered, `"0"` / `"ok"` on success.
    pub answer_code: Option<String>,
}

/// A canned failure for the next `times` matching calls.
///
/// What is answered: `body` as is if given; else `{errcode, errmsg}` if `errcode` is given; else
/// `{code, message, requestid}` if `code` is given; else an empty body. `status` defaults to 200
/// for `body`/`errcode`, 403 for `Forbidden…` codes, 400 for other codes and 500 for an empty body.
/// Without `path` a fault matches any path except `/gettoken`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct FaultSpec {
    /// Only calls to this path.
    pub path: Option<String>,
    /// How many calls get it (0 is treated as 1).
    pub times: u32,
    /// HTTP status.
    pub status: Option<u16>,
    /// Old-API errcode.
    pub errcode: Option<i64>,
    /// Old-API errmsg.
    pub errmsg: Option<String>,
    /// New-API code.
    pub code: Option<String>,
    /// New-API message.
    pub message: Option<String>,
    /// A raw JSON body.
    pub body: Option<Value>,
    /// Extra delay before answering, in ms.
    pub delay_ms: Option<u64>,
}

impl FaultSpec {
    /// An old-API `errcode` answer (HTTP 200), e.g. 90018, 90020, -1, 42001.
    pub fn errcode(errcode: i64) -> Self {
        FaultSpec {
            errcode: Some(errcode),
            errmsg: Some(default_errmsg(errcode).to_owned()),
            times: 1,
            ..FaultSpec::default()
        }
    }

    /// A new-API error answer, e.g. `(403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")`.
    pub fn api_code(status: u16, code: &str) -> Self {
        FaultSpec {
            status: Some(status),
            code: Some(code.to_owned()),
            message: Some(format!("fake {code}")),
            times: 1,
            ..FaultSpec::default()
        }
    }

    /// A bare HTTP status with an empty body, e.g. 502.
    pub fn http_status(status: u16) -> Self {
        FaultSpec {
            status: Some(status),
            times: 1,
            ..FaultSpec::default()
        }
    }

    /// DingTalk's per-IP ban body: `{"status": 1111, "wait": wait_secs, "punish": "deny"}`.
    pub fn ip_ban(wait_secs: u64) -> Self {
        FaultSpec {
            status: Some(403),
            body: Some(ban_body(wait_secs)),
            times: 1,
            ..FaultSpec::default()
        }
    }

    /// Applies to the next `times` matching calls.
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// Applies only to calls to `path`.
    pub fn on_path(mut self, path: &str) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    /// Answers after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(delay.as_millis() as u64);
        self
    }
}

/// What `getsendresult` reports for a task. Unset, it reports every recipient as unread.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct FakeSendResult {
    /// Users who read it.
    pub read_user_id_list: Vec<String>,
    /// Users who have not.
    pub unread_user_id_list: Vec<String>,
    /// Users refused by flow control.
    pub forbidden_user_id_list: Vec<String>,
    /// Users the send failed for.
    pub failed_user_id_list: Vec<String>,
    /// Unknown users.
    pub invalid_user_id_list: Vec<String>,
    /// Flow-control details (`{code, count, userid}`).
    pub forbidden_list: Vec<Value>,
}

/// A work notification the fake accepted.
#[derive(Clone, Debug, Serialize)]
pub struct SentMessage {
    /// The task id it answered.
    pub task_id: i64,
    /// The whole request body.
    pub request: Value,
    /// Recalled since.
    pub recalled: bool,
    /// Last status bar set with `status_bar/update`.
    pub status_bar: Option<Value>,
}

/// Handle to a fake DingTalk. Cheap to clone; clones control the same server.
#[derive(Clone)]
pub struct FakeDingTalk {
    shared: Arc<Shared>,
}

struct Shared {
    /// A std mutex: every handler computes its answer without awaiting while holding it, and
    /// sleeps (for delays) only after releasing it.
    state: Mutex<FakeState>,
    started: Instant,
}

struct FakeToken {
    value: String,
    expires_at: Instant,
}

struct FakeState {
    credentials: Option<(String, String)>,
    token: Option<FakeToken>,
    /// Tokens that were valid once: they answer "expired" rather than "invalid".
    retired_tokens: HashSet<String>,
    token_ttl: Duration,
    issued_tokens: u64,
    faults: VecDeque<FaultSpec>,
    delay: Option<Duration>,
    path_delays: HashMap<String, Duration>,
    qps_limit: Option<u32>,
    qps_windows: HashMap<String, VecDeque<Instant>>,
    quota_limit: Option<u64>,
    quota_used: u64,
    calls: VecDeque<RecordedCall>,
    next_seq: u64,
    failed_callbacks: VecDeque<Value>,
    failed_page_size: usize,
    users: Vec<Value>,
    groups: HashMap<String, Value>,
    todos: HashMap<(String, String), Value>,
    work_records: HashMap<String, Vec<Value>>,
    attendance_update: HashMap<(String, String), Value>,
    /// `attendance/list` records by `userId`.
    attendance_list: HashMap<String, Vec<Value>>,
    next_record_id: i64,
    attendance_records: Vec<Value>,
    messages: Vec<SentMessage>,
    next_task_id: i64,
    send_results: HashMap<i64, FakeSendResult>,
    robot_messages: Vec<Value>,
    next_request_id: u64,
}

impl Default for FakeState {
    fn default() -> Self {
        FakeState {
            credentials: None,
            token: None,
            retired_tokens: HashSet::new(),
            token_ttl: Duration::from_secs(7200),
            issued_tokens: 0,
            faults: VecDeque::new(),
            delay: None,
            path_delays: HashMap::new(),
            qps_limit: None,
            qps_windows: HashMap::new(),
            quota_limit: None,
            quota_used: 0,
            calls: VecDeque::new(),
            next_seq: 1,
            failed_callbacks: VecDeque::new(),
            failed_page_size: DEFAULT_FAILED_PAGE_SIZE,
            users: Vec::new(),
            groups: HashMap::new(),
            todos: HashMap::new(),
            work_records: HashMap::new(),
            attendance_update: HashMap::new(),
            attendance_list: HashMap::new(),
            next_record_id: 700_000_000_001,
            attendance_records: Vec::new(),
            messages: Vec::new(),
            next_task_id: 1001,
            send_results: HashMap::new(),
            robot_messages: Vec::new(),
            next_request_id: 1,
        }
    }
}

impl Default for FakeDingTalk {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDingTalk {
    /// A fresh fake with no users, no faults, no limits. Serve it with [`serve`].
    pub fn new() -> Self {
        FakeDingTalk {
            shared: Arc::new(Shared {
                state: Mutex::new(FakeState::default()),
                started: Instant::now(),
            }),
        }
    }

    /// Starts a fake on `127.0.0.1:0` in the current tokio runtime and returns it with its base
    /// URL (`http://127.0.0.1:PORT`, usable as both the oapi and the api base URL).
    pub async fn spawn() -> std::io::Result<(FakeDingTalk, String)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let fake = FakeDingTalk::new();
        let serving = fake.clone();
        tokio::spawn(async move {
            if let Err(err) = serve(listener, serving).await {
                tracing::error!(error = %err, "fake DingTalk stopped");
            }
        });
        Ok((fake, format!("http://{addr}")))
    }

    /// The axum router (DingTalk endpoints plus `/_fake/…` admin routes).
    pub fn router(&self) -> Router {
        Router::new()
            .nest("/_fake", admin_routes())
            .fallback(dingtalk_endpoint)
            .with_state(self.clone())
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        // A poisoned lock means a test panicked mid-update; the fake's state is still usable.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call received so far, oldest first.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state().calls.iter().cloned().collect()
    }

    /// Calls received on `path`.
    pub fn calls_to(&self, path: &str) -> Vec<RecordedCall> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// How many `/gettoken` requests arrived.
    pub fn token_fetches(&self) -> usize {
        self.calls_to("/gettoken").len()
    }

    /// Answers the next matching call(s) with `fault`. Faults are consumed in the order added.
    pub fn fail_next(&self, fault: FaultSpec) {
        self.state().faults.push_back(fault);
    }

    /// Drops pending faults.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Delays every answer (`None` removes the delay).
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.state().delay = delay;
    }

    /// Delays answers on one path (`None` removes it).
    pub fn set_path_delay(&self, path: &str, delay: Option<Duration>) {
        let mut state = self.state();
        match delay {
            Some(d) => state.path_delays.insert(path.to_owned(), d),
            None => state.path_delays.remove(path),
        };
    }

    /// Makes the current token invalid: calls carrying it answer 42001 (old API) or
    /// `InvalidAuthentication` (new API), and the next gettoken issues a new token.
    pub fn expire_token(&self) {
        let mut state = self.state();
        if let Some(token) = state.token.take() {
            state.retired_tokens.insert(token.value);
        }
    }

    /// Lifetime (`expires_in`) of tokens issued from now on.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.state().token_ttl = ttl;
    }

    /// Requires this app key and secret in gettoken (40089 otherwise). By default any
    /// non-empty pair is accepted.
    pub fn set_credentials(&self, app_key: &str, app_secret: &str) {
        self.state().credentials = Some((app_key.to_owned(), app_secret.to_owned()));
    }

    /// Throttles each path above `limit` calls in any one second, answering 90018 (old API) or
    /// 403 `Forbidden.AccessDenied.QpsLimitForAppkeyAndApi` (new API). `None` removes the limit.
    pub fn set_qps_limit(&self, limit: Option<u32>) {
        let mut state = self.state();
        state.qps_limit = limit;
        state.qps_windows.clear();
    }

    /// Refuses metered calls once `limit` were served this "month", answering 90020 (old API) or
    /// 403 `Forbidden.AccessDenied.ApiCountLimitForOrg` (new API). `None` removes the quota.
    pub fn set_monthly_quota(&self, limit: Option<u64>) {
        self.state().quota_limit = limit;
    }

    /// Sets the metered calls served so far.
    pub fn set_quota_used(&self, used: u64) {
        self.state().quota_used = used;
    }

    /// Metered calls served (gettoken and getbymobile are free, as on DingTalk).
    pub fn quota_used(&self) -> u64 {
        self.state().quota_used
    }

    /// Answers the next `times` calls with the per-IP ban body.
    pub fn ban_next(&self, wait_secs: u64, times: u32) {
        self.fail_next(FaultSpec::ip_ban(wait_secs).times(times));
    }

    /// Appends entries to the failed-push list. Each read of
    /// `/call_back/get_call_back_failed_result` returns (and removes) the next page.
    pub fn load_failed_callbacks(&self, entries: Vec<Value>) {
        self.state().failed_callbacks.extend(entries);
    }

    /// Entries per failed-push page (DingTalk: 200).
    pub fn set_failed_page_size(&self, page_size: usize) {
        self.state().failed_page_size = page_size.max(1);
    }

    /// Entries still in the failed-push list.
    pub fn failed_callbacks_left(&self) -> usize {
        self.state().failed_callbacks.len()
    }

    /// Adds a user: an object with `userid` and optionally `unionid`, `mobile`, `name`, … The
    /// whole object is what `topapi/v2/user/get` answers.
    pub fn add_user(&self, user: Value) {
        self.state().users.push(user);
    }

    /// Adds a group for `sceneGroups/query`: an object with `openConversationId`, `title`, …
    /// If it has a `coolAppCode`, robot sends to it must carry the same one.
    pub fn add_group(&self, group: Value) {
        if let Some(id) = group.get("openConversationId").and_then(Value::as_str) {
            let id = id.to_owned();
            self.state().groups.insert(id, group);
        }
    }

    /// Adds a v1.0 to-do task (an object with `id`) for the user `union_id`.
    pub fn add_todo_task(&self, union_id: &str, task: Value) {
        if let Some(id) = task.get("id").and_then(Value::as_str) {
            let key = (union_id.to_owned(), id.to_owned());
            self.state().todos.insert(key, task);
        }
    }

    /// A to-do task as it is now (after any PUT).
    pub fn todo_task(&self, union_id: &str, task_id: &str) -> Option<Value> {
        let key = (union_id.to_owned(), task_id.to_owned());
        self.state().todos.get(&key).cloned()
    }

    /// Sets a user's legacy work records (objects with `record_id`, `title`, `status` 0/1, …).
    pub fn set_work_records(&self, userid: &str, records: Vec<Value>) {
        self.state().work_records.insert(userid.to_owned(), records);
    }

    /// A user's legacy work records as they are now.
    pub fn work_records(&self, userid: &str) -> Vec<Value> {
        self.state()
            .work_records
            .get(userid)
            .cloned()
            .unwrap_or_default()
    }

    /// Sets what `getupdatedata` answers for a user and day (`"yyyy-MM-dd"`).
    pub fn set_attendance_update_data(&self, userid: &str, work_date: &str, result: Value) {
        let key = (userid.to_owned(), work_date.to_owned());
        self.state().attendance_update.insert(key, result);
    }

    /// Sets the records `attendance/list` pages through (all users' at once). Each needs a
    /// `userId` and a `workDate` (epoch ms of the day's midnight at +08:00), like DingTalk's.
    pub fn set_attendance_list(&self, records: Vec<Value>) {
        let mut by_user: HashMap<String, Vec<Value>> = HashMap::new();
        for record in records {
            if let Some(user) = record.get("userId").and_then(Value::as_str) {
                by_user.entry(user.to_owned()).or_default().push(record);
            }
        }
        self.state().attendance_list = by_user;
    }

    /// Gives each of `user_ids` a copy of `records` as its `attendance/list` data, replacing
    /// what it had: many users in one cheap step. Each copy gets the user's `userId` and, if
    /// the template has none, an `id` of its own (DingTalk's ids are unique). Users never given
    /// any records have none (`attendance/list` answers nothing for them).
    pub fn set_attendance_list_for_users(&self, user_ids: &[String], records: &[Value]) {
        let mut state = self.state();
        for user in user_ids {
            let mut copies = Vec::with_capacity(records.len());
            for record in records {
                let mut record = record.clone();
                if let Some(obj) = record.as_object_mut() {
                    obj.insert("userId".into(), json!(user));
                    if !obj.contains_key("id") {
                        obj.insert("id".into(), json!(state.next_record_id));
                        state.next_record_id += 1;
                    }
                }
                copies.push(record);
            }
            state.attendance_list.insert(user.clone(), copies);
        }
    }

    /// Sets the records `attendance/listRecord` returns (filtered by `userId`).
    pub fn set_attendance_records(&self, records: Vec<Value>) {
        self.state().attendance_records = records;
    }

    /// Sets what `getsendresult` reports for `task_id`.
    pub fn set_send_result(&self, task_id: i64, result: FakeSendResult) {
        self.state().send_results.insert(task_id, result);
    }

    /// Work notifications accepted so far.
    pub fn sent_messages(&self) -> Vec<SentMessage> {
        self.state().messages.clone()
    }

    /// Robot group messages accepted so far (request bodies).
    pub fn robot_messages(&self) -> Vec<Value> {
        self.state().robot_messages.clone()
    }

    /// Back to a fresh fake (recorded calls included).
    pub fn reset(&self) {
        *self.state() = FakeState::default();
    }

    fn summary(&self) -> Value {
        let state = self.state();
        json!({
            "token_fetches": state.calls.iter().filter(|c| c.path == "/gettoken").count(),
            "tokens_issued": state.issued_tokens,
            "quota_used": state.quota_used,
            "quota_limit": state.quota_limit,
            "qps_limit": state.qps_limit,
            "pending_faults": state.faults.len(),
            "failed_callbacks_left": state.failed_callbacks.len(),
            "sent_messages": state.messages,
            "robot_messages": state.robot_messages,
            "calls_recorded": state.calls.len(),
        })
    }
}

/// Serves `fake` on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: TcpListener, fake: FakeDingTalk) -> std::io::Result<()> {
    axum::serve(listener, fake.router()).await
}

/// Binds `listen` and serves a fresh fake until Ctrl-C: what `dinghook fake-dingtalk --listen`
/// runs.
pub async fn run(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "fake DingTalk listening; point both base URLs at http://{addr}");
    axum::serve(listener, FakeDingTalk::new().router())
        .with_graceful_shutdown(crate::app::shutdown_signal())
        .await
}

// ---------------------------------------------------------------------------------------------
// The DingTalk side.

/// What to answer: status, JSON body (or nothing), and an optional delay before answering.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    delay: Option<Duration>,
}

impl Reply {
    fn json(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
            delay: None,
        }
    }

    fn answer_code(&self) -> Option<String> {
        let body = self.body.as_ref()?;
        if let Some(errcode) = body.get("errcode") {
            return Some(errcode.to_string());
        }
        if let Some(code) = body.get("code").and_then(Value::as_str) {
            return Some(code.to_owned());
        }
        if body.get("status").and_then(Value::as_i64) == Some(1111) {
            return Some("1111".into());
        }
        self.status.is_success().then(|| "ok".to_owned())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Old,
    New,
}

fn family_of(path: &str) -> Family {
    if path.starts_with("/v1.0/") {
        Family::New
    } else {
        Family::Old
    }
}

/// Calls DingTalk does not count toward the monthly quota.
fn is_metered(path: &str) -> bool {
    !matches!(path, "/gettoken" | "/topapi/v2/user/getbymobile")
}

fn default_errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "系统繁忙",
        40001 => "Secret错误或access_token无效",
        40014 => "不合法的access_token",
        42001 => "access_token超时",
        90002 => "应用调用该接口的并发量超过限制",
        90018 => "当前应用调用该接口的并发量超过限制",
        90020 => "当前企业调用接口次数已达到上限",
        _ => "fake error",
    }
}

fn ban_body(wait_secs: u64) -> Value {
    json!({"status": 1111, "wait": wait_secs, "punish": "deny", "msg": "fake per-IP ban"})
}

enum Route {
    AsyncSend,
    SendProgress,
    SendResult,
    StatusBar,
    Recall,
    RobotSend,
    GroupQuery,
    AttendanceUpdate,
    AttendanceList,
    AttendanceListRecord,
    TodoGet { union_id: String, task_id: String },
    TodoPut { union_id: String, task_id: String },
    WorkRecordUpdate,
    WorkRecordGet,
    UserByMobile,
    UserGet,
    UserByUnionId,
    FailedCallbacks,
}

/// Maps method + path to an endpoint; a known path with the wrong method is a 405, an unknown
/// path a 404, both of which a test will notice.
fn route(method: &Method, path: &str) -> Result<Route, Reply> {
    let post_only = |route: Route| {
        if method == Method::POST {
            Ok(route)
        } else {
            Err(Reply::json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"errcode": 405, "errmsg": "method not allowed"}),
            ))
        }
    };
    match path {
        "/topapi/message/corpconversation/asyncsend_v2" => post_only(Route::AsyncSend),
        "/topapi/message/corpconversation/getsendprogress" => post_only(Route::SendProgress),
        "/topapi/message/corpconversation/getsendresult" => post_only(Route::SendResult),
        "/topapi/message/corpconversation/status_bar/update" => post_only(Route::StatusBar),
        "/topapi/message/corpconversation/recall" => post_only(Route::Recall),
        "/v1.0/robot/groupMessages/send" => post_only(Route::RobotSend),
        "/v1.0/im/sceneGroups/query" => post_only(Route::GroupQuery),
        "/topapi/attendance/getupdatedata" => post_only(Route::AttendanceUpdate),
        "/attendance/list" => post_only(Route::AttendanceList),
        "/attendance/listRecord" => post_only(Route::AttendanceListRecord),
        "/topapi/workrecord/update" => post_only(Route::WorkRecordUpdate),
        "/topapi/workrecord/getbyuserid" => post_only(Route::WorkRecordGet),
        "/topapi/v2/user/getbymobile" => post_only(Route::UserByMobile),
        "/topapi/v2/user/get" => post_only(Route::UserGet),
        "/topapi/user/getbyunionid" => post_only(Route::UserByUnionId),
        "/call_back/get_call_back_failed_result" if method == Method::GET => {
            Ok(Route::FailedCallbacks)
        }
        _ => {
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            if let ["v1.0", "todo", "users", union_id, "tasks", task_id] = segments.as_slice() {
                let union_id = decode_segment(union_id);
                let task_id = decode_segment(task_id);
                if *method == Method::GET {
                    return Ok(Route::TodoGet { union_id, task_id });
                }
                if *method == Method::PUT {
                    return Ok(Route::TodoPut { union_id, task_id });
                }
                return Err(Reply::json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({"code": "MethodNotAllowed", "message": "method not allowed"}),
                ));
            }
            Err(Reply::json(
                StatusCode::NOT_FOUND,
                json!({"errcode": 404, "errmsg": format!("fake DingTalk has no {path}")}),
            ))
        }
    }
}

fn decode_segment(segment: &str) -> String {
    // Percent-decoding through the URL parser keeps us from adding a dependency for it.
    reqwest::Url::parse(&format!("http://x/?v={segment}"))
        .ok()
        .and_then(|u| u.query_pairs().next().map(|(_, v)| v.into_owned()))
        .unwrap_or_else(|| segment.to_owned())
}

fn parse_query(uri: &Uri) -> BTreeMap<String, String> {
    let Some(query) = uri.query() else {
        return BTreeMap::new();
    };
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn dingtalk_endpoint(
    State(fake): State<FakeDingTalk>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let path = uri.path().to_owned();
    let query = parse_query(&uri);
    let body = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
        )
    };
    let token_header = header(&headers, TOKEN_HEADER);
    let (seq, delay) = {
        let mut state = fake.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        if state.calls.len() >= MAX_RECORDED_CALLS {
            state.calls.pop_front();
        }
        state.calls.push_back(RecordedCall {
            seq,
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            token_header: token_header.clone(),
            user_agent: header(&headers, "user-agent"),
            content_type: header(&headers, "content-type"),
            body: body.clone(),
            at_ms: (arrived - fake.shared.started).as_secs_f64() * 1000.0,
            at: arrived,
            status: None,
            answer_code: None,
        });
        let delay = state.path_delays.get(&path).copied().or(state.delay);
        (seq, delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let reply = {
        let mut state = fake.state();
        let reply = state.respond(
            Instant::now(),
            &method,
            &path,
            &query,
            token_header.as_deref(),
            body.as_ref(),
        );
        let answer_code = reply.answer_code();
        if let Some(call) = state.calls.iter_mut().rev().find(|c| c.seq == seq) {
            call.status = Some(reply.status.as_u16());
            call.answer_code = answer_code;
        }
        reply
    };
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let request_id = format!("fake-req-{seq}");
    let mut response = match reply.body {
        Some(body) => (reply.status, axum::Json(body)).into_response(),
        None => reply.status.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-acs-request-id", value);
    }
    response
}

fn str_field<'a>(body: Option<&'a Value>, key: &str) -> Option<&'a str> {
    body?.get(key)?.as_str()
}

fn i64_field(body: Option<&Value>, key: &str) -> Option<i64> {
    body?.get(key)?.as_i64()
}

impl FakeState {
    fn request_id(&mut self) -> String {
        let id = self.next_request_id;
        self.next_request_id += 1;
        format!("fake-{id:08}")
    }

    fn old_ok(&mut self, fields: Value) -> Reply {
        let mut body = Map::new();
        body.insert("errcode".into(), json!(0));
        body.insert("errmsg".into(), json!("ok"));
        if let Value::Object(fields) = fields {
            body.extend(fields);
        }
        body.insert("request_id".into(), json!(self.request_id()));
        Reply::json(StatusCode::OK, Value::Object(body))
    }

    fn old_err(&mut self, errcode: i64, errmsg: &str) -> Reply {
        let request_id = self.request_id();
        Reply::json(
            StatusCode::OK,
            json!({"errcode": errcode, "errmsg": errmsg, "request_id": request_id}),
        )
    }

    fn new_err(&mut self, status: StatusCode, code: &str, message: &str) -> Reply {
        let request_id = self.request_id();
        Reply::json(
            status,
            json!({"code": code, "message": message, "requestid": request_id}),
        )
    }

    /// The answer to one DingTalk call. Runs under the state lock, without awaiting.
    fn respond(
        &mut self,
        now: Instant,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        token_header: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let family = family_of(path);
        if let Some(reply) = self.take_fault(path) {
            return reply;
        }
        if path == "/gettoken" {
            return self.gettoken(now, method, query);
        }
        let route = match route(method, path) {
            Ok(route) => route,
            Err(reply) => return reply,
        };
        let token = match family {
            Family::Old => query.get("access_token").map(String::as_str),
            Family::New => token_header,
        };
        if let Some(reply) = self.check_token(now, family, token) {
            return reply;
        }
        if let Some(reply) = self.throttle(now, family, path) {
            return reply;
        }
        if is_metered(path) {
            if let Some(limit) = self.quota_limit {
                if self.quota_used >= limit {
                    let message = format!(
                        "当前企业调用接口次数已达到上限, 次数:{}, 额度:{limit}",
                        self.quota_used
                    );
                    return match family {
                        Family::Old => self.old_err(90020, &message),
                        Family::New => self.new_err(
                            StatusCode::FORBIDDEN,
                            "Forbidden.AccessDenied.ApiCountLimitForOrg",
                            &message,
                        ),
                    };
                }
            }
            self.quota_used += 1;
        }
        self.handle(route, query, body)
    }

    fn take_fault(&mut self, path: &str) -> Option<Reply> {
        let index = self.faults.iter().position(|f| match &f.path {
            Some(p) => p == path,
            None => path != "/gettoken",
        })?;
        let fault = {
            let fault = self.faults.get_mut(index)?;
            fault.times = fault.times.saturating_sub(1);
            fault.clone()
        };
        if fault.times == 0 {
            self.faults.remove(index);
        }
        let delay = fault.delay_ms.map(Duration::from_millis);
        let status = |default: u16| {
            fault
                .status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::from_u16(default).unwrap_or(StatusCode::OK))
        };
        let mut reply = if let Some(body) = fault.body.clone() {
            Reply::json(status(200), body)
        } else if let Some(errcode) = fault.errcode {
            let errmsg = fault
                .errmsg
                .clone()
                .unwrap_or_else(|| default_errmsg(errcode).to_owned());
            let mut reply = self.old_err(errcode, &errmsg);
            reply.status = status(200);
            reply
        } else if let Some(code) = fault.code.clone() {
            let default = if code.starts_with("Forbidden") {
                403
            } else {
                400
            };
            let message = fault.message.clone().unwrap_or_else(|| code.clone());
            self.new_err(status(default), &code, &message)
        } else {
            Reply {
                status: status(500),
                body: None,
                delay: None,
            }
        };
        reply.delay = delay;
        Some(reply)
    }

    fn gettoken(
        &mut self,
        now: Instant,
        method: &Method,
        query: &BTreeMap<String, String>,
    ) -> Reply {
        if *method != Method::GET {
            return Reply::json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"errcode": 405, "errmsg": "gettoken is a GET"}),
            );
        }
        let key = query.get("appkey").map(String::as_str).unwrap_or("");
        let secret = query.get("appsecret").map(String::as_str).unwrap_or("");
        let accepted = match &self.credentials {
            Some((k, s)) => k == key && s == secret,
            None => !key.is_empty() && !secret.is_empty(),
        };
        if !accepted {
            return self.old_err(40089, "不合法的appKey或appSecret");
        }
        let ttl = self.token_ttl;
        // Like DingTalk: asking again while the token is valid returns it with a fresh lifetime.
        let value = match &mut self.token {
            Some(token) if now < token.expires_at => {
                token.expires_at = now + ttl;
                token.value.clone()
            }
            _ => {
                if let Some(old) = self.token.take() {
                    self.retired_tokens.insert(old.value);
                }
                self.issued_tokens += 1;
                let value = format!(
                    "fake-token-{}-{}",
                    self.issued_tokens,
                    uuid::Uuid::new_v4().simple()
                );
                self.token = Some(FakeToken {
                    value: value.clone(),
                    expires_at: now + ttl,
                });
                value
            }
        };
        self.old_ok(json!({"access_token": value, "expires_in": ttl.as_secs()}))
    }

    fn check_token(&mut self, now: Instant, family: Family, token: Option<&str>) -> Option<Reply> {
        let valid = match (&self.token, token) {
            (Some(current), Some(given)) => current.value == given && now < current.expires_at,
            _ => false,
        };
        if valid {
            return None;
        }
        let expired = token.is_some_and(|t| {
            self.retired_tokens.contains(t) || self.token.as_ref().is_some_and(|c| c.value == t)
        });
        Some(match (family, expired) {
            (Family::Old, true) => self.old_err(42001, "access_token超时"),
            (Family::Old, false) => self.old_err(40014, "不合法的access_token"),
            (Family::New, _) => self.new_err(
                StatusCode::BAD_REQUEST,
                "InvalidAuthentication",
                "不合法的access_token",
            ),
        })
    }

    fn throttle(&mut self, now: Instant, family: Family, path: &str) -> Option<Reply> {
        let limit = self.qps_limit? as usize;
        let window = self.qps_windows.entry(path.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() < limit {
            window.push_back(now);
            return None;
        }
        Some(match family {
            Family::Old => self.old_err(90018, default_errmsg(90018)),
            Family::New => self.new_err(
                StatusCode::FORBIDDEN,
                "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                "QPS limit exceeded",
            ),
        })
    }

    fn handle(
        &mut self,
        route: Route,
        _query: &BTreeMap<String, String>,
        body: Option<&Value>,
    ) -> Reply {
        match route {
            Route::AsyncSend => self.async_send(body),
            Route::SendProgress => match self.task_of(body, "task_id") {
                Ok(_) => {
                    self.old_ok(json!({"progress": {"progress_in_percent": 100, "status": 2}}))
                }
                Err(reply) => reply,
            },
            Route::SendResult => match self.task_of(body, "task_id") {
                Ok(index) => {
                    let task_id = self.messages[index].task_id;
                    let result = match self.send_results.get(&task_id) {
                        Some(result) => result.clone(),
                        None => FakeSendResult {
                            unread_user_id_list: split_commas(str_field(
                                Some(&self.messages[index].request),
                                "userid_list",
                            )),
                            ..FakeSendResult::default()
                        },
                    };
                    self.old_ok(json!({"send_result": result}))
                }
                Err(reply) => reply,
            },
            Route::StatusBar => match self.task_of(body, "task_id") {
                Ok(index) => {
                    let is_oa = self.messages[index].request["msg"]["msgtype"] == "oa";
                    match str_field(body, "status_value") {
                        Some(_) if is_oa => {
                            self.messages[index].status_bar = body.cloned();
                            self.old_ok(json!({}))
                        }
                        Some(_) => self.old_err(41052, "only OA messages have a status bar"),
                        None => self.old_err(40035, "缺少参数 status_value"),
                    }
                }
                Err(reply) => reply,
            },
            Route::Recall => match self.task_of(body, "msg_task_id") {
                Ok(index) => {
                    self.messages[index].recalled = true;
                    self.old_ok(json!({}))
                }
                Err(reply) => reply,
            },
            Route::RobotSend => self.robot_send(body),
            Route::GroupQuery => {
                let Some(id) = str_field(body, "openConversationId") else {
                    return self.new_err(
                        StatusCode::BAD_REQUEST,
                        "MissingopenConversationId",
                        "openConversationId is mandatory",
                    );
                };
                match self.groups.get(id).cloned() {
                    Some(mut group) => {
                        if let Some(obj) = group.as_object_mut() {
                            obj.insert("success".into(), json!(true));
                            obj.remove("coolAppCode");
                        }
                        Reply::json(StatusCode::OK, group)
                    }
                    None => self.new_err(
                        StatusCode::BAD_REQUEST,
                        "invalid.openConversationId",
                        "群不存在",
                    ),
                }
            }
            Route::AttendanceUpdate => {
                let (Some(userid), Some(work_date)) =
                    (str_field(body, "userid"), str_field(body, "work_date"))
                else {
                    return self.old_err(40035, "缺少参数 userid 或 work_date");
                };
                let key = (userid.to_owned(), work_date.to_owned());
                let result = self.attendance_update.get(&key).cloned().unwrap_or_else(|| {
                    json!({"work_date": work_date, "userid": userid, "attendance_result_list": [],
                           "check_record_list": [], "approve_list": []})
                });
                self.old_ok(json!({"result": result}))
            }
            Route::AttendanceList => self.attendance_list(body),
            Route::AttendanceListRecord => {
                let (Some(users), Some(_), Some(_)) = (
                    body.and_then(|b| b.get("userIds"))
                        .and_then(Value::as_array),
                    str_field(body, "checkDateFrom"),
                    str_field(body, "checkDateTo"),
                ) else {
                    return self.old_err(40035, "缺少参数 userIds, checkDateFrom 或 checkDateTo");
                };
                let records: Vec<Value> = self
                    .attendance_records
                    .iter()
                    .filter(|r| users.contains(&r["userId"]))
                    .cloned()
                    .collect();
                self.old_ok(json!({"recordresult": records}))
            }
            Route::TodoGet { union_id, task_id } => {
                match self.todos.get(&(union_id, task_id)).cloned() {
                    Some(mut task) => {
                        let request_id = self.request_id();
                        if let Some(obj) = task.as_object_mut() {
                            obj.insert("requestId".into(), json!(request_id));
                        }
                        Reply::json(StatusCode::OK, task)
                    }
                    None => self.new_err(StatusCode::NOT_FOUND, "taskNotExist", "待办不存在"),
                }
            }
            Route::TodoPut { union_id, task_id } => {
                let Some(Value::Object(changes)) = body else {
                    return self.new_err(
                        StatusCode::BAD_REQUEST,
                        "todo.taskUpdate.paramError",
                        "body must be an object",
                    );
                };
                const UPDATABLE: [&str; 6] = [
                    "subject",
                    "description",
                    "dueTime",
                    "done",
                    "executorIds",
                    "participantIds",
                ];
                if let Some(unknown) = changes.keys().find(|k| !UPDATABLE.contains(&k.as_str())) {
                    let message = format!("unknown field {unknown}");
                    return self.new_err(
                        StatusCode::BAD_REQUEST,
                        "todo.taskUpdate.paramError",
                        &message,
                    );
                }
                match self.todos.get_mut(&(union_id, task_id)) {
                    Some(Value::Object(task)) => {
                        for (key, value) in changes {
                            task.insert(key.clone(), value.clone());
                        }
                        Reply::json(StatusCode::OK, json!({"result": true}))
                    }
                    _ => self.new_err(StatusCode::NOT_FOUND, "taskNotExist", "待办不存在"),
                }
            }
            Route::WorkRecordUpdate => {
                let (Some(userid), Some(record_id)) =
                    (str_field(body, "userid"), str_field(body, "record_id"))
                else {
                    return self.old_err(40035, "缺少参数 userid 或 record_id");
                };
                let found = self
                    .work_records
                    .get_mut(userid)
                    .and_then(|records| records.iter_mut().find(|r| r["record_id"] == record_id));
                match found {
                    Some(record) => {
                        record["status"] = json!(1);
                        self.old_ok(json!({"result": true}))
                    }
                    None => self.old_err(400002, "待办不存在"),
                }
            }
            Route::WorkRecordGet => {
                let (Some(userid), Some(offset), Some(limit), Some(status)) = (
                    str_field(body, "userid"),
                    i64_field(body, "offset"),
                    i64_field(body, "limit"),
                    i64_field(body, "status"),
                ) else {
                    return self.old_err(40035, "缺少参数 userid, offset, limit 或 status");
                };
                if !(1..=50).contains(&limit) || offset < 0 {
                    return self.old_err(40035, "limit must be 1..=50");
                }
                let matching: Vec<Value> = self
                    .work_records
                    .get(userid)
                    .map(|records| {
                        records
                            .iter()
                            .filter(|r| r["status"].as_i64().unwrap_or(0) == status)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let (page, has_more) = paginate(&matching, offset as usize, limit as usize);
                self.old_ok(json!({"records": {"has_more": has_more, "list": page}}))
            }
            Route::UserByMobile => {
                let Some(mobile) = str_field(body, "mobile") else {
                    return self.old_err(40035, "缺少参数 mobile");
                };
                match self.users.iter().find(|u| u["mobile"] == mobile) {
                    Some(user) => {
                        let userid = user["userid"].clone();
                        self.old_ok(json!({"result": {"userid": userid}}))
                    }
                    None => self.old_err(60121, "找不到该用户"),
                }
            }
            Route::UserGet => {
                let Some(userid) = str_field(body, "userid") else {
                    return self.old_err(40035, "缺少参数 userid");
                };
                match self.users.iter().find(|u| u["userid"] == userid).cloned() {
                    Some(user) => self.old_ok(json!({"result": user})),
                    None => self.old_err(60121, "找不到该用户"),
                }
            }
            Route::UserByUnionId => {
                let Some(unionid) = str_field(body, "unionid") else {
                    return self.old_err(40035, "缺少参数 unionid");
                };
                match self.users.iter().find(|u| u["unionid"] == unionid) {
                    Some(user) => {
                        let userid = user["userid"].clone();
                        self.old_ok(json!({"result": {"contact_type": 0, "userid": userid}}))
                    }
                    None => self.old_err(60121, "找不到该用户"),
                }
            }
            Route::FailedCallbacks => {
                let take = self.failed_page_size.min(self.failed_callbacks.len());
                // Reading a page deletes it, as on DingTalk.
                let page: Vec<Value> = self.failed_callbacks.drain(..take).collect();
                let has_more = !self.failed_callbacks.is_empty();
                self.old_ok(json!({"has_more": has_more, "failed_list": page}))
            }
        }
    }

    fn async_send(&mut self, body: Option<&Value>) -> Reply {
        if i64_field(body, "agent_id").is_none() {
            return self.old_err(40035, "缺少参数 agent_id (a number)");
        }
        for list in ["userid_list", "dept_id_list"] {
            if body
                .and_then(|b| b.get(list))
                .is_some_and(|v| !v.is_string())
            {
                let message = format!("{list} must be a comma-separated string");
                return self.old_err(40035, &message);
            }
        }
        let to_all = body
            .and_then(|b| b.get("to_all_user"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !to_all
            && str_field(body, "userid_list").is_none()
            && str_field(body, "dept_id_list").is_none()
        {
            return self.old_err(
                40035,
                "no receivers: userid_list, dept_id_list or to_all_user",
            );
        }
        let msg = body.and_then(|b| b.get("msg"));
        let msgtype = msg.and_then(|m| m.get("msgtype")).and_then(Value::as_str);
        const TYPES: [&str; 8] = [
            "text",
            "markdown",
            "link",
            "action_card",
            "oa",
            "image",
            "voice",
            "file",
        ];
        let well_formed = match msgtype {
            Some(t) if TYPES.contains(&t) => {
                msg.and_then(|m| m.get(t)).is_some_and(Value::is_object)
            }
            _ => false,
        };
        if !well_formed {
            return self.old_err(40035, "msg must be {msgtype, <msgtype>: {...}}");
        }
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        self.messages.push(SentMessage {
            task_id,
            request: body.cloned().unwrap_or(Value::Null),
            recalled: false,
            status_bar: None,
        });
        self.old_ok(json!({"task_id": task_id}))
    }

    /// Finds the work notification named by `body[key]`; answers 400002 if there is none.
    fn task_of(&mut self, body: Option<&Value>, key: &str) -> Result<usize, Reply> {
        if i64_field(body, "agent_id").is_none() {
            return Err(self.old_err(40035, "缺少参数 agent_id"));
        }
        let task_id = i64_field(body, key);
        match self
            .messages
            .iter()
            .position(|m| Some(m.task_id) == task_id)
        {
            Some(index) => Ok(index),
            None => Err(self.old_err(400002, "无效的agentId或taskId")),
        }
    }

    fn robot_send(&mut self, body: Option<&Value>) -> Reply {
        for field in ["robotCode", "openConversationId", "msgKey"] {
            if str_field(body, field).is_none() {
                let message = format!("{field} is mandatory");
                return self.new_err(
                    StatusCode::BAD_REQUEST,
                    &format!("Missing{field}"),
                    &message,
                );
            }
        }
        let param_is_json_object = str_field(body, "msgParam")
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .is_some_and(|v| v.is_object());
        if !param_is_json_object {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgParam.invalid",
                "msgParam must be a JSON object encoded as a string",
            );
        }
        let group = str_field(body, "openConversationId").and_then(|id| self.groups.get(id));
        if let Some(required) = group
            .and_then(|g| g.get("coolAppCode"))
            .and_then(Value::as_str)
        {
            if str_field(body, "coolAppCode") != Some(required) {
                return self.new_err(
                    StatusCode::BAD_REQUEST,
                    "invalidParameter.robotCode.coolApp",
                    "coolAppCode missing or wrong",
                );
            }
        }
        self.robot_messages
            .push(body.cloned().unwrap_or(Value::Null));
        let key = format!("fake-pqk-{}", self.robot_messages.len());
        Reply::json(StatusCode::OK, json!({"processQueryKey": key}))
    }

    /// Like DingTalk's: the results of the listed users (at most 50) for the work dates from
    /// `workDateFrom` to `workDateTo` (whole days, at most 7 apart), user by user in the list's
    /// order, `limit` (at most 50) from `offset`, `hasMore` while more follow. Broken limits
    /// get DingTalk's invalid-parameter errcode (40035), which the client does not retry.
    fn attendance_list(&mut self, body: Option<&Value>) -> Reply {
        let users = body
            .and_then(|b| b.get("userIdList"))
            .and_then(Value::as_array);
        let (Some(users), Some(from), Some(to), Some(offset), Some(limit)) = (
            users,
            str_field(body, "workDateFrom"),
            str_field(body, "workDateTo"),
            i64_field(body, "offset"),
            i64_field(body, "limit"),
        ) else {
            return self.old_err(
                40035,
                "缺少参数 workDateFrom, workDateTo, userIdList, offset 或 limit",
            );
        };
        if users.len() > 50 {
            let message = format!("userIdList 最多 50 个, 收到 {}", users.len());
            return self.old_err(40035, &message);
        }
        if !(1..=50).contains(&limit) || offset < 0 {
            return self.old_err(40035, "limit 必须在 1 到 50 之间, offset 不能为负");
        }
        let (start, end) = match work_date_span(from, to) {
            Ok(span) => span,
            Err(message) => return self.old_err(40035, &message),
        };
        let mut asked: Vec<&str> = Vec::new();
        for user in users {
            match user.as_str() {
                Some(u) if !asked.contains(&u) => asked.push(u),
                Some(_) => {}
                None => return self.old_err(40035, "userIdList 必须是字符串列表"),
            }
        }
        let matching: Vec<Value> = asked
            .iter()
            .filter_map(|u| self.attendance_list.get(*u))
            .flatten()
            .filter(|r| lenient_i64(&r["workDate"]).is_some_and(|d| d >= start && d < end))
            .cloned()
            .collect();
        let (page, has_more) = paginate(&matching, offset as usize, limit as usize);
        self.old_ok(json!({"recordresult": page, "hasMore": has_more}))
    }
}

fn split_commas(list: Option<&str>) -> Vec<String> {
    list.map(|l| {
        l.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// A number, or a string of digits (DingTalk writes ids and times both ways).
fn lenient_i64(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The work dates `workDateFrom` to `workDateTo` cover, as `[start, end)` in epoch ms at
/// DingTalk's +08:00: whole days, whatever the time of day given (DingTalk's examples use
/// 00:00:00). Refused like DingTalk: not `yyyy-MM-dd HH:mm:ss`, reversed, or more than 7 days
/// apart.
fn work_date_span(from: &str, to: &str) -> Result<(i64, i64), String> {
    const DAY_MS: i64 = 86_400_000;
    let china = crate::handlers::attendance::UtcOffset::CHINA;
    let day_start = |text: &str| -> Option<i64> {
        let (date, clock) = text.trim().split_once(' ')?;
        if clock.len() != 8 {
            return None;
        }
        china.parse_time(text)?;
        china.parse_time(&format!("{date} 00:00:00"))
    };
    let (Some(start), Some(last)) = (day_start(from), day_start(to)) else {
        return Err(format!(
            "workDateFrom / workDateTo 格式应为 yyyy-MM-dd HH:mm:ss: {from:?}, {to:?}"
        ));
    };
    if last < start {
        return Err("workDateTo 早于 workDateFrom".to_owned());
    }
    if last - start > 7 * DAY_MS {
        return Err("workDateFrom 与 workDateTo 最多相隔 7 天".to_owned());
    }
    Ok((start, last + DAY_MS))
}

fn paginate(items: &[Value], offset: usize, limit: usize) -> (Vec<Value>, bool) {
    let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
    let has_more = offset.saturating_add(limit) < items.len();
    (page, has_more)
}

// ---------------------------------------------------------------------------------------------
// The admin side: `/_fake/...`.

fn admin_routes() -> Router<FakeDingTalk> {
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
        .route("/todos", post(admin_todos))
        .route("/work-records", post(admin_work_records))
        .route("/attendance/update-data", post(admin_attendance_update))
        .route("/attendance/list", post(admin_attendance_list))
        .route("/attendance/list/users", post(admin_attendance_list_users))
        .route("/attendance/records", post(admin_attendance_records))
        .route("/send-results/{task_id}", post(admin_send_result))
        .route("/send-results", delete(admin_clear_send_results))
}

/// An admin body that is not the JSON expected.
struct BadBody(String);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        let body = json!({"error": format!("bad JSON body: {}", self.0)});
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
}

/// Parses an admin body without insisting on a `Content-Type`, so `curl -d` works as is.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, BadBody> {
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
    wait: u64,
    #[serde(default = "one")]
    times: u32,
}

fn one() -> u32 {
    1
}

async fn admin_ban(State(fake): State<FakeDingTalk>, body: Bytes) -> Response {
    match parse_body::<BanBody>(&body) {
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
