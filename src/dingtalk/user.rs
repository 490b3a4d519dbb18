//! Users: `topapi/v2/user/getbymobile`, `topapi/v2/user/get`, `topapi/user/getbyunionid`.

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::client::Request;
use super::lenient;
use super::{Client, Result};

/// `topapi/v2/user/get` result (the fields handlers use; the rest is in `extra`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct UserDetail {
    /// User id.
    pub userid: String,
    /// Union id (what the v1.0 to-do API wants).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub unionid: Option<String>,
    /// Name.
    pub name: String,
    /// Mobile number, when the app may see it.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub mobile: Option<String>,
    /// Job title.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub title: Option<String>,
    /// Departments.
    #[serde(deserialize_with = "lenient::vec_or_null")]
    pub dept_id_list: Vec<i64>,
    /// Activated.
    pub active: Option<bool>,
    /// Everything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `topapi/user/getbyunionid` result.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UserByUnionId {
    /// User id.
    pub userid: String,
    /// 0 employee, 1 external contact.
    #[serde(deserialize_with = "lenient::opt_i64")]
    pub contact_type: Option<i64>,
}

#[derive(Deserialize)]
struct ResultAnswer<T> {
    result: T,
}

#[derive(Deserialize)]
struct UseridOnly {
    userid: String,
}

#[derive(Serialize)]
struct MobileBody<'a> {
    mobile: &'a str,
}

#[derive(Serialize)]
struct UserGetBody<'a> {
    userid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<&'a str>,
}

#[derive(Serialize)]
struct UnionIdBody<'a> {
    unionid: &'a str,
}

impl Client {
    /// The user id of an active employee with this mobile number (`topapi/v2/user/getbymobile`).
    /// Not counted toward the monthly quota (DingTalk lists it among the free address-book calls).
    pub async fn user_id_by_mobile(&self, mobile: &str) -> Result<String> {
        let request = Request::old(Method::POST, "/topapi/v2/user/getbymobile")
            .json(&MobileBody { mobile })?
            .unmetered();
        let answer: ResultAnswer<UseridOnly> = self.execute(request).await?;
        Ok(answer.result.userid)
    }

    /// A user's details (`topapi/v2/user/get`); `language` is `zh_CN` (default) or `en_US`.
    pub async fn get_user(&self, userid: &str, language: Option<&str>) -> Result<UserDetail> {
        let request = Request::old(Method::POST, "/topapi/v2/user/get")
            .json(&UserGetBody { userid, language })?;
        let answer: ResultAnswer<UserDetail> = self.execute(request).await?;
        Ok(answer.result)
    }

    /// The user id behind a union id (`topapi/user/getbyunionid`).
    pub async fn user_by_union_id(&self, unionid: &str) -> Result<UserByUnionId> {
        let request = Request::old(Method::POST, "/topapi/user/getbyunionid")
            .json(&UnionIdBody { unionid })?;
        let answer: ResultAnswer<UserByUnionId> = self.execute(request).await?;
        Ok(answer.result)
    }
}
