//! The `groups` collection: what dinghook knows of each group (cool-app installs, renames),
//! and the one way to message a group, which refuses groups the app was removed from.

use serde::{Deserialize, Serialize};

use super::{effect_once, notification_budget, notification_outcome};
use crate::dingtalk::RobotGroupMessage;
use crate::handler::{Context, HandlerError};
use crate::store::{Store, StoreError};
use crate::time::now_millis;

const COLLECTION: &str = "group";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupStatus {
    /// Seen (renamed) but no install of our cool app recorded.
    #[default]
    Known,
    Installed,
    Uninstalled,
}

/// A row of the `groups` view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub open_conversation_id: String,
    pub title: Option<String>,
    /// When `title` was set, epoch ms; an older rename arriving late does not overwrite it.
    pub title_at: Option<i64>,
    pub status: GroupStatus,
    pub robot_code: Option<String>,
    pub cool_app_code: Option<String>,
    pub corp_id: Option<String>,
    pub operator: Option<String>,
    pub installed_at: Option<i64>,
    pub uninstalled_at: Option<i64>,
}

impl Group {
    pub fn new(open_conversation_id: &str) -> Self {
        Group {
            open_conversation_id: open_conversation_id.to_owned(),
            ..Group::default()
        }
    }
}

pub async fn load(store: &dyn Store, id: &str) -> Result<Option<Group>, StoreError> {
    Ok(match store.get_document(COLLECTION, id).await? {
        Some(doc) => serde_json::from_value(doc.body).ok(),
        None => None,
    })
}

pub async fn save(store: &dyn Store, group: &Group) -> Result<(), StoreError> {
    let body = serde_json::to_value(group).unwrap_or_default();
    store
        .put_document(COLLECTION, &group.open_conversation_id, &body, now_millis())
        .await
}

/// Sends `text` into the group through its robot, once per event (`effect` names it).
/// Skipped, with the reason logged, when the app is not installed there (never installed, or
/// uninstalled: DingTalk would refuse, and retrying cannot help), or when the monthly quota is
/// under the reserve or used up.
pub async fn send_text(
    ctx: &Context,
    group: &Group,
    text: &str,
    effect: &str,
    reserve: u64,
) -> Result<(), HandlerError> {
    let (Some(robot_code), GroupStatus::Installed) = (&group.robot_code, group.status) else {
        tracing::info!(
            group = %group.open_conversation_id,
            status = ?group.status,
            effect,
            "group message skipped: the cool app is not installed in this group"
        );
        ctx.metrics
            .notification_skipped(&ctx.record.app, "group_not_installed");
        return Ok(());
    };
    if !notification_budget(ctx, reserve, effect).await {
        return Ok(());
    }
    let client = ctx.dingtalk()?;
    let message = RobotGroupMessage::new(
        robot_code.clone(),
        group.open_conversation_id.clone(),
        group.cool_app_code.clone(),
        "sampleText",
        &serde_json::json!({ "content": text }),
    )?;
    effect_once(ctx, effect, || async {
        let sent = notification_outcome(ctx, client.send_robot_group_message(&message).await)?;
        if sent.is_some() {
            ctx.metrics
                .notification_sent(&ctx.record.app, "group_message");
        }
        Ok(serde_json::json!({ "process_query_key": sent, "skipped": sent.is_none() }))
    })
    .await?;
    Ok(())
}
