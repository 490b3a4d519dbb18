//! The DingTalk side: every request not under `/_fake` is recorded, then answered like
//! DingTalk would (or with a scripted fault).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::{
    dates, stream, CreatedSceneGroup, FakeDingTalk, FakeSendResult, FakeState, FakeToken,
    RecordedCall, SentMessage, MAX_RECORDED_CALLS, TOKEN_HEADER,
};

/// What to answer: status, JSON body (or an HTML page, or nothing), and an optional delay
/// before answering.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    html: Option<String>,
    delay: Option<Duration>,
}

impl Reply {
    fn json(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
            html: None,
            delay: None,
        }
    }

    fn answer_code(&self) -> Option<String> {
        if self.html.is_some() {
            return Some("html".into());
        }
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

/// `getsendprogress`'s `status` of a finished send.
const SEND_DONE: i64 = 2;
/// `robot/groupMessages/send` refuses a `msgParam` longer than this many bytes.
const MSG_PARAM_MAX_BYTES: usize = 15_000;
/// `robot/oToMessages/batchSend` takes at most this many `userIds` (its page).
const OTO_MAX_USERS: usize = 20;
/// `sceneGroup/create`: a title of at most 30 characters (its page).
const SCENE_GROUP_TITLE_MAX_CHARS: usize = 30;
/// `sceneGroup/create`: at most 999 members besides the owner (the old create's documented
/// limit; the new page states none).
const SCENE_GROUP_MAX_MEMBERS: usize = 999;
/// `sceneGroup/create`: DingTalk suggests a `uuid` of at most 64 characters; the fake insists.
const SCENE_GROUP_UUID_MAX_CHARS: usize = 64;

/// Calls DingTalk does not count toward the monthly quota.
fn is_metered(path: &str) -> bool {
    !matches!(path, "/gettoken" | "/topapi/v2/user/getbymobile")
}

/// DingTalk's errmsg for the codes the fake is asked to answer most (the global error table,
/// <https://open.dingtalk.com/document/development/server-api-error-codes-1>, and the pages of
/// the APIs; shortened where DingTalk repeats itself).
pub(crate) fn default_errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "系统繁忙",
        500 => "系统异常",
        33001 => "无效的企业ID",
        40001 => "获取access_token时Secret错误，或者access_token无效",
        40014 => "不合法的access_token",
        40035 => "不合法的参数",
        41052 => "本次发送人数过多,不再返回发送结果",
        42001 => "access_token超时",
        400001 => "系统错误",
        400002 => "无效的参数",
        90001 => "您的服务器调用钉钉开放平台所有接口的请求都被暂时禁用了",
        90002 => "您的服务器调用钉钉开放平台当前接口的所有请求都被暂时禁用了",
        90003 => "您的企业调用钉钉开放平台所有接口的请求都被暂时禁用了",
        90004 => "您当前使用的CorpId及CorpSecret被暂时禁用了",
        90005 => "您的企业调用当前接口次数过多，请求被暂时禁用了",
        90006 => "您当前使用的CorpId及CorpSecret调用当前接口次数过多，请求被暂时禁用了",
        90017 => "此IP使用CorpId及CorpSecret调用接口的CorpId个数超过限制",
        90007..=90016 => "请求被暂时禁用了",
        90018 => "当前应用调用该接口的并发量超过限制",
        90020 => "当前企业调用接口次数已达到上限",
        _ => "fake error",
    }
}

pub(crate) fn ban_body(wait_secs: u64) -> Value {
    json!({"status": 1111, "wait": wait_secs, "punish": "deny", "msg": "fake per-IP ban"})
}

/// The fake's HTML ban page. DingTalk does not publish its page, so on purpose it carries
/// none of the JSON body's fields: a client has to recognise an HTML answer, not a marker.
pub(crate) fn ban_page() -> String {
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>访问受限</title></head>\n\
     <body><p>您的访问过于频繁，请稍后再试。</p></body></html>\n"
        .to_owned()
}

enum Route {
    AsyncSend,
    SendProgress,
    SendResult,
    StatusBar,
    Recall,
    RobotSend,
    RobotOtoSend,
    GroupQuery,
    SceneGroupCreate,
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
        "/v1.0/robot/oToMessages/batchSend" => post_only(Route::RobotOtoSend),
        "/v1.0/im/sceneGroups/query" => post_only(Route::GroupQuery),
        "/v1.0/im/sceneGroup/create" => post_only(Route::SceneGroupCreate),
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
    // A path segment decodes like a form value (`%XX`, and `+` for a space as before).
    let field = format!("v={segment}");
    form_urlencoded::parse(field.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| segment.to_owned())
}

fn parse_query(uri: &Uri) -> BTreeMap<String, String> {
    match uri.query() {
        Some(query) => form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        None => BTreeMap::new(),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub(crate) async fn dingtalk_endpoint(
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
            &headers,
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
    let mut response = match (reply.html, reply.body) {
        (Some(page), _) => (
            reply.status,
            [(CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response(),
        (None, Some(body)) => (reply.status, axum::Json(body)).into_response(),
        (None, None) => reply.status.into_response(),
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
    pub(crate) fn request_id(&mut self) -> String {
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
        headers: &HeaderMap,
        body: Option<&Value>,
    ) -> Reply {
        let family = family_of(path);
        if let Some(reply) = self.take_fault(path) {
            return reply;
        }
        if path == "/gettoken" {
            return self.gettoken(now, method, query);
        }
        if path == crate::SESSION_PATH {
            return self.session_send(method, query, body);
        }
        if path == stream::OPEN_PATH {
            let host = header(headers, "host");
            let (status, body) = self.stream_open(now, method, body, host.as_deref());
            return Reply::json(status, body);
        }
        let route = match route(method, path) {
            Ok(route) => route,
            Err(reply) => return reply,
        };
        let token_header = header(headers, TOKEN_HEADER);
        let token = match family {
            Family::Old => query.get("access_token").map(String::as_str),
            Family::New => token_header.as_deref(),
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
            None => path != "/gettoken" && path != stream::OPEN_PATH,
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
        let mut reply = if let Some(page) = fault.html.clone() {
            Reply {
                status: status(200),
                body: None,
                html: Some(page),
                delay: None,
            }
        } else if let Some(body) = fault.body.clone() {
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
                html: None,
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
        if !self.credentials_accepted(key, secret) {
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

    /// The app key and secret set with `set_credentials`, or any non-empty pair if none
    /// were set: gettoken's check, and Stream's `connections/open`.
    pub(crate) fn credentials_accepted(&self, key: &str, secret: &str) -> bool {
        match &self.credentials {
            Some((k, s)) => k == key && s == secret,
            None => !key.is_empty() && !secret.is_empty(),
        }
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
                Ok(index) => {
                    let task_id = self.messages[index].task_id;
                    let (percent, status) = self.progress_of(task_id);
                    self.old_ok(
                        json!({"progress": {"progress_in_percent": percent, "status": status}}),
                    )
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
            // DingTalk's page lists 40056 (agent id), 40035 (parameter) and 41052, "too many
            // recipients, no more send results", which it also answers while the send's progress
            // is not finished (https://open.dingtalk.com/document/development/update-work-notification-status-bar).
            Route::StatusBar => match self.task_of(body, "task_id") {
                Ok(index) => {
                    let task_id = self.messages[index].task_id;
                    let is_oa = self.messages[index].request["msg"]["msgtype"] == "oa";
                    let (_, status) = self.progress_of(task_id);
                    match str_field(body, "status_value") {
                        None => self.old_err(40035, "不合法的参数: 缺少 status_value"),
                        Some(_) if !is_oa => {
                            self.old_err(40035, "不合法的参数: only OA messages have a status bar")
                        }
                        Some(_) if status != SEND_DONE => {
                            self.old_err(41052, default_errmsg(41052))
                        }
                        Some(_) => {
                            self.messages[index].status_bar = body.cloned();
                            self.old_ok(json!({}))
                        }
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
            Route::RobotOtoSend => self.robot_oto_send(body),
            Route::GroupQuery => self.group_query(body),
            Route::SceneGroupCreate => self.scene_group_create(body),
            Route::AttendanceUpdate => {
                let (Some(userid), Some(work_date)) =
                    (str_field(body, "userid"), str_field(body, "work_date"))
                else {
                    return self.old_err(40035, "缺少参数 userid 或 work_date");
                };
                // `yyyy-MM-dd HH:mm:ss`, as every request example of DingTalk's page sends it.
                let Some(day) = dates::day_of(work_date) else {
                    let message = format!("work_date 格式应为 yyyy-MM-dd HH:mm:ss: {work_date:?}");
                    return self.old_err(40035, &message);
                };
                let key = (userid.to_owned(), day.clone());
                let result = self
                    .attendance_update
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| {
                        json!({"work_date": format!("{day} 00:00:00"), "userid": userid,
                           "attendance_result_list": [], "check_record_list": [],
                           "approve_list": []})
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
                // The page's codes (https://open.dingtalk.com/document/development/get-the-user-s-to-do-items).
                if offset < 0 {
                    return self.old_err(40068, "无效的offset");
                }
                if !(1..=50).contains(&limit) {
                    return self.old_err(40069, "无效的limit");
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
            // The user pages list 400002 for a bad or missing parameter, 33012 for an unknown
            // userid (user/get) and 60121 for a user not found (by union id, by mobile).
            Route::UserByMobile => {
                let Some(mobile) = str_field(body, "mobile") else {
                    return self.old_err(400002, "无效的参数");
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
                    return self.old_err(400002, "无效的参数");
                };
                match self.users.iter().find(|u| u["userid"] == userid).cloned() {
                    Some(user) => self.old_ok(json!({"result": user})),
                    None => self.old_err(33012, "无效的userId"),
                }
            }
            Route::UserByUnionId => {
                let Some(unionid) = str_field(body, "unionid") else {
                    return self.old_err(400002, "无效的参数");
                };
                match self.users.iter().find(|u| u["unionid"] == unionid) {
                    Some(user) => {
                        let userid = user["userid"].clone();
                        self.old_ok(json!({"result": {"contact_type": 0, "userid": userid}}))
                    }
                    None => self.old_err(60121, "未找到对应员工"),
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

    /// A send's `getsendprogress` (`progress_in_percent`, `status`): done unless set.
    fn progress_of(&self, task_id: i64) -> (i64, i64) {
        self.send_progress
            .get(&task_id)
            .copied()
            .unwrap_or((100, SEND_DONE))
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

    /// `sceneGroups/query` as its page describes it
    /// (<https://open.dingtalk.com/document/development/query-group-information>): `paramBlank`
    /// without `openConversationId`; `groupPermissionDenied` for a group the app may not see,
    /// which includes a cool-app group asked without its `coolAppCode` (the page: "required for
    /// groups the cool app was installed in") or with another one.
    fn group_query(&mut self, body: Option<&Value>) -> Reply {
        let Some(id) = str_field(body, "openConversationId").filter(|id| !id.is_empty()) else {
            return self.new_err(StatusCode::BAD_REQUEST, "paramBlank", "请求参数为空");
        };
        let Some(mut group) = self.groups.get(id).cloned() else {
            return self.new_err(StatusCode::BAD_REQUEST, "groupPermissionDenied", "无权限");
        };
        let required = group.get("coolAppCode").and_then(Value::as_str);
        if required.is_some() && str_field(body, "coolAppCode") != required {
            return self.new_err(StatusCode::BAD_REQUEST, "groupPermissionDenied", "无权限");
        }
        if let Some(obj) = group.as_object_mut() {
            obj.insert("success".into(), json!(true));
            obj.remove("coolAppCode");
        }
        Reply::json(StatusCode::OK, group)
    }

    /// `sceneGroup/create` with the codes its page lists
    /// (<https://open.dingtalk.com/document/development/create-a-scene-group>; what the fake
    /// adds is in `docs/dingtalk-war-room.md`): `parameter.invalid` for a missing or malformed
    /// field, `member.exceed`, `groupTemplate.notFound` for a template not registered,
    /// `member.notFound` for an owner (and, the fake's choice, a member or administrator) who
    /// is not one of its users. A `uuid` seen before answers its group again and makes none.
    /// The group becomes visible to `sceneGroups/query`.
    fn scene_group_create(&mut self, body: Option<&Value>) -> Reply {
        let Some(Value::Object(fields)) = body else {
            return self.param_invalid("body必须是JSON对象");
        };
        let text = |name: &str| {
            fields
                .get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.trim().is_empty())
        };
        let (Some(title), Some(template_id), Some(owner)) =
            (text("title"), text("template_id"), text("owner_user_id"))
        else {
            return self.param_invalid("缺少参数 title, template_id 或 owner_user_id");
        };
        if title.chars().count() > SCENE_GROUP_TITLE_MAX_CHARS {
            return self.param_invalid("title 最长 30 个字符");
        }
        let (user_ids, subadmin_ids) =
            match (id_list(fields, "user_ids"), id_list(fields, "subadmin_ids")) {
                (Ok(users), Ok(admins)) => (users, admins),
                (Err(message), _) | (_, Err(message)) => return self.param_invalid(&message),
            };
        let optional_text = |name: &str| match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(format!("{name} 必须是字符串")),
        };
        let (uuid, icon) = match (optional_text("uuid"), optional_text("icon")) {
            (Ok(uuid), Ok(icon)) => (uuid.filter(|u| !u.is_empty()), icon),
            (Err(message), _) | (_, Err(message)) => return self.param_invalid(&message),
        };
        if uuid
            .as_ref()
            .is_some_and(|u| u.chars().count() > SCENE_GROUP_UUID_MAX_CHARS)
        {
            return self.param_invalid("uuid 最长 64 个字符");
        }
        let management_options = match fields.get("management_options") {
            None | Some(Value::Null) => None,
            Some(Value::Object(options)) if options.values().all(|v| v.as_i64().is_some()) => {
                Some(Value::Object(options.clone()))
            }
            Some(_) => return self.param_invalid("management_options 必须是整数字段的对象"),
        };
        if user_ids.len() > SCENE_GROUP_MAX_MEMBERS {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "member.exceed",
                "群成员数量超出限制",
            );
        }
        if let Some(uuid) = &uuid {
            if let Some(group) = self
                .scene_groups
                .iter_mut()
                .find(|g| g.uuid.as_ref() == Some(uuid))
            {
                group.creates += 1;
                let answer = json!({
                    "open_conversation_id": group.open_conversation_id,
                    "chat_id": group.chat_id,
                });
                return Reply::json(StatusCode::OK, answer);
            }
        }
        if !self.scene_templates.contains(template_id) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "groupTemplate.notFound",
                "群模板不存在或者已下线",
            );
        }
        let people = std::iter::once(owner)
            .chain(user_ids.iter().map(String::as_str))
            .chain(subadmin_ids.iter().map(String::as_str));
        for userid in people {
            if !self.users.iter().any(|u| u["userid"] == userid) {
                let message = format!("不存在的员工: {userid}");
                return self.new_err(StatusCode::BAD_REQUEST, "member.notFound", &message);
            }
        }
        let n = self.scene_groups.len() + 1;
        let open_conversation_id = format!("cidFakeSceneGroup{n:06}==");
        let chat_id = format!("chatfake{n:08x}");
        let mut listed = json!({
            "openConversationId": open_conversation_id,
            "title": title,
            "templateId": template_id,
            "ownerUserId": owner,
            "groupUrl": format!("dingtalk://dingtalkclient/page/fake-group?cid={n}"),
            "status": 1,
        });
        if let (Some(icon), Some(obj)) = (&icon, listed.as_object_mut()) {
            obj.insert("icon".into(), json!(icon));
        }
        self.groups.insert(open_conversation_id.clone(), listed);
        self.scene_groups.push(CreatedSceneGroup {
            open_conversation_id: open_conversation_id.clone(),
            chat_id: chat_id.clone(),
            title: title.to_owned(),
            template_id: template_id.to_owned(),
            owner_user_id: owner.to_owned(),
            user_ids,
            subadmin_ids,
            uuid,
            icon,
            management_options,
            creates: 1,
        });
        Reply::json(
            StatusCode::OK,
            json!({"open_conversation_id": open_conversation_id, "chat_id": chat_id}),
        )
    }

    fn param_invalid(&mut self, detail: &str) -> Reply {
        let message = format!("输入参数错误: {detail}");
        self.new_err(StatusCode::BAD_REQUEST, "parameter.invalid", &message)
    }

    /// A robot session webhook: no token (the session is the credential). An unknown or expired
    /// session answers 300001 "session 不存在", as DingTalk does; a message it cannot read
    /// answers 40035.
    fn session_send(
        &mut self,
        method: &Method,
        query: &BTreeMap<String, String>,
        body: Option<&Value>,
    ) -> Reply {
        if method != Method::POST {
            return Reply::json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"errcode": 405, "errmsg": "method not allowed"}),
            );
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let session = query.get("session").cloned().unwrap_or_default();
        let live = self
            .robot_sessions
            .get(&session)
            .is_some_and(|expires| now_ms < *expires);
        if !live {
            return self.old_err(300_001, "session 不存在");
        }
        let readable = match str_field(body, "msgtype") {
            Some("text") => body
                .and_then(|b| b.get("text"))
                .and_then(|t| t.get("content"))
                .and_then(Value::as_str)
                .is_some_and(|c| !c.is_empty()),
            Some("markdown") => body
                .and_then(|b| b.get("markdown"))
                .is_some_and(|m| m.get("title").is_some() && m.get("text").is_some()),
            Some(_) => true,
            None => false,
        };
        if !readable {
            return self.old_err(40035, "不合法的参数: msgtype 与消息内容");
        }
        self.session_messages
            .push(json!({"session": session, "body": body.cloned().unwrap_or(Value::Null)}));
        self.old_ok(json!({}))
    }

    /// `robot/groupMessages/send` with the codes its page lists
    /// (<https://open.dingtalk.com/document/development/the-robot-sends-a-group-message>).
    fn robot_send(&mut self, body: Option<&Value>) -> Reply {
        if !body.is_some_and(Value::is_object) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgBody.invalid",
                "body必须是JSON",
            );
        }
        let missing = [
            (
                "robotCode",
                "invalidParameter.robotCode.missing",
                "缺少robotCode",
            ),
            (
                "openConversationId",
                "miss.openConversationId",
                "缺少openConversationId",
            ),
            ("msgKey", "invalidParameter.msgKey.empty", "缺少msgKey"),
        ];
        for (field, code, message) in missing {
            if str_field(body, field).is_none_or(str::is_empty) {
                return self.new_err(StatusCode::BAD_REQUEST, code, message);
            }
        }
        let param = str_field(body, "msgParam");
        if param.is_some_and(|p| p.len() > MSG_PARAM_MAX_BYTES) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgParam.tooLong",
                "消息内容太长",
            );
        }
        let param_is_json_object = param
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .is_some_and(|v| v.is_object());
        if !param_is_json_object {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgParam.invalid",
                "msgParam必须是json格式",
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
                    "酷应用编码无效",
                );
            }
        }
        self.robot_messages
            .push(body.cloned().unwrap_or(Value::Null));
        let key = format!("fake-pqk-{}", self.robot_messages.len());
        Reply::json(StatusCode::OK, json!({"processQueryKey": key}))
    }

    /// `robot/oToMessages/batchSend`: checked like `groupMessages/send` (a JSON body, the
    /// robot, the template key, `msgParam` a JSON object in a string of at most 15 000 bytes),
    /// plus `userIds`, 1 to 20 strings. As DingTalk does, users it does not know are not an
    /// error: they come back in `invalidStaffIdList` (here: every id that is not a user added
    /// to the fake) and get nothing; the message is recorded when someone got it.
    fn robot_oto_send(&mut self, body: Option<&Value>) -> Reply {
        if !body.is_some_and(Value::is_object) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgBody.invalid",
                "body必须是JSON",
            );
        }
        if str_field(body, "robotCode").is_none_or(str::is_empty) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.robotCode.missing",
                "缺少robotCode",
            );
        }
        let users = body
            .and_then(|b| b.get("userIds"))
            .and_then(Value::as_array)
            .map(|ids| ids.iter().map(Value::as_str).collect::<Option<Vec<_>>>());
        let users = match users {
            Some(Some(users)) if !users.is_empty() && users.iter().all(|u| !u.is_empty()) => users,
            _ => {
                return self.new_err(
                    StatusCode::BAD_REQUEST,
                    "invalidParameter.userIds.empty",
                    "缺少userIds",
                )
            }
        };
        if users.len() > OTO_MAX_USERS {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.userIds.tooMany",
                "userIds最多20个",
            );
        }
        if str_field(body, "msgKey").is_none_or(str::is_empty) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgKey.empty",
                "缺少msgKey",
            );
        }
        let param = str_field(body, "msgParam");
        if param.is_some_and(|p| p.len() > MSG_PARAM_MAX_BYTES) {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgParam.tooLong",
                "消息内容太长",
            );
        }
        let param_is_json_object = param
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .is_some_and(|v| v.is_object());
        if !param_is_json_object {
            return self.new_err(
                StatusCode::BAD_REQUEST,
                "invalidParameter.msgParam.invalid",
                "msgParam必须是json格式",
            );
        }
        let known = |id: &str| {
            self.users
                .iter()
                .any(|u| u.get("userid").and_then(Value::as_str) == Some(id))
        };
        let invalid: Vec<&str> = users.iter().copied().filter(|u| !known(u)).collect();
        let key = if invalid.len() < users.len() {
            self.robot_oto_messages
                .push(body.cloned().unwrap_or(Value::Null));
            format!("fake-oto-pqk-{}", self.robot_oto_messages.len())
        } else {
            String::new()
        };
        Reply::json(
            StatusCode::OK,
            json!({"processQueryKey": key, "invalidStaffIdList": invalid, "flowControlledStaffIdList": []}),
        )
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
        let (start, end) = match dates::work_date_span(from, to) {
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

/// A list of user ids in a new-API body: absent or `null` is empty; anything but an array of
/// strings (such as the old API's comma-separated string) is refused.
fn id_list(fields: &Map<String, Value>, name: &str) -> Result<Vec<String>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| format!("{name} 必须是字符串数组")),
        Some(_) => Err(format!("{name} 必须是字符串数组")),
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

fn paginate(items: &[Value], offset: usize, limit: usize) -> (Vec<Value>, bool) {
    let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
    let has_more = offset.saturating_add(limit) < items.len();
    (page, has_more)
}
