//! `todo_task_create` / `todo_task_update` / `todo_task_delete`: keep the `todos` collection
//! and mirror each to-do in a work notification to its executors.
//!
//! The events say which task changed, not how, so every create and update fetches the task
//! (`GET /v1.0/todo/users/{unionId}/tasks/{taskId}`). On create the executors (union ids,
//! turned into user ids through `topapi/user/getbyunionid`, cached in the `user` collection)
//! get an OA work notification with a "pending" status bar; its `task_id` is kept on the
//! to-do. When the to-do is done the status bar becomes "done" (`status_bar/update`), when it
//! is reopened it goes back to "pending", and when it is deleted the notification is
//! recalled (`recall`). Each call is recorded once per event ([`effect_once`]), and the state
//! kept on the to-do (what the status bar shows, whether it was recalled) stops a second event
//! from repeating what an earlier one did.

use std::cell::Cell;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{effect_once, notification_budget, notify, HandlersConfig};
use crate::dingtalk::{OaBody, OaHead, OaMessage, OaStatusBar, TodoTask, WorkMessage};
use crate::event::TodoTaskChange;
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};
use crate::store::Store;
use crate::template::Template;
use crate::time::{now_millis, UtcOffset};

const COLLECTION: &str = "todo";
const USER_COLLECTION: &str = "user";
/// Which event makes each change to a notification (see [`claim`]).
const CLAIM_COLLECTION: &str = "todo_claim";
/// The notification kind (metrics label, `notifications` view).
const KIND: &str = "todo";
/// DingTalk puts a status bar on an OA message only for at most this many user recipients.
pub const STATUS_BAR_MAX_RECIPIENTS: usize = 5;
/// Where the notification points when the to-do has no detail URL: it opens DingTalk. (No
/// documented deep link to a to-do exists; set `message_url` to your own page if you have one.)
pub const FALLBACK_URL: &str = "dingtalk://dingtalkclient/home";
/// At most this many union ids are tried to read a task, so a task that is gone costs a
/// bounded number of calls.
const MAX_FETCH_TRIES: usize = 3;

/// `[handlers.todo]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TodoConfig {
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// Send the executors a work notification and keep its status bar in step (needs
    /// `dingtalk.agent_id`). Off: the to-dos are only recorded.
    #[serde(deserialize_with = "crate::setting::switch")]
    pub notify: bool,
    /// Status bar text and colour (ARGB, e.g. `0xFFFF9900`) while the to-do is open.
    pub pending_status: String,
    pub pending_color: String,
    /// Status bar text and colour once it is done.
    pub done_status: String,
    pub done_color: String,
    /// The OA header strip: text (a template) and ARGB colour (e.g. `FF1890FF`).
    pub head_text: Template,
    pub head_color: String,
    /// OA body title and text. Placeholders: see [`TODO_FIELDS`].
    pub title: Template,
    pub content: Template,
    /// Where a tap goes; `{url}` is the task's own detail link (app, else PC), else
    /// [`FALLBACK_URL`].
    pub message_url: Template,
    /// The offset `{due_time}` is shown in (DingTalk's China data centre: `+08:00`).
    pub utc_offset: UtcOffset,
}

/// The placeholders of the todo templates.
pub const TODO_FIELDS: &[&str] = &[
    "subject",
    "description",
    "due_time",
    "creator",
    "url",
    "task_id",
];

impl Default for TodoConfig {
    fn default() -> Self {
        TodoConfig {
            enabled: true,
            notify: true,
            pending_status: "待处理".into(),
            pending_color: "0xFFFF9900".into(),
            done_status: "已完成".into(),
            done_color: "0xFF78C06E".into(),
            head_text: Template::from_default("待办"),
            head_color: "FF1890FF".into(),
            title: Template::from_default("{subject}"),
            content: Template::from_default("截止时间：{due_time}\n{description}"),
            message_url: Template::from_default("{url}"),
            utc_offset: UtcOffset::CHINA,
        }
    }
}

impl TodoConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (key, template) in [
            ("head_text", &self.head_text),
            ("title", &self.title),
            ("content", &self.content),
            ("message_url", &self.message_url),
        ] {
            template
                .check(TODO_FIELDS)
                .map_err(|e| format!("handlers.todo.{key}: {e}"))?;
        }
        if self.notify && self.pending_status.trim().is_empty() {
            return Err("handlers.todo.pending_status: must not be empty".into());
        }
        if self.notify && self.done_status.trim().is_empty() {
            return Err("handlers.todo.done_status: must not be empty".into());
        }
        Ok(())
    }
}

/// What the notification's status bar shows now, as far as we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusBar {
    Pending,
    Done,
}

/// A row of the `todos` view, keyed by the task id. `subject`, `done`, `deleted` and
/// `notification_task_id` are read by the view: keep those names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Todo {
    pub task_id: String,
    pub subject: String,
    pub description: Option<String>,
    pub done: bool,
    pub deleted: bool,
    /// Epoch ms.
    pub due_time: Option<i64>,
    pub creator_union_id: Option<String>,
    pub executor_union_ids: Vec<String>,
    /// The executors' user ids, as resolved when the notification was sent.
    pub executor_user_ids: Vec<String>,
    /// The union id the task was last read with (used again when an event names nobody).
    pub union_id: Option<String>,
    pub biz_tag: Option<String>,
    pub corp_id: Option<String>,
    /// DingTalk's `modifiedTime` of the state stored here; an older read does not replace it.
    pub modified_time: Option<i64>,
    /// The work notification's `task_id` (the `notification` collection's key).
    pub notification_task_id: Option<i64>,
    /// What its status bar shows; `None` when it has none (more than five recipients).
    pub status_bar: Option<StatusBar>,
    /// Status-bar changes made so far; the next one is claimed under this number plus one.
    pub status_changes: u32,
    pub recalled: bool,
    /// Why there is no notification or status bar, or why its last change failed.
    pub notification_note: Option<String>,
    pub updated_at: i64,
}

impl Todo {
    fn new(change: &TodoTaskChange) -> Self {
        Todo {
            task_id: change.task_id.clone(),
            biz_tag: change.biz_tag.clone(),
            corp_id: change.corp_id.clone(),
            ..Todo::default()
        }
    }

    /// Takes the fetched state, unless it is older than the one stored (two events for one
    /// to-do fetched at nearly the same time may finish in either order).
    fn apply(&mut self, task: &TodoTask, union_id: &str) -> bool {
        if let (Some(stored), Some(fetched)) = (self.modified_time, task.modified_time) {
            if fetched < stored {
                return false;
            }
        }
        self.subject = task.subject.clone();
        self.description = task.description.clone();
        self.done = task.done;
        self.due_time = task.due_time;
        self.creator_union_id = task.creator_id.clone();
        self.executor_union_ids = task.executor_ids.clone();
        self.union_id = Some(union_id.to_owned());
        if task.biz_tag.is_some() {
            self.biz_tag = task.biz_tag.clone();
        }
        self.modified_time = task.modified_time;
        true
    }
}

pub async fn load(store: &dyn Store, task_id: &str) -> Result<Option<Todo>, HandlerError> {
    Ok(match store.get_document(COLLECTION, task_id).await? {
        Some(doc) => serde_json::from_value(doc.body).ok(),
        None => None,
    })
}

/// Saves `todo`, keeping what only moves forward from the stored copy: another event for the
/// same to-do may have run beside this one (a create and an update in one batch) and linked
/// the notification, recalled it or seen the delete since we loaded.
pub async fn save(store: &dyn Store, todo: &mut Todo) -> Result<(), HandlerError> {
    if let Some(current) = load(store, &todo.task_id).await? {
        if todo.notification_task_id.is_none() && current.notification_task_id.is_some() {
            todo.notification_task_id = current.notification_task_id;
            todo.status_bar = current.status_bar;
            todo.executor_user_ids = current.executor_user_ids;
            todo.notification_note = current.notification_note;
        }
        if current.status_changes > todo.status_changes {
            todo.status_bar = current.status_bar;
            todo.status_changes = current.status_changes;
        }
        todo.deleted |= current.deleted;
        todo.recalled |= current.recalled;
    }
    todo.updated_at = now_millis();
    let body = serde_json::to_value(&*todo).unwrap_or_default();
    store
        .put_document(COLLECTION, &todo.task_id, &body, todo.updated_at)
        .await?;
    Ok(())
}

pub fn register(builder: RegistryBuilder, config: &HandlersConfig) -> RegistryBuilder {
    if !config.todo.enabled {
        return builder;
    }
    let settings = Arc::new(config.clone());
    let (on_create, on_update, on_delete) = (
        Arc::clone(&settings),
        Arc::clone(&settings),
        Arc::clone(&settings),
    );
    builder
        .named("builtin.todo.create")
        .on_todo_task_create(move |change, ctx| {
            let config = Arc::clone(&on_create);
            async move { created(change, ctx, &config).await }
        })
        .named("builtin.todo.update")
        .on_todo_task_update(move |change, ctx| {
            let config = Arc::clone(&on_update);
            async move { updated(change, ctx, &config).await }
        })
        .named("builtin.todo.delete")
        .on_todo_task_delete(move |change, ctx| {
            let config = Arc::clone(&on_delete);
            async move { deleted(change, ctx, &config).await }
        })
}

/// The built-in `todo_task_create` handler. Public, so a program that turns it off
/// (`[handlers.todo] enabled = false`) can wrap it in its own; so are `updated` and `deleted`.
pub async fn created(
    change: TodoTaskChange,
    ctx: Context,
    config: &HandlersConfig,
) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    let mut todo = load(store, &change.task_id)
        .await?
        .unwrap_or_else(|| Todo::new(&change));
    if todo.deleted {
        tracing::info!(task = %change.task_id, "create of a to-do already deleted; nothing to do");
        return Ok(());
    }
    let Some((task, union_id)) = fetch(&ctx, &change, &todo).await? else {
        return Ok(());
    };
    todo.apply(&task, &union_id);
    if !config.todo.notify || todo.notification_task_id.is_some() {
        return save(store, &mut todo).await;
    }
    if todo.done {
        tracing::info!(task = %todo.task_id, "to-do already done when its create was handled; no notification");
        return save(store, &mut todo).await;
    }
    // send_pending saves the to-do once, with the notification linked (or why not). Until
    // then the fetched state is only in memory: a retry fetches it again anyway.
    send_pending(&ctx, config, &mut todo, &task).await
}

/// The built-in `todo_task_update` handler.
pub async fn updated(
    change: TodoTaskChange,
    ctx: Context,
    config: &HandlersConfig,
) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    let mut todo = load(store, &change.task_id)
        .await?
        .unwrap_or_else(|| Todo::new(&change));
    if todo.deleted {
        tracing::info!(task = %change.task_id, "update of a deleted to-do; nothing to do");
        return Ok(());
    }
    // An update for a to-do we never saw (its create was lost or comes later) is stored like
    // any other; without a notification there is no status bar to change.
    let Some((task, union_id)) = fetch(&ctx, &change, &todo).await? else {
        return Ok(());
    };
    if !todo.apply(&task, &union_id) {
        tracing::info!(task = %todo.task_id, "fetched state older than the stored one; kept the stored one");
    }
    save(store, &mut todo).await?;
    if config.todo.notify {
        sync_status_bar(&ctx, config, &mut todo).await?;
    }
    Ok(())
}

/// The built-in `todo_task_delete` handler.
pub async fn deleted(
    change: TodoTaskChange,
    ctx: Context,
    config: &HandlersConfig,
) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    let mut todo = load(store, &change.task_id)
        .await?
        .unwrap_or_else(|| Todo::new(&change));
    todo.deleted = true;
    save(store, &mut todo).await?;
    let Some(task_id) = todo.notification_task_id else {
        tracing::info!(task = %todo.task_id, "deleted to-do had no notification; nothing to recall");
        return Ok(());
    };
    if todo.recalled || !config.todo.notify {
        return Ok(());
    }
    if !notification_budget(&ctx, config.notify_quota_reserve, "todo_recall").await {
        return Ok(());
    }
    if !claim(&ctx, &format!("{task_id}:recall")).await? {
        return Ok(());
    }
    let client = ctx.dingtalk()?;
    let outcome = effect_once(&ctx, "todo_recall", || async {
        best_effort(
            &ctx,
            "recall",
            client.recall_work_notification(task_id).await,
        )
    })
    .await?;
    if succeeded(&outcome) {
        todo.recalled = true;
        mark_notification(&ctx, task_id, "recalled").await?;
    } else {
        todo.notification_note = failure_note("recall", &outcome);
    }
    save(store, &mut todo).await
}

/// Reads the task as the event's first user, else as whoever it was read as before, else as
/// its creator; the next one is tried when DingTalk says the task does not exist for a user.
/// `None`: the task is gone (deleted since; its delete event does the rest).
async fn fetch(
    ctx: &Context,
    change: &TodoTaskChange,
    known: &Todo,
) -> Result<Option<(TodoTask, String)>, HandlerError> {
    let mut candidates: Vec<&str> = Vec::new();
    for id in change
        .union_ids
        .iter()
        .chain(known.union_id.iter())
        .chain(known.creator_union_id.iter())
    {
        if !id.is_empty() && !candidates.contains(&id.as_str()) {
            candidates.push(id);
        }
    }
    if candidates.is_empty() {
        return Err(HandlerError::permanent(format!(
            "to-do {}: the event has no UnionIdList and the to-do is unknown, so it cannot be read",
            change.task_id
        )));
    }
    let client = ctx.dingtalk()?;
    for union_id in candidates.into_iter().take(MAX_FETCH_TRIES) {
        match client.get_todo_task(union_id, &change.task_id).await {
            Ok(task) => return Ok(Some((task, union_id.to_owned()))),
            Err(e) if is_not_found(&e) => {
                tracing::debug!(task = %change.task_id, union_id, error = %e, "to-do not found for this user");
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(task = %change.task_id, "to-do not found on DingTalk (deleted since?); nothing to do");
    Ok(None)
}

fn is_not_found(e: &crate::dingtalk::Error) -> bool {
    match e {
        // DingTalk has said it as a 404 and as a 400 parameter error whose message is
        // "task not exist"; the fake answers 404 `taskNotExist`.
        crate::dingtalk::Error::ApiV2 {
            status,
            code,
            message,
            ..
        } => {
            let code = code.to_ascii_lowercase();
            let message = message.to_ascii_lowercase();
            *status == 404
                || code.contains("notexist")
                || code.contains("notfound")
                || message.contains("not exist")
                || message.contains("不存在")
        }
        _ => false,
    }
}

/// Sends the executors the OA notification with the pending status bar and links it to the
/// to-do. Skipped (and noted on the to-do) under the quota reserve or without recipients.
async fn send_pending(
    ctx: &Context,
    config: &HandlersConfig,
    todo: &mut Todo,
    task: &TodoTask,
) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    // Checked before the user look-ups too, so a skipped notification costs no calls.
    if !notification_budget(ctx, config.notify_quota_reserve, KIND).await {
        todo.notification_note = Some("skipped: monthly API quota under the reserve".into());
        return save(store, todo).await;
    }
    let mut userids = Vec::new();
    for union_id in &todo.executor_union_ids {
        if let Some(userid) = user_id(ctx, union_id).await? {
            if !userids.contains(&userid) {
                userids.push(userid);
            }
        }
    }
    if userids.is_empty() {
        tracing::info!(task = %todo.task_id, "no executor with a user id; no notification");
        todo.notification_note = Some("no executor with a user id in this organisation".into());
        return save(store, todo).await;
    }
    let cfg = &config.todo;
    let creator = if uses(cfg, "creator") {
        match &todo.creator_union_id {
            Some(union_id) => user_id(ctx, union_id).await?.unwrap_or_default(),
            None => String::new(),
        }
    } else {
        String::new()
    };
    let detail = task.detail_url.clone().unwrap_or_default();
    let url = detail
        .app_url
        .clone()
        .or_else(|| detail.pc_url.clone())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| FALLBACK_URL.to_owned());
    let due_time = todo
        .due_time
        .map_or_else(|| "—".to_owned(), |t| cfg.utc_offset.date_time(t));
    let fields = [
        ("subject", todo.subject.as_str()),
        ("description", todo.description.as_deref().unwrap_or("")),
        ("due_time", due_time.as_str()),
        ("creator", creator.as_str()),
        ("url", url.as_str()),
        ("task_id", todo.task_id.as_str()),
    ];
    let with_status_bar = userids.len() <= STATUS_BAR_MAX_RECIPIENTS;
    let message_url = cfg.message_url.render_with(&fields);
    // An empty {description} would leave a dangling line break.
    let content = cfg.content.render_with(&fields).trim_end().to_owned();
    let msg = WorkMessage::Oa {
        oa: OaMessage {
            message_url: if message_url.trim().is_empty() {
                FALLBACK_URL.to_owned()
            } else {
                message_url
            },
            pc_message_url: detail.pc_url.filter(|u| !u.is_empty()),
            head: OaHead {
                bgcolor: cfg.head_color.clone(),
                text: cfg.head_text.render_with(&fields),
            },
            status_bar: with_status_bar
                .then(|| status_bar(&cfg.pending_status, &cfg.pending_color)),
            body: OaBody {
                title: Some(cfg.title.render_with(&fields)),
                content: (!content.trim().is_empty()).then_some(content),
                ..OaBody::default()
            },
        },
    };
    // The budget was checked above, before the look-ups.
    let sent =
        notify::send_within_budget(ctx, config, KIND, "todo_notify", userids.clone(), msg).await?;
    todo.executor_user_ids = userids;
    match sent {
        Some(task_id) => {
            todo.notification_task_id = Some(task_id);
            if with_status_bar {
                todo.status_bar = Some(StatusBar::Pending);
                todo.notification_note = None;
            } else {
                tracing::info!(
                    task = %todo.task_id,
                    recipients = todo.executor_user_ids.len(),
                    "to-do notification sent without a status bar: DingTalk allows one for at most {STATUS_BAR_MAX_RECIPIENTS} recipients"
                );
                todo.notification_note = Some(format!(
                    "no status bar: more than {STATUS_BAR_MAX_RECIPIENTS} recipients"
                ));
            }
        }
        None => todo.notification_note = Some("skipped: monthly API quota".into()),
    }
    save(store, todo).await
}

/// Brings the status bar in line with the to-do: "done" once it is done, "pending" again if
/// it is reopened. Nothing when there is no notification or no status bar, when it was
/// recalled, or when it already shows the right value (a second event for the same change).
async fn sync_status_bar(
    ctx: &Context,
    config: &HandlersConfig,
    todo: &mut Todo,
) -> Result<(), HandlerError> {
    let (Some(task_id), Some(shown)) = (todo.notification_task_id, todo.status_bar) else {
        return Ok(());
    };
    let wanted = if todo.done {
        StatusBar::Done
    } else {
        StatusBar::Pending
    };
    if todo.recalled || shown == wanted {
        return Ok(());
    }
    // Skipped, the state stays as it is, so a later event for this to-do tries again.
    if !notification_budget(ctx, config.notify_quota_reserve, "todo_status").await {
        return Ok(());
    }
    let cfg = &config.todo;
    let (bar, effect) = match wanted {
        StatusBar::Done => (
            status_bar(&cfg.done_status, &cfg.done_color),
            "todo_status_done",
        ),
        StatusBar::Pending => (
            status_bar(&cfg.pending_status, &cfg.pending_color),
            "todo_status_pending",
        ),
    };
    let change = todo.status_changes.saturating_add(1);
    if !claim(ctx, &format!("{task_id}:status:{change}")).await? {
        return Ok(());
    }
    let client = ctx.dingtalk()?;
    let outcome = effect_once(ctx, effect, || async {
        best_effort(
            ctx,
            "status bar update",
            client.update_work_notification_status(task_id, &bar).await,
        )
    })
    .await?;
    if succeeded(&outcome) {
        todo.status_bar = Some(wanted);
        todo.status_changes = change;
        todo.notification_note = None;
        mark_notification(ctx, task_id, &bar.status_value).await?;
    } else {
        todo.notification_note = failure_note("status bar update", &outcome);
    }
    save(&*ctx.store, todo).await
}

/// Whether this event may make the change named `key` to a notification: the first event to
/// ask gets it (a create-only document, atomic on both stores), and keeps it on its retries.
/// Two events for one change (two updates handled at the same time by two workers or
/// replicas, both seeing "pending" when the to-do is done) then make one call, not two. A
/// change refused by DingTalk stays claimed: asking again would be refused again.
async fn claim(ctx: &Context, key: &str) -> Result<bool, HandlerError> {
    let event = &ctx.record.dedup_key;
    let body = json!({ "event": event });
    if ctx
        .store
        .insert_document(CLAIM_COLLECTION, key, &body, now_millis())
        .await?
    {
        return Ok(true);
    }
    let owner = ctx.store.get_document(CLAIM_COLLECTION, key).await?;
    let ours =
        owner.is_some_and(|doc| doc.body.get("event").and_then(Value::as_str) == Some(event));
    if !ours {
        tracing::info!(
            key,
            "another event makes this change to the to-do's notification"
        );
    }
    Ok(ours)
}

fn status_bar(value: &str, color: &str) -> OaStatusBar {
    OaStatusBar {
        status_value: value.to_owned(),
        status_bg: (!color.trim().is_empty()).then(|| color.to_owned()),
    }
}

/// The recorded outcome of a change to a sent notification. DingTalk's refusals of it (too
/// old: recall works for 24 h, status bars for 7 days) and a used-up quota are recorded, not
/// retried: the bookkeeping is done, and a later event for the to-do may try again.
fn best_effort(
    ctx: &Context,
    what: &str,
    result: Result<(), crate::dingtalk::Error>,
) -> Result<Value, HandlerError> {
    match result {
        Ok(()) => Ok(json!({ "ok": true })),
        Err(crate::dingtalk::Error::QuotaExhausted { .. }) => {
            tracing::warn!(
                what,
                "skipped: DingTalk says the monthly API quota is used up"
            );
            ctx.metrics
                .notification_skipped(&ctx.record.app, "quota_exhausted");
            Ok(json!({ "ok": false, "error": "monthly API quota used up" }))
        }
        Err(e) if e.is_permanent() => {
            tracing::warn!(what, error = %e, "DingTalk refused a change to a to-do notification");
            Ok(json!({ "ok": false, "error": e.to_string() }))
        }
        Err(e) => Err(e.into()),
    }
}

fn succeeded(outcome: &Value) -> bool {
    outcome.get("ok").and_then(Value::as_bool) == Some(true)
}

fn failure_note(what: &str, outcome: &Value) -> Option<String> {
    let error = outcome
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("failed");
    Some(format!("{what} failed: {error}"))
}

async fn mark_notification(ctx: &Context, task_id: i64, status: &str) -> Result<(), HandlerError> {
    if let Some(mut n) = notify::load(ctx, task_id).await? {
        n.status = status.to_owned();
        notify::save(ctx, &n).await?;
    }
    Ok(())
}

/// The user id behind a union id, from the `user` collection, else from DingTalk (then
/// remembered: each look-up is a metered call). `None`: not a member of this organisation.
async fn user_id(ctx: &Context, union_id: &str) -> Result<Option<String>, HandlerError> {
    if let Some(doc) = ctx.store.get_document(USER_COLLECTION, union_id).await? {
        if let Some(userid) = doc.body.get("userid").and_then(Value::as_str) {
            if !userid.is_empty() {
                return Ok(Some(userid.to_owned()));
            }
        }
    }
    let client = ctx.dingtalk()?;
    match client.user_by_union_id(union_id).await {
        Ok(user) if !user.userid.is_empty() => {
            let body = json!({
                "union_id": union_id,
                "userid": user.userid,
                "contact_type": user.contact_type,
            });
            ctx.store
                .put_document(USER_COLLECTION, union_id, &body, now_millis())
                .await?;
            Ok(Some(user.userid))
        }
        Ok(_) => Ok(None),
        Err(e) if e.is_permanent() => {
            tracing::warn!(union_id, error = %e, "no user id for this union id; left out");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether any of the notification's templates uses `name` (found by rendering them and
/// noting the placeholders asked for), so a look-up nobody shows is not paid for.
fn uses(cfg: &TodoConfig, name: &str) -> bool {
    let asked = Cell::new(false);
    for template in [&cfg.head_text, &cfg.title, &cfg.content, &cfg.message_url] {
        template.render(|field| {
            if field == name {
                asked.set(true);
            }
            None
        });
    }
    asked.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_checked() {
        let mut config = TodoConfig::default();
        config.validate().unwrap();
        config.content = Template::parse("{subjcet}").unwrap();
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("handlers.todo.content") && err.contains("subjcet"),
            "{err}"
        );
    }

    #[test]
    fn only_used_placeholders_are_looked_up() {
        let mut config = TodoConfig::default();
        assert!(!uses(&config, "creator"));
        config.title = Template::parse("{subject} ({creator})").unwrap();
        assert!(uses(&config, "creator"));
    }

    #[test]
    fn an_older_read_does_not_replace_a_newer_one() {
        let change = TodoTaskChange {
            corp_id: None,
            task_id: "t1".into(),
            biz_tag: None,
            union_ids: vec![],
        };
        let mut todo = Todo::new(&change);
        let newer = TodoTask {
            done: true,
            modified_time: Some(20),
            ..TodoTask::default()
        };
        let older = TodoTask {
            done: false,
            modified_time: Some(10),
            ..TodoTask::default()
        };
        assert!(todo.apply(&newer, "u"));
        assert!(!todo.apply(&older, "u"));
        assert!(todo.done);
    }
}
