//! Runs the actions the HTTP API and `dinghook act` store ([`crate::actions`]): one handler,
//! registered for every app whatever `[handlers]` says, because an action was asked for
//! explicitly.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::actions::{
    Action, ActionError, ResolveError, StoredAction, ACTION_EFFECT, ACTION_EVENT,
};
use crate::event::Event;
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};

use super::{effect_once, notification_budget, HandlersConfig};

/// The handler's name, recorded with each action's outcome.
pub const HANDLER_NAME: &str = "builtin.action";

/// Registers the action handler with the app's notification reserve.
pub fn register(builder: RegistryBuilder, config: &HandlersConfig) -> RegistryBuilder {
    let reserve = Arc::new(config.notify_quota_reserve);
    builder
        .named(HANDLER_NAME)
        .on(ACTION_EVENT, move |event: Event, ctx: Context| {
            let reserve = Arc::clone(&reserve);
            async move { run(event, ctx, *reserve).await }
        })
}

/// Runs one stored action once: the result is recorded as the event's `action` effect, so a
/// retry after the call succeeded (a store hiccup, a lease lost) does not call DingTalk
/// again. A message sent through a metered API (a work notification, a group or one-to-one
/// robot message, a robot reply that cannot use its session webhook) is refused (dead, with
/// the reason) while the monthly quota is under the reserve; a reply through the session
/// webhook costs no quota and is never held back.
pub async fn run(event: Event, ctx: Context, reserve: u64) -> Result<(), HandlerError> {
    let Event::Unknown { raw, .. } = event else {
        return Err(HandlerError::permanent(format!(
            "the action handler received a {} event",
            event.event_type()
        )));
    };
    let stored: StoredAction = serde_json::from_value(raw)
        .map_err(|e| HandlerError::permanent(format!("not a stored action: {e}")))?;
    let action = Action::parse(&stored.action)
        .map_err(|e| HandlerError::permanent(format!("invalid action: {e}")))?;
    // A robot reply to a stored robot message reads it (this app's only).
    let action = action
        .resolve(ctx.store.as_ref())
        .await
        .map_err(|e| match e {
            ResolveError::Store(e) => HandlerError::from(e),
            other => HandlerError::permanent(other),
        })?;
    let client = ctx.dingtalk()?.clone();
    let dedup = stored.dedup_id(&ctx.record.app);
    let gate = |kind: &'static str| -> BoxFuture<'_, bool> {
        Box::pin(notification_budget(&ctx, reserve, kind))
    };
    let result: Value = effect_once(&ctx, ACTION_EFFECT, || async {
        match action.execute(&client, &dedup, &gate).await {
            Ok(result) => Ok(result),
            Err(ActionError::Reserve(kind)) => Err(HandlerError::permanent(format!(
                "{kind} refused: the monthly DingTalk quota is under the notification reserve \
                 ({reserve} calls); replay it when the quota allows"
            ))),
            Err(ActionError::DingTalk(e)) => Err(e.into()),
        }
    })
    .await?;
    tracing::info!(
        action = action.kind(),
        id = ctx.record.id,
        app = %ctx.record.app,
        %result,
        "action done"
    );
    Ok(())
}
