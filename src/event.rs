//! Decrypted events: the envelope (type, corp, ids, de-duplication key) and the typed
//! [`Event`] the dispatcher hands to handlers.
//!
//! DingTalk has sent several generations of payloads (legacy PascalCase, current camelCase,
//! Stream), so keys are matched case-insensitively and timestamps may be numbers or strings.
//! Unknown fields are ignored; unknown event types become [`Event::Unknown`] with the raw JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Event types answered at once and never stored: DingTalk's URL checks.
pub const CHECK_TYPES: &[&str] = &[
    "check_url",
    "check_create_suite_url",
    "check_update_suite_url",
];

/// The fields every event may carry, whatever the generation of its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `EventType`; `unknown` when the payload has none (it is kept, not dropped).
    pub event_type: String,
    pub corp_id: Option<String>,
    /// `eventId`: DingTalk's id of this event, unique per event whatever its type.
    pub event_id: Option<IdText>,
    /// `BizId`: unique within an event type only.
    pub biz_id: Option<IdText>,
    /// `EventTime`, else `TimeStamp`, in epoch milliseconds.
    pub event_time: Option<i64>,
}

/// An id as the decrypted JSON wrote it. A string and a number with the same digits are
/// different ids: `"1"` is not `1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdText {
    /// A JSON string: its value (escapes decoded), never empty.
    String(String),
    /// A JSON number: its text exactly as written (`12345678901234567890123`, `1.50`), never
    /// through `f64`, which rounds distinct big ids onto one value.
    Number(String),
}

impl IdText {
    /// The string's value or the number's text.
    pub fn as_str(&self) -> &str {
        match self {
            IdText::String(text) | IdText::Number(text) => text,
        }
    }
}

/// Why a decrypted message is not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the decrypted message is not JSON: {0}")]
    NotJson(String),
    #[error("the decrypted message is JSON but not an object")]
    NotObject,
}

/// Looks a key up ignoring ASCII case (`EventType`, `eventType`, `eventtype`).
pub fn get_ci<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    entry_ci(object, key).map(|(_, v)| v)
}

/// [`get_ci`] with the key as the object spells it: the exact spelling if present, else the
/// first that matches ignoring ASCII case.
fn entry_ci<'a>(object: &'a Map<String, Value>, key: &str) -> Option<(&'a String, &'a Value)> {
    object
        .get_key_value(key)
        .or_else(|| object.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)))
}

/// The top-level members of a JSON object as written (read only when an id is a number).
type RawMembers<'a> = BTreeMap<String, &'a RawValue>;

/// An id field (`key` in any case): a non-empty string, or a number with its text as written
/// in `msg`. Anything else (empty, null, true, a list) is no id.
fn id_ci<'a>(
    object: &Map<String, Value>,
    key: &str,
    msg: &'a [u8],
    raw: &mut Option<RawMembers<'a>>,
) -> Option<IdText> {
    let (name, value) = entry_ci(object, key)?;
    match value {
        Value::String(s) if !s.is_empty() => Some(IdText::String(s.clone())),
        Value::Number(n) => {
            // `Value` keeps only an f64 of a number beyond 64 bits, so the text is read again
            // from the message. Only here: ids are strings in every payload DingTalk documents,
            // and those cost no second read. A duplicated member counts as its last occurrence,
            // as in `Value`.
            if raw.is_none() {
                *raw = serde_json::from_slice(msg).ok();
            }
            let text = raw
                .as_ref()
                .and_then(|members| members.get(name.as_str()))
                .map(|v| v.get().trim())
                .filter(|text| text.starts_with(|c: char| c == '-' || c.is_ascii_digit()));
            // The message parsed as `Value` a moment ago, so it parses again; the fallback only
            // keeps this free of panics.
            Some(IdText::Number(
                text.map_or_else(|| n.to_string(), str::to_owned),
            ))
        }
        _ => None,
    }
}

/// A string field that may be sent as a string or a number.
pub fn string_ci(object: &Map<String, Value>, key: &str) -> Option<String> {
    match get_ci(object, key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An integer field that may be sent as a number or a numeric string.
pub fn i64_ci(object: &Map<String, Value>, key: &str) -> Option<i64> {
    match get_ci(object, key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Envelope {
    /// Parses the envelope of a decrypted message.
    pub fn parse(msg: &[u8]) -> Result<(Self, Value), EnvelopeError> {
        let value: Value =
            serde_json::from_slice(msg).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(object) = &value else {
            return Err(EnvelopeError::NotObject);
        };
        let mut raw = None;
        let envelope = Envelope {
            event_type: string_ci(object, "EventType").unwrap_or_else(|| "unknown".into()),
            corp_id: string_ci(object, "CorpId"),
            event_id: id_ci(object, "eventId", msg, &mut raw),
            biz_id: id_ci(object, "BizId", msg, &mut raw),
            event_time: i64_ci(object, "EventTime").or_else(|| i64_ci(object, "TimeStamp")),
        };
        Ok((envelope, value))
    }

    /// True for DingTalk's URL checks, which are answered and not stored.
    pub fn is_check(&self) -> bool {
        CHECK_TYPES.contains(&self.event_type.as_str())
    }

    /// The key that makes a re-delivery the same event, whichever source (push, recovery)
    /// brought it, and keeps distinct events apart. In order of preference:
    ///
    /// | the payload has | key |
    /// | --- | --- |
    /// | `eventId`, a string | `event:` + the string |
    /// | `eventId`, a number | `event-number:` + the number exactly as written |
    /// | else `BizId`, a string or a number | `biz:` or `biz-number:`, the event type, `:`, the id (as above) |
    /// | else | `sha256:` + the SHA-256 of the decrypted message, in hex |
    ///
    /// `eventId` alone names the event: DingTalk makes it unique per event of any type, and
    /// the type or corp id of one event may be spelled differently by another source (recovery
    /// fills a missing `EventType` from the failed list's tag and `CorpId` from its entry).
    /// `BizId` is unique within a type only, so the type is part of that key; a type holding
    /// a `:` puts its length in bytes in the prefix (`biz/5:a:b:c:id`), so no two (type, id)
    /// pairs share a key. Each kind has its own prefix, so keys of different kinds never meet.
    /// Keys stored before migration 6 differ for numeric ids and types holding a `:`; that
    /// migration re-keys those rows from their payloads (`src/store/rekey.rs`). Any change
    /// here changes the keys of stored rows, and needs such a migration too.
    pub fn dedup_key(&self, msg: &[u8]) -> String {
        dedup_key(self, msg)
    }
}

/// See [`Envelope::dedup_key`].
pub fn dedup_key(envelope: &Envelope, msg: &[u8]) -> String {
    match (&envelope.event_id, &envelope.biz_id) {
        (Some(IdText::String(id)), _) => format!("event:{id}"),
        (Some(IdText::Number(id)), _) => format!("event-number:{id}"),
        (None, Some(biz)) => {
            let kind = match biz {
                IdText::String(_) => "biz",
                IdText::Number(_) => "biz-number",
            };
            let event_type = &envelope.event_type;
            let biz = biz.as_str();
            if event_type.contains(':') {
                format!("{kind}/{}:{event_type}:{biz}", event_type.len())
            } else {
                format!("{kind}:{event_type}:{biz}")
            }
        }
        (None, None) => format!("sha256:{}", hex::encode(Sha256::digest(msg))),
    }
}

/// Why a payload of a known type could not be turned into its typed event. Permanent: the
/// same payload will never decode, so the event goes straight to `dead`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the payload is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("{event_type}: required field {field:?} is missing or empty")]
    Missing {
        event_type: &'static str,
        field: &'static str,
    },
    /// An event dinghook scheduled for itself that does not read as its type (written by
    /// another version, or edited by hand).
    #[error("{event_type}: {message}")]
    Internal {
        event_type: &'static str,
        message: String,
    },
}

/// Read access to a JSON object with case-insensitive keys and forgiving scalar types.
#[derive(Clone, Copy)]
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn string(self, key: &str) -> Option<String> {
        string_ci(self.0, key)
    }
    fn i64(self, key: &str) -> Option<i64> {
        i64_ci(self.0, key)
    }
    fn f64(self, key: &str) -> Option<f64> {
        match get_ci(self.0, key)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
    fn bool(self, key: &str) -> Option<bool> {
        match get_ci(self.0, key)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => None,
            },
            Value::Number(n) => n.as_i64().map(|n| n != 0),
            _ => None,
        }
    }
    /// A list of strings; a single string counts as a list of one.
    fn strings(self, key: &str) -> Vec<String> {
        match get_ci(self.0, key) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            _ => Vec::new(),
        }
    }
    /// The objects of a list (`DataList` / `dataList`); other items are skipped.
    fn objects(self, key: &str) -> Vec<Fields<'a>> {
        match get_ci(self.0, key) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_object().map(Fields))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn required(self, event_type: &'static str, key: &'static str) -> Result<String, DecodeError> {
        self.string(key).ok_or(DecodeError::Missing {
            event_type,
            field: key,
        })
    }
}

/// `chat_update_title`: a group was renamed.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatUpdateTitle {
    pub corp_id: Option<String>,
    pub chat_id: Option<String>,
    pub open_conversation_id: Option<String>,
    /// The new name.
    pub title: String,
    /// The user id of who renamed it.
    pub operator: Option<String>,
    pub operator_union_id: Option<String>,
    /// When it happened, epoch ms (`timeStamp`, else `EventTime`).
    pub time: Option<i64>,
}

/// `im_cool_app_install` / `im_cool_app_uninstall`: a cool app was added to or removed from a
/// group. The three codes are what a robot message into that group needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoolAppChange {
    pub corp_id: Option<String>,
    pub cool_app_code: String,
    pub robot_code: String,
    pub open_conversation_id: String,
    pub open_conversation_corp_id: Option<String>,
    pub operator: Option<String>,
    /// Epoch ms (`operateTime`, a string in DingTalk's examples).
    pub operate_time: Option<i64>,
}

/// One clock-in of `attendance_check_record`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRecord {
    pub user_id: String,
    pub corp_id: Option<String>,
    pub check_time: Option<i64>,
    pub group_id: Option<String>,
    pub biz_id: Option<String>,
    /// MAP, WIFI, ATM …
    pub location_method: Option<String>,
    /// Normal or Outside.
    pub location_result: Option<String>,
    pub address: Option<String>,
    pub device_sn: Option<String>,
    /// False for replays made by the system after re-scheduling. Missing means true.
    pub check_by_user: bool,
}

/// One item of `attendance_schedule_change`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleChange {
    pub corp_id: Option<String>,
    pub user_ids: Vec<String>,
    /// `modify` or `delete`.
    pub change_type: Option<String>,
    pub work_date_begin: Option<i64>,
    pub work_date_end: Option<i64>,
}

/// One item of `attendance_overtime_duration`.
#[derive(Debug, Clone, PartialEq)]
pub struct OvertimeDuration {
    pub corp_id: Option<String>,
    pub user_id: Option<String>,
    pub overtime_day: Option<f64>,
    pub overtime_hour: Option<f64>,
    pub work_date: Option<i64>,
    /// workDay, restDay or holiday (current payloads only).
    pub overtime_day_type: Option<String>,
}

/// `todo_task_create` / `todo_task_update` / `todo_task_delete`: which task changed (not how:
/// fetch it to see).
#[derive(Debug, Clone, PartialEq)]
pub struct TodoTaskChange {
    pub corp_id: Option<String>,
    pub task_id: String,
    pub biz_tag: Option<String>,
    /// Users concerned, as union ids (`UnionIdList`).
    pub union_ids: Vec<String>,
}

/// Whether a robot message came from a one-to-one chat or a group (`conversationType`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConversationType {
    /// `"1"`: a one-to-one chat with the robot.
    Single,
    /// `"2"`: a group; `conversation_id` is the group's `openConversationId`.
    Group,
    /// Anything else, as sent (empty when missing).
    #[default]
    Unknown,
}

/// Someone @-mentioned in a robot message (`atUsers`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AtUser {
    pub dingtalk_id: Option<String>,
    /// The user id inside the organisation (absent for outsiders).
    pub staff_id: Option<String>,
}

/// What a robot message says, by `msgtype`.
#[derive(Debug, Clone, PartialEq)]
pub enum RobotContent {
    /// `text`: `text.content` as sent (DingTalk keeps the space left by the @-mention).
    Text(String),
    /// `richText`: the text parts joined, and every part as sent (`{"text"}`, pictures with
    /// their `downloadCode`).
    RichText { text: String, parts: Vec<Value> },
    /// `picture`: the code that downloads it (`content.downloadCode`).
    Picture { download_code: Option<String> },
    /// Any other kind (`audio`, `video`, `file`, …): `msgtype` and its `content` as sent.
    Other { msgtype: String, content: Value },
}

impl Default for RobotContent {
    fn default() -> Self {
        RobotContent::Text(String::new())
    }
}

/// `robot_message`: a message to the app's robot (an @-mention in a group, or a one-to-one
/// chat), from Stream mode's CALLBACK frames or the robot's HTTP endpoint. Read leniently:
/// a missing or ill-typed field is its default, never an error. `Debug` hides the session
/// webhook, whose URL is a credential.
#[derive(Clone, PartialEq, Default)]
pub struct RobotMessage {
    /// DingTalk's id of the message (the de-duplication key is `robot:<msgId>`).
    pub msg_id: String,
    /// `text`, `richText`, `picture`, … (`msgtype`).
    pub msgtype: String,
    pub content: RobotContent,
    /// The conversation (`conversationId`): the group's `openConversationId` in a group.
    pub conversation_id: String,
    pub conversation_type: ConversationType,
    pub conversation_title: Option<String>,
    pub sender_id: Option<String>,
    /// The sender's user id in the organisation.
    pub sender_staff_id: Option<String>,
    pub sender_corp_id: Option<String>,
    pub sender_nick: Option<String>,
    pub is_admin: bool,
    pub at_users: Vec<AtUser>,
    /// Whether the robot was @-mentioned.
    pub is_in_at_list: bool,
    /// Where a reply can be POSTed until `session_webhook_expired_time` (a credential: keep
    /// it out of logs).
    pub session_webhook: Option<String>,
    /// Epoch ms.
    pub session_webhook_expired_time: Option<i64>,
    pub robot_code: Option<String>,
    pub chatbot_user_id: Option<String>,
    pub chatbot_corp_id: Option<String>,
    /// When it was sent, epoch ms.
    pub create_at: Option<i64>,
}

impl std::fmt::Debug for RobotMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RobotMessage")
            .field("msg_id", &self.msg_id)
            .field("msgtype", &self.msgtype)
            .field("content", &self.content)
            .field("conversation_id", &self.conversation_id)
            .field("conversation_type", &self.conversation_type)
            .field("conversation_title", &self.conversation_title)
            .field("sender_id", &self.sender_id)
            .field("sender_staff_id", &self.sender_staff_id)
            .field("sender_corp_id", &self.sender_corp_id)
            .field("sender_nick", &self.sender_nick)
            .field("is_admin", &self.is_admin)
            .field("at_users", &self.at_users)
            .field("is_in_at_list", &self.is_in_at_list)
            .field(
                "session_webhook",
                &self.session_webhook.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "session_webhook_expired_time",
                &self.session_webhook_expired_time,
            )
            .field("robot_code", &self.robot_code)
            .field("chatbot_user_id", &self.chatbot_user_id)
            .field("chatbot_corp_id", &self.chatbot_corp_id)
            .field("create_at", &self.create_at)
            .finish()
    }
}

impl RobotMessage {
    /// Reads a robot message's JSON; anything but an object is an empty message.
    pub fn from_value(value: &Value) -> RobotMessage {
        value.as_object().map(Self::from_object).unwrap_or_default()
    }

    /// Reads a robot message's JSON object, leniently.
    pub fn from_object(object: &Map<String, Value>) -> RobotMessage {
        let f = Fields(object);
        let msgtype = f.string("msgtype").unwrap_or_default();
        let content_object = get_ci(object, "content");
        let content = match msgtype.as_str() {
            "text" | "" => RobotContent::Text(
                get_ci(object, "text")
                    .and_then(Value::as_object)
                    .and_then(|t| string_ci(t, "content"))
                    .or_else(|| content_object.and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default(),
            ),
            "richText" => {
                let parts: Vec<Value> = content_object
                    .and_then(Value::as_object)
                    .and_then(|c| get_ci(c, "richText"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let text = parts
                    .iter()
                    .filter_map(|p| p.as_object().and_then(|p| string_ci(p, "text")))
                    .collect::<Vec<_>>()
                    .join("");
                RobotContent::RichText { text, parts }
            }
            "picture" => RobotContent::Picture {
                download_code: content_object
                    .and_then(Value::as_object)
                    .and_then(|c| string_ci(c, "downloadCode")),
            },
            other => RobotContent::Other {
                msgtype: other.to_owned(),
                content: content_object
                    .or_else(|| get_ci(object, other))
                    .cloned()
                    .unwrap_or(Value::Null),
            },
        };
        let conversation_type = match f.string("conversationType").as_deref().map(str::trim) {
            Some("1") => ConversationType::Single,
            Some("2") => ConversationType::Group,
            _ => ConversationType::Unknown,
        };
        let at_users = match get_ci(object, "atUsers") {
            Some(Value::Array(users)) => users
                .iter()
                .filter_map(Value::as_object)
                .map(|u| AtUser {
                    dingtalk_id: string_ci(u, "dingtalkId"),
                    staff_id: string_ci(u, "staffId"),
                })
                .collect(),
            _ => Vec::new(),
        };
        RobotMessage {
            msg_id: f.string("msgId").unwrap_or_default(),
            msgtype,
            content,
            conversation_id: f.string("conversationId").unwrap_or_default(),
            conversation_type,
            conversation_title: f.string("conversationTitle"),
            sender_id: f.string("senderId"),
            sender_staff_id: f.string("senderStaffId"),
            sender_corp_id: f.string("senderCorpId"),
            sender_nick: f.string("senderNick"),
            is_admin: f.bool("isAdmin").unwrap_or(false),
            at_users,
            is_in_at_list: f.bool("isInAtList").unwrap_or(false),
            session_webhook: f.string("sessionWebhook"),
            session_webhook_expired_time: f.i64("sessionWebhookExpiredTime"),
            robot_code: f.string("robotCode"),
            chatbot_user_id: f.string("chatbotUserId"),
            chatbot_corp_id: f.string("chatbotCorpId"),
            create_at: f.i64("createAt"),
        }
    }

    /// The text of a `text` or `richText` message, trimmed (the @-mention leaves a space).
    pub fn text(&self) -> Option<&str> {
        match &self.content {
            RobotContent::Text(text) | RobotContent::RichText { text, .. } => Some(text.trim()),
            _ => None,
        }
    }

    /// The session webhook, if it is still valid at `now_ms` (a webhook without an expiry
    /// counts as valid).
    pub fn session_webhook_at(&self, now_ms: i64) -> Option<&str> {
        let valid = self
            .session_webhook_expired_time
            .is_none_or(|expires| now_ms < expires);
        self.session_webhook.as_deref().filter(|_| valid)
    }
}

/// A decoded event, routed to handlers by its variant.
// `RobotMessage` is the largest variant (a few hundred bytes); it is kept unboxed so
// `on_robot_message` hands handlers the message itself, like every other typed registration.
// An event is decoded once per claim, so the size costs a copy, not an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ChatUpdateTitle(ChatUpdateTitle),
    CoolAppInstall(CoolAppChange),
    CoolAppUninstall(CoolAppChange),
    AttendanceCheckRecord(Vec<CheckRecord>),
    AttendanceScheduleChange(Vec<ScheduleChange>),
    AttendanceOvertimeDuration(Vec<OvertimeDuration>),
    TodoTaskCreate(TodoTaskChange),
    TodoTaskUpdate(TodoTaskChange),
    TodoTaskDelete(TodoTaskChange),
    /// Internal: look up one user's attendance day (scheduled by the check-in handler).
    AttendanceLookup(AttendanceLookup),
    /// Internal: ask DingTalk what became of a work notification (scheduled after sending).
    SendResultCheck(SendResultCheck),
    /// A message to the app's robot (`robot_message`: Stream CALLBACK or the robot's HTTP
    /// endpoint).
    RobotMessage(RobotMessage),
    /// Every other type, kept as received.
    Unknown {
        event_type: String,
        raw: Value,
    },
}

pub const CHAT_UPDATE_TITLE: &str = "chat_update_title";
pub const COOL_APP_INSTALL: &str = "im_cool_app_install";
pub const COOL_APP_UNINSTALL: &str = "im_cool_app_uninstall";
pub const ATTENDANCE_CHECK_RECORD: &str = "attendance_check_record";
pub const ATTENDANCE_SCHEDULE_CHANGE: &str = "attendance_schedule_change";
pub const ATTENDANCE_OVERTIME_DURATION: &str = "attendance_overtime_duration";
pub const TODO_TASK_CREATE: &str = "todo_task_create";
pub const TODO_TASK_UPDATE: &str = "todo_task_update";
pub const TODO_TASK_DELETE: &str = "todo_task_delete";
/// A message to the app's robot. DingTalk gives it no `EventType`: the sources store it under
/// this type (keyed `robot:<msgId>`), and [`Event::decode_stored`] reads it by the row's type.
pub const ROBOT_MESSAGE: &str = "robot_message";
/// Internal event types: dinghook stores them in its own inbox as follow-up work, so they
/// get the same durability, retries and replay as DingTalk's events.
pub const ATTENDANCE_LOOKUP: &str = "dinghook_attendance_lookup";
pub const SEND_RESULT_CHECK: &str = "dinghook_send_result_check";

/// What an attendance lookup carries: one user's day, and the window of check times it
/// covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttendanceLookup {
    pub user_id: String,
    /// `yyyy-MM-dd` at the configured offset.
    pub work_date: String,
    /// The window's check times, `[window_start, window_end)` in epoch ms.
    pub window_start: i64,
    pub window_end: i64,
    #[serde(default)]
    pub corp_id: Option<String>,
    /// The punches of the event that scheduled it (later punches of the window were
    /// coalesced into it and are found in DingTalk's answer).
    #[serde(default)]
    pub punches: Vec<Punch>,
}

/// One check-in as the push reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Punch {
    pub check_time: i64,
    #[serde(default)]
    pub location_result: Option<String>,
    #[serde(default)]
    pub location_method: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub check_by_user: bool,
}

/// What a delivery check carries: the work notification's task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResultCheck {
    pub task_id: i64,
}

impl Event {
    /// Decodes a stored payload.
    pub fn decode(payload: &str) -> Result<Event, DecodeError> {
        let value: Value =
            serde_json::from_str(payload).map_err(|e| DecodeError::NotAnObject(e.to_string()))?;
        Self::from_value(value)
    }

    /// Decodes a stored row's payload: its `EventType`, else the row's `event_type` (a robot
    /// message carries no `EventType`; the source stored it as [`ROBOT_MESSAGE`]).
    pub fn decode_stored(event_type: &str, payload: &str) -> Result<Event, DecodeError> {
        let value: Value =
            serde_json::from_str(payload).map_err(|e| DecodeError::NotAnObject(e.to_string()))?;
        Self::from_value_as(value, Some(event_type))
    }

    /// Decodes a parsed payload.
    pub fn from_value(value: Value) -> Result<Event, DecodeError> {
        Self::from_value_as(value, None)
    }

    /// [`Event::from_value`] with the type to assume when the payload names none.
    fn from_value_as(value: Value, row_type: Option<&str>) -> Result<Event, DecodeError> {
        let Some(object) = value.as_object() else {
            return Err(DecodeError::NotAnObject("not an object".into()));
        };
        let f = Fields(object);
        let event_type = f
            .string("EventType")
            .or_else(|| row_type.filter(|t| !t.is_empty()).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        let event = match event_type.as_str() {
            CHAT_UPDATE_TITLE => Event::ChatUpdateTitle(ChatUpdateTitle {
                corp_id: f.string("CorpId"),
                chat_id: f.string("ChatId"),
                open_conversation_id: f.string("OpenConversationId"),
                title: f.required(CHAT_UPDATE_TITLE, "title")?,
                operator: f.string("Operator"),
                operator_union_id: f.string("operatorUnionId"),
                time: f.i64("TimeStamp").or_else(|| f.i64("EventTime")),
            }),
            COOL_APP_INSTALL => Event::CoolAppInstall(cool_app(f, COOL_APP_INSTALL)?),
            COOL_APP_UNINSTALL => Event::CoolAppUninstall(cool_app(f, COOL_APP_UNINSTALL)?),
            ATTENDANCE_CHECK_RECORD => Event::AttendanceCheckRecord(
                f.objects("DataList")
                    .into_iter()
                    .map(|r| {
                        Ok(CheckRecord {
                            user_id: r.required(ATTENDANCE_CHECK_RECORD, "userId")?,
                            corp_id: r.string("corpId"),
                            check_time: r.i64("checkTime"),
                            group_id: r.string("groupId"),
                            biz_id: r.string("bizId"),
                            location_method: r.string("locationMethod"),
                            location_result: r.string("locationResult"),
                            address: r.string("address"),
                            device_sn: r.string("deviceSN"),
                            check_by_user: r.bool("checkByUser").unwrap_or(true),
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?,
            ),
            ATTENDANCE_SCHEDULE_CHANGE => Event::AttendanceScheduleChange(
                f.objects("DataList")
                    .into_iter()
                    .map(|r| ScheduleChange {
                        corp_id: r.string("corpId"),
                        user_ids: r.strings("userIds"),
                        change_type: r.string("type"),
                        work_date_begin: r.i64("workDateBegin"),
                        work_date_end: r.i64("workDateEnd"),
                    })
                    .collect(),
            ),
            ATTENDANCE_OVERTIME_DURATION => Event::AttendanceOvertimeDuration(
                f.objects("DataList")
                    .into_iter()
                    .map(|r| OvertimeDuration {
                        corp_id: r.string("corpId"),
                        user_id: r.string("userId"),
                        overtime_day: r.f64("overtimeDay"),
                        overtime_hour: r.f64("overtimeHour"),
                        work_date: r.i64("workDate"),
                        overtime_day_type: r.string("overtimeDayType"),
                    })
                    .collect(),
            ),
            TODO_TASK_CREATE => Event::TodoTaskCreate(todo(f, TODO_TASK_CREATE)?),
            TODO_TASK_UPDATE => Event::TodoTaskUpdate(todo(f, TODO_TASK_UPDATE)?),
            TODO_TASK_DELETE => Event::TodoTaskDelete(todo(f, TODO_TASK_DELETE)?),
            ATTENDANCE_LOOKUP => Event::AttendanceLookup(internal(ATTENDANCE_LOOKUP, value)?),
            SEND_RESULT_CHECK => Event::SendResultCheck(internal(SEND_RESULT_CHECK, value)?),
            ROBOT_MESSAGE => Event::RobotMessage(RobotMessage::from_object(object)),
            _ => Event::Unknown {
                event_type,
                raw: value,
            },
        };
        Ok(event)
    }

    /// The payload an internal event is stored as: its fields and `EventType`. `None` for
    /// DingTalk's events, which are stored exactly as received.
    pub fn internal_payload(&self) -> Option<Value> {
        let mut value = match self {
            Event::AttendanceLookup(lookup) => serde_json::to_value(lookup).ok()?,
            Event::SendResultCheck(check) => serde_json::to_value(check).ok()?,
            _ => return None,
        };
        let Value::Object(map) = &mut value else {
            return None;
        };
        map.insert(
            "EventType".into(),
            Value::String(self.event_type().to_owned()),
        );
        Some(value)
    }

    /// The DingTalk event type this variant stands for.
    pub fn event_type(&self) -> &str {
        match self {
            Event::ChatUpdateTitle(_) => CHAT_UPDATE_TITLE,
            Event::CoolAppInstall(_) => COOL_APP_INSTALL,
            Event::CoolAppUninstall(_) => COOL_APP_UNINSTALL,
            Event::AttendanceCheckRecord(_) => ATTENDANCE_CHECK_RECORD,
            Event::AttendanceScheduleChange(_) => ATTENDANCE_SCHEDULE_CHANGE,
            Event::AttendanceOvertimeDuration(_) => ATTENDANCE_OVERTIME_DURATION,
            Event::TodoTaskCreate(_) => TODO_TASK_CREATE,
            Event::TodoTaskUpdate(_) => TODO_TASK_UPDATE,
            Event::TodoTaskDelete(_) => TODO_TASK_DELETE,
            Event::AttendanceLookup(_) => ATTENDANCE_LOOKUP,
            Event::SendResultCheck(_) => SEND_RESULT_CHECK,
            Event::RobotMessage(_) => ROBOT_MESSAGE,
            Event::Unknown { event_type, .. } => event_type,
        }
    }
}

/// An internal event's payload read back as written by [`Event::internal_payload`].
fn internal<T: serde::de::DeserializeOwned>(
    event_type: &'static str,
    value: Value,
) -> Result<T, DecodeError> {
    serde_json::from_value(value).map_err(|e| DecodeError::Internal {
        event_type,
        message: e.to_string(),
    })
}

fn cool_app(f: Fields<'_>, event_type: &'static str) -> Result<CoolAppChange, DecodeError> {
    Ok(CoolAppChange {
        corp_id: f.string("CorpId"),
        cool_app_code: f.required(event_type, "coolAppCode")?,
        robot_code: f.required(event_type, "robotCode")?,
        open_conversation_id: f.required(event_type, "openConversationId")?,
        open_conversation_corp_id: f.string("openConversationCorpId"),
        operator: f.string("operator"),
        operate_time: f.i64("operateTime"),
    })
}

fn todo(f: Fields<'_>, event_type: &'static str) -> Result<TodoTaskChange, DecodeError> {
    Ok(TodoTaskChange {
        corp_id: f.string("CorpId"),
        task_id: f.required(event_type, "taskId")?,
        biz_tag: f.string("bizTag"),
        union_ids: f.strings("UnionIdList"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_case_insensitively_and_numbers_may_be_strings() {
        let (e, _) = Envelope::parse(
            br#"{"eventType":"chat_update_title","corpId":"ding1","EVENTID":"e1","timeStamp":"1608027247528"}"#,
        )
        .unwrap();
        assert_eq!(e.event_type, "chat_update_title");
        assert_eq!(e.corp_id.as_deref(), Some("ding1"));
        assert_eq!(e.event_id, Some(IdText::String("e1".into())));
        assert_eq!(e.event_time, Some(1_608_027_247_528));
    }

    #[test]
    fn dedup_prefers_event_id_then_biz_id_then_hash() {
        let msg = br#"{"EventType":"x","eventId":"abc","BizId":"b"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        assert_eq!(e.dedup_key(msg), "event:abc");
        let msg = br#"{"EventType":"x","BizId":"b"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        assert_eq!(e.dedup_key(msg), "biz:x:b");
        let msg = br#"{"EventType":"x"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        let key = e.dedup_key(msg);
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64, "{key}");
    }

    fn key(msg: &str) -> String {
        let (e, _) = Envelope::parse(msg.as_bytes()).unwrap();
        e.dedup_key(msg.as_bytes())
    }

    #[test]
    fn numeric_ids_keep_their_text_and_differ_from_strings() {
        let a = key(r#"{"EventType":"x","eventId":12345678901234567890123}"#);
        let b = key(r#"{"EventType":"x","eventId":12345678901234567890124}"#);
        assert_eq!(a, "event-number:12345678901234567890123");
        assert_eq!(b, "event-number:12345678901234567890124");
        // As written: whitespace around it is not part of it, its spelling is.
        assert_eq!(
            key("{ \"eventId\" :\t 1.50 , \"EventType\":\"x\"}"),
            "event-number:1.50"
        );
        assert_eq!(key(r#"{"eventId":-0}"#), "event-number:-0");
        // A number and a string with the same digits are different ids, in any event type.
        assert_eq!(key(r#"{"EventType":"x","eventId":1}"#), "event-number:1");
        assert_eq!(key(r#"{"EventType":"x","eventId":"1"}"#), "event:1");
        assert_eq!(key(r#"{"EventType":"y","eventId":1}"#), "event-number:1");
        // Any spelling of the member, escapes in its name, the last of duplicates (as `Value`).
        assert_eq!(
            key(r#"{"EVENTID":99999999999999999999}"#),
            "event-number:99999999999999999999"
        );
        assert_eq!(
            key(r#"{"event\u0049d":99999999999999999999}"#),
            "event-number:99999999999999999999"
        );
        assert_eq!(
            key(r#"{"eventId":1,"eventId":22222222222222222222222}"#),
            "event-number:22222222222222222222222"
        );
        // Nested members are not the event's id.
        assert!(key(r#"{"x":{"eventId":5}}"#).starts_with("sha256:"));
    }

    #[test]
    fn biz_ids_are_typed_and_cannot_meet_across_types() {
        assert_eq!(
            key(r#"{"EventType":"t","BizId":12345678901234567890123}"#),
            "biz-number:t:12345678901234567890123"
        );
        assert_eq!(key(r#"{"EventType":"t","BizId":"7"}"#), "biz:t:7");
        assert_ne!(
            key(r#"{"EventType":"t","BizId":7}"#),
            key(r#"{"EventType":"t","BizId":"7"}"#)
        );
        // ("a:b", "c") and ("a", "b:c") would both be biz:a:b:c.
        assert_eq!(key(r#"{"EventType":"a:b","BizId":"c"}"#), "biz/3:a:b:c");
        assert_eq!(key(r#"{"EventType":"a","BizId":"b:c"}"#), "biz:a:b:c");
        // An eventId of any kind comes first.
        assert_eq!(
            key(r#"{"EventType":"t","BizId":"b","eventId":5}"#),
            "event-number:5"
        );
        // Empty, null or boolean ids are no ids.
        assert_eq!(
            key(r#"{"EventType":"t","BizId":"b","eventId":""}"#),
            "biz:t:b"
        );
        assert_eq!(
            key(r#"{"EventType":"t","BizId":"b","eventId":null}"#),
            "biz:t:b"
        );
        assert!(key(r#"{"EventType":"t","BizId":true}"#).starts_with("sha256:"));
    }

    #[test]
    fn a_payload_without_a_type_is_kept_as_unknown() {
        let (e, _) = Envelope::parse(br#"{"CorpId":"x"}"#).unwrap();
        assert_eq!(e.event_type, "unknown");
        assert!(!e.is_check());
    }

    #[test]
    fn non_objects_are_rejected() {
        assert_eq!(
            Envelope::parse(b"[1]").unwrap_err(),
            EnvelopeError::NotObject
        );
        assert!(matches!(
            Envelope::parse(b"nope"),
            Err(EnvelopeError::NotJson(_))
        ));
    }

    #[test]
    fn robot_messages_decode_by_the_rows_type_and_leniently() {
        let payload = r#"{"msgId":"msgA","msgtype":"text","text":{"content":" ack"},
            "conversationId":"cid1","conversationType":"2","senderStaffId":"u1","senderNick":"Ann",
            "senderId":"$:s","senderCorpId":"dingc","atUsers":[{"dingtalkId":"d1","staffId":"s1"},{"dingtalkId":"d2"},3],
            "sessionWebhook":"https://oapi.dingtalk.com/robot/sendBySession?session=secret",
            "sessionWebhookExpiredTime":"1700000000000","robotCode":"rc","chatbotUserId":"$:b",
            "createAt":1699999999000,"isInAtList":"true"}"#;
        let Event::RobotMessage(m) = Event::decode_stored(ROBOT_MESSAGE, payload).unwrap() else {
            panic!("not a robot message");
        };
        assert_eq!(m.msg_id, "msgA");
        assert_eq!(m.text(), Some("ack"));
        assert_eq!(m.conversation_type, ConversationType::Group);
        assert_eq!(m.conversation_id, "cid1");
        assert_eq!(m.at_users.len(), 2);
        assert_eq!(m.at_users[0].staff_id.as_deref(), Some("s1"));
        assert_eq!(m.at_users[1].staff_id, None);
        assert_eq!(m.session_webhook_expired_time, Some(1_700_000_000_000));
        assert!(m.is_in_at_list);
        assert_eq!(m.create_at, Some(1_699_999_999_000));
        assert!(m.session_webhook_at(1_699_999_999_999).is_some());
        assert!(m.session_webhook_at(1_700_000_000_000).is_none());
        // The session webhook is a credential: Debug hides it.
        assert!(!format!("{m:?}").contains("secret"), "{m:?}");
        // Without the row's type, the payload alone is an unknown event, as before.
        assert!(matches!(
            Event::decode(payload).unwrap(),
            Event::Unknown { .. }
        ));
        // A payload's own EventType wins over the row's.
        let typed = r#"{"EventType":"todo_task_create","taskId":"t"}"#;
        assert!(matches!(
            Event::decode_stored(ROBOT_MESSAGE, typed).unwrap(),
            Event::TodoTaskCreate(_)
        ));
    }

    #[test]
    fn robot_content_kinds_and_missing_fields() {
        let m = RobotMessage::from_value(&serde_json::json!({}));
        assert_eq!(m, RobotMessage::default());
        assert_eq!(m.text(), Some(""));
        let m = RobotMessage::from_value(&serde_json::json!([1, 2]));
        assert_eq!(m, RobotMessage::default());
        let m = RobotMessage::from_value(&serde_json::json!({"msgtype": "richText",
            "content": {"richText": [{"text": "see "}, {"type": "picture", "downloadCode": "dc"}, {"text": "this"}]}}));
        assert_eq!(m.text(), Some("see this"));
        let RobotContent::RichText { parts, .. } = &m.content else {
            panic!()
        };
        assert_eq!(parts.len(), 3);
        let m = RobotMessage::from_value(&serde_json::json!({"msgtype": "picture",
            "content": {"downloadCode": "dc1"}, "conversationType": 1}));
        assert_eq!(
            m.content,
            RobotContent::Picture {
                download_code: Some("dc1".into())
            }
        );
        assert_eq!(m.conversation_type, ConversationType::Single);
        assert_eq!(m.text(), None);
        let m = RobotMessage::from_value(&serde_json::json!({"msgtype": "audio",
            "content": {"duration": 3}, "text": 5, "atUsers": "x", "isInAtList": [], "createAt": "soon"}));
        assert_eq!(
            m.content,
            RobotContent::Other {
                msgtype: "audio".into(),
                content: serde_json::json!({"duration": 3})
            }
        );
        assert!(m.at_users.is_empty() && !m.is_in_at_list && m.create_at.is_none());
        // Wrong types for text never panic.
        let m = RobotMessage::from_value(&serde_json::json!({"msgtype": "text", "text": "plain"}));
        assert_eq!(m.text(), Some(""));
    }
}
