//! Scene groups: `POST /v1.0/im/sceneGroups/query` (group information) and
//! `POST /v1.0/im/sceneGroup/create` (a group from a template: a war room). What DingTalk
//! documents for the create, and why this API and not the old topapi one: `docs/dingtalk-war-room.md`.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::client::Request;
use super::lenient;
use super::robot::segments;
use super::{Client, Result};

/// What `sceneGroups/query` says about a cool-app or template group.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct SceneGroupInfo {
    /// The group.
    pub open_conversation_id: String,
    /// Group name.
    pub title: String,
    /// Template id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub template_id: Option<String>,
    /// Owner's user id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub owner_user_id: Option<String>,
    /// Icon media id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub icon: Option<String>,
    /// Group URL.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub group_url: Option<String>,
    /// 1 normal, 2 disbanded.
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub status: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QueryBody<'a> {
    open_conversation_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cool_app_code: Option<&'a str>,
}

/// A group to create from a template (`sceneGroup/create`). The field names are DingTalk's,
/// snake_case on the wire; empty lists and unset options are left out of the body.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CreateSceneGroup {
    /// Group name, at most 30 characters.
    pub title: String,
    /// The group template's id (developer console: 场景群 > 群模板).
    pub template_id: String,
    /// The owner's user id.
    pub owner_user_id: String,
    /// Members' user ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    /// Administrators' user ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subadmin_ids: Vec<String>,
    /// The caller's de-duplication id (at most 64 characters): a create repeated with the same
    /// `uuid` makes no second group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Avatar `mediaId`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    /// The group's settings; DingTalk's defaults for those left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_options: Option<SceneGroupManagementOptions>,
}

impl CreateSceneGroup {
    /// A group with a title, a template and an owner, nothing else yet.
    pub fn new(
        title: impl Into<String>,
        template_id: impl Into<String>,
        owner_user_id: impl Into<String>,
    ) -> Self {
        CreateSceneGroup {
            title: title.into(),
            template_id: template_id.into(),
            owner_user_id: owner_user_id.into(),
            ..CreateSceneGroup::default()
        }
    }
}

/// `management_options` of `sceneGroup/create`: each 0 or 1, DingTalk's default when `None`
/// (in brackets). Meanings in `docs/dingtalk-war-room.md`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SceneGroupManagementOptions {
    /// 0 anyone may @all, 1 the owner only [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mention_all_authority: Option<i32>,
    /// 1: new members see the history [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_history_type: Option<i32>,
    /// 1: joining needs approval [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_type: Option<i32>,
    /// 1: the group can be found by search [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub searchable: Option<i32>,
    /// 1: everyone muted [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_banned_type: Option<i32>,
    /// 1: only the owner manages the group [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_type: Option<i32>,
    /// 1: only the owner and administrators may send a DING [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_admin_can_ding: Option<i32>,
    /// 1: anyone may start a video or voice call [1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_members_can_create_mcs_conf: Option<i32>,
    /// 1: members who are not friends or colleagues may schedule with each other [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_members_can_create_calendar: Option<i32>,
    /// 1: no group e-mail [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_email_disabled: Option<i32>,
    /// 1: only the owner and administrators pin messages [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_admin_can_set_msg_top: Option<i32>,
    /// 1: members may not befriend or message each other privately [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_friend_forbidden: Option<i32>,
    /// 1: anyone may go live in the group [1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_live_switch: Option<i32>,
    /// 1: members may not message administrators privately [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members_to_admin_chat: Option<i32>,
    /// 1: people who leave the organisation stay in the group (external groups only) [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_quit_when_emp_leave: Option<i32>,
    /// 1: only the owner and administrators invite (with `management_type` 1) [0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_admin_can_add_mem: Option<i32>,
}

/// What `sceneGroup/create` answers: the new group's ids.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SceneGroupCreated {
    /// The group (`cid…`): what robot messages and `sceneGroups/query` take.
    pub open_conversation_id: String,
    /// The old-style chat id (`chat…`), which DingTalk says it will phase out.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub chat_id: Option<String>,
}

impl Client {
    /// Creates a group from a template (`sceneGroup/create`, permission `qyapi_chat_manage`,
    /// counted toward the monthly quota). Pass a `uuid` whenever the call may be repeated (a
    /// retry after a time-out): DingTalk makes no second group for a `uuid` it has seen.
    /// DingTalk's refusals (`groupTemplate.notFound`, `member.notFound`, `parameter.invalid`,
    /// `permession.checkFailed`, …) come back as [`Error::ApiV2`](super::Error::ApiV2), permanent.
    pub async fn create_scene_group(&self, group: &CreateSceneGroup) -> Result<SceneGroupCreated> {
        let request = Request::new_api(
            Method::POST,
            "/v1.0/im/sceneGroup/create",
            segments(&["v1.0", "im", "sceneGroup", "create"]),
        )
        .json(group)?;
        self.execute(request).await
    }

    /// Looks a group up (`sceneGroups/query`); `cool_app_code` is required for cool-app groups.
    pub async fn query_scene_group(
        &self,
        open_conversation_id: &str,
        cool_app_code: Option<&str>,
    ) -> Result<SceneGroupInfo> {
        let request = Request::new_api(
            Method::POST,
            "/v1.0/im/sceneGroups/query",
            segments(&["v1.0", "im", "sceneGroups", "query"]),
        )
        .json(&QueryBody {
            open_conversation_id,
            cool_app_code,
        })?;
        self.execute(request).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn create_body_has_dingtalks_names_and_leaves_out_what_is_unset() {
        let bare = CreateSceneGroup::new("INC-42 db down", "tpl-1", "alice");
        assert_eq!(
            serde_json::to_value(&bare).unwrap(),
            json!({"title": "INC-42 db down", "template_id": "tpl-1", "owner_user_id": "alice"})
        );
        let full = CreateSceneGroup {
            user_ids: vec!["bob".into(), "carol".into()],
            subadmin_ids: vec!["bob".into()],
            uuid: Some("k-1".into()),
            icon: Some("@lADO".into()),
            management_options: Some(SceneGroupManagementOptions {
                show_history_type: Some(1),
                searchable: Some(0),
                ..SceneGroupManagementOptions::default()
            }),
            ..bare
        };
        assert_eq!(
            serde_json::to_value(&full).unwrap(),
            json!({
                "title": "INC-42 db down", "template_id": "tpl-1", "owner_user_id": "alice",
                "user_ids": ["bob", "carol"], "subadmin_ids": ["bob"], "uuid": "k-1",
                "icon": "@lADO",
                "management_options": {"show_history_type": 1, "searchable": 0}
            })
        );
    }

    #[test]
    fn created_answer_parses_with_or_without_chat_id() {
        let answer: SceneGroupCreated =
            serde_json::from_str(r#"{"open_conversation_id":"cid1==","chat_id":"chat9"}"#).unwrap();
        assert_eq!(answer.open_conversation_id, "cid1==");
        assert_eq!(answer.chat_id.as_deref(), Some("chat9"));
        let answer: SceneGroupCreated =
            serde_json::from_str(r#"{"open_conversation_id":"cid1==","chat_id":null}"#).unwrap();
        assert_eq!(answer.chat_id, None);
        // Without the group's id the answer is useless: a decode error, not an empty id.
        assert!(serde_json::from_str::<SceneGroupCreated>(r#"{"chat_id":"chat9"}"#).is_err());
    }
}
