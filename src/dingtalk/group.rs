//! Group information: `POST /v1.0/im/sceneGroups/query`.

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

impl Client {
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
