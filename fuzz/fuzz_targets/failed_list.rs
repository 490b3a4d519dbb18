//! The answer of `call_back/get_call_back_failed_result`, from bytes to stored events:
//! `FailedCallbackPage::from_body` (what `Client::failed_callbacks` does with a successful
//! answer) → `recovery::recovered_event` for each entry (what a recovery cycle stores) →
//! `Event::decode` (what the dispatcher does with the stored payload).
//!
//! Checked: nothing panics; one entry per list item, none dropped; every stored payload is a JSON
//! object whose envelope is the event's type, corp and de-duplication key; only URL checks are
//! skipped; the dispatcher's decoding agrees with the envelope on the type.
#![no_main]

use dinghook::dingtalk::FailedCallbackPage;
use dinghook::event::{Envelope, Event};
use dinghook::sources::recovery::recovered_event;
use dinghook::store::Source;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const NOW_MS: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(page) = FailedCallbackPage::from_body(data) else {
        return;
    };
    // Every item of a `failed_list` array becomes an entry, whatever its shape.
    if let Ok(answer) = serde_json::from_slice::<Value>(data) {
        let items = match answer.get("failed_list") {
            Some(Value::Array(items)) => items.len(),
            _ => 0,
        };
        assert_eq!(page.entries.len(), items);
    }
    for entry in &page.entries {
        let _ = entry.payload_json();
        let Some(event) = recovered_event(entry, NOW_MS) else {
            // Only URL checks are left out.
            let json = dinghook::sources::recovery::event_json(entry);
            let (envelope, _) = Envelope::parse(json.to_string().as_bytes())
                .expect("a skipped entry's event JSON is an object");
            assert!(envelope.is_check(), "{entry:?} was skipped");
            continue;
        };
        assert_eq!(event.source, Source::Recovery);
        assert_eq!(event.received_at, NOW_MS);
        let (envelope, value) =
            Envelope::parse(event.payload.as_bytes()).expect("a recovered payload is an object");
        assert!(value.is_object());
        assert!(!envelope.is_check());
        assert_eq!(envelope.event_type, event.event_type);
        assert_eq!(envelope.corp_id, event.corp_id);
        assert_eq!(
            envelope.dedup_key(event.payload.as_bytes()),
            event.dedup_key
        );
        match Event::decode(&event.payload) {
            Ok(decoded) => assert_eq!(decoded.event_type(), event.event_type),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
