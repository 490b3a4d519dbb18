//! Robot messages into a group: `POST /v1.0/robot/groupMessages/send`; into one-to-one chats
//! with the robot: `POST /v1.0/robot/oToMessages/batchSend`; and replies through a robot
//! message's session webhook (`https://oapi.dingtalk.com/robot/sendBySession?session=…`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::client::Request;
use super::error::Error;
use super::{Client, Result};

/// A robot message for one group. The three ids come straight from the `im_cool_app_install`
/// event. `msg_param` is a JSON **string** on the wire; build it with [`RobotGroupMessage::new`].
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RobotGroupMessage {
    /// The robot's code.
    pub robot_code: String,
    /// The group (`cid…`).
    pub open_conversation_id: String,
    /// Required when the robot was installed through a group cool app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cool_app_code: Option<String>,
    /// Template key: `sampleText`, `sampleMarkdown`, `sampleLink`, `sampleActionCard`, …
    pub msg_key: String,
    /// The template's parameters, serialised as a JSON string (≤15 000 bytes).
    pub msg_param: String,
}

impl RobotGroupMessage {
    /// Builds a message, serialising `param` into the JSON string DingTalk wants.
    pub fn new<P: Serialize>(
        robot_code: impl Into<String>,
        open_conversation_id: impl Into<String>,
        cool_app_code: Option<String>,
        msg_key: impl Into<String>,
        param: &P,
    ) -> Result<Self> {
        let msg_param = serde_json::to_string(param).map_err(|source| Error::Decode {
            path: "msgParam".into(),
            source,
        })?;
        Ok(RobotGroupMessage {
            robot_code: robot_code.into(),
            open_conversation_id: open_conversation_id.into(),
            cool_app_code,
            msg_key: msg_key.into(),
            msg_param,
        })
    }

    /// A `sampleMarkdown` message.
    pub fn markdown(
        robot_code: impl Into<String>,
        open_conversation_id: impl Into<String>,
        cool_app_code: Option<String>,
        title: &str,
        text: &str,
    ) -> Result<Self> {
        Self::new(
            robot_code,
            open_conversation_id,
            cool_app_code,
            "sampleMarkdown",
            &serde_json::json!({ "title": title, "text": text }),
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendAnswer {
    #[serde(default)]
    process_query_key: String,
}

impl Client {
    /// Sends a robot message into a group; returns the `processQueryKey` (for read status or
    /// recall).
    pub async fn send_robot_group_message(&self, message: &RobotGroupMessage) -> Result<String> {
        let request = Request::new_api(
            Method::POST,
            "/v1.0/robot/groupMessages/send",
            segments(&["v1.0", "robot", "groupMessages", "send"]),
        )
        .json(message)?;
        let answer: SendAnswer = self.execute(request).await?;
        Ok(answer.process_query_key)
    }
}

/// A robot message into one-to-one chats between the robot and each of `user_ids`
/// (`POST /v1.0/robot/oToMessages/batchSend`; fields as DingTalk's official SDKs send them,
/// `docs/dingtalk-robot-oto.md`). `msg_param` is a JSON **string** on the wire, as for groups.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RobotOtoMessage {
    /// The robot's code.
    pub robot_code: String,
    /// The recipients' user ids (staff ids), at most [`RobotOtoMessage::MAX_USERS`].
    pub user_ids: Vec<String>,
    /// Template key: `sampleText`, `sampleMarkdown`, … (as for groups).
    pub msg_key: String,
    /// The template's parameters, serialised as a JSON string.
    pub msg_param: String,
}

impl RobotOtoMessage {
    /// DingTalk's limit on the users of one call.
    pub const MAX_USERS: usize = 20;

    /// Builds a message, serialising `param` into the JSON string DingTalk wants.
    pub fn new<P: Serialize>(
        robot_code: impl Into<String>,
        user_ids: Vec<String>,
        msg_key: impl Into<String>,
        param: &P,
    ) -> Result<Self> {
        let msg_param = serde_json::to_string(param).map_err(|source| Error::Decode {
            path: "msgParam".into(),
            source,
        })?;
        Ok(RobotOtoMessage {
            robot_code: robot_code.into(),
            user_ids,
            msg_key: msg_key.into(),
            msg_param,
        })
    }
}

/// DingTalk's answer to `oToMessages/batchSend`: a success may still leave users out.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RobotOtoSent {
    /// For read status and recall.
    #[serde(default)]
    pub process_query_key: String,
    /// Users DingTalk does not know (or who cannot get the robot's messages): not sent.
    #[serde(default)]
    pub invalid_staff_id_list: Vec<String>,
    /// Users DingTalk held back for sending too often: not sent, worth another try later.
    #[serde(default)]
    pub flow_controlled_staff_id_list: Vec<String>,
}

impl Client {
    /// Sends a robot message to each user's one-to-one chat with the robot. Users DingTalk left
    /// out are in the answer's lists, not an error: the caller decides.
    pub async fn send_robot_oto_message(&self, message: &RobotOtoMessage) -> Result<RobotOtoSent> {
        let request = Request::new_api(
            Method::POST,
            OTO_SEND_PATH,
            segments(&["v1.0", "robot", "oToMessages", "batchSend"]),
        )
        .json(message)?;
        self.execute(request).await
    }
}

/// Where one-to-one robot messages are sent.
pub const OTO_SEND_PATH: &str = "/v1.0/robot/oToMessages/batchSend";

/// The name session-webhook calls go by in errors and logs (the URL itself is a credential).
pub const SESSION_WEBHOOK_LABEL: &str = "/robot/sendBySession";

/// DingTalk's answer to a session webhook whose session is gone (expired or unknown):
/// `{"errcode": 300001, "errmsg": "session 不存在"}`, as users of it report.
pub const SESSION_GONE_ERRCODE: i64 = 300_001;

#[derive(Deserialize)]
struct SessionAnswer {
    #[serde(default, deserialize_with = "super::lenient::opt_i64")]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
}

impl Client {
    /// Posts `message` (`{"msgtype": "text", "text": {"content": …}}`, `markdown`, …) to a
    /// robot message's session webhook. DingTalk answers `errcode` 0, or e.g. 300001 when the
    /// session is gone ([`Error::Api`], permanent). The URL must be on the oapi base URL's
    /// host; it appears in no error.
    pub async fn send_by_session(&self, webhook: &str, message: &serde_json::Value) -> Result<()> {
        let (status, body) = self
            .post_credential_url(SESSION_WEBHOOK_LABEL, webhook, message)
            .await?;
        let answer: Option<SessionAnswer> = serde_json::from_slice(&body).ok();
        match answer.and_then(|a| a.errcode.map(|c| (c, a.errmsg))) {
            Some((0, _)) if status.is_success() => Ok(()),
            Some((errcode, errmsg)) if errcode != 0 => Err(Error::Api {
                path: SESSION_WEBHOOK_LABEL.into(),
                errcode,
                errmsg: errmsg.unwrap_or_default(),
                request_id: None,
            }),
            _ => Err(Error::ApiV2 {
                status: status.as_u16(),
                code: String::new(),
                message: format!("the session webhook answered HTTP {status} without an errcode"),
                request_id: None,
            }),
        }
    }
}

pub(crate) fn segments(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_param_is_a_json_string() {
        let message =
            RobotGroupMessage::markdown("robot", "cid1", Some("COOLAPP-1".into()), "t", "**x**")
                .unwrap();
        let wire = serde_json::to_value(&message).unwrap();
        assert_eq!(wire["robotCode"], "robot");
        assert_eq!(wire["openConversationId"], "cid1");
        assert_eq!(wire["coolAppCode"], "COOLAPP-1");
        assert_eq!(wire["msgKey"], "sampleMarkdown");
        let param: serde_json::Value =
            serde_json::from_str(wire["msgParam"].as_str().unwrap()).unwrap();
        assert_eq!(param["text"], "**x**");
    }
}
