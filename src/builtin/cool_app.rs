//! `im_cool_app_install` / `im_cool_app_uninstall`: keep the `groups` collection, look the
//! group's name up, and greet the group through the robot.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::groups::{self, Group, GroupStatus};
use super::HandlersConfig;
use crate::event::CoolAppChange;
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};
use crate::template::Template;
use crate::time::now_millis;

/// `[handlers.cool_app]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoolAppConfig {
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// Look the group's name up with `sceneGroups/query` (permission `qyapi_chat_manage`).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub lookup_title: bool,
    /// Send `welcome_message` into the group (permission `qyapi_robot_sendmsg`).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub welcome: bool,
    /// Placeholders: {title} {open_conversation_id} {operator} {cool_app_code} {corp_id}.
    pub welcome_message: Template,
}

pub const WELCOME_FIELDS: &[&str] = &[
    "title",
    "open_conversation_id",
    "operator",
    "cool_app_code",
    "corp_id",
];

impl Default for CoolAppConfig {
    fn default() -> Self {
        CoolAppConfig {
            enabled: true,
            lookup_title: true,
            welcome: true,
            welcome_message: Template::from_default(
                "大家好，我已加入「{title}」。有事件时我会在这里通知大家。",
            ),
        }
    }
}

impl CoolAppConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.welcome_message
            .check(WELCOME_FIELDS)
            .map_err(|e| format!("handlers.cool_app.welcome_message: {e}"))
    }
}

pub fn register(builder: RegistryBuilder, config: &HandlersConfig) -> RegistryBuilder {
    if !config.cool_app.enabled {
        return builder;
    }
    let settings = Arc::new((config.cool_app.clone(), config.notify_quota_reserve));
    let on_install = Arc::clone(&settings);
    builder
        .named("builtin.cool_app.install")
        .on_cool_app_install(move |change, ctx| {
            let settings = Arc::clone(&on_install);
            async move { install(change, ctx, &settings.0, settings.1).await }
        })
        .named("builtin.cool_app.uninstall")
        .on_cool_app_uninstall(|change, ctx| async move { uninstall(change, ctx).await })
}

/// The built-in `im_cool_app_install` handler. Public, so a program that turns it off
/// (`[handlers.cool_app] enabled = false`) can wrap it in its own.
pub async fn install(
    change: CoolAppChange,
    ctx: Context,
    config: &CoolAppConfig,
    reserve: u64,
) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    let at = change.operate_time.unwrap_or_else(now_millis);
    let mut group = groups::load(store, &change.open_conversation_id)
        .await?
        .unwrap_or_else(|| Group::new(&change.open_conversation_id));
    // A late retry of an old install must not undo a newer uninstall.
    if group.uninstalled_at.is_some_and(|u| u > at) {
        tracing::info!(group = %group.open_conversation_id, "install older than the recorded uninstall; ignored");
        return Ok(());
    }
    group.status = GroupStatus::Installed;
    group.robot_code = Some(change.robot_code.clone());
    group.cool_app_code = Some(change.cool_app_code.clone());
    group.corp_id = change
        .open_conversation_corp_id
        .clone()
        .or(change.corp_id.clone());
    group.operator = change.operator.clone();
    group.installed_at = Some(at);
    groups::save(store, &group).await?;

    if config.lookup_title && group.title.is_none() {
        let client = ctx.dingtalk()?;
        match client
            .query_scene_group(&change.open_conversation_id, Some(&change.cool_app_code))
            .await
        {
            Ok(info) => {
                group.title = Some(info.title);
                group.title_at = Some(at);
                groups::save(store, &group).await?;
            }
            // The bookkeeping is done; a name we cannot get is not worth a dead event.
            Err(e)
                if e.is_permanent()
                    || matches!(e, crate::dingtalk::Error::QuotaExhausted { .. }) =>
            {
                tracing::warn!(group = %group.open_conversation_id, error = %e, "group name lookup failed");
            }
            Err(e) => return Err(e.into()),
        }
    }

    if config.welcome {
        let title = group.title.clone().unwrap_or_default();
        let text = config.welcome_message.render_with(&[
            ("title", &title),
            ("open_conversation_id", &group.open_conversation_id),
            ("operator", group.operator.as_deref().unwrap_or("")),
            ("cool_app_code", &change.cool_app_code),
            ("corp_id", group.corp_id.as_deref().unwrap_or("")),
        ]);
        groups::send_text(&ctx, &group, &text, "welcome", reserve).await?;
    }
    Ok(())
}

/// The built-in `im_cool_app_uninstall` handler (public for the same reason).
pub async fn uninstall(change: CoolAppChange, ctx: Context) -> Result<(), HandlerError> {
    let store = &*ctx.store;
    let at = change.operate_time.unwrap_or_else(now_millis);
    let mut group = groups::load(store, &change.open_conversation_id)
        .await?
        .unwrap_or_else(|| Group::new(&change.open_conversation_id));
    if group.installed_at.is_some_and(|i| i > at) {
        tracing::info!(group = %group.open_conversation_id, "uninstall older than the recorded install; ignored");
        return Ok(());
    }
    group.status = GroupStatus::Uninstalled;
    group.uninstalled_at = Some(at);
    group.robot_code.get_or_insert(change.robot_code);
    group.cool_app_code.get_or_insert(change.cool_app_code);
    groups::save(store, &group).await?;
    tracing::info!(group = %group.open_conversation_id, "cool app uninstalled; nothing more is sent to this group");
    Ok(())
}
