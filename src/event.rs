//! The envelope of a decrypted event: its type, corp, ids and de-duplication key.
//!
//! DingTalk has sent several generations of payloads (legacy PascalCase, current camelCase,
//! Stream), so keys are matched case-insensitively and timestamps may be numbers or strings.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Event types answered at once and never stored: DingTalk's URL checks.
pub const CHECK_TYPES: &[&str] = &[
    "check_url",
    "check_create_suite_url",
    "check_update_suite_url",
];

/// The fields every event may carry, whatever the generation of its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `EventType`; `unknown` when the payload has none (it is kept, not dropped).
    pub event_type: String,
    pub corp_id: Option<String>,
    pub event_id: Option<String>,
    pub biz_id: Option<String>,
    /// `EventTime`, else `TimeStamp`, in epoch milliseconds.
    pub event_time: Option<i64>,
}

/// Why a decrypted message is not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the decrypted message is not JSON: {0}")]
    NotJson(String),
    #[error("the decrypted message is JSON but not an object")]
    NotObject,
}

/// Looks a key up ignoring ASCII case (`EventType`, `eventType`, `eventtype`).
pub fn get_ci<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// A string field that may be sent as a string or a number.
pub fn string_ci(object: &Map<String, Value>, key: &str) -> Option<String> {
    match get_ci(object, key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An integer field that may be sent as a number or a numeric string.
pub fn i64_ci(object: &Map<String, Value>, key: &str) -> Option<i64> {
    match get_ci(object, key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Envelope {
    /// Parses the envelope of a decrypted message.
    pub fn parse(msg: &[u8]) -> Result<(Self, Value), EnvelopeError> {
        let value: Value =
            serde_json::from_slice(msg).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(object) = &value else {
            return Err(EnvelopeError::NotObject);
        };
        let envelope = Envelope {
            event_type: string_ci(object, "EventType").unwrap_or_else(|| "unknown".into()),
            corp_id: string_ci(object, "CorpId"),
            event_id: string_ci(object, "eventId"),
            biz_id: string_ci(object, "BizId"),
            event_time: i64_ci(object, "EventTime").or_else(|| i64_ci(object, "TimeStamp")),
        };
        Ok((envelope, value))
    }

    /// True for DingTalk's URL checks, which are answered and not stored.
    pub fn is_check(&self) -> bool {
        CHECK_TYPES.contains(&self.event_type.as_str())
    }

    /// The key that makes a re-delivery the same event: `eventId` if present, else `BizId` +
    /// event type, else the SHA-256 of the decrypted message.
    pub fn dedup_key(&self, msg: &[u8]) -> String {
        dedup_key(self, msg)
    }
}

/// See [`Envelope::dedup_key`].
pub fn dedup_key(envelope: &Envelope, msg: &[u8]) -> String {
    if let Some(id) = &envelope.event_id {
        format!("event:{id}")
    } else if let Some(biz) = &envelope.biz_id {
        format!("biz:{}:{biz}", envelope.event_type)
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(msg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_case_insensitively_and_numbers_may_be_strings() {
        let (e, _) = Envelope::parse(
            br#"{"eventType":"chat_update_title","corpId":"ding1","EVENTID":"e1","timeStamp":"1608027247528"}"#,
        )
        .unwrap();
        assert_eq!(e.event_type, "chat_update_title");
        assert_eq!(e.corp_id.as_deref(), Some("ding1"));
        assert_eq!(e.event_id.as_deref(), Some("e1"));
        assert_eq!(e.event_time, Some(1_608_027_247_528));
    }

    #[test]
    fn dedup_prefers_event_id_then_biz_id_then_hash() {
        let msg = br#"{"EventType":"x","eventId":"abc","BizId":"b"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        assert_eq!(e.dedup_key(msg), "event:abc");
        let msg = br#"{"EventType":"x","BizId":"b"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        assert_eq!(e.dedup_key(msg), "biz:x:b");
        let msg = br#"{"EventType":"x"}"#;
        let (e, _) = Envelope::parse(msg).unwrap();
        let key = e.dedup_key(msg);
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64, "{key}");
    }

    #[test]
    fn a_payload_without_a_type_is_kept_as_unknown() {
        let (e, _) = Envelope::parse(br#"{"CorpId":"x"}"#).unwrap();
        assert_eq!(e.event_type, "unknown");
        assert!(!e.is_check());
    }

    #[test]
    fn non_objects_are_rejected() {
        assert_eq!(
            Envelope::parse(b"[1]").unwrap_err(),
            EnvelopeError::NotObject
        );
        assert!(matches!(
            Envelope::parse(b"nope"),
            Err(EnvelopeError::NotJson(_))
        ));
    }
}
