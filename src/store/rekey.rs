//! Migration 6: de-duplication keys keep the exact text of the id.
//!
//! Before it, `event:<id>` and `biz:<type>:<id>` put a numeric `eventId` / `BizId` through
//! `f64` (`12345678901234567890123` and `…124` both became `event:1.2345678901234568e22`, the
//! second event dropped as a duplicate), a number and a string with the same digits shared a
//! key (`1` and `"1"`), and a type holding a `:` could meet another (type, id) pair. Today's
//! keys are [`crate::event::dedup_key`]; string ids of ordinary types (every payload DingTalk
//! documents) keep the key they had.
//!
//! The rows whose key changes are re-keyed here, from their stored payload, inside the
//! migration's transaction, rather than looked up under both formats for a while:
//!
//! - the old key of a big number cannot be recomputed from the old key, but the payload is
//!   stored whole, and a row is re-keyed only when its key is what the old code gave that
//!   payload (internal events and rows written some other way keep theirs);
//! - left in place, an old numeric key would take a string id's key from it (`event:1` of the
//!   number 1 would make the string `"1"` a duplicate), and the insert path would pay a
//!   second lookup for ever;
//! - the built-in handlers keep the event's key in what they record: effects done
//!   (`effect` documents, `<key>/<name>`, see `builtin::effect_once`) and to-do claims
//!   (`todo_claim` documents, `{"event": <key>}`). Those are renamed in the same transaction,
//!   so a re-keyed event retried or replayed after the upgrade does not send twice. The
//!   `event_key` recorded in a `notification` is a note for the operator and is left as it
//!   was; documents a program's own handlers keyed by event keys are not known here.
//!
//! Cost: one pass over the keys of `events` (a pattern match, no payload read) and the
//! payloads of the rows that look numeric; nothing more when none changes.

use std::collections::HashMap;

use serde_json::Value;

use super::schema::Dialect;
use crate::event::{Envelope, IdText};

/// The migration (counted from 1, as both stores count them) after which the stores run the
/// re-keying, in the same transaction.
pub const MIGRATION: usize = 6;

/// The collections whose documents hold event keys (see the module's notes).
pub const EFFECT_COLLECTION: &str = "effect";
pub const CLAIM_COLLECTION: &str = "todo_claim";

/// `id, dedup_key, payload` of the rows whose key may change: an `event:` key whose id looks
/// like a number, a `biz:` key whose id does, or one with a third `:` (a type holding one).
/// A superset: [`rekeyed`] decides from the payload. Hexadecimal ids never match, so their
/// payloads are not read.
pub fn candidates(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => {
            "SELECT id, dedup_key, payload FROM events WHERE source <> 'internal' AND (\
             (dedup_key GLOB 'event:[0-9-]*' AND substr(dedup_key, 7) NOT GLOB '*[^0-9eE.+-]*') \
             OR (dedup_key GLOB 'biz:*:*:*') \
             OR (dedup_key GLOB 'biz:*:[0-9-]*' AND dedup_key NOT GLOB 'biz:*:*[^0-9eE.+-]*'))"
        }
        Dialect::Postgres => {
            "SELECT id, dedup_key, payload FROM events WHERE source <> 'internal' AND (\
             dedup_key ~ '^event:-?[0-9][0-9eE.+-]*$' \
             OR dedup_key ~ '^biz:.*:.*:' \
             OR dedup_key ~ '^biz:[^:]*:-?[0-9][0-9eE.+-]*$')"
        }
    }
}

/// Today's key for a stored row, when `stored` is the key the code before migration 6 gave
/// `payload` and today's differs. `None`: the row keeps its key.
pub fn rekeyed(stored: &str, payload: &str) -> Option<String> {
    let (envelope, _) = Envelope::parse(payload.as_bytes()).ok()?;
    let key = envelope.dedup_key(payload.as_bytes());
    if key == stored {
        return None;
    }
    // The old key: `event:` + the id, else `biz:` + type + `:` + the id, a number written by
    // serde_json from its `f64` or 64-bit integer.
    let old_id = match (&envelope.event_id, &envelope.biz_id) {
        (Some(id), _) => (id, stored.strip_prefix("event:")?),
        (None, Some(biz)) => {
            let rest = stored
                .strip_prefix("biz:")?
                .strip_prefix(envelope.event_type.as_str())?
                .strip_prefix(':')?;
            (biz, rest)
        }
        (None, None) => return None,
    };
    was_written_as(old_id.0, old_id.1).then_some(key)
}

/// Whether the old code wrote `id` as `old`: a string as it is; a number as serde_json printed
/// its value (compared as numbers, since that printing changed between serde_json versions).
fn was_written_as(id: &IdText, old: &str) -> bool {
    match id {
        IdText::String(text) => text == old,
        IdText::Number(text) => {
            text == old
                || old.starts_with(|c: char| c == '-' || c.is_ascii_digit())
                    && matches!(
                        (old.parse::<f64>(), text.parse::<f64>()),
                        (Ok(a), Ok(b)) if a == b
                    )
        }
    }
}

/// The rows re-keyed, and what follows from them for the documents.
#[derive(Debug, Default)]
pub struct Renames {
    /// Row id, new key.
    pub events: Vec<(i64, String)>,
    /// Old key → new key.
    keys: HashMap<String, String>,
}

impl Renames {
    /// Notes row `id` (key `stored`, `payload`) if it is re-keyed.
    pub fn consider(&mut self, id: i64, stored: String, payload: &str) {
        if let Some(key) = rekeyed(&stored, payload) {
            self.events.push((id, key.clone()));
            self.keys.insert(stored, key);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The new key of an `effect` document (`<event key>/<name>`) of a re-keyed event. Event
    /// keys may hold a `/` themselves, so every `/` is tried as the separator.
    pub fn effect_key(&self, key: &str) -> Option<String> {
        key.match_indices('/').find_map(|(at, _)| {
            let new = self.keys.get(&key[..at])?;
            Some(format!("{new}{}", &key[at..]))
        })
    }

    /// The new body of a `todo_claim` document (`{"event": <key>}`) held by a re-keyed event.
    pub fn claim_body(&self, body: &str) -> Option<String> {
        let mut value: Value = serde_json::from_str(body).ok()?;
        let event = value.get_mut("event")?;
        let new = self.keys.get(event.as_str()?)?;
        *event = Value::String(new.clone());
        Some(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn numbers_are_rekeyed_from_the_payload_and_strings_are_not() {
        let big = r#"{"EventType":"x","eventId":12345678901234567890123}"#;
        for old in [
            "event:1.2345678901234568e22",
            "event:1.2345678901234568e+22",
        ] {
            assert_eq!(
                rekeyed(old, big).as_deref(),
                Some("event-number:12345678901234567890123"),
                "{old}"
            );
        }
        let one = r#"{"EventType":"x","eventId":1}"#;
        assert_eq!(rekeyed("event:1", one).as_deref(), Some("event-number:1"));
        // A key the old code did not give this payload is left alone.
        assert_eq!(rekeyed("event:2", one), None);
        assert_eq!(rekeyed("send-result:1", one), None);
        // Strings keep their key.
        assert_eq!(rekeyed("event:1", r#"{"eventId":"1"}"#), None);
        let biz = r#"{"EventType":"t","BizId":"b"}"#;
        assert_eq!(rekeyed("biz:t:b", biz), None);
        // Numeric biz ids and types holding a ':'.
        let biz = r#"{"EventType":"t","BizId":77}"#;
        assert_eq!(rekeyed("biz:t:77", biz).as_deref(), Some("biz-number:t:77"));
        let biz = r#"{"EventType":"a:b","BizId":"c"}"#;
        assert_eq!(rekeyed("biz:a:b:c", biz).as_deref(), Some("biz/3:a:b:c"));
        assert_eq!(rekeyed("garbage", "not json"), None);
    }

    #[test]
    fn documents_follow_their_events() {
        let mut renames = Renames::default();
        renames.consider(7, "event:1".into(), r#"{"EventType":"x","eventId":1}"#);
        renames.consider(8, "event:a".into(), r#"{"eventId":"a"}"#);
        assert_eq!(renames.events, [(7, "event-number:1".to_owned())]);
        assert_eq!(
            renames.effect_key("event:1/welcome").as_deref(),
            Some("event-number:1/welcome")
        );
        assert_eq!(
            renames.effect_key("event:1/todo/x").as_deref(),
            Some("event-number:1/todo/x")
        );
        assert_eq!(renames.effect_key("event:10/welcome"), None);
        assert_eq!(renames.effect_key("event:a/welcome"), None);
        assert_eq!(
            renames.claim_body(r#"{"event":"event:1"}"#).as_deref(),
            Some(r#"{"event":"event-number:1"}"#)
        );
        assert_eq!(renames.claim_body(r#"{"event":"event:a"}"#), None);
        assert_eq!(renames.claim_body("[]"), None);
    }

    #[test]
    fn sqlite_candidates_are_the_keys_that_may_have_been_numbers() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, dedup_key TEXT, payload TEXT, source TEXT)",
        )
        .unwrap();
        let keys = [
            ("event:1.2345678901234568e22", true),
            ("event:-5", true),
            ("event:12", true),
            ("event:0ba7c3", false),
            ("event:abc", false),
            ("event:", false),
            ("biz:t:77", true),
            ("biz:t:-1.5e+3", true),
            ("biz:t:7b", false),
            ("biz:a:b:c", true),
            ("biz:t:b", false),
            ("sha256:00", false),
            ("attendance-lookup:u:1", false),
        ];
        for (i, (key, _)) in keys.iter().enumerate() {
            conn.execute(
                "INSERT INTO events VALUES (?1, ?2, '{}', 'push')",
                rusqlite::params![i as i64, key],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO events VALUES (100, 'event:9', '{}', 'internal')",
            [],
        )
        .unwrap();
        let found: Vec<String> = conn
            .prepare(candidates(Dialect::Sqlite))
            .unwrap()
            .query_map([], |r| r.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<&str> = keys.iter().filter(|k| k.1).map(|k| k.0).collect();
        assert_eq!(found, expected);
    }
}
