//! The built-in handlers: what dinghook does with DingTalk's events out of the box.
//!
//! Each family lives in its own module with its own configuration section (`[handlers.*]` in
//! `config/dinghook.toml`). Shared here: the `[handlers]` configuration, the registration of
//! every enabled handler ([`registrations`]), effects recorded once per event ([`effect_once`]),
//! the monthly-quota reserve for notifications ([`notification_budget`]), and internal
//! follow-up events ([`schedule_internal`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::handler::{Context, HandlerError, RegistryBuilder};
use crate::store::{Inserted, NewEvent, Source};
use crate::time::{duration_str, now_millis};

pub mod action;
pub mod attendance;
pub mod chat;
pub mod cool_app;
pub mod groups;
pub mod notify;
pub mod todo;

/// `[handlers]`: which built-in behaviours run, and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandlersConfig {
    /// Register the built-in handlers at all (a library user may want only their own).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// When fewer monthly API calls than this remain, notifications (work notifications,
    /// group messages) are skipped and counted; bookkeeping calls still run.
    #[serde(deserialize_with = "crate::setting::number")]
    pub notify_quota_reserve: u64,
    /// How long after a work notification its delivery is checked (`getsendresult`).
    #[serde(with = "duration_str")]
    pub send_result_delay: Duration,
    pub cool_app: cool_app::CoolAppConfig,
    pub chat: chat::ChatConfig,
    pub attendance: attendance::AttendanceConfig,
    pub todo: todo::TodoConfig,
}

impl Default for HandlersConfig {
    fn default() -> Self {
        HandlersConfig {
            enabled: true,
            notify_quota_reserve: 500,
            send_result_delay: Duration::from_secs(60),
            cool_app: cool_app::CoolAppConfig::default(),
            chat: chat::ChatConfig::default(),
            attendance: attendance::AttendanceConfig::default(),
            todo: todo::TodoConfig::default(),
        }
    }
}

impl HandlersConfig {
    /// Checks the templates' placeholders and the numbers; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.cool_app.validate()?;
        self.chat.validate()?;
        self.attendance.validate()?;
        self.todo.validate()?;
        Ok(())
    }
}

/// The built-in handlers `[handlers]` enables. [`AppBuilder::build`](crate::AppBuilder::build)
/// registers them before a program's own, so `dinghook serve` and a program built on the
/// library run the same ones.
pub fn registrations(config: &HandlersConfig) -> RegistryBuilder {
    let mut builder = RegistryBuilder::new();
    if !config.enabled {
        return builder;
    }
    builder = cool_app::register(builder, config);
    builder = chat::register(builder, config);
    builder = attendance::register(builder, config);
    builder = todo::register(builder, config);
    builder = notify::register(builder, config);
    builder
}

/// Runs `effect` unless this event already recorded an effect called `name`, and records
/// what it returns. Returns the recorded value (now or from an earlier run). The record is
/// written right after the effect succeeds, before the handler returns, so a retry of the
/// event does not repeat it (only a crash in between could).
pub async fn effect_once<F, Fut>(
    ctx: &Context,
    name: &str,
    effect: F,
) -> Result<Value, HandlerError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Value, HandlerError>>,
{
    let key = format!("{}/{name}", ctx.record.dedup_key);
    if let Some(done) = ctx.store.get_document("effect", &key).await? {
        tracing::debug!(effect = name, "effect already recorded; not repeating it");
        return Ok(done.body);
    }
    let value = effect().await?;
    ctx.store
        .insert_document("effect", &key, &value, now_millis())
        .await?;
    Ok(value)
}

/// Whether a notification may be sent: false (logged and counted) when the monthly quota's
/// remainder is under the configured reserve, so the quota is kept for bookkeeping calls.
pub async fn notification_budget(ctx: &Context, reserve: u64, what: &str) -> bool {
    let Some(client) = &ctx.client else {
        return false;
    };
    let quota = client.quota().await;
    if quota.remaining < reserve {
        tracing::warn!(
            what,
            remaining = quota.remaining,
            reserve,
            "notification skipped: monthly API quota is under the reserve"
        );
        ctx.metrics
            .notification_skipped(&ctx.record.app, "quota_reserve");
        return false;
    }
    true
}

/// Handles DingTalk's answer to a notification: its monthly-quota refusal means "skipped"
/// (logged, counted, not retried: retrying cannot succeed before the month turns); any other
/// error is the handler's error.
pub fn notification_outcome<T>(
    ctx: &Context,
    result: Result<T, crate::dingtalk::Error>,
) -> Result<Option<T>, HandlerError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(crate::dingtalk::Error::QuotaExhausted { .. }) => {
            tracing::warn!("notification skipped: DingTalk says the monthly API quota is used up");
            ctx.metrics
                .notification_skipped(&ctx.record.app, "quota_exhausted");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Stores an internal follow-up event (same inbox, same dispatcher), due at `due_at_ms`. Its
/// de-duplication key makes repeated scheduling (retries, coalescing) a no-op.
pub async fn schedule_internal(
    ctx: &Context,
    dedup_key: String,
    event: &Event,
    due_at_ms: i64,
) -> Result<Inserted, HandlerError> {
    let payload = event.internal_payload().ok_or_else(|| {
        HandlerError::permanent(format!("{} is not an internal event", event.event_type()))
    })?;
    let event = NewEvent {
        app: ctx.record.app.clone(),
        dedup_key,
        event_type: event.event_type().to_owned(),
        corp_id: None,
        payload: payload.to_string(),
        source: Source::Internal,
        received_at: now_millis(),
        routes: Vec::new(),
    };
    Ok(ctx.store.schedule(event, due_at_ms).await?)
}
