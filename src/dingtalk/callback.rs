//! DingTalk's list of pushes that failed: `GET /call_back/get_call_back_failed_result`.
//!
//! Reading a page deletes it on DingTalk's side, so the caller must store a page before asking
//! for the next one. The entries' shape varies (the per-tag value has been seen as an object and
//! as a Java-map-style string), so each entry is kept whole and only the tag and time are pulled
//! out; one odd entry never fails the page.

use reqwest::Method;
use serde_json::Value;

use super::client::{parse_answer, Request};
use super::{Client, Result};

const PATH: &str = "/call_back/get_call_back_failed_result";

/// One page of failed pushes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailedCallbackPage {
    /// More entries are waiting; call again after storing these.
    pub has_more: bool,
    /// The entries, in DingTalk's order.
    pub entries: Vec<FailedCallback>,
}

/// One failed push.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedCallback {
    /// `call_back_tag`: the event type, when present and a string.
    pub tag: Option<String>,
    /// `event_time` in ms, when present (number or numeric string).
    pub event_time: Option<i64>,
    /// The value under the key named after the tag: an object, or sometimes a string.
    pub payload: Option<Value>,
    /// The whole entry as DingTalk sent it.
    pub raw: Value,
}

impl FailedCallback {
    /// Reads one `failed_list` entry without ever failing.
    pub fn from_entry(raw: Value) -> Self {
        let tag = raw
            .get("call_back_tag")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let event_time = raw.get("event_time").and_then(|t| match t {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        let payload = tag.as_deref().and_then(|t| raw.get(t)).cloned();
        FailedCallback {
            tag,
            event_time,
            payload,
            raw,
        }
    }

    /// The payload as JSON: the object itself, or a string payload parsed as JSON. `None` when
    /// there is no payload or it is a string that is not JSON (e.g. `"{corpid=ding…}"`).
    pub fn payload_json(&self) -> Option<Value> {
        match self.payload.as_ref()? {
            Value::String(text) => serde_json::from_str(text).ok(),
            other => Some(other.clone()),
        }
    }
}

impl FailedCallbackPage {
    /// Reads a whole answer leniently: a missing or non-list `failed_list` is an empty page.
    pub fn from_answer(answer: &Value) -> Self {
        let has_more = match answer.get("has_more") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
            _ => false,
        };
        let entries = match answer.get("failed_list") {
            Some(Value::Array(items)) => items
                .iter()
                .cloned()
                .map(FailedCallback::from_entry)
                .collect(),
            _ => Vec::new(),
        };
        FailedCallbackPage { has_more, entries }
    }

    /// Reads the body of a successful answer (DingTalk said `errcode` 0) into a page, exactly as
    /// [`Client::failed_callbacks`] does: only a body that is not JSON at all is an error.
    pub fn from_body(body: &[u8]) -> Result<Self> {
        let answer: Value = parse_answer(PATH, body)?;
        Ok(Self::from_answer(&answer))
    }
}

impl Client {
    /// Reads (and thereby deletes on DingTalk's side) the next page of failed pushes.
    pub async fn failed_callbacks(&self) -> Result<FailedCallbackPage> {
        let request = Request::old(Method::GET, PATH);
        let answer: Value = self.execute(request).await?;
        Ok(FailedCallbackPage::from_answer(&answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn odd_entries_do_not_fail_the_page() {
        let answer = json!({
            "errcode": 0,
            "has_more": true,
            "failed_list": [
                {"call_back_tag": "chat_update_title", "event_time": 1663143335567_i64,
                 "chat_update_title": {"corpid": "ding1", "callbackData": {"title": "x"}}},
                {"call_back_tag": "user_modify_org", "event_time": "1663143335000",
                 "user_modify_org": "{corpid=ding1}"},
                {"call_back_tag": 7},
                "not even an object",
                {"event_time": null}
            ]
        });
        let page = FailedCallbackPage::from_answer(&answer);
        assert!(page.has_more);
        assert_eq!(page.entries.len(), 5);
        let first = &page.entries[0];
        assert_eq!(first.tag.as_deref(), Some("chat_update_title"));
        assert_eq!(first.event_time, Some(1663143335567));
        assert_eq!(first.payload_json().unwrap()["callbackData"]["title"], "x");
        let second = &page.entries[1];
        assert_eq!(second.event_time, Some(1663143335000));
        assert_eq!(second.payload, Some(json!("{corpid=ding1}")));
        assert_eq!(second.payload_json(), None);
        assert_eq!(page.entries[2].tag, None);
        assert_eq!(page.entries[3].raw, json!("not even an object"));
    }

    #[test]
    fn missing_list_is_an_empty_page() {
        let page = FailedCallbackPage::from_answer(&json!({"errcode": 0}));
        assert_eq!(page, FailedCallbackPage::default());
    }
}
