//! The one message every route sends, whatever the destination: the event as DingTalk sent it
//! (`data`) with what dinghook knows about it. `docs/envelope.schema.json` describes it; the
//! tests check what is sent against that schema.

use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// A routed event, ready to serialize.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// Stable for the event: the same on every attempt, replay and replica (derived from the
    /// app and the event's de-duplication key). The Standard Webhooks `webhook-id`, the
    /// JetStream `Nats-Msg-Id`, the AMQP `message_id`.
    pub id: String,
    /// The app it came to.
    pub app: &'a str,
    /// DingTalk's event type (`EventType`).
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub corp_id: Option<&'a str>,
    /// When dinghook stored it, RFC 3339 in UTC with milliseconds.
    pub received_at: String,
    /// How it came in: `push`, `recovery` (later `stream`).
    pub source: &'a str,
    /// The decrypted DingTalk event, exactly as received.
    pub data: &'a RawValue,
}

/// What an envelope is made from: an event as stored.
pub struct EventParts<'a> {
    pub app: &'a str,
    pub dedup_key: &'a str,
    pub event_type: &'a str,
    pub corp_id: Option<&'a str>,
    pub received_at: i64,
    pub source: &'a str,
    pub payload: &'a str,
}

/// Why an event cannot be sent: its stored payload is not JSON (it always is when dinghook
/// stored it; a hand-edited database may differ).
#[derive(Debug, thiserror::Error)]
#[error("the stored event is not JSON: {0}")]
pub struct BadPayload(#[from] serde_json::Error);

impl<'a> Envelope<'a> {
    pub fn new(parts: &EventParts<'a>) -> Result<Self, BadPayload> {
        let data: &RawValue = serde_json::from_str(parts.payload)?;
        Ok(Envelope {
            id: envelope_id(parts.app, parts.dedup_key),
            app: parts.app,
            event_type: parts.event_type,
            corp_id: parts.corp_id,
            received_at: crate::time::rfc3339_millis(parts.received_at),
            source: parts.source,
            data,
        })
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing borrowed strings and a raw value cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `evt_` and 32 hex digits of SHA-256 over the app and the de-duplication key: the same for
/// one event everywhere, different for two apps' events with one eventId.
pub fn envelope_id(app: &str, dedup_key: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(app.as_bytes());
    hash.update([0]);
    hash.update(dedup_key.as_bytes());
    let digest = hash.finalize();
    format!("evt_{}", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(app: &'a str, key: &'a str, payload: &'a str) -> EventParts<'a> {
        EventParts {
            app,
            dedup_key: key,
            event_type: "chat_update_title",
            corp_id: Some("dingcorp"),
            received_at: 1_764_000_000_123,
            source: "push",
            payload,
        }
    }

    #[test]
    fn the_envelope_carries_the_event_as_received() {
        let payload = r#"{"EventType":"chat_update_title", "eventId":"e1","title":"新名字"}"#;
        let envelope = Envelope::new(&parts("ops", "@ops/event:e1", payload)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&envelope.to_json()).unwrap();
        assert_eq!(json["app"], "ops");
        assert_eq!(json["type"], "chat_update_title");
        assert_eq!(json["corp_id"], "dingcorp");
        assert_eq!(json["received_at"], "2025-11-24T16:00:00.123Z");
        assert_eq!(json["source"], "push");
        assert_eq!(json["data"]["title"], "新名字");
        // Byte for byte: the raw payload is embedded, not re-serialized.
        let text = String::from_utf8(envelope.to_json()).unwrap();
        assert!(text.contains(payload), "{text}");
    }

    #[test]
    fn the_id_is_stable_per_event_and_differs_between_apps() {
        let a = envelope_id("ops", "event:e1");
        assert_eq!(a, envelope_id("ops", "event:e1"));
        assert_ne!(a, envelope_id("sales", "event:e1"));
        assert_ne!(a, envelope_id("ops", "event:e2"));
        assert!(a.starts_with("evt_") && a.len() == 36, "{a}");
    }

    #[test]
    fn a_payload_that_is_not_json_is_an_error() {
        assert!(Envelope::new(&parts("ops", "k", "not json")).is_err());
    }
}
