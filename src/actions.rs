//! Actions: what the user's systems ask dinghook to do on DingTalk, through the HTTP API
//! (`POST /api/v1/apps/{app}/actions`) or `dinghook act`.
//!
//! An action is stored in the inbox as an internal event ([`ACTION_EVENT`]) before it is
//! acknowledged, so it has what every event has: durability, a lease, retries on DingTalk's
//! passing failures, dead letters for its permanent ones, replay. The dispatcher runs it
//! through the app's own client (its token, QPS limiter and monthly quota). Its fields keep
//! DingTalk's own names.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dingtalk::{
    Client, CreateSceneGroup, OaStatusBar, RobotGroupMessage, RobotOtoMessage, TodoTaskUpdate,
    WorkMessage, WorkNotification,
};
use crate::event::{ConversationType, Event, RobotMessage, ROBOT_MESSAGE};
use crate::store::{Store, StoreError};

/// The event type an action is stored as.
pub const ACTION_EVENT: &str = "dinghook_action";

/// The effect name under which an action's result is recorded (see
/// `builtin::effect_once`): `effect` documents keyed `<dedup key>/action`.
pub const ACTION_EFFECT: &str = "action";

/// The prefix of an action's de-duplication key; the rest is the caller's idempotency key.
pub const ACTION_KEY_PREFIX: &str = "action:";

/// DingTalk's limits on one work notification's recipients (asyncsend_v2).
const MAX_USERS: usize = 100;
const MAX_DEPTS: usize = 20;
/// Members one war room may be created with (DingTalk's group size is larger; a request
/// this long is a mistake, and each mobile costs a lookup).
const MAX_MEMBERS: usize = 500;
/// DingTalk's limit on a scene group's title (docs/dingtalk-war-room.md).
const MAX_TITLE: usize = 30;
/// Longest robot reply text (bytes): the group-message API's `msgParam` limit, so a reply
/// that falls back to it is not refused there.
const MAX_REPLY: usize = 15_000;
/// A session webhook closer than this to its expiry is not used: the request could arrive
/// after it.
const SESSION_MARGIN_MS: i64 = 5_000;

/// `text` of a robot reply (DingTalk's own shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyText {
    pub content: String,
}

/// `markdown` of a robot reply (DingTalk's own shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyMarkdown {
    pub title: String,
    pub text: String,
}

/// One action, as the caller sends it (`{"type": "…", …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// A work notification (`asyncsend_v2`); `msg` exactly as that API takes it.
    WorkNotification {
        #[serde(default)]
        userid_list: Vec<String>,
        #[serde(default)]
        dept_id_list: Vec<i64>,
        #[serde(default)]
        to_all_user: bool,
        msg: Box<WorkMessage>,
    },
    /// The status bar of an OA work notification sent before.
    StatusBar {
        task_id: i64,
        status_value: String,
        #[serde(default)]
        status_bg: Option<String>,
    },
    /// Withdraws a work notification sent in the last 24 hours.
    Recall { task_id: i64 },
    /// A robot message into a group (`/v1.0/robot/groupMessages/send`).
    GroupMessage {
        open_conversation_id: String,
        robot_code: String,
        #[serde(default)]
        cool_app_code: Option<String>,
        msg_key: String,
        msg_param: Value,
    },
    /// Changes a to-do task (`PUT /v1.0/todo/users/{unionId}/tasks/{taskId}`).
    TodoUpdate {
        union_id: String,
        task_id: String,
        #[serde(default)]
        done: Option<bool>,
        #[serde(default)]
        subject: Option<String>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        due_time: Option<i64>,
        #[serde(default)]
        operator_id: Option<String>,
    },
    /// A scene group created from a template for an incident, members by user id or by
    /// mobile.
    WarRoom {
        title: String,
        template_id: String,
        owner_user_id: String,
        #[serde(default)]
        user_ids: Vec<String>,
        #[serde(default)]
        mobiles: Vec<String>,
    },
    /// A reply to a robot message: through its session webhook while that is valid, else
    /// into the group through the group-message API, or into a one-to-one chat through the
    /// one-to-one API. `event_id` names the stored `robot_message` to answer (its webhook,
    /// expiry, group or sender, and robot code fill the fields left out); without it, the
    /// fields say where to send.
    RobotReply {
        #[serde(default)]
        event_id: Option<i64>,
        #[serde(default)]
        session_webhook: Option<String>,
        /// Epoch ms; without it a given session webhook is tried.
        #[serde(default)]
        session_webhook_expires_at: Option<i64>,
        #[serde(default)]
        open_conversation_id: Option<String>,
        #[serde(default)]
        robot_code: Option<String>,
        #[serde(default)]
        cool_app_code: Option<String>,
        /// The user of a one-to-one chat (their user id, a message's `senderStaffId`): where
        /// the reply goes when the session webhook cannot take it.
        #[serde(default)]
        user_id: Option<String>,
        /// `text` or `markdown`.
        msgtype: String,
        #[serde(default)]
        text: Option<Box<ReplyText>>,
        #[serde(default)]
        markdown: Option<Box<ReplyMarkdown>>,
    },
}

/// Why a `robot_reply`'s `event_id` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("event_id {0}: no such event of this app")]
    NotFound(i64),
    #[error("event_id {id}: a {event_type} event, not a robot_message")]
    NotARobotMessage { id: i64, event_type: String },
    #[error("event_id {id}: its payload does not decode: {message}")]
    Undecodable { id: i64, message: String },
    /// Passing: worth another attempt.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a run of an action did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// It would send a message through a metered API, and the caller's gate (the monthly
    /// quota's notification reserve) said no. Nothing was sent.
    #[error("{0} refused: the monthly DingTalk quota is under the notification reserve")]
    Reserve(&'static str),
    #[error(transparent)]
    DingTalk(#[from] crate::dingtalk::Error),
}

/// Asked before each call that sends a message through an API counted toward the monthly
/// quota (a work notification, a group or one-to-one robot message); `false` refuses it. A
/// reply through a session webhook is not metered and does not ask.
pub type MeteredGate<'a> =
    &'a (dyn Fn(&'static str) -> futures_util::future::BoxFuture<'a, bool> + Send + Sync);

/// What the API shows of an action's body: as submitted, except a `session_webhook` (a
/// credential: whoever holds it may post into the conversation until it expires), shown as
/// `"[set]"`. The stored action keeps it to run.
pub fn redacted(request: &Value) -> Value {
    let mut shown = request.clone();
    if let Some(webhook) = shown.get_mut("session_webhook") {
        if !webhook.is_null() {
            *webhook = Value::String(REDACTED.into());
        }
    }
    shown
}

/// What the API and the console show of a stored event's payload: as stored, except the
/// session webhooks in it (an action's `session_webhook`, a robot message's
/// `sessionWebhook`), shown as `"[set]"`. Routes still carry robot messages whole: the
/// user's own service needs the webhook to reply.
pub fn shown_payload(event_type: &str, mut payload: Value) -> Value {
    let field = match event_type {
        ACTION_EVENT => payload
            .get_mut("action")
            .and_then(|a| a.get_mut("session_webhook")),
        ROBOT_MESSAGE => payload.get_mut("sessionWebhook"),
        _ => None,
    };
    if let Some(webhook) = field {
        if !webhook.is_null() {
            *webhook = Value::String(REDACTED.into());
        }
    }
    payload
}

/// What [`redacted`] puts in place of a session webhook.
pub const REDACTED: &str = "[set]";

/// Why a request is not an action that can be run: the API answers 422 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidAction {
    /// The field at fault (`msg`, `userid_list`, …), or `type`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> InvalidAction {
    InvalidAction {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn required(field: &str, value: &str) -> Result<(), InvalidAction> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Ok(())
}

impl Action {
    /// Reads an action from the caller's JSON, naming the field at fault.
    pub fn parse(body: &Value) -> Result<Action, InvalidAction> {
        let Some(kind) = body.get("type") else {
            return Err(invalid(
                "type",
                format!("missing: one of {}", Self::TYPES.join(", ")),
            ));
        };
        let kind = kind.as_str().unwrap_or_default();
        if !Self::TYPES.contains(&kind) {
            return Err(invalid(
                "type",
                format!(
                    "unknown action type {kind:?}: one of {}",
                    Self::TYPES.join(", ")
                ),
            ));
        }
        let action: Action =
            serde_json::from_value(body.clone()).map_err(|e| invalid(kind, e.to_string()))?;
        action.validate()?;
        Ok(action)
    }

    /// Every action type.
    pub const TYPES: [&'static str; 7] = [
        "work_notification",
        "status_bar",
        "recall",
        "group_message",
        "todo_update",
        "war_room",
        "robot_reply",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Action::WorkNotification { .. } => "work_notification",
            Action::StatusBar { .. } => "status_bar",
            Action::Recall { .. } => "recall",
            Action::GroupMessage { .. } => "group_message",
            Action::TodoUpdate { .. } => "todo_update",
            Action::WarRoom { .. } => "war_room",
            Action::RobotReply { .. } => "robot_reply",
        }
    }

    /// Whether it sends a message. Those that do through a metered API ask the
    /// [`MeteredGate`] first (a robot reply only when it cannot go through its session
    /// webhook).
    pub fn is_notification(&self) -> bool {
        matches!(
            self,
            Action::WorkNotification { .. }
                | Action::GroupMessage { .. }
                | Action::RobotReply { .. }
        )
    }

    /// Checks what DingTalk would refuse anyway, so the caller hears it at once (422) and
    /// no quota is spent on it.
    pub fn validate(&self) -> Result<(), InvalidAction> {
        match self {
            Action::WorkNotification {
                userid_list,
                dept_id_list,
                to_all_user,
                ..
            } => {
                if userid_list.is_empty() && dept_id_list.is_empty() && !to_all_user {
                    return Err(invalid(
                        "userid_list",
                        "no recipient: give userid_list, dept_id_list or to_all_user",
                    ));
                }
                if userid_list.len() > MAX_USERS {
                    return Err(invalid(
                        "userid_list",
                        format!("at most {MAX_USERS} users per notification"),
                    ));
                }
                if dept_id_list.len() > MAX_DEPTS {
                    return Err(invalid(
                        "dept_id_list",
                        format!("at most {MAX_DEPTS} departments per notification"),
                    ));
                }
                if userid_list.iter().any(|u| u.trim().is_empty()) {
                    return Err(invalid("userid_list", "holds an empty user id"));
                }
            }
            Action::StatusBar {
                task_id,
                status_value,
                ..
            } => {
                if *task_id <= 0 {
                    return Err(invalid("task_id", "must be a positive task id"));
                }
                required("status_value", status_value)?;
            }
            Action::Recall { task_id } => {
                if *task_id <= 0 {
                    return Err(invalid("task_id", "must be a positive task id"));
                }
            }
            Action::GroupMessage {
                open_conversation_id,
                robot_code,
                msg_key,
                msg_param,
                ..
            } => {
                required("open_conversation_id", open_conversation_id)?;
                required("robot_code", robot_code)?;
                required("msg_key", msg_key)?;
                if !msg_param.is_object() {
                    return Err(invalid("msg_param", "must be a JSON object"));
                }
            }
            Action::TodoUpdate {
                union_id,
                task_id,
                done,
                subject,
                description,
                due_time,
                ..
            } => {
                required("union_id", union_id)?;
                required("task_id", task_id)?;
                if done.is_none()
                    && subject.is_none()
                    && description.is_none()
                    && due_time.is_none()
                {
                    return Err(invalid(
                        "done",
                        "nothing to change: give done, subject, description or due_time",
                    ));
                }
            }
            Action::WarRoom {
                title,
                template_id,
                owner_user_id,
                user_ids,
                mobiles,
            } => {
                required("title", title)?;
                if title.chars().count() > MAX_TITLE {
                    return Err(invalid(
                        "title",
                        format!("at most {MAX_TITLE} characters (DingTalk's limit)"),
                    ));
                }
                required("template_id", template_id)?;
                required("owner_user_id", owner_user_id)?;
                if user_ids.len() + mobiles.len() > MAX_MEMBERS {
                    return Err(invalid(
                        "user_ids",
                        format!("at most {MAX_MEMBERS} members (user_ids and mobiles together)"),
                    ));
                }
                if mobiles.iter().any(|m| m.trim().is_empty()) {
                    return Err(invalid("mobiles", "holds an empty mobile number"));
                }
            }
            Action::RobotReply {
                event_id,
                session_webhook,
                open_conversation_id,
                robot_code,
                user_id,
                msgtype,
                text,
                markdown,
                ..
            } => {
                if event_id.is_some_and(|id| id <= 0) {
                    return Err(invalid("event_id", "must be a positive event id"));
                }
                if let Some(webhook) = session_webhook {
                    if !(webhook.starts_with("https://") || webhook.starts_with("http://")) {
                        return Err(invalid("session_webhook", "must be an http(s) URL"));
                    }
                }
                for (field, value) in [
                    ("open_conversation_id", open_conversation_id),
                    ("robot_code", robot_code),
                    ("user_id", user_id),
                ] {
                    if let Some(value) = value {
                        required(field, value)?;
                    }
                }
                if open_conversation_id.is_some() && user_id.is_some() {
                    return Err(invalid(
                        "user_id",
                        "a reply goes to a group (open_conversation_id) or to a one-to-one chat \
                         (user_id), not both",
                    ));
                }
                let group = open_conversation_id.is_some() && robot_code.is_some();
                let single = user_id.is_some() && robot_code.is_some();
                if event_id.is_none() && session_webhook.is_none() && !group && !single {
                    return Err(invalid(
                        "event_id",
                        "no recipient: give event_id (a stored robot_message), session_webhook, \
                         open_conversation_id and robot_code, or user_id and robot_code",
                    ));
                }
                let length = match (msgtype.as_str(), text, markdown) {
                    ("text", Some(text), None) => {
                        required("text.content", &text.content)?;
                        text.content.len()
                    }
                    ("markdown", None, Some(markdown)) => {
                        required("markdown.title", &markdown.title)?;
                        required("markdown.text", &markdown.text)?;
                        markdown.title.len() + markdown.text.len()
                    }
                    ("text" | "markdown", _, _) => {
                        return Err(invalid(
                            "msgtype",
                            format!("{msgtype} takes the field {msgtype:?} (and no other)"),
                        ))
                    }
                    _ => return Err(invalid("msgtype", "one of text, markdown")),
                };
                if length > MAX_REPLY {
                    return Err(invalid(
                        "msgtype",
                        format!("at most {MAX_REPLY} bytes of text"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A `robot_reply` naming a stored `robot_message` (`event_id`), with the fields the caller
    /// left out filled from it: session webhook and its expiry, robot code, and the group when
    /// the message came from one, or the sender (`senderStaffId`) when it came from a
    /// one-to-one chat. `store` is the app's own view, so another app's events are
    /// not found. Every other action comes back as it was.
    pub async fn resolve(self, store: &dyn Store) -> Result<Action, ResolveError> {
        let Action::RobotReply {
            event_id: Some(id),
            session_webhook,
            session_webhook_expires_at,
            open_conversation_id,
            robot_code,
            cool_app_code,
            user_id,
            msgtype,
            text,
            markdown,
        } = self
        else {
            return Ok(self);
        };
        let Some(row) = store.get(id).await? else {
            return Err(ResolveError::NotFound(id));
        };
        if row.event_type != ROBOT_MESSAGE {
            return Err(ResolveError::NotARobotMessage {
                id,
                event_type: row.event_type,
            });
        }
        let message = match Event::decode_stored(&row.event_type, &row.payload) {
            Ok(Event::RobotMessage(message)) => message,
            Ok(_) => RobotMessage::default(),
            Err(e) => {
                return Err(ResolveError::Undecodable {
                    id,
                    message: e.to_string(),
                })
            }
        };
        let group = (message.conversation_type == ConversationType::Group
            && !message.conversation_id.is_empty())
        .then(|| message.conversation_id.clone());
        let single = (message.conversation_type == ConversationType::Single)
            .then(|| message.sender_staff_id.clone())
            .flatten()
            .filter(|id| !id.is_empty());
        // The caller's own webhook comes with the caller's expiry (or none), not the message's.
        let (session_webhook, session_webhook_expires_at) = match session_webhook {
            Some(webhook) => (Some(webhook), session_webhook_expires_at),
            None => (
                message.session_webhook.clone(),
                session_webhook_expires_at.or(message.session_webhook_expired_time),
            ),
        };
        // The caller's group or user wins; the message's fills only when neither was given.
        let given = open_conversation_id.is_some() || user_id.is_some();
        let (open_conversation_id, user_id) = if given {
            (open_conversation_id, user_id)
        } else {
            (group, single)
        };
        Ok(Action::RobotReply {
            event_id: Some(id),
            session_webhook,
            session_webhook_expires_at,
            open_conversation_id,
            robot_code: robot_code.or(message.robot_code),
            cool_app_code,
            user_id,
            msgtype,
            text,
            markdown,
        })
    }

    /// Runs the action through `client`; returns DingTalk's result as the API shows it.
    /// `dedup` is a stable id of this action (derived from its idempotency key): passed to
    /// DingTalk where the API takes one, so a run repeated after a crash creates nothing
    /// twice there. `gate` is asked before each message sent through a metered API.
    pub async fn execute(
        &self,
        client: &Client,
        dedup: &str,
        gate: MeteredGate<'_>,
    ) -> Result<Value, ActionError> {
        if matches!(
            self,
            Action::WorkNotification { .. } | Action::GroupMessage { .. }
        ) && !gate(self.kind()).await
        {
            return Err(ActionError::Reserve(self.kind()));
        }
        match self {
            Action::WorkNotification {
                userid_list,
                dept_id_list,
                to_all_user,
                msg,
            } => {
                let notification = WorkNotification {
                    userid_list: userid_list.clone(),
                    dept_id_list: dept_id_list.clone(),
                    to_all_user: *to_all_user,
                    msg: (**msg).clone(),
                };
                let task_id = client.send_work_notification(&notification).await?;
                Ok(json!({ "task_id": task_id }))
            }
            Action::StatusBar {
                task_id,
                status_value,
                status_bg,
            } => {
                let status = OaStatusBar {
                    status_value: status_value.clone(),
                    status_bg: status_bg.clone(),
                };
                client
                    .update_work_notification_status(*task_id, &status)
                    .await?;
                Ok(json!({ "task_id": task_id }))
            }
            Action::Recall { task_id } => {
                client.recall_work_notification(*task_id).await?;
                Ok(json!({ "task_id": task_id }))
            }
            Action::GroupMessage {
                open_conversation_id,
                robot_code,
                cool_app_code,
                msg_key,
                msg_param,
            } => {
                let message = RobotGroupMessage::new(
                    robot_code.clone(),
                    open_conversation_id.clone(),
                    cool_app_code.clone(),
                    msg_key.clone(),
                    msg_param,
                )?;
                let key = client.send_robot_group_message(&message).await?;
                Ok(json!({ "process_query_key": key }))
            }
            Action::TodoUpdate {
                union_id,
                task_id,
                done,
                subject,
                description,
                due_time,
                operator_id,
            } => {
                let update = TodoTaskUpdate {
                    subject: subject.clone(),
                    description: description.clone(),
                    due_time: *due_time,
                    done: *done,
                    ..TodoTaskUpdate::default()
                };
                let result = client
                    .update_todo_task(union_id, task_id, operator_id.as_deref(), &update)
                    .await?;
                Ok(json!({ "result": result }))
            }
            Action::WarRoom {
                title,
                template_id,
                owner_user_id,
                user_ids,
                mobiles,
            } => {
                let mut members = user_ids.clone();
                for mobile in mobiles {
                    let user = client.user_id_by_mobile(mobile).await?;
                    if !members.contains(&user) {
                        members.push(user);
                    }
                }
                let mut group = CreateSceneGroup::new(title, template_id, owner_user_id);
                group.user_ids = members.clone();
                group.uuid = Some(dedup.to_owned());
                let created = client.create_scene_group(&group).await?;
                Ok(json!({
                    "open_conversation_id": created.open_conversation_id,
                    "chat_id": created.chat_id,
                    "user_ids": members,
                }))
            }
            Action::RobotReply {
                session_webhook,
                session_webhook_expires_at,
                open_conversation_id,
                robot_code,
                cool_app_code,
                user_id,
                msgtype,
                text,
                markdown,
                ..
            } => {
                let (webhook_body, msg_key, msg_param) = match (text, markdown) {
                    (Some(text), _) => (
                        json!({"msgtype": "text", "text": {"content": text.content}}),
                        "sampleText",
                        json!({"content": text.content}),
                    ),
                    (None, Some(md)) => (
                        json!({"msgtype": "markdown", "markdown": {"title": md.title, "text": md.text}}),
                        "sampleMarkdown",
                        json!({"title": md.title, "text": md.text}),
                    ),
                    (None, None) => {
                        return Err(crate::dingtalk::Error::Refused(format!(
                            "robot_reply: {msgtype} without its content"
                        ))
                        .into())
                    }
                };
                let now = crate::time::now_millis();
                let webhook = session_webhook.as_deref().filter(|_| {
                    session_webhook_expires_at
                        .is_none_or(|expires| now.saturating_add(SESSION_MARGIN_MS) < expires)
                });
                let fallback = match (open_conversation_id, user_id, robot_code) {
                    (Some(group), _, Some(robot)) => Some(Fallback::Group(group, robot)),
                    (None, Some(user), Some(robot)) => Some(Fallback::Single(user, robot)),
                    _ => None,
                };
                if let Some(webhook) = webhook {
                    match client.send_by_session(webhook, &webhook_body).await {
                        Ok(()) => return Ok(json!({"via": "session_webhook"})),
                        // DingTalk refused it (the session ended early): nothing was posted,
                        // so the group or one-to-one API may send it instead.
                        Err(e) if e.errcode().is_some() && fallback.is_some() => {
                            tracing::warn!(error = %e, "session webhook refused the reply; sending through the metered API");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let Some(fallback) = fallback else {
                    return Err(crate::dingtalk::Error::Refused(
                        "robot_reply: the session webhook is missing or expired, and there is \
                         nowhere else to send it (open_conversation_id or user_id, with \
                         robot_code)"
                            .into(),
                    )
                    .into());
                };
                if !gate(self.kind()).await {
                    return Err(ActionError::Reserve(self.kind()));
                }
                match fallback {
                    Fallback::Group(open_conversation_id, robot_code) => {
                        let message = RobotGroupMessage::new(
                            robot_code.clone(),
                            open_conversation_id.clone(),
                            cool_app_code.clone(),
                            msg_key,
                            &msg_param,
                        )?;
                        let key = client.send_robot_group_message(&message).await?;
                        Ok(json!({"via": "group_message", "process_query_key": key}))
                    }
                    Fallback::Single(user_id, robot_code) => {
                        let message = RobotOtoMessage::new(
                            robot_code.clone(),
                            vec![user_id.clone()],
                            msg_key,
                            &msg_param,
                        )?;
                        let sent = client.send_robot_oto_message(&message).await?;
                        if sent.invalid_staff_id_list.contains(user_id) {
                            return Err(crate::dingtalk::Error::Refused(format!(
                                "robot_reply: DingTalk did not send it: user {user_id:?} is in \
                                 invalidStaffIdList (not a user of the organisation, or the \
                                 robot cannot write to them)"
                            ))
                            .into());
                        }
                        if sent.flow_controlled_staff_id_list.contains(user_id) {
                            return Err(crate::dingtalk::Error::Throttled {
                                code: "flowControlledStaffIdList".into(),
                                attempts: 1,
                            }
                            .into());
                        }
                        Ok(
                            json!({"via": "oto_message", "process_query_key": sent.process_query_key}),
                        )
                    }
                }
            }
        }
    }
}

/// Where a robot reply goes when the session webhook cannot take it.
enum Fallback<'a> {
    /// A group: `open_conversation_id`, `robot_code`.
    Group(&'a String, &'a String),
    /// A one-to-one chat: `user_id`, `robot_code`.
    Single(&'a String, &'a String),
}

/// An action as stored: the event payload of an [`ACTION_EVENT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAction {
    /// The body as the caller sent it (compared with a repeat of the idempotency key).
    pub action: Value,
    pub idempotency_key: String,
    /// The API token's name (or `cli`).
    pub requested_by: String,
}

impl StoredAction {
    /// A stable id for DingTalk's own de-duplication (`uuid` of the scene group create):
    /// the first 32 hex digits of SHA-256 over app and idempotency key.
    pub fn dedup_id(&self, app: &str) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(app.as_bytes())
            .chain_update([0])
            .chain_update(self.idempotency_key.as_bytes())
            .finalize();
        hex::encode(&digest[..16])
    }
}

/// The event type routes receive when an action is done.
pub const ACTION_DONE_EVENT: &str = "dinghook.action.done";
/// The event type routes receive when an action is dead (given up on).
pub const ACTION_DEAD_EVENT: &str = "dinghook.action.dead";

/// The event that tells routes the action stored as `record` has ended: done (`error` is
/// `None`) or dead (why). Its payload names the action (id, idempotency key, type, who asked),
/// its attempts, and DingTalk's result as the action recorded it (`result`, read from `store`,
/// the app's view) or the error; never the request, which may hold a session webhook. Keyed
/// `<the action's key>/done` (or `/dead`), so telling twice stores it once.
pub async fn completion(
    store: &dyn Store,
    record: &crate::store::StoredEvent,
    error: Option<&str>,
    now_ms: i64,
) -> Result<crate::store::NewEvent, StoreError> {
    let stored: Option<StoredAction> = serde_json::from_str(&record.payload).ok();
    let result = store
        .get_document("effect", &format!("{}/{ACTION_EFFECT}", record.dedup_key))
        .await?
        .map(|d| d.body);
    let (event_type, state) = match error {
        None => (ACTION_DONE_EVENT, "done"),
        Some(_) => (ACTION_DEAD_EVENT, "dead"),
    };
    let payload = json!({
        "action_id": record.id,
        "app": record.app,
        "idempotency_key": stored.as_ref().map(|s| s.idempotency_key.as_str()),
        "action_type": stored.as_ref().and_then(|s| s.action.get("type")).and_then(Value::as_str),
        "requested_by": stored.as_ref().map(|s| s.requested_by.as_str()),
        "state": state,
        "attempts": record.attempts,
        "result": result,
        "error": error,
        "received_at": record.received_at,
        "finished_at": now_ms,
    });
    let key = crate::store::scoped::unscoped(&record.app, &record.dedup_key);
    Ok(crate::store::NewEvent {
        app: record.app.clone(),
        dedup_key: format!("{key}/{state}"),
        event_type: event_type.to_owned(),
        corp_id: None,
        payload: payload.to_string(),
        source: crate::store::Source::Internal,
        received_at: now_ms,
        routes: Vec::new(),
    })
}

/// Where an action is: the event's state as the API names it.
pub fn state_name(state: crate::store::EventState) -> &'static str {
    use crate::store::EventState;
    match state {
        EventState::Pending | EventState::Retry => "queued",
        EventState::Running => "running",
        EventState::Done => "done",
        EventState::Dead => "dead",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_notification_reads_dingtalk_s_own_message() {
        let action = Action::parse(&json!({
            "type": "work_notification",
            "userid_list": ["u1"],
            "msg": {"msgtype": "text", "text": {"content": "hi"}}
        }))
        .unwrap();
        assert_eq!(action.kind(), "work_notification");
        assert!(action.is_notification());
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (json!({"userid_list": []}), "type"),
            (json!({"type": "fax"}), "type"),
            (
                json!({"type": "work_notification", "msg": {"msgtype": "text", "text": {"content": "x"}}}),
                "userid_list",
            ),
            (
                json!({"type": "work_notification", "userid_list": ["u"], "msg": {"msgtype": "text", "text": {"content": "x", "extra": 1}}}),
                "work_notification",
            ),
            (
                json!({"type": "recall", "task_id": 1, "color": "red"}),
                "recall",
            ),
            (json!({"type": "recall", "task_id": 0}), "task_id"),
            (
                json!({"type": "group_message", "open_conversation_id": "cid", "robot_code": "r", "msg_key": "sampleText", "msg_param": "text"}),
                "msg_param",
            ),
            (
                json!({"type": "todo_update", "union_id": "u", "task_id": "t"}),
                "done",
            ),
            (
                json!({"type": "war_room", "title": "", "template_id": "t", "owner_user_id": "o"}),
                "title",
            ),
            (
                json!({"type": "robot_reply", "msgtype": "text", "text": {"content": "x"}}),
                "event_id",
            ),
            (
                json!({"type": "robot_reply", "event_id": 0, "msgtype": "text", "text": {"content": "x"}}),
                "event_id",
            ),
            (
                json!({"type": "robot_reply", "event_id": 1, "msgtype": "image", "text": {"content": "x"}}),
                "msgtype",
            ),
            (
                json!({"type": "robot_reply", "event_id": 1, "msgtype": "markdown", "text": {"content": "x"}}),
                "msgtype",
            ),
            (
                json!({"type": "robot_reply", "event_id": 1, "msgtype": "text", "text": {"content": " "}}),
                "text.content",
            ),
            (
                json!({"type": "robot_reply", "session_webhook": "file:///etc/passwd", "msgtype": "text", "text": {"content": "x"}}),
                "session_webhook",
            ),
            (
                json!({"type": "robot_reply", "event_id": 1, "msgtype": "text", "text": {"content": "x".repeat(15_001)}}),
                "msgtype",
            ),
        ];
        for (body, field) in cases {
            let err = Action::parse(&body).unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
        }
    }

    #[test]
    fn robot_replies_take_an_event_a_webhook_or_a_group() {
        for body in [
            json!({"type": "robot_reply", "event_id": 7, "msgtype": "text", "text": {"content": "ack"}}),
            json!({"type": "robot_reply", "session_webhook": "https://oapi.dingtalk.com/robot/sendBySession?session=s",
                   "msgtype": "markdown", "markdown": {"title": "t", "text": "**ack**"}}),
            json!({"type": "robot_reply", "open_conversation_id": "cid", "robot_code": "rc",
                   "msgtype": "text", "text": {"content": "ack"}}),
        ] {
            let action = Action::parse(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(action.kind(), "robot_reply");
            assert!(action.is_notification());
        }
        let err = Action::parse(
            &json!({"type": "robot_reply", "event_id": 7, "msgtype": "text",
            "text": {"content": "x"}, "colour": "red"}),
        )
        .unwrap_err();
        assert_eq!(err.field, "robot_reply");
    }

    #[test]
    fn a_one_to_one_reply_names_its_user_and_not_a_group_too() {
        let single = json!({"type": "robot_reply", "user_id": "staff-ann", "robot_code": "rc",
                            "msgtype": "text", "text": {"content": "ack"}});
        assert_eq!(Action::parse(&single).unwrap().kind(), "robot_reply");
        let mut both = single.clone();
        both["open_conversation_id"] = json!("cid");
        assert_eq!(Action::parse(&both).unwrap_err().field, "user_id");
        let mut empty = single.clone();
        empty["user_id"] = json!(" ");
        assert_eq!(Action::parse(&empty).unwrap_err().field, "user_id");
        let mut no_robot = single;
        no_robot.as_object_mut().unwrap().remove("robot_code");
        assert_eq!(Action::parse(&no_robot).unwrap_err().field, "event_id");
    }

    #[test]
    fn the_api_shows_a_session_webhook_as_set_only() {
        let body = json!({"type": "robot_reply",
            "session_webhook": "https://oapi.dingtalk.com/robot/sendBySession?session=secret",
            "msgtype": "text", "text": {"content": "ack"}});
        let shown = redacted(&body);
        assert_eq!(shown["session_webhook"], REDACTED);
        assert!(!shown.to_string().contains("secret"));
        assert_eq!(shown["text"], body["text"]);
        // Nothing to hide: the body as it was.
        let plain = json!({"type": "robot_reply", "event_id": 7, "msgtype": "text",
                           "text": {"content": "ack"}, "session_webhook": null});
        assert_eq!(redacted(&plain), plain);
    }

    #[test]
    fn the_dedup_id_depends_on_app_and_key() {
        let stored = |key: &str| StoredAction {
            action: json!({}),
            idempotency_key: key.into(),
            requested_by: "t".into(),
        };
        assert_eq!(stored("k").dedup_id("a"), stored("k").dedup_id("a"));
        assert_ne!(stored("k").dedup_id("a"), stored("k").dedup_id("b"));
        assert_ne!(stored("k").dedup_id("a"), stored("j").dedup_id("a"));
        assert_eq!(stored("k").dedup_id("a").len(), 32);
    }
}
