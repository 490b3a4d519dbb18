//! `chat_update_title`: keep the group's name, and optionally announce it in the group.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::groups::{self, Group};
use super::HandlersConfig;
use crate::event::ChatUpdateTitle;
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};
use crate::template::Template;
use crate::time::now_millis;

/// `[handlers.chat]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// Announce the new name in the group (only where our cool app is installed).
    #[serde(deserialize_with = "crate::setting::switch")]
    pub announce: bool,
    /// Placeholders: {title} {operator} {open_conversation_id} {chat_id}.
    pub announce_message: Template,
}

pub const ANNOUNCE_FIELDS: &[&str] = &["title", "operator", "open_conversation_id", "chat_id"];

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            enabled: true,
            announce: false,
            announce_message: Template::from_default("群名已更新为「{title}」。"),
        }
    }
}

impl ChatConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.announce_message
            .check(ANNOUNCE_FIELDS)
            .map_err(|e| format!("handlers.chat.announce_message: {e}"))
    }
}

pub fn register(builder: RegistryBuilder, config: &HandlersConfig) -> RegistryBuilder {
    if !config.chat.enabled {
        return builder;
    }
    let settings = Arc::new((config.chat.clone(), config.notify_quota_reserve));
    builder
        .named("builtin.chat.update_title")
        .on_chat_update_title(move |change, ctx| {
            let settings = Arc::clone(&settings);
            async move { rename(change, ctx, &settings.0, settings.1).await }
        })
}

/// The built-in `chat_update_title` handler. Public, so a program that turns it off
/// (`[handlers.chat] enabled = false`) can wrap it in its own.
pub async fn rename(
    change: ChatUpdateTitle,
    ctx: Context,
    config: &ChatConfig,
    reserve: u64,
) -> Result<(), HandlerError> {
    // Groups are keyed by openConversationId; a legacy event with only a chatId is kept under
    // that instead, so nothing is lost.
    let key = change
        .open_conversation_id
        .clone()
        .or_else(|| change.chat_id.as_ref().map(|c| format!("chat:{c}")))
        .ok_or_else(|| {
            HandlerError::permanent("chat_update_title without openConversationId or chatId")
        })?;
    let at = change.time.unwrap_or_else(now_millis);
    let store = &*ctx.store;
    let mut group = groups::load(store, &key)
        .await?
        .unwrap_or_else(|| Group::new(&key));
    if group.title_at.is_some_and(|t| t > at) {
        tracing::info!(group = %key, "rename older than the recorded name; ignored");
        return Ok(());
    }
    group.title = Some(change.title.clone());
    group.title_at = Some(at);
    if group.corp_id.is_none() {
        group.corp_id = change.corp_id.clone();
    }
    groups::save(store, &group).await?;

    if config.announce {
        let text = config.announce_message.render_with(&[
            ("title", &change.title),
            ("operator", change.operator.as_deref().unwrap_or("")),
            (
                "open_conversation_id",
                change.open_conversation_id.as_deref().unwrap_or(""),
            ),
            ("chat_id", change.chat_id.as_deref().unwrap_or("")),
        ]);
        groups::send_text(&ctx, &group, &text, "announce", reserve).await?;
    }
    Ok(())
}
