//! Work notifications (`asyncsend_v2`) sent by the handlers, and the follow-up that checks
//! what DingTalk really delivered: it answers success even when it silently drops a
//! recipient, so a minute later (`handlers.send_result_delay`) an internal event reads
//! `getsendresult` and records failed, forbidden and read recipients against the
//! notification (`dinghook notifications list|show`).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    effect_once, notification_budget, notification_outcome, schedule_internal, HandlersConfig,
};
use crate::dingtalk::{SendResult, WorkMessage, WorkNotification};
use crate::event::{Event, SendResultCheck};
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};
use crate::time::now_millis;

/// The internal event type of the delivery check.
const COLLECTION: &str = "notification";

/// A row of the `notifications` view, keyed by DingTalk's `task_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub task_id: i64,
    /// What sent it, e.g. `attendance` or `todo`.
    pub kind: String,
    pub userids: Vec<String>,
    /// The event that caused it.
    pub event_key: String,
    /// `sent`, `checked`; `recalled` or a status-bar value when changed later.
    pub status: String,
    pub sent_at: i64,
    /// What `getsendresult` reported, once checked.
    pub result: Option<DeliveryResult>,
}

/// The recipients DingTalk reported per outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryResult {
    pub checked_at: i64,
    pub failed: Vec<String>,
    pub forbidden: Vec<String>,
    pub invalid: Vec<String>,
    pub read: Vec<String>,
    pub unread: Vec<String>,
}

impl DeliveryResult {
    fn from_send_result(r: &SendResult, checked_at: i64) -> Self {
        let mut forbidden = r.forbidden_user_id_list.clone();
        for entry in &r.forbidden_list {
            if !forbidden.contains(&entry.userid) {
                forbidden.push(entry.userid.clone());
            }
        }
        DeliveryResult {
            checked_at,
            failed: r.failed_user_id_list.clone(),
            forbidden,
            invalid: r.invalid_user_id_list.clone(),
            read: r.read_user_id_list.clone(),
            unread: r.unread_user_id_list.clone(),
        }
    }
}

pub async fn load(ctx: &Context, task_id: i64) -> Result<Option<Notification>, HandlerError> {
    Ok(
        match ctx
            .store
            .get_document(COLLECTION, &task_id.to_string())
            .await?
        {
            Some(doc) => serde_json::from_value(doc.body).ok(),
            None => None,
        },
    )
}

pub async fn save(ctx: &Context, n: &Notification) -> Result<(), HandlerError> {
    let body = serde_json::to_value(n).unwrap_or_default();
    ctx.store
        .put_document(COLLECTION, &n.task_id.to_string(), &body, now_millis())
        .await?;
    Ok(())
}

/// Sends `msg` to `userids` once per event (`effect` names it within the event), records the
/// notification and schedules its delivery check. `Ok(None)`: skipped (quota reserve, quota
/// used up, nobody to send to). Returns DingTalk's task id.
pub async fn send(
    ctx: &Context,
    config: &HandlersConfig,
    kind: &str,
    effect: &str,
    userids: Vec<String>,
    msg: WorkMessage,
) -> Result<Option<i64>, HandlerError> {
    if userids.is_empty() {
        return Ok(None);
    }
    if !notification_budget(ctx, config.notify_quota_reserve, kind).await {
        return Ok(None);
    }
    send_within_budget(ctx, config, kind, effect, userids, msg).await
}

/// [`send`] for a caller that has just checked [`notification_budget`] itself (to skip its
/// own look-ups when there is no budget), so the quota is not read twice.
pub async fn send_within_budget(
    ctx: &Context,
    config: &HandlersConfig,
    kind: &str,
    effect: &str,
    userids: Vec<String>,
    msg: WorkMessage,
) -> Result<Option<i64>, HandlerError> {
    if userids.is_empty() {
        return Ok(None);
    }
    let client = ctx.dingtalk()?;
    let notification = WorkNotification::to_users(userids.clone(), msg);
    let recorded = effect_once(ctx, effect, || async {
        let sent = notification_outcome(ctx, client.send_work_notification(&notification).await)?;
        Ok(json!({ "task_id": sent }))
    })
    .await?;
    let Some(task_id) = recorded.get("task_id").and_then(Value::as_i64) else {
        return Ok(None);
    };
    ctx.metrics.notification_sent(&ctx.record.app, kind);
    let n = Notification {
        task_id,
        kind: kind.to_owned(),
        userids,
        event_key: ctx.record.dedup_key.clone(),
        status: "sent".into(),
        sent_at: now_millis(),
        result: None,
    };
    let body = serde_json::to_value(&n).unwrap_or_default();
    ctx.store
        .insert_document(COLLECTION, &task_id.to_string(), &body, now_millis())
        .await?;
    schedule_internal(
        ctx,
        format!("send-result:{task_id}"),
        &Event::SendResultCheck(SendResultCheck { task_id }),
        crate::time::after(now_millis(), config.send_result_delay),
    )
    .await?;
    Ok(Some(task_id))
}

pub fn register(builder: RegistryBuilder, _config: &HandlersConfig) -> RegistryBuilder {
    builder
        .named("builtin.notify.send_result_check")
        .on_send_result_check(|check, ctx| async move { check_delivery(check, ctx).await })
}

/// The built-in delivery check of a work notification (`dinghook_send_result_check`).
pub async fn check_delivery(check: SendResultCheck, ctx: Context) -> Result<(), HandlerError> {
    let task_id = check.task_id;
    let client = ctx.dingtalk()?;
    // Still sending: look again later (the dispatcher's retry schedule).
    let progress = client.work_notification_progress(task_id).await?;
    if progress.status != 2 {
        return Err(HandlerError::transient(format!(
            "notification {task_id} is still being sent ({} %)",
            progress.progress_in_percent
        )));
    }
    let result = client.work_notification_result(task_id).await?;
    let delivery = DeliveryResult::from_send_result(&result, now_millis());
    if !delivery.failed.is_empty() || !delivery.forbidden.is_empty() || !delivery.invalid.is_empty()
    {
        tracing::warn!(
            task_id,
            failed = ?delivery.failed,
            forbidden = ?delivery.forbidden,
            invalid = ?delivery.invalid,
            "DingTalk did not deliver a notification to every recipient"
        );
        ctx.metrics.notification_undelivered(
            (delivery.failed.len() + delivery.forbidden.len() + delivery.invalid.len()) as u64,
        );
    }
    // Loaded only now, after the DingTalk calls, so a status set meanwhile (a to-do's status
    // bar, a recall) is kept: only `result` (and `sent` → `checked`) change here.
    let mut n = load(&ctx, task_id).await?.unwrap_or(Notification {
        task_id,
        kind: "unknown".into(),
        userids: Vec::new(),
        event_key: String::new(),
        status: "sent".into(),
        sent_at: 0,
        result: None,
    });
    if n.status == "sent" {
        n.status = "checked".into();
    }
    n.result = Some(delivery);
    save(&ctx, &n).await
}
