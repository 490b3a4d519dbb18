//! To-do: the new v1.0 task API (`/v1.0/todo/users/{unionId}/tasks/{taskId}`) and the legacy
//! work records (`topapi/workrecord/*`).

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::client::Request;
use super::lenient;
use super::{Client, Result};

const TASK_LABEL: &str = "/v1.0/todo/users/{unionId}/tasks/{taskId}";

/// A to-do task as `GET …/tasks/{taskId}` returns it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TodoTask {
    /// Task id.
    pub id: String,
    /// Title.
    pub subject: String,
    /// Description.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub description: Option<String>,
    /// Completed.
    pub done: bool,
    /// Due (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub due_time: Option<i64>,
    /// Finished (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub finish_time: Option<i64>,
    /// Start (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub start_time: Option<i64>,
    /// Executors' unionIds.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub executor_ids: Vec<String>,
    /// Participants' unionIds.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub participant_ids: Vec<String>,
    /// Creator's unionId.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub creator_id: Option<String>,
    /// Last modifier's unionId.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub modifier_id: Option<String>,
    /// Source application.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub source: Option<String>,
    /// Business id given at creation.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub source_id: Option<String>,
    /// Business tag.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub biz_tag: Option<String>,
    /// Detail links.
    pub detail_url: Option<TodoDetailUrl>,
    /// 10, 20, 30 or 40.
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub priority: Option<i64>,
    /// Created (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub created_time: Option<i64>,
    /// Modified (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub modified_time: Option<i64>,
    /// DingTalk's request id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub request_id: Option<String>,
    /// Everything else (tenant, card type, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `detailUrl` of a task.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct TodoDetailUrl {
    /// Mobile link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
    /// PC link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pc_url: Option<String>,
}

/// Fields to change with `PUT …/tasks/{taskId}`; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TodoTaskUpdate {
    /// New title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// New description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New due time (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_time: Option<i64>,
    /// Mark done / not done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
    /// Replace the executors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor_ids: Option<Vec<String>>,
    /// Replace the participants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct BoolAnswer {
    #[serde(default)]
    result: bool,
}

/// A page of legacy work records (`topapi/workrecord/getbyuserid`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WorkRecordPage {
    /// More pages follow.
    pub has_more: bool,
    /// The records.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub list: Vec<WorkRecord>,
}

/// One legacy work record.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WorkRecord {
    /// Record id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub record_id: Option<String>,
    /// Created (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub create_time: Option<i64>,
    /// Title.
    pub title: String,
    /// Link.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub url: Option<String>,
    /// Form lines.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub forms: Vec<WorkRecordForm>,
}

/// One line of a work record's form.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WorkRecordForm {
    /// Label.
    pub title: String,
    /// Value.
    pub content: String,
}

#[derive(Deserialize)]
struct WorkRecordAnswer {
    #[serde(default)]
    records: WorkRecordPage,
}

#[derive(Serialize)]
struct WorkRecordUpdateBody<'a> {
    userid: &'a str,
    record_id: &'a str,
}

#[derive(Serialize)]
struct WorkRecordQueryBody<'a> {
    userid: &'a str,
    offset: u32,
    limit: u32,
    status: u8,
}

fn task_segments(union_id: &str, task_id: &str) -> Vec<String> {
    ["v1.0", "todo", "users", union_id, "tasks", task_id]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

impl Client {
    /// Reads a to-do task (`GET /v1.0/todo/users/{unionId}/tasks/{taskId}`).
    pub async fn get_todo_task(&self, union_id: &str, task_id: &str) -> Result<TodoTask> {
        let request = Request::new_api(Method::GET, TASK_LABEL, task_segments(union_id, task_id));
        self.execute(request).await
    }

    /// Changes a to-do task (`PUT /v1.0/todo/users/{unionId}/tasks/{taskId}?operatorId=`);
    /// returns DingTalk's `result`.
    pub async fn update_todo_task(
        &self,
        union_id: &str,
        task_id: &str,
        operator_id: Option<&str>,
        update: &TodoTaskUpdate,
    ) -> Result<bool> {
        let mut request =
            Request::new_api(Method::PUT, TASK_LABEL, task_segments(union_id, task_id))
                .json(update)?;
        if let Some(operator) = operator_id {
            request = request.query("operatorId", operator);
        }
        let answer: BoolAnswer = self.execute(request).await?;
        Ok(answer.result)
    }

    /// Marks a legacy work record done (`topapi/workrecord/update`).
    pub async fn complete_work_record(&self, userid: &str, record_id: &str) -> Result<bool> {
        let request = Request::old(Method::POST, "/topapi/workrecord/update")
            .json(&WorkRecordUpdateBody { userid, record_id })?;
        let answer: BoolAnswer = self.execute(request).await?;
        Ok(answer.result)
    }

    /// A user's legacy work records (`topapi/workrecord/getbyuserid`); `done` picks finished
    /// (status 1) or open (status 0) ones; `limit` at most 50.
    pub async fn work_records(
        &self,
        userid: &str,
        offset: u32,
        limit: u32,
        done: bool,
    ) -> Result<WorkRecordPage> {
        let request = Request::old(Method::POST, "/topapi/workrecord/getbyuserid").json(
            &WorkRecordQueryBody {
                userid,
                offset,
                limit,
                status: u8::from(done),
            },
        )?;
        let answer: WorkRecordAnswer = self.execute(request).await?;
        Ok(answer.records)
    }
}
