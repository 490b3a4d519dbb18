//! Typed events from the fixture files: every payload generation parses to the same value.

use std::path::PathBuf;

use dinghook::event::{CheckRecord, Event};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode(name: &str) -> Event {
    if name.ends_with(".stream.json") {
        return Event::from_value(stream_payload(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    Event::decode(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A Stream fixture is a whole EVENT frame: the type, corp, id and birth time are headers,
/// `data` is a JSON string of the business fields. Merged as a Stream source stores it
/// (`shared/docs/stream-mode.md` §3): `EventType ← eventType`, `CorpId ← eventCorpId`,
/// `eventId ← eventId`, `EventTime ← eventBornTime`, plus the fields of `data`.
fn stream_payload(name: &str) -> serde_json::Value {
    let frame: serde_json::Value = serde_json::from_str(&fixture(name)).unwrap();
    assert_eq!(frame["type"], "EVENT", "{name}");
    let headers = &frame["headers"];
    let data = frame["data"].as_str().expect("data is a JSON string");
    let mut payload: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(data).unwrap();
    for key in ["eventType", "eventCorpId", "eventId"] {
        assert!(
            payload.keys().all(|k| !k.eq_ignore_ascii_case(key)),
            "{name}: {key} belongs in the headers"
        );
    }
    for (field, header) in [
        ("EventType", "eventType"),
        ("CorpId", "eventCorpId"),
        ("eventId", "eventId"),
        ("EventTime", "eventBornTime"),
    ] {
        let value = headers[header].as_str().expect("headers are strings");
        payload.insert(field.into(), value.into());
    }
    serde_json::Value::Object(payload)
}

#[test]
fn legacy_and_current_payloads_decode_to_the_same_values() {
    let pairs = [
        (
            "chat_update_title.legacy.json",
            "chat_update_title.current.json",
        ),
        (
            "im_cool_app_install.legacy.json",
            "im_cool_app_install.current.json",
        ),
        (
            "im_cool_app_uninstall.legacy.json",
            "im_cool_app_uninstall.current.json",
        ),
        (
            "attendance_check_record.legacy.json",
            "attendance_check_record.current.json",
        ),
        (
            "attendance_schedule_change.legacy.json",
            "attendance_schedule_change.current.json",
        ),
        (
            "attendance_overtime_duration.legacy.json",
            "attendance_overtime_duration.current.json",
        ),
        (
            "todo_task_create.stream.json",
            "todo_task_create.current.json",
        ),
        (
            "todo_task_update.stream.json",
            "todo_task_update.current.json",
        ),
        (
            "todo_task_delete.stream.json",
            "todo_task_delete.current.json",
        ),
    ];
    for (a, b) in pairs {
        let (x, mut y) = (decode(a), decode(b));
        // Only the current payload carries the operator's union id.
        if let Event::ChatUpdateTitle(chat) = &mut y {
            assert!(chat.operator_union_id.take().is_some());
        }
        assert_eq!(x, y, "{a} vs {b}");
        assert!(
            !matches!(x, Event::Unknown { .. }),
            "{a} decoded as unknown"
        );
    }
}

#[test]
fn fields_land_where_they_belong() {
    let Event::ChatUpdateTitle(chat) = decode("chat_update_title.current.json") else {
        panic!("not a rename")
    };
    assert_eq!(chat.title, "开放平台");
    assert_eq!(chat.open_conversation_id.as_deref(), Some("cidmfW1"));
    assert_eq!(chat.operator.as_deref(), Some("user456"));
    assert_eq!(chat.time, Some(1_608_027_247_528));

    let Event::CoolAppInstall(install) = decode("im_cool_app_install.current.json") else {
        panic!("not an install")
    };
    assert_eq!(
        (
            install.cool_app_code.as_str(),
            install.robot_code.as_str(),
            install.open_conversation_id.as_str()
        ),
        ("COOLAPP-1-1018", "rBLBXuia", "cidT461w")
    );
    assert_eq!(install.operate_time, Some(1_641_866_135_051));
    assert!(matches!(
        decode("im_cool_app_uninstall.current.json"),
        Event::CoolAppUninstall(_)
    ));

    let Event::AttendanceCheckRecord(records) = decode("attendance_check_record.current.json")
    else {
        panic!("not a check-in")
    };
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[1],
        CheckRecord {
            user_id: "0127user".into(),
            corp_id: Some("dingcorp1".into()),
            check_time: Some(1_570_791_890_000),
            group_id: Some("4C63group".into()),
            biz_id: Some("FF63biz".into()),
            location_method: Some("WIFI".into()),
            location_result: Some("Outside".into()),
            address: None,
            device_sn: Some("SN1".into()),
            check_by_user: false,
        }
    );

    let Event::TodoTaskUpdate(todo) = decode("todo_task_update.current.json") else {
        panic!("not a to-do update")
    };
    assert_eq!(todo.task_id, "task15cb");
    assert_eq!(todo.union_ids, ["QWRGux2l", "ZZunion"]);

    for name in [
        "attendance_overtime_duration.legacy.json",
        "attendance_overtime_duration.current.json",
    ] {
        let Event::AttendanceOvertimeDuration(ot) = decode(name) else {
            panic!("not overtime")
        };
        assert_eq!(ot[0].user_id.as_deref(), Some("u9"), "{name}");
        assert_eq!(ot[0].overtime_day, Some(0.5), "{name}");
    }

    // A delete carries no bizTag, pushed or streamed.
    for name in [
        "todo_task_delete.current.json",
        "todo_task_delete.stream.json",
    ] {
        let Event::TodoTaskDelete(todo) = decode(name) else {
            panic!("not a to-do delete")
        };
        assert_eq!(todo.biz_tag, None, "{name}");
        assert_eq!(todo.corp_id.as_deref(), Some("dingcorp1"), "{name}");
    }
}

#[test]
fn unknown_types_keep_their_raw_json() {
    let text = fixture("user_modify_org.legacy.json");
    let event = Event::decode(&text).unwrap();
    let Event::Unknown { event_type, raw } = &event else {
        panic!("{event:?}")
    };
    assert_eq!(event_type, "user_modify_org");
    assert_eq!(
        raw,
        &serde_json::from_str::<serde_json::Value>(&text).unwrap()
    );
    assert_eq!(event.event_type(), "user_modify_org");
}

#[test]
fn a_known_type_without_its_required_fields_is_a_decode_error() {
    let err = Event::decode(r#"{"EventType":"im_cool_app_install","robotCode":"r"}"#).unwrap_err();
    assert!(err.to_string().contains("coolAppCode"), "{err}");
    assert!(Event::decode("[]").is_err());
    assert!(Event::decode("nope").is_err());
}
