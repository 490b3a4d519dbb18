//! Work notifications (工作通知): `topapi/message/corpconversation/*`.

use reqwest::Method;
use serde::{Deserialize, Serialize, Serializer};

use super::client::Request;
use super::lenient;
use super::{Client, Error, Result};

/// `status_bar/update`'s errcode for "too many recipients, no more send results", which it
/// also answers while the send is not finished.
const SEND_NOT_FINISHED: i64 = 41052;
/// `getsendprogress`'s `status` of a finished send (0 not started, 1 running, 2 done).
const SEND_DONE: i64 = 2;

/// The `msg` object of a work notification. Serialises as `{"msgtype": "...", "<msgtype>": {...}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "msgtype", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkMessage {
    /// Plain text.
    Text {
        /// The body.
        text: Text,
    },
    /// Markdown (DingTalk's subset).
    Markdown {
        /// The body.
        markdown: Markdown,
    },
    /// A link card.
    Link {
        /// The body.
        link: Link,
    },
    /// An action card with one link or a row/column of buttons.
    ActionCard {
        /// The body.
        action_card: ActionCard,
    },
    /// An OA message, the only kind with an updatable status bar.
    Oa {
        /// The body.
        oa: OaMessage,
    },
}

/// `text` message body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Text {
    /// The text.
    pub content: String,
}

/// `markdown` message body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Markdown {
    /// Shown in the conversation list.
    pub title: String,
    /// Markdown text.
    pub text: String,
}

/// `link` message body (DingTalk spells these fields in camelCase).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Link {
    /// Where a click goes.
    pub message_url: String,
    /// Picture (URL or `@mediaId`).
    pub pic_url: String,
    /// Title.
    pub title: String,
    /// Text.
    pub text: String,
}

/// `action_card` message body: either `single_title` + `single_url`, or buttons.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionCard {
    /// Title.
    pub title: String,
    /// Markdown body.
    pub markdown: String,
    /// Text of the single button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_title: Option<String>,
    /// Link of the single button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_url: Option<String>,
    /// `"0"` vertical or `"1"` horizontal buttons.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub btn_orientation: Option<String>,
    /// Buttons, when there is no single button.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub btn_json_list: Vec<ActionCardButton>,
}

/// One action-card button.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionCardButton {
    /// Button text.
    pub title: String,
    /// Where it goes.
    pub action_url: String,
}

/// `oa` message body.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaMessage {
    /// Link opened on mobile.
    pub message_url: String,
    /// Link opened on PC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pc_message_url: Option<String>,
    /// Header strip.
    pub head: OaHead,
    /// Status bar (only for ≤5 user recipients, no departments, not to all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_bar: Option<OaStatusBar>,
    /// Body.
    pub body: OaBody,
}

/// `oa.head`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaHead {
    /// ARGB colour, e.g. `FFBBBBBB`.
    pub bgcolor: String,
    /// Header text.
    pub text: String,
}

/// `oa.status_bar` (also the body of `status_bar/update`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaStatusBar {
    /// Status text.
    pub status_value: String,
    /// ARGB background colour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_bg: Option<String>,
}

/// `oa.body`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaBody {
    /// Title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Key/value lines (at most 6 are shown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub form: Vec<OaForm>,
    /// A number with a unit, shown large.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rich: Option<OaRich>,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Image `@mediaId`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Number of attachments shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<String>,
    /// Author line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
}

/// One `oa.body.form` line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaForm {
    /// Label.
    pub key: String,
    /// Value.
    pub value: String,
}

/// `oa.body.rich`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OaRich {
    /// The number.
    pub num: String,
    /// Its unit.
    pub unit: String,
}

/// Who gets a work notification and what. The agent id comes from the client's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkNotification {
    /// User ids (≤100).
    pub userid_list: Vec<String>,
    /// Department ids (≤20; sub-departments included).
    pub dept_id_list: Vec<i64>,
    /// Send to everyone in the organisation.
    pub to_all_user: bool,
    /// The message.
    pub msg: WorkMessage,
}

impl WorkNotification {
    /// A notification to the given users.
    pub fn to_users<I, S>(users: I, msg: WorkMessage) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        WorkNotification {
            userid_list: users.into_iter().map(Into::into).collect(),
            dept_id_list: Vec::new(),
            to_all_user: false,
            msg,
        }
    }
}

/// The wire body of `asyncsend_v2`: lists travel as comma-separated strings.
#[derive(Serialize)]
struct AsyncSendBody<'a> {
    agent_id: i64,
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "comma_list")]
    userid_list: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "comma_list")]
    dept_id_list: &'a [i64],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    to_all_user: bool,
    msg: &'a WorkMessage,
}

fn comma_list<S: Serializer, T: ToString>(items: &&[T], s: S) -> Result<S::Ok, S::Error> {
    let joined = items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    s.serialize_str(&joined)
}

#[derive(Deserialize)]
struct AsyncSendAnswer {
    task_id: i64,
}

#[derive(Serialize)]
struct TaskBody {
    agent_id: i64,
    task_id: i64,
}

/// `getsendprogress` answer.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SendProgress {
    /// 0–100.
    #[serde(default)]
    pub progress_in_percent: i64,
    /// 0 not started, 1 running, 2 done.
    #[serde(default)]
    pub status: i64,
}

#[derive(Deserialize)]
struct ProgressAnswer {
    #[serde(default)]
    progress: SendProgress,
}

/// `getsendresult` answer: who got it, who did not and why.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct SendResult {
    /// Unknown user ids.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub invalid_user_id_list: Vec<String>,
    /// Users blocked by flow control (see `forbidden_list` for why).
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub forbidden_user_id_list: Vec<String>,
    /// Users the send failed for.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub failed_user_id_list: Vec<String>,
    /// Users who read it.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub read_user_id_list: Vec<String>,
    /// Users who have not read it.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub unread_user_id_list: Vec<String>,
    /// Unknown department ids.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub invalid_dept_id_list: Vec<i64>,
    /// Flow-control details.
    #[serde(default, deserialize_with = "lenient::vec_or_null")]
    pub forbidden_list: Vec<ForbiddenEntry>,
}

/// One flow-control entry of [`SendResult`] (codes 143103–143106, 1430000–1430004).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ForbiddenEntry {
    /// The flow-control code, as text.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub code: Option<String>,
    /// The limit that was hit.
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    pub count: Option<i64>,
    /// The user.
    #[serde(default)]
    pub userid: String,
}

#[derive(Deserialize)]
struct SendResultAnswer {
    #[serde(default)]
    send_result: SendResult,
}

#[derive(Serialize)]
struct StatusBarBody<'a> {
    agent_id: i64,
    task_id: i64,
    status_value: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_bg: Option<&'a str>,
}

#[derive(Serialize)]
struct RecallBody {
    agent_id: i64,
    msg_task_id: i64,
}

#[derive(Deserialize)]
struct Ack {}

impl Client {
    /// Sends a work notification (`asyncsend_v2`) and returns its task id.
    ///
    /// DingTalk answers success even when a per-user limit drops the message; check
    /// [`Client::work_notification_result`] to see who actually got it.
    pub async fn send_work_notification(&self, notification: &WorkNotification) -> Result<i64> {
        let body = AsyncSendBody {
            agent_id: self.agent_id()?,
            userid_list: &notification.userid_list,
            dept_id_list: &notification.dept_id_list,
            to_all_user: notification.to_all_user,
            msg: &notification.msg,
        };
        let request = Request::old(
            Method::POST,
            "/topapi/message/corpconversation/asyncsend_v2",
        )
        .json(&body)?;
        let answer: AsyncSendAnswer = self.execute(request).await?;
        Ok(answer.task_id)
    }

    /// How far a work notification's delivery got (`getsendprogress`).
    pub async fn work_notification_progress(&self, task_id: i64) -> Result<SendProgress> {
        let body = TaskBody {
            agent_id: self.agent_id()?,
            task_id,
        };
        let request = Request::old(
            Method::POST,
            "/topapi/message/corpconversation/getsendprogress",
        )
        .json(&body)?;
        let answer: ProgressAnswer = self.execute(request).await?;
        Ok(answer.progress)
    }

    /// Who received, read, or was refused a work notification (`getsendresult`).
    pub async fn work_notification_result(&self, task_id: i64) -> Result<SendResult> {
        let body = TaskBody {
            agent_id: self.agent_id()?,
            task_id,
        };
        let request = Request::old(
            Method::POST,
            "/topapi/message/corpconversation/getsendresult",
        )
        .json(&body)?;
        let answer: SendResultAnswer = self.execute(request).await?;
        Ok(answer.send_result)
    }

    /// Changes the status bar of an OA work notification (`status_bar/update`).
    ///
    /// DingTalk answers 41052 ("too many recipients, no more send results") while the send is
    /// still in progress, and for a send too large to report on: its page says to check
    /// `getsendprogress` and to send to fewer people
    /// (<https://open.dingtalk.com/document/development/update-work-notification-status-bar>).
    /// So on 41052 the progress is read: a send not done yet gives
    /// [`Error::SendInProgress`] (retryable: try again later); a
    /// send that is done gets the update once more, and a second 41052 is DingTalk's refusal.
    pub async fn update_work_notification_status(
        &self,
        task_id: i64,
        status: &OaStatusBar,
    ) -> Result<()> {
        let body = StatusBarBody {
            agent_id: self.agent_id()?,
            task_id,
            status_value: &status.status_value,
            status_bg: status.status_bg.as_deref(),
        };
        let request = || {
            Request::old(
                Method::POST,
                "/topapi/message/corpconversation/status_bar/update",
            )
            .json(&body)
        };
        match self.execute::<Ack>(request()?).await {
            Err(err) if err.errcode() == Some(SEND_NOT_FINISHED) => {}
            other => return other.map(|_| ()),
        }
        let progress = self.work_notification_progress(task_id).await?;
        if progress.status != SEND_DONE {
            tracing::info!(
                task_id,
                progress.progress_in_percent,
                progress.status,
                "status bar refused while the notification is still being sent"
            );
            return Err(Error::SendInProgress {
                task_id,
                progress_in_percent: progress.progress_in_percent,
                status: progress.status,
            });
        }
        let _: Ack = self.execute(request()?).await?;
        Ok(())
    }

    /// Withdraws a work notification sent less than 24 h ago (`recall`).
    pub async fn recall_work_notification(&self, task_id: i64) -> Result<()> {
        let body = RecallBody {
            agent_id: self.agent_id()?,
            msg_task_id: task_id,
        };
        let request =
            Request::old(Method::POST, "/topapi/message/corpconversation/recall").json(&body)?;
        let _: Ack = self.execute(request).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_serialise_as_dingtalk_expects() {
        let text = WorkMessage::Text {
            text: Text {
                content: "hi".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&text).unwrap(),
            json!({"msgtype": "text", "text": {"content": "hi"}})
        );
        let link = WorkMessage::Link {
            link: Link {
                message_url: "https://e.x".into(),
                pic_url: "@m".into(),
                title: "t".into(),
                text: "x".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&link).unwrap(),
            json!({"msgtype": "link", "link": {"messageUrl": "https://e.x", "picUrl": "@m", "title": "t", "text": "x"}})
        );
        let card = WorkMessage::ActionCard {
            action_card: ActionCard {
                title: "t".into(),
                markdown: "m".into(),
                single_title: Some("go".into()),
                single_url: Some("https://e.x".into()),
                ..ActionCard::default()
            },
        };
        assert_eq!(
            serde_json::to_value(&card).unwrap(),
            json!({"msgtype": "action_card", "action_card": {"title": "t", "markdown": "m", "single_title": "go", "single_url": "https://e.x"}})
        );
    }

    #[test]
    fn asyncsend_body_joins_lists_with_commas() {
        let msg = WorkMessage::Markdown {
            markdown: Markdown {
                title: "t".into(),
                text: "x".into(),
            },
        };
        let body = AsyncSendBody {
            agent_id: 7,
            userid_list: &["a".to_owned(), "b".to_owned()],
            dept_id_list: &[1, 2],
            to_all_user: false,
            msg: &msg,
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"agent_id": 7, "userid_list": "a,b", "dept_id_list": "1,2",
                   "msg": {"msgtype": "markdown", "markdown": {"title": "t", "text": "x"}}})
        );
    }
}
