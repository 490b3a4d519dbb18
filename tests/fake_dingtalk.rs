//! dinghook's DingTalk client against the fake DingTalk scripted over its `/_fake` admin routes
//! (what curl scripts use). The fake's own checks, with plain HTTP and no client, are tested in
//! its crate (`crates/fake-dingtalk/tests/`).

// Loaded by path so it cannot collide with other test helpers under tests/support/.
#[path = "support/dingtalk.rs"]
mod support;

use dinghook::dingtalk::Error;
use serde_json::{json, Value};
use support::start;

async fn post(http: &reqwest::Client, url: String, body: &str) -> (u16, Value) {
    // No Content-Type on purpose: `curl -d` does not send a JSON one either.
    let response = http.post(url).body(body.to_owned()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn admin_routes_script_the_fake_over_http() {
    let t = start().await;
    let http = reqwest::Client::new();
    let admin = |route: &str| format!("{}/_fake{route}", t.base_url);

    let (status, _) = post(
        &http,
        admin("/users"),
        r#"[{"userid": "alice", "unionid": "u-a", "mobile": "1380"}]"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &http,
        admin("/faults"),
        r#"{"path": "/topapi/v2/user/get", "errcode": 90018, "times": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        t.client.get_user("alice", None).await.unwrap().userid,
        "alice"
    );

    let calls = get_json(&http, admin("/calls?path=/topapi/v2/user/get")).await;
    let calls = calls.as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["answer_code"], "90018");
    assert_eq!(calls[1]["answer_code"], "0");
    assert_eq!(calls[1]["method"], "POST");
    assert_eq!(calls[1]["body"], json!({"userid": "alice"}));
    assert!(calls[1]["query"]["access_token"].is_string());
    assert!(calls[1]["at_ms"].as_f64().unwrap() >= calls[0]["at_ms"].as_f64().unwrap());

    let state = get_json(&http, admin("/state")).await;
    assert_eq!(state["token_fetches"], 1);
    assert_eq!(state["quota_used"], 1, "the throttled call was not served");

    // Failed pushes, in pages of one.
    let (status, _) = post(
        &http,
        admin("/failed-callbacks"),
        r#"{"entries": [{"call_back_tag": "a", "event_time": 1}, {"call_back_tag": "b", "event_time": 2}], "page_size": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let page = t.client.failed_callbacks().await.unwrap();
    assert!(page.has_more);
    assert_eq!(page.entries[0].tag.as_deref(), Some("a"));
    assert_eq!(
        get_json(&http, admin("/state")).await["failed_callbacks_left"],
        1
    );

    // Token expiry, quota and bans, all from outside.
    post(&http, admin("/token/expire"), "").await;
    t.client.get_user("alice", None).await.unwrap();
    assert_eq!(get_json(&http, admin("/state")).await["token_fetches"], 2);

    post(&http, admin("/quota"), r#"{"limit": 3, "used": 3}"#).await;
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::QuotaExhausted { .. }), "{err:?}");
    post(&http, admin("/quota"), r#"{"limit": null}"#).await;

    post(&http, admin("/ban"), r#"{"wait": 1}"#).await;
    t.client.get_user("alice", None).await.unwrap();
    assert_eq!(t.client.stats().ip_bans, 1);

    // A delayed answer.
    post(
        &http,
        admin("/delay"),
        r#"{"ms": 300, "path": "/topapi/v2/user/get"}"#,
    )
    .await;
    let started = std::time::Instant::now();
    t.client.get_user("alice", None).await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    post(
        &http,
        admin("/delay"),
        r#"{"ms": 0, "path": "/topapi/v2/user/get"}"#,
    )
    .await;

    // Send results for a task, set over HTTP.
    let task = t
        .client
        .send_work_notification(&dinghook::dingtalk::WorkNotification::to_users(
            ["alice", "bob"],
            dinghook::dingtalk::WorkMessage::Text {
                text: dinghook::dingtalk::Text {
                    content: "x".into(),
                },
            },
        ))
        .await
        .unwrap();
    let default = t.client.work_notification_result(task).await.unwrap();
    assert_eq!(default.unread_user_id_list, ["alice", "bob"]);
    post(
        &http,
        admin(&format!("/send-results/{task}")),
        r#"{"read_user_id_list": ["alice"], "forbidden_user_id_list": ["bob"]}"#,
    )
    .await;
    let result = t.client.work_notification_result(task).await.unwrap();
    assert_eq!(result.read_user_id_list, ["alice"]);
    assert_eq!(result.forbidden_user_id_list, ["bob"]);

    // Bad JSON is a 400 that says why; reset forgets everything.
    let (status, body) = post(&http, admin("/faults"), "{not json").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("bad JSON"));
    post(&http, admin("/reset"), "").await;
    assert_eq!(
        get_json(&http, admin("/calls"))
            .await
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // The fake forgot its token (the client refetches) and its users (so: DingTalk's
    // "invalid userId").
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert_eq!(err.errcode(), Some(33012), "{err:?}");
}

#[tokio::test]
async fn war_room_templates_and_groups_over_the_admin_routes() {
    use dinghook::dingtalk::CreateSceneGroup;
    let t = start().await;
    let http = reqwest::Client::new();
    let admin = |route: &str| format!("{}/_fake{route}", t.base_url);
    post(
        &http,
        admin("/users"),
        r#"[{"userid": "alice"}, {"userid": "bob"}]"#,
    )
    .await;
    let group = CreateSceneGroup {
        user_ids: vec!["bob".into()],
        uuid: Some("k-1".into()),
        ..CreateSceneGroup::new("INC-1", "tpl-1", "alice")
    };
    // No template registered yet: DingTalk's "template not found or offline".
    let err = t.client.create_scene_group(&group).await.unwrap_err();
    assert_eq!(err.code(), Some("groupTemplate.notFound"), "{err:?}");

    let (status, _) = post(&http, admin("/templates"), r#"["tpl-1"]"#).await;
    assert_eq!(status, 200);
    let created = t.client.create_scene_group(&group).await.unwrap();
    let state = get_json(&http, admin("/state")).await;
    assert_eq!(state["scene_templates"], json!(["tpl-1"]));
    let groups = state["scene_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(
        groups[0]["open_conversation_id"],
        created.open_conversation_id.as_str()
    );
    assert_eq!(groups[0]["user_ids"], json!(["bob"]));
    assert_eq!(groups[0]["uuid"], "k-1");
    let (status, body) = post(&http, admin("/templates"), r#"{"id": 1}"#).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn attendance_list_answers_like_dingtalk_for_many_users() {
    use dinghook::dingtalk::AttendanceListRequest;
    let t = start().await;
    let http = reqwest::Client::new();
    // 2024-05-06 and 2024-05-07, 00:00 at +08:00.
    let (monday, tuesday) = (1_714_924_800_000_i64, 1_715_011_200_000_i64);
    // 60 users in one admin call, each with an on-duty result on both days.
    let users: Vec<String> = (0..60).map(|i| format!("u{i:02}")).collect();
    let body = json!({"user_ids": users, "records": [
        {"workDate": monday, "checkType": "OnDuty", "timeResult": "Late"},
        {"workDate": tuesday, "checkType": "OnDuty", "timeResult": "Normal"}]});
    let (status, _) = post(
        &http,
        format!("{}/_fake/attendance/list/users", t.base_url),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200);

    let day = |date: &str, users: &[String], offset: u32, limit: u32| AttendanceListRequest {
        work_date_from: format!("{date} 00:00:00"),
        work_date_to: format!("{date} 00:00:00"),
        user_id_list: users.to_vec(),
        offset,
        limit,
    };
    // One day of 30 users (and one it has nothing for): 30 records, page by page.
    let mut asked = users[..30].to_vec();
    asked.push("nobody".into());
    let first = t
        .client
        .attendance_list(&day("2024-05-06", &asked, 0, 20))
        .await
        .unwrap();
    assert_eq!(first.records.len(), 20);
    assert!(first.has_more);
    let rest = t
        .client
        .attendance_list(&day("2024-05-06", &asked, 20, 20))
        .await
        .unwrap();
    assert_eq!(rest.records.len(), 10);
    assert!(!rest.has_more);
    let all: Vec<_> = first.records.iter().chain(&rest.records).collect();
    assert!(all
        .iter()
        .all(|r| r.work_date == Some(monday) && r.time_result.as_deref() == Some("Late")));
    let mut ids: Vec<_> = all.iter().map(|r| r.id.clone().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 30, "each copied record has an id of its own");
    let mut who: Vec<_> = all.iter().map(|r| r.user_id.clone().unwrap()).collect();
    who.sort_unstable();
    assert_eq!(who, users[..30]);

    // Both days at once; a user it has no records for answers nothing.
    let both = AttendanceListRequest {
        work_date_to: "2024-05-07 00:00:00".into(),
        ..day("2024-05-06", &users[..2], 0, 50)
    };
    assert_eq!(
        t.client.attendance_list(&both).await.unwrap().records.len(),
        4
    );
    let nobody = day("2024-05-06", &["nobody".to_owned()], 0, 50);
    assert!(t
        .client
        .attendance_list(&nobody)
        .await
        .unwrap()
        .records
        .is_empty());

    // DingTalk's limits: 50 users, pages of 50, 7 days; refused, not retried.
    let calls_before = t.fake.calls_to("/attendance/list").len();
    for (what, query) in [
        ("51 users", day("2024-05-06", &users[..51], 0, 50)),
        ("limit 51", day("2024-05-06", &users[..2], 0, 51)),
        (
            "8 days",
            AttendanceListRequest {
                work_date_to: "2024-05-14 00:00:00".into(),
                ..day("2024-05-06", &users[..2], 0, 50)
            },
        ),
        (
            "reversed",
            AttendanceListRequest {
                work_date_to: "2024-05-05 00:00:00".into(),
                ..day("2024-05-06", &users[..2], 0, 50)
            },
        ),
        (
            "no time",
            AttendanceListRequest {
                work_date_from: "2024-05-06".into(),
                ..day("2024-05-06", &users[..2], 0, 50)
            },
        ),
    ] {
        let err = t.client.attendance_list(&query).await.unwrap_err();
        assert_eq!(err.errcode(), Some(40035), "{what}: {err:?}");
        assert!(err.is_permanent(), "{what}");
    }
    assert_eq!(
        t.fake.calls_to("/attendance/list").len(),
        calls_before + 5,
        "one request each"
    );
}
