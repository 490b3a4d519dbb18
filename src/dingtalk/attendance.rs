//! Attendance: `topapi/attendance/getupdatedata`, `attendance/list`, `attendance/listRecord`.
//!
//! Ids and times change between string and number across endpoints and doc generations, so they
//! are read leniently, and every record keeps the fields we do not model in `extra`.

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::client::Request;
use super::lenient;
use super::{Client, Result};

/// `getupdatedata` result: one user's attendance for one day. Serializable so a handler can
/// keep what it read.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct AttendanceUpdateData {
    /// The day.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub work_date: Option<String>,
    /// The user.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub userid: Option<String>,
    /// The organisation.
    #[serde(rename = "corpId", deserialize_with = "lenient::opt_string")]
    pub corp_id: Option<String>,
    /// Results per planned check (on duty / off duty).
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub attendance_result_list: Vec<AttendanceCheckResult>,
    /// Raw punches.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub check_record_list: Vec<Value>,
    /// Approvals (leave, overtime, trips) affecting the day.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub approve_list: Vec<Value>,
    /// Shift settings.
    pub class_setting_info: Option<Value>,
}

/// One entry of `attendance_result_list`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct AttendanceCheckResult {
    /// `OnDuty` / `OffDuty`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub check_type: Option<String>,
    /// `Normal`, `Early`, `Late`, `SeriousLate`, `Absenteeism`, `NotSigned`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub time_result: Option<String>,
    /// `Normal`, `Outside`, …
    #[serde(deserialize_with = "lenient::opt_string")]
    pub location_result: Option<String>,
    /// Where the punch came from.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub source_type: Option<String>,
    /// Planned time.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub plan_check_time: Option<String>,
    /// Actual time.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub user_check_time: Option<String>,
    /// Punch record id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub record_id: Option<String>,
    /// Plan id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub plan_id: Option<String>,
    /// Attendance group id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub group_id: Option<String>,
    /// Shift id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub class_id: Option<String>,
    /// Everything else DingTalk sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct UpdateDataAnswer {
    #[serde(default)]
    result: AttendanceUpdateData,
}

#[derive(Serialize)]
struct UpdateDataBody<'a> {
    userid: &'a str,
    work_date: &'a str,
}

/// `yyyy-MM-dd` becomes `yyyy-MM-dd 00:00:00`, as DingTalk's examples send it; anything else
/// (a date with its time already) is sent as given.
fn wire_work_date(work_date: &str) -> String {
    let day = work_date.trim();
    let is_bare_date = day.len() == 10
        && day.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if is_bare_date {
        format!("{day} 00:00:00")
    } else {
        work_date.to_owned()
    }
}

/// `attendance/list` query. Dates are `"yyyy-MM-dd HH:mm:ss"`, at most 7 days apart; both
/// name work dates, whole days included (`00:00:00` is the usual time), so one day `D` is
/// `workDateFrom = workDateTo = "D 00:00:00"`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttendanceListRequest {
    /// Start.
    pub work_date_from: String,
    /// End.
    pub work_date_to: String,
    /// Users (≤50).
    pub user_id_list: Vec<String>,
    /// Paging offset.
    pub offset: u32,
    /// Page size (≤50).
    pub limit: u32,
}

/// One record of `attendance/list` or `attendance/listRecord`. Serializable (camelCase, as
/// DingTalk writes it) so a handler can keep what it read.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AttendanceRecord {
    /// Record id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    /// The user.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub user_id: Option<String>,
    /// The day (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub work_date: Option<i64>,
    /// `OnDuty` / `OffDuty`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub check_type: Option<String>,
    /// `Normal`, `Late`, …
    #[serde(deserialize_with = "lenient::opt_string")]
    pub time_result: Option<String>,
    /// `Normal`, `Outside`, …
    #[serde(deserialize_with = "lenient::opt_string")]
    pub location_result: Option<String>,
    /// Where the punch came from.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub source_type: Option<String>,
    /// Actual time (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub user_check_time: Option<i64>,
    /// Planned time (ms).
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub base_check_time: Option<i64>,
    /// Punch record id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub record_id: Option<String>,
    /// Plan id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub plan_id: Option<String>,
    /// Attendance group id.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub group_id: Option<String>,
    /// Everything else (location, device, approval ids, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A page of `attendance/list`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct AttendanceListResult {
    /// The records.
    #[serde(
        default,
        rename = "recordresult",
        deserialize_with = "lenient::vec_or_null"
    )]
    pub records: Vec<AttendanceRecord>,
    /// More pages follow.
    #[serde(default, rename = "hasMore")]
    pub has_more: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListRecordBody<'a> {
    user_ids: &'a [String],
    check_date_from: &'a str,
    check_date_to: &'a str,
}

impl Client {
    /// One user's attendance for one day (`topapi/attendance/getupdatedata`); `work_date` is
    /// `"yyyy-MM-dd"` (or a whole `"yyyy-MM-dd HH:mm:ss"`). One call per user: the check-in
    /// handler uses [`attendance_list`](Client::attendance_list) instead, which answers 50
    /// users a call.
    ///
    /// The day is sent as `"yyyy-MM-dd 00:00:00"`: the parameter table types `work_date` as a
    /// Date with the example `2021-01-14`, but every request example on the page (curl,
    /// Python, PHP, C#) sends `2018-05-02 00:00:00`
    /// (<https://open.dingtalk.com/document/development/obtain-the-attendance-update-data>).
    pub async fn attendance_update_data(
        &self,
        userid: &str,
        work_date: &str,
    ) -> Result<AttendanceUpdateData> {
        let work_date = &wire_work_date(work_date);
        let request = Request::old(Method::POST, "/topapi/attendance/getupdatedata")
            .json(&UpdateDataBody { userid, work_date })?;
        let answer: UpdateDataAnswer = self.execute(request).await?;
        Ok(answer.result)
    }

    /// Attendance results, planned slots included (`attendance/list`).
    pub async fn attendance_list(
        &self,
        query: &AttendanceListRequest,
    ) -> Result<AttendanceListResult> {
        let request = Request::old(Method::POST, "/attendance/list").json(query)?;
        self.execute(request).await
    }

    /// Raw punches with location and device detail (`attendance/listRecord`). Dates are
    /// `"yyyy-MM-dd HH:mm:ss"`, at most 7 days apart; `user_ids` at most 50.
    pub async fn attendance_records(
        &self,
        user_ids: &[String],
        check_date_from: &str,
        check_date_to: &str,
    ) -> Result<Vec<AttendanceRecord>> {
        let request =
            Request::old(Method::POST, "/attendance/listRecord").json(&ListRecordBody {
                user_ids,
                check_date_from,
                check_date_to,
            })?;
        let answer: AttendanceListResult = self.execute(request).await?;
        Ok(answer.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dates_go_out_as_dingtalks_examples_send_them() {
        assert_eq!(wire_work_date("2026-11-02"), "2026-11-02 00:00:00");
        assert_eq!(wire_work_date(" 2026-11-02 "), "2026-11-02 00:00:00");
        assert_eq!(wire_work_date("2026-11-02 00:00:00"), "2026-11-02 00:00:00");
        assert_eq!(wire_work_date("2026/11/02"), "2026/11/02");
    }
}
