//! A fake DingTalk: a real HTTP server speaking the DingTalk endpoints dinghook's client calls,
//! with in-memory state, a record of every request, and knobs to make it misbehave.
//!
//! It shares no code with dinghook: only HTTP and JSON pass between them, so a client that
//! gets DingTalk's protocol wrong (a header name, a field) fails against it. Run it with the
//! `fake-dingtalk` binary (`--listen 127.0.0.1:9000`) or start one in a test with
//! [`FakeDingTalk::spawn`].
//!
//! One base URL serves both the old-API paths (`/gettoken`, `/topapi/…`) and the new-API paths
//! (`/v1.0/…`, Stream's `connections/open` included, and its `/connect` WebSocket), so a single fake is configured as both of the client's base URLs. It is driven
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
//! | `POST /_fake/ban` | `{"wait": 5, "times": 1, "html": false}` | answer the per-IP ban: the `{"status": 1111, …}` body, or (`html: true`) an HTML page |
//! | `POST /_fake/failed-callbacks` | `{"entries": […], "page_size": 200?}` | load the failed-push list |
//! | `POST /_fake/users` | `[{"userid", "unionid", "mobile", "name", …}]` | add users |
//! | `POST /_fake/groups` | `[{"openConversationId", "title", "coolAppCode"?, …}]` | add groups |
//! | `POST /_fake/templates` | `["tpl-1", …]` or `[{"template_id": "tpl-1"}, …]` | group templates `sceneGroup/create` accepts (none until registered) |
//! | `POST /_fake/todos` | `{"union_id": "…", "task": {"id": "…", …}}` | add a v1.0 to-do task |
//! | `POST /_fake/work-records` | `{"userid": "…", "records": […]}` | set legacy work records |
//! | `POST /_fake/attendance/update-data` | `{"userid", "work_date", "result"}` | `getupdatedata` answer |
//! | `POST /_fake/attendance/list` | `[records]` | `attendance/list` data (replaces all) |
//! | `POST /_fake/attendance/list/users` | `{"user_ids": […], "records": […]}` | each user's `attendance/list` data becomes a copy of `records` |
//! | `POST /_fake/attendance/records` | `[records]` | `attendance/listRecord` data |
//! | `POST /_fake/send-results/{task_id}` | [`FakeSendResult`] | what `getsendresult` reports |
//! | `POST /_fake/robot/sessions` | `{"expires_at": ms?}` | a robot session webhook (`{base}/robot/sendBySession?session=…`, valid 90 minutes unless `expires_at` says otherwise); answers `{"session_webhook", "expires_at"}` |
//! | `POST /_fake/send-progress/{task_id}` | `{"progress_in_percent": 40, "status": 1}` | what `getsendprogress` reports (sends are done at once unless set); `status_bar/update` answers 41052 until `status` is 2 |
//!
//! It speaks Stream mode too (module `stream`): `POST /v1.0/gateway/connections/open` checks
//! `clientId`/`clientSecret` like gettoken checks the app key and secret (401 `authFailed`;
//! 400 for a malformed body) and answers `{"endpoint": "ws://HOST/connect", "ticket"}`; the
//! ticket opens one WebSocket (`GET /connect?ticket=…`) within `ticket_ttl_ms`, else 401
//! before the upgrade. Messages wait in a queue shared by the connections and go round-robin
//! to those subscribed with room in their window. Routes that take `connection` act on that
//! open connection (404 if it is not) or, without it, on every open one:
//!
//! | route | body | effect |
//! | --- | --- | --- |
//! | `GET /_fake/stream/state[?frames=false]` | | [`StreamReport`]: tickets, connections, frames sent, acks by outcome, eventIds acknowledged `SUCCESS`, pings echoed, bad acks, … |
//! | `POST /_fake/stream/settings` | any of [`StreamSettings`]' fields | `ticket_ttl_ms`, `window`, `ack_timeout_ms`, `redelivery_delay_ms`, `disconnect_close_ms`, `duplicate_every`, `ping_interval_ms`; answers the settings now in force |
//! | `POST /_fake/stream/events` | a [`StreamEvent`] or a list | queue EVENT frames; answers `{"event_ids": […]}` |
//! | `POST /_fake/stream/events/generate` | `{"count": 50000, "id_prefix": "b-"?, "event": StreamEvent?}` | queue `count` events with ids `{id_prefix}1…` |
//! | `POST /_fake/stream/robot` | a robot message object or a list | queue CALLBACK frames (topic `/v1.0/im/bot/messages/get`); missing fields get DingTalk-like values, a `sessionWebhook` at this fake included (valid until `sessionWebhookExpiredTime`, 90 minutes by default); answers `{"msg_ids": […]}` |
//! | `POST /_fake/stream/duplicate` | `{"event_ids": […]}` | deliver these acknowledged events once more; answers `{"queued", "unknown": […]}` |
//! | `POST /_fake/stream/ping` | `{"connection": 1?}` | a SYSTEM `ping`; the client must echo it |
//! | `POST /_fake/stream/system` | `{"connection"?, "topic": "…", "data": {…}}` | any SYSTEM frame (an unknown topic, say) |
//! | `POST /_fake/stream/disconnect` | `{"connection"?, "reason"?, "close_after_ms"?}` | a SYSTEM `disconnect`, nothing new sent after it, then a close frame after the delay |
//! | `POST /_fake/stream/drop` | `{"connection"?}` | end the socket without a close frame |
//! | `POST /_fake/stream/silence` | `{"connection"?, "on": true, "ms": 30000?}` | read and send nothing (no pongs, no frames), for `ms` if given |
//! | `POST /_fake/stream/raw` | `{"connection"?, "text": "…"}` | send `text` as is as one text frame (not JSON, unknown types, huge frames) |

mod admin;
mod api;
mod dates;
mod stream;

pub use stream::{
    BadAck, ConnectionRecord, FrameRecord, StreamEvent, StreamReport, StreamSettings, Subscription,
    CONNECT_PATH, OPEN_PATH, ROBOT_TOPIC,
};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use api::{ban_body, ban_page, default_errmsg};

/// The header DingTalk's new API (`/v1.0/…`) takes the access token in, as DingTalk documents
/// it. Written here on purpose rather than shared with the client under test.
pub const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";

/// A robot message's session webhook path (DingTalk's is on `oapi.dingtalk.com`).
pub const SESSION_PATH: &str = "/robot/sendBySession";
/// How long the session webhooks the fake hands out stay valid by default: DingTalk's are
/// about 90 minutes.
pub const SESSION_TTL_MS: i64 = 90 * 60 * 1000;

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
/// What is answered: `html` as a `text/html` page if given; else `body` as is if given; else
/// `{errcode, errmsg}` if `errcode` is given; else `{code, message, requestid}` if `code` is
/// given; else an empty body. `status` defaults to 200 for `html`/`body`/`errcode`, 403 for
/// `Forbidden…` codes, 400 for other codes and 500 for an empty body. Without `path` a fault
/// matches any path except `/gettoken` and Stream's `connections/open`.
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
    /// An HTML page (not JSON), sent as `text/html`.
    pub html: Option<String>,
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

    /// DingTalk's per-IP ban as an HTML page instead of JSON, which DingTalk's throttling page
    /// says the ban "returns". The page itself is not published; this one is the fake's own,
    /// without the JSON body's fields.
    pub fn ip_ban_page() -> Self {
        FaultSpec {
            html: Some(ban_page()),
            times: 1,
            ..FaultSpec::default()
        }
    }

    /// Answers with this HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
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

/// A group `sceneGroup/create` made: the request's fields and the ids it answered.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CreatedSceneGroup {
    /// The group's id (`cid…`), also what `sceneGroups/query` takes.
    pub open_conversation_id: String,
    /// The old-style id (`chat…`).
    pub chat_id: String,
    /// Group name.
    pub title: String,
    /// The template it was made from.
    pub template_id: String,
    /// Owner's user id.
    pub owner_user_id: String,
    /// Members' user ids, as sent.
    pub user_ids: Vec<String>,
    /// Administrators' user ids, as sent.
    pub subadmin_ids: Vec<String>,
    /// The caller's de-duplication id, if any.
    pub uuid: Option<String>,
    /// Avatar media id, if any.
    pub icon: Option<String>,
    /// `management_options` as sent.
    pub management_options: Option<Value>,
    /// How many creates answered with this group (more than 1: repeats with its `uuid`).
    pub creates: u32,
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
    /// Stream connection ids: never reused, resets included, so a connection's task that
    /// outlived a reset cannot mistake a new connection for its own.
    next_connection: AtomicU64,
    /// `http://ADDR` once served: where the session webhooks it hands out point.
    base_url: Mutex<Option<String>>,
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
    /// Group template ids `sceneGroup/create` accepts.
    scene_templates: BTreeSet<String>,
    /// Groups made by `sceneGroup/create`, oldest first.
    scene_groups: Vec<CreatedSceneGroup>,
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
    /// `getsendprogress` answers (`progress_in_percent`, `status`); unset means done.
    send_progress: HashMap<i64, (i64, i64)>,
    robot_messages: Vec<Value>,
    /// One-to-one robot messages (`oToMessages/batchSend` bodies) someone got.
    robot_oto_messages: Vec<Value>,
    /// Robot session webhooks: session → expiry (epoch ms).
    robot_sessions: HashMap<String, i64>,
    /// Messages posted to session webhooks: `{"session", "body"}`, oldest first.
    session_messages: Vec<Value>,
    next_request_id: u64,
    stream: stream::StreamState,
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
            scene_templates: BTreeSet::new(),
            scene_groups: Vec::new(),
            todos: HashMap::new(),
            work_records: HashMap::new(),
            attendance_update: HashMap::new(),
            attendance_list: HashMap::new(),
            next_record_id: 700_000_000_001,
            attendance_records: Vec::new(),
            messages: Vec::new(),
            next_task_id: 1001,
            send_results: HashMap::new(),
            send_progress: HashMap::new(),
            robot_messages: Vec::new(),
            robot_oto_messages: Vec::new(),
            robot_sessions: HashMap::new(),
            session_messages: Vec::new(),
            next_request_id: 1,
            stream: stream::StreamState::default(),
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
                next_connection: AtomicU64::new(1),
                base_url: Mutex::new(None),
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

    /// The axum router (DingTalk endpoints, the Stream WebSocket, `/_fake/…` admin routes).
    pub fn router(&self) -> Router {
        Router::new()
            .nest("/_fake", admin::routes())
            .route(CONNECT_PATH, get(stream::connect))
            .fallback(api::dingtalk_endpoint)
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

    /// Answers the next `times` calls with an HTML ban page (HTTP 200).
    pub fn ban_next_with_page(&self, times: u32) {
        self.fail_next(FaultSpec::ip_ban_page().times(times));
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
    /// If it has a `coolAppCode` (a group the cool app was installed in), robot sends to it and
    /// `sceneGroups/query` of it must carry the same one, as on DingTalk.
    pub fn add_group(&self, group: Value) {
        if let Some(id) = group.get("openConversationId").and_then(Value::as_str) {
            let id = id.to_owned();
            self.state().groups.insert(id, group);
        }
    }

    /// Registers a group template: `sceneGroup/create` answers `groupTemplate.notFound` for any
    /// other, as DingTalk does for a template not made in (or taken offline from) the console.
    pub fn add_scene_template(&self, template_id: &str) {
        self.state().scene_templates.insert(template_id.to_owned());
    }

    /// Groups made by `sceneGroup/create`, oldest first.
    pub fn created_scene_groups(&self) -> Vec<CreatedSceneGroup> {
        self.state().scene_groups.clone()
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

    /// Sets what `getupdatedata` answers for a user and day (`"yyyy-MM-dd"`; a time after it
    /// is ignored). Requests name the day as `"yyyy-MM-dd HH:mm:ss"`, as DingTalk's examples do.
    pub fn set_attendance_update_data(&self, userid: &str, work_date: &str, result: Value) {
        let day = work_date.trim().get(..10).unwrap_or(work_date);
        let key = (userid.to_owned(), day.to_owned());
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

    /// Sets what `getsendprogress` reports for `task_id` (`status` 0 not started, 1 running, 2
    /// done). While `status` is not 2, `status_bar/update` of the task answers 41052.
    pub fn set_send_progress(&self, task_id: i64, progress_in_percent: i64, status: i64) {
        self.state()
            .send_progress
            .insert(task_id, (progress_in_percent, status));
    }

    /// Sets what `getsendresult` reports for `task_id`.
    pub fn set_send_result(&self, task_id: i64, result: FakeSendResult) {
        self.state().send_results.insert(task_id, result);
    }

    /// Work notifications accepted so far.
    pub fn sent_messages(&self) -> Vec<SentMessage> {
        self.state().messages.clone()
    }

    /// Messages posted to robot session webhooks so far: `{"session": …, "body": …}`.
    pub fn session_messages(&self) -> Vec<Value> {
        self.state().session_messages.clone()
    }

    /// A robot session webhook valid until `expires_at_ms` (epoch ms), as DingTalk puts in a
    /// robot message: `{base}/robot/sendBySession?session=…`.
    pub fn robot_session(&self, expires_at_ms: i64) -> String {
        let session = uuid::Uuid::new_v4().simple().to_string();
        self.state()
            .robot_sessions
            .insert(session.clone(), expires_at_ms);
        format!("{}{SESSION_PATH}?session={session}", self.base_url())
    }

    /// Where the fake is served (`http://127.0.0.1` before it is).
    fn base_url(&self) -> String {
        self.shared
            .base_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1".to_owned())
    }

    fn set_base_url(&self, listener: &TcpListener) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        *self
            .shared
            .base_url
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(format!("http://{addr}"));
        Ok(())
    }

    /// Robot group messages accepted so far (request bodies).
    pub fn robot_messages(&self) -> Vec<Value> {
        self.state().robot_messages.clone()
    }

    /// One-to-one robot messages accepted so far (`oToMessages/batchSend` request bodies that
    /// reached at least one user).
    pub fn robot_oto_messages(&self) -> Vec<Value> {
        self.state().robot_oto_messages.clone()
    }

    /// Back to a fresh fake (recorded calls included). Open Stream connections are dropped.
    pub fn reset(&self) {
        let notifiers = self.stream_notifiers();
        *self.state() = FakeState::default();
        for notify in notifiers {
            notify.notify_one();
        }
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
            "robot_oto_messages": state.robot_oto_messages,
            "session_messages": state.session_messages,
            "scene_templates": state.scene_templates,
            "scene_groups": state.scene_groups,
            "calls_recorded": state.calls.len(),
        })
    }
}

/// Serves `fake` on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: TcpListener, fake: FakeDingTalk) -> std::io::Result<()> {
    fake.set_base_url(&listener)?;
    axum::serve(listener, fake.router()).await
}

/// Binds `listen` and serves a fresh fake until SIGTERM or Ctrl-C: what the `fake-dingtalk`
/// binary runs. Logs the URL it listens on (`http://127.0.0.1:PORT`, also for port 0).
pub async fn run(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "fake DingTalk listening; point both base URLs at http://{addr}");
    let fake = FakeDingTalk::new();
    fake.set_base_url(&listener)?;
    axum::serve(listener, fake.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT), whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
