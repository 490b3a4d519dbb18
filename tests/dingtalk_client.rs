//! The DingTalk client against the fake DingTalk, over real HTTP on 127.0.0.1.
//!
//! Each test starts its own fake and client, calls the client like a handler would, then looks
//! at what the fake received and what the client reports.

// Loaded by path so it cannot collide with other test helpers under tests/support/.
#[path = "support/dingtalk.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dinghook::dingtalk::{
    current_month, ActionCard, AttendanceListRequest, CallCounter, Client, CounterError,
    CreateSceneGroup, Error, Link, Markdown, OaBody, OaForm, OaHead, OaMessage, OaStatusBar,
    RobotGroupMessage, SceneGroupManagementOptions, Text, TodoTaskUpdate, WorkMessage,
    WorkNotification,
};
use fake_dingtalk::{FakeSendResult, FaultSpec, RecordedCall};
use serde_json::{json, Value};
use support::{start, start_with, CapturedLogs, AGENT_ID, APP_KEY, APP_SECRET};
use tokio::time::Instant;

const ASYNC_SEND: &str = "/topapi/message/corpconversation/asyncsend_v2";
const USER_GET: &str = "/topapi/v2/user/get";
const GROUP_QUERY: &str = "/v1.0/im/sceneGroups/query";
const GROUP_CREATE: &str = "/v1.0/im/sceneGroup/create";
const BY_MOBILE: &str = "/topapi/v2/user/getbymobile";

/// An old-API call: POST, token in the query and not in a header, JSON body, our User-Agent.
fn assert_old_api_call(call: &RecordedCall, path: &str) {
    assert_eq!(call.method, "POST", "{path}");
    assert_eq!(call.path, path);
    let token = call
        .query
        .get("access_token")
        .expect("access_token in query");
    assert!(token.starts_with("fake-token-"), "{token}");
    assert_eq!(
        call.token_header, None,
        "old API must not send the token header"
    );
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    let agent = call.user_agent.as_deref().unwrap_or_default();
    assert!(agent.starts_with("dinghook/"), "User-Agent {agent:?}");
    assert_eq!(call.status, Some(200));
    assert_eq!(
        call.answer_code.as_deref(),
        Some("0"),
        "{path} answered an error"
    );
}

/// A new-API call: token in the header and not in the query.
fn assert_new_api_call(call: &RecordedCall, method: &str, path: &str) {
    assert_eq!(call.method, method);
    assert_eq!(call.path, path);
    let token = call.token_header.as_deref().expect("token header");
    assert!(token.starts_with("fake-token-"), "{token}");
    assert!(!call.query.contains_key("access_token"));
    assert_eq!(call.status, Some(200), "{path}");
}

fn only_call(calls: Vec<RecordedCall>) -> RecordedCall {
    assert_eq!(calls.len(), 1, "{calls:#?}");
    calls.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Each call's request matches the protocol and its answer parses.

#[tokio::test]
async fn work_notifications_match_the_protocol() {
    let t = start().await;
    let messages = [
        WorkMessage::Text {
            text: Text {
                content: "hello".into(),
            },
        },
        WorkMessage::Markdown {
            markdown: Markdown {
                title: "t".into(),
                text: "# hi".into(),
            },
        },
        WorkMessage::Link {
            link: Link {
                message_url: "https://example.com".into(),
                pic_url: "@lADO".into(),
                title: "t".into(),
                text: "x".into(),
            },
        },
        WorkMessage::ActionCard {
            action_card: ActionCard {
                title: "t".into(),
                markdown: "m".into(),
                single_title: Some("open".into()),
                single_url: Some("https://example.com".into()),
                ..ActionCard::default()
            },
        },
    ];
    for msg in messages {
        let task = t
            .client
            .send_work_notification(&WorkNotification::to_users(["alice", "bob"], msg))
            .await
            .unwrap();
        assert!(task > 0);
    }
    let sends = t.calls(ASYNC_SEND);
    assert_eq!(sends.len(), 4);
    for call in &sends {
        assert_old_api_call(call, ASYNC_SEND);
        let body = call.body.as_ref().unwrap();
        assert_eq!(body["agent_id"], json!(AGENT_ID));
        assert_eq!(body["userid_list"], "alice,bob");
        let msgtype = body["msg"]["msgtype"].as_str().unwrap();
        assert!(body["msg"][msgtype].is_object(), "{body}");
    }
    assert_eq!(
        sends[2].body.as_ref().unwrap()["msg"]["link"]["messageUrl"],
        "https://example.com"
    );
    assert_eq!(
        sends[3].body.as_ref().unwrap()["msg"]["action_card"]["single_url"],
        "https://example.com"
    );

    // OA with a status bar, then the status bar update, progress, result and recall.
    let oa = WorkMessage::Oa {
        oa: OaMessage {
            message_url: "https://example.com/approve".into(),
            head: OaHead {
                bgcolor: "FFBBBBBB".into(),
                text: "Approval".into(),
            },
            status_bar: Some(OaStatusBar {
                status_value: "pending".into(),
                status_bg: Some("0xFFF65E5E".into()),
            }),
            body: OaBody {
                title: Some("Leave".into()),
                form: vec![OaForm {
                    key: "Days".into(),
                    value: "2".into(),
                }],
                ..OaBody::default()
            },
            ..OaMessage::default()
        },
    };
    let task = t
        .client
        .send_work_notification(&WorkNotification::to_users(["alice"], oa))
        .await
        .unwrap();
    let oa_body = t.calls(ASYNC_SEND).pop().unwrap().body.unwrap();
    assert_eq!(
        oa_body["msg"]["oa"]["status_bar"]["status_value"],
        "pending"
    );
    assert_eq!(oa_body["msg"]["oa"]["body"]["form"][0]["key"], "Days");

    let progress = t.client.work_notification_progress(task).await.unwrap();
    assert_eq!((progress.progress_in_percent, progress.status), (100, 2));
    let call = only_call(t.calls("/topapi/message/corpconversation/getsendprogress"));
    assert_old_api_call(&call, "/topapi/message/corpconversation/getsendprogress");
    assert_eq!(
        call.body.unwrap(),
        json!({"agent_id": AGENT_ID, "task_id": task})
    );

    t.fake.set_send_result(
        task,
        FakeSendResult {
            read_user_id_list: vec!["alice".into()],
            forbidden_user_id_list: vec!["bob".into()],
            failed_user_id_list: vec!["carol".into()],
            forbidden_list: vec![json!({"code": "143105", "count": 500, "userid": "bob"})],
            ..FakeSendResult::default()
        },
    );
    let result = t.client.work_notification_result(task).await.unwrap();
    assert_eq!(result.read_user_id_list, ["alice"]);
    assert_eq!(result.forbidden_user_id_list, ["bob"]);
    assert_eq!(result.failed_user_id_list, ["carol"]);
    assert_eq!(result.forbidden_list[0].code.as_deref(), Some("143105"));
    assert_eq!(result.forbidden_list[0].count, Some(500));
    let call = only_call(t.calls("/topapi/message/corpconversation/getsendresult"));
    assert_old_api_call(&call, "/topapi/message/corpconversation/getsendresult");

    t.client
        .update_work_notification_status(
            task,
            &OaStatusBar {
                status_value: "approved".into(),
                status_bg: None,
            },
        )
        .await
        .unwrap();
    let call = only_call(t.calls("/topapi/message/corpconversation/status_bar/update"));
    assert_old_api_call(&call, "/topapi/message/corpconversation/status_bar/update");
    assert_eq!(
        call.body.unwrap(),
        json!({"agent_id": AGENT_ID, "task_id": task, "status_value": "approved"})
    );

    t.client.recall_work_notification(task).await.unwrap();
    let call = only_call(t.calls("/topapi/message/corpconversation/recall"));
    assert_old_api_call(&call, "/topapi/message/corpconversation/recall");
    assert_eq!(
        call.body.unwrap(),
        json!({"agent_id": AGENT_ID, "msg_task_id": task})
    );
    let sent = t.fake.sent_messages();
    assert!(sent.iter().any(|m| m.task_id == task && m.recalled));

    // An unknown task is DingTalk's 400002, a permanent error that keeps the request id.
    let err = t
        .client
        .recall_work_notification(999_999)
        .await
        .unwrap_err();
    assert_eq!(err.errcode(), Some(400002));
    assert!(err.is_permanent() && !err.is_retryable());
    assert!(err.request_id().is_some());
}

#[tokio::test]
async fn robot_group_message_uses_the_header_token_and_a_string_msg_param() {
    let t = start().await;
    t.fake.add_group(json!({
        "openConversationId": "cid-group-1", "title": "Ops", "coolAppCode": "COOLAPP-1-abc",
        "ownerUserId": "alice", "status": 1
    }));
    let message = RobotGroupMessage::markdown(
        "robot-1",
        "cid-group-1",
        Some("COOLAPP-1-abc".into()),
        "Deploy",
        "**done**",
    )
    .unwrap();
    let key = t.client.send_robot_group_message(&message).await.unwrap();
    assert!(key.starts_with("fake-pqk-"));
    let call = only_call(t.calls("/v1.0/robot/groupMessages/send"));
    assert_new_api_call(&call, "POST", "/v1.0/robot/groupMessages/send");
    let body = call.body.unwrap();
    assert_eq!(body["robotCode"], "robot-1");
    assert_eq!(body["openConversationId"], "cid-group-1");
    assert_eq!(body["coolAppCode"], "COOLAPP-1-abc");
    assert_eq!(body["msgKey"], "sampleMarkdown");
    let param: Value = serde_json::from_str(body["msgParam"].as_str().expect("a string")).unwrap();
    assert_eq!(param, json!({"title": "Deploy", "text": "**done**"}));

    // Without the coolAppCode the fake answers as DingTalk does: HTTP 400 and a code.
    let bare = RobotGroupMessage::new(
        "robot-1",
        "cid-group-1",
        None,
        "sampleText",
        &json!({"content": "x"}),
    )
    .unwrap();
    match t.client.send_robot_group_message(&bare).await.unwrap_err() {
        err @ Error::ApiV2 { .. } => {
            assert_eq!(err.code(), Some("invalidParameter.robotCode.coolApp"));
            assert!(err.is_permanent());
            assert!(err.request_id().is_some());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        t.calls("/v1.0/robot/groupMessages/send").len(),
        2,
        "a 400 is not retried"
    );
}

#[tokio::test]
async fn scene_group_query_parses_the_group() {
    let t = start().await;
    // A group the cool app was installed in: DingTalk answers only with its coolAppCode.
    t.fake.add_group(json!({
        "openConversationId": "cid-1", "title": "Sales", "templateId": "tpl", "ownerUserId": "alice",
        "icon": "@icon", "groupUrl": "dingtalk://group", "status": 1, "coolAppCode": "COOLAPP-1"
    }));
    let info = t
        .client
        .query_scene_group("cid-1", Some("COOLAPP-1"))
        .await
        .unwrap();
    assert_eq!(info.title, "Sales");
    assert_eq!(info.owner_user_id.as_deref(), Some("alice"));
    assert_eq!(info.status, Some(1));
    let call = only_call(t.calls(GROUP_QUERY));
    assert_new_api_call(&call, "POST", GROUP_QUERY);
    assert_eq!(
        call.body.unwrap(),
        json!({"openConversationId": "cid-1", "coolAppCode": "COOLAPP-1"})
    );
    // Without it (or for a group the app cannot see), DingTalk's refusal, not retried.
    for (cid, cool_app_code) in [("cid-1", None), ("cid-nope", None)] {
        let err = t
            .client
            .query_scene_group(cid, cool_app_code)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("groupPermissionDenied"), "{cid}");
        assert!(err.is_permanent(), "{cid}");
    }
    assert_eq!(t.calls(GROUP_QUERY).len(), 3, "one request each");
    assert!(t.calls(GROUP_QUERY)[1].body.as_ref().unwrap()["coolAppCode"].is_null());
}

#[tokio::test]
async fn war_room_is_created_once_per_uuid_and_is_a_group_like_any_other() {
    let t = start().await.with_alice();
    t.fake
        .add_user(json!({"userid": "bob", "name": "Bob", "mobile": "13900000001"}));
    t.fake.add_user(json!({"userid": "carol", "name": "Carol"}));
    t.fake.add_scene_template("tpl-war-room");

    // A member given by mobile: getbymobile (free), then the create (counted).
    let bob = t.client.user_id_by_mobile("13900000001").await.unwrap();
    let war_room = CreateSceneGroup {
        user_ids: vec![bob, "carol".into()],
        subadmin_ids: vec!["carol".into()],
        uuid: Some("default:incident-42".into()),
        management_options: Some(SceneGroupManagementOptions {
            show_history_type: Some(1),
            ..SceneGroupManagementOptions::default()
        }),
        ..CreateSceneGroup::new("INC-42 支付失败", "tpl-war-room", "alice")
    };
    let created = t.client.create_scene_group(&war_room).await.unwrap();
    assert!(
        created.open_conversation_id.starts_with("cid"),
        "{created:?}"
    );
    assert!(created.chat_id.as_deref().unwrap().starts_with("chat"));
    let call = only_call(t.calls(GROUP_CREATE));
    assert_new_api_call(&call, "POST", GROUP_CREATE);
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        call.body.unwrap(),
        json!({
            "title": "INC-42 支付失败", "template_id": "tpl-war-room", "owner_user_id": "alice",
            "user_ids": ["bob", "carol"], "subadmin_ids": ["carol"],
            "uuid": "default:incident-42", "management_options": {"show_history_type": 1}
        })
    );
    assert_eq!(t.calls(BY_MOBILE).len(), 1);
    assert_eq!(
        t.counted().await,
        1,
        "the create is counted, getbymobile is not"
    );

    // Sent again with its uuid (a retry after a time-out): the same group, no second one.
    let again = t.client.create_scene_group(&war_room).await.unwrap();
    assert_eq!(again, created);
    assert_eq!(t.fake.created_scene_groups().len(), 1);
    // A DingTalk fault on the create is retried; the uuid keeps it to one group.
    t.fake
        .fail_next(FaultSpec::api_code(500, "system.error").on_path(GROUP_CREATE));
    let retried = t.client.create_scene_group(&war_room).await.unwrap();
    assert_eq!(retried, created);
    assert_eq!(t.client.stats().busy_retries, 1);
    assert_eq!(t.fake.created_scene_groups().len(), 1);

    // sceneGroups/query shows the new group; a robot message goes into it.
    let info = t
        .client
        .query_scene_group(&created.open_conversation_id, None)
        .await
        .unwrap();
    assert_eq!(info.open_conversation_id, created.open_conversation_id);
    assert_eq!(info.title, "INC-42 支付失败");
    assert_eq!(info.template_id.as_deref(), Some("tpl-war-room"));
    assert_eq!(info.owner_user_id.as_deref(), Some("alice"));
    assert_eq!(info.status, Some(1));
    let message = RobotGroupMessage::markdown(
        "robot-1",
        created.open_conversation_id.clone(),
        None,
        "INC-42",
        "**支付失败**: 已建群",
    )
    .unwrap();
    assert!(!t
        .client
        .send_robot_group_message(&message)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn war_room_refusals_are_typed_permanent_and_sent_once() {
    let t = start().await.with_alice();
    t.fake.add_scene_template("tpl-war-room");
    let base = CreateSceneGroup::new("INC-43", "tpl-war-room", "alice");
    for (what, group, code) in [
        (
            "unknown template",
            CreateSceneGroup {
                template_id: "tpl-gone".into(),
                ..base.clone()
            },
            "groupTemplate.notFound",
        ),
        (
            "unknown owner",
            CreateSceneGroup {
                owner_user_id: "mallory".into(),
                ..base.clone()
            },
            "member.notFound",
        ),
        (
            "unknown member",
            CreateSceneGroup {
                user_ids: vec!["mallory".into()],
                ..base.clone()
            },
            "member.notFound",
        ),
        (
            "empty title",
            CreateSceneGroup {
                title: String::new(),
                ..base.clone()
            },
            "parameter.invalid",
        ),
    ] {
        let err = t.client.create_scene_group(&group).await.unwrap_err();
        match &err {
            Error::ApiV2 {
                status,
                code: c,
                request_id,
                ..
            } => {
                assert_eq!((*status, c.as_str()), (400, code), "{what}");
                assert!(request_id.is_some(), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(err.is_permanent() && !err.is_retryable(), "{what}");
    }
    assert_eq!(t.calls(GROUP_CREATE).len(), 4, "one request each");
    assert_eq!(t.counted().await, 4, "DingTalk answered each: counted");
    assert!(t.fake.created_scene_groups().is_empty());
    // A mobile DingTalk does not know: 60121 from getbymobile, before any create.
    let err = t.client.user_id_by_mobile("19999999999").await.unwrap_err();
    assert_eq!(err.errcode(), Some(60121));
    assert!(err.is_permanent());
}

#[tokio::test]
async fn attendance_calls_match_the_protocol() {
    let t = start().await;
    t.fake.set_attendance_update_data(
        "alice",
        "2026-11-02",
        json!({"work_date": "2026-11-02 00:00:00", "userid": "alice", "corpId": "dingcorp",
               "attendance_result_list": [{"check_type": "OnDuty", "time_result": "Late",
                   "record_id": 7_000_000_001_i64, "plan_check_time": "2026-11-02 09:00:00", "vendor_field": 1}],
               "check_record_list": [], "approve_list": []}),
    );
    let day = t
        .client
        .attendance_update_data("alice", "2026-11-02")
        .await
        .unwrap();
    assert_eq!(day.corp_id.as_deref(), Some("dingcorp"));
    let result = &day.attendance_result_list[0];
    assert_eq!(result.time_result.as_deref(), Some("Late"));
    assert_eq!(
        result.record_id.as_deref(),
        Some("7000000001"),
        "numeric id kept as text"
    );
    assert_eq!(result.extra["vendor_field"], 1);
    let call = only_call(t.calls("/topapi/attendance/getupdatedata"));
    assert_old_api_call(&call, "/topapi/attendance/getupdatedata");
    // The day goes out as DingTalk's request examples send it.
    assert_eq!(
        call.body.unwrap(),
        json!({"userid": "alice", "work_date": "2026-11-02 00:00:00"})
    );

    // 2026-11-02 00:00 +08:00, the work date of each record.
    let work_date = 1_793_548_800_000_i64;
    let records: Vec<Value> = (0..3)
        .map(|i| {
            json!({"id": i, "userId": "alice", "workDate": work_date, "checkType": "OnDuty",
                        "timeResult": "Normal", "userCheckTime": 1_793_600_000_000_i64 + i,
                        "baseCheckTime": "1793600000000"})
        })
        .chain([json!({"id": 9, "userId": "bob", "workDate": work_date})])
        .collect();
    t.fake.set_attendance_list(records.clone());
    let query = AttendanceListRequest {
        work_date_from: "2026-11-02 00:00:00".into(),
        work_date_to: "2026-11-03 00:00:00".into(),
        user_id_list: vec!["alice".into()],
        offset: 0,
        limit: 2,
    };
    let page = t.client.attendance_list(&query).await.unwrap();
    assert_eq!(page.records.len(), 2);
    assert!(page.has_more);
    assert_eq!(page.records[0].base_check_time, Some(1_793_600_000_000));
    let next = t
        .client
        .attendance_list(&AttendanceListRequest { offset: 2, ..query })
        .await
        .unwrap();
    assert_eq!(next.records.len(), 1);
    assert!(!next.has_more);
    let call = t.calls("/attendance/list").remove(0);
    assert_old_api_call(&call, "/attendance/list");
    let body = call.body.unwrap();
    for key in [
        "workDateFrom",
        "workDateTo",
        "userIdList",
        "offset",
        "limit",
    ] {
        assert!(body.get(key).is_some(), "missing {key} in {body}");
    }

    t.fake.set_attendance_records(vec![
        json!({"userId": "alice", "userCheckTime": 1_793_600_000_000_i64, "userAddress": "HQ", "deviceId": "d1"}),
        json!({"userId": "bob", "userCheckTime": 1}),
    ]);
    let punches = t
        .client
        .attendance_records(
            &["alice".into()],
            "2026-11-02 00:00:00",
            "2026-11-03 00:00:00",
        )
        .await
        .unwrap();
    assert_eq!(punches.len(), 1);
    assert_eq!(punches[0].extra["userAddress"], "HQ");
    let call = only_call(t.calls("/attendance/listRecord"));
    assert_old_api_call(&call, "/attendance/listRecord");
    assert_eq!(
        call.body.unwrap(),
        json!({"userIds": ["alice"], "checkDateFrom": "2026-11-02 00:00:00", "checkDateTo": "2026-11-03 00:00:00"})
    );
}

#[tokio::test]
async fn todo_calls_match_the_protocol() {
    let t = start().await;
    t.fake.add_todo_task(
        "union-alice",
        json!({"id": "task-1", "subject": "Review", "done": false, "dueTime": 1_793_600_000_000_i64,
               "executorIds": ["union-alice"], "detailUrl": {"appUrl": "dingtalk://x", "pcUrl": "https://x"},
               "priority": 20, "tenantType": "org"}),
    );
    let task = t
        .client
        .get_todo_task("union-alice", "task-1")
        .await
        .unwrap();
    assert_eq!(task.subject, "Review");
    assert!(!task.done);
    assert_eq!(task.executor_ids, ["union-alice"]);
    assert_eq!(
        task.detail_url.unwrap().pc_url.as_deref(),
        Some("https://x")
    );
    assert!(task.request_id.is_some());
    assert_eq!(task.extra["tenantType"], "org");
    let path = "/v1.0/todo/users/union-alice/tasks/task-1";
    let call = only_call(t.calls(path));
    assert_new_api_call(&call, "GET", path);
    assert_eq!(call.body, None);

    let update = TodoTaskUpdate {
        done: Some(true),
        subject: Some("Reviewed".into()),
        ..TodoTaskUpdate::default()
    };
    assert!(t
        .client
        .update_todo_task("union-alice", "task-1", Some("union-alice"), &update)
        .await
        .unwrap());
    let call = t.calls(path).pop().unwrap();
    assert_new_api_call(&call, "PUT", path);
    assert_eq!(
        call.query.get("operatorId").map(String::as_str),
        Some("union-alice")
    );
    assert_eq!(
        call.body.unwrap(),
        json!({"done": true, "subject": "Reviewed"})
    );
    assert_eq!(
        t.fake.todo_task("union-alice", "task-1").unwrap()["done"],
        true
    );

    // Ids with characters that need escaping stay one path segment.
    let err = t
        .client
        .get_todo_task("union/x y", "t?1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("taskNotExist"));
    assert_eq!(
        t.calls("/v1.0/todo/users/union%2Fx%20y/tasks/t%3F1").len(),
        1
    );

    // Legacy work records.
    t.fake.set_work_records(
        "alice",
        vec![
            json!({"record_id": "r1", "title": "Sign", "create_time": 1, "url": "https://x", "status": 0,
                   "forms": [{"title": "Amount", "content": "12"}]}),
            json!({"record_id": "r2", "title": "Old", "status": 1}),
        ],
    );
    let open = t.client.work_records("alice", 0, 50, false).await.unwrap();
    assert_eq!(open.list.len(), 1);
    assert_eq!(open.list[0].record_id.as_deref(), Some("r1"));
    assert_eq!(open.list[0].forms[0].content, "12");
    let call = only_call(t.calls("/topapi/workrecord/getbyuserid"));
    assert_old_api_call(&call, "/topapi/workrecord/getbyuserid");
    assert_eq!(
        call.body.unwrap(),
        json!({"userid": "alice", "offset": 0, "limit": 50, "status": 0})
    );
    assert!(t.client.complete_work_record("alice", "r1").await.unwrap());
    let call = only_call(t.calls("/topapi/workrecord/update"));
    assert_old_api_call(&call, "/topapi/workrecord/update");
    assert_eq!(
        call.body.unwrap(),
        json!({"userid": "alice", "record_id": "r1"})
    );
    assert_eq!(t.fake.work_records("alice")[0]["status"], 1);
}

#[tokio::test]
async fn user_lookups_match_the_protocol() {
    let t = start().await.with_alice();
    assert_eq!(
        t.client.user_id_by_mobile("13800000000").await.unwrap(),
        "alice"
    );
    let call = only_call(t.calls("/topapi/v2/user/getbymobile"));
    assert_old_api_call(&call, "/topapi/v2/user/getbymobile");
    assert_eq!(call.body.unwrap(), json!({"mobile": "13800000000"}));
    assert_eq!(t.counted().await, 0, "getbymobile is not metered");

    let user = t.client.get_user("alice", None).await.unwrap();
    assert_eq!(user.unionid.as_deref(), Some("union-alice"));
    assert_eq!(user.dept_id_list, [1, 2]);
    assert!(
        user.extra.get("mobile").is_none(),
        "typed fields are not repeated in extra"
    );
    assert_eq!(user.mobile.as_deref(), Some("13800000000"));
    assert_eq!(user.title.as_deref(), Some("Engineer"));
    let call = only_call(t.calls(USER_GET));
    assert_old_api_call(&call, USER_GET);
    assert_eq!(call.body.unwrap(), json!({"userid": "alice"}));

    let by_union = t.client.user_by_union_id("union-alice").await.unwrap();
    assert_eq!(by_union.userid, "alice");
    assert_eq!(by_union.contact_type, Some(0));
    let call = only_call(t.calls("/topapi/user/getbyunionid"));
    assert_old_api_call(&call, "/topapi/user/getbyunionid");
    assert_eq!(call.body.unwrap(), json!({"unionid": "union-alice"}));
    assert_eq!(
        t.counted().await,
        2,
        "user/get and getbyunionid are metered"
    );

    let err = t.client.user_id_by_mobile("13900000000").await.unwrap_err();
    assert_eq!(err.errcode(), Some(60121));
    assert!(err.is_permanent());
}

#[tokio::test]
async fn failed_callback_pages_are_consumed_and_odd_entries_survive() {
    let t = start().await;
    t.fake.set_failed_page_size(2);
    t.fake.load_failed_callbacks(vec![
        json!({"call_back_tag": "chat_update_title", "event_time": 1_793_600_000_000_i64,
               "chat_update_title": {"corpid": "dingcorp", "callbackData": {"title": "New"}}}),
        json!({"call_back_tag": "user_modify_org", "event_time": "1793600000001",
               "user_modify_org": "{corpid=dingcorp}"}),
        json!({"call_back_tag": ["not", "a", "string"]}),
        json!(42),
        json!({"call_back_tag": "todo_task_update", "event_time": 1,
               "todo_task_update": "{\"taskId\":\"task-1\"}"}),
    ]);
    let first = t.client.failed_callbacks().await.unwrap();
    assert!(first.has_more);
    assert_eq!(first.entries.len(), 2);
    assert_eq!(first.entries[0].tag.as_deref(), Some("chat_update_title"));
    assert_eq!(
        first.entries[0].payload_json().unwrap()["callbackData"]["title"],
        "New"
    );
    assert_eq!(first.entries[1].event_time, Some(1_793_600_000_001));
    assert_eq!(first.entries[1].payload, Some(json!("{corpid=dingcorp}")));
    assert_eq!(
        t.fake.failed_callbacks_left(),
        3,
        "reading a page removes it"
    );

    let second = t.client.failed_callbacks().await.unwrap();
    assert!(second.has_more);
    assert_eq!(second.entries[0].tag, None);
    assert_eq!(second.entries[1].raw, json!(42));
    let third = t.client.failed_callbacks().await.unwrap();
    assert!(!third.has_more);
    assert_eq!(third.entries[0].payload_json().unwrap()["taskId"], "task-1");
    let empty = t.client.failed_callbacks().await.unwrap();
    assert!(!empty.has_more && empty.entries.is_empty());

    let calls = t.calls("/call_back/get_call_back_failed_result");
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0].method, "GET");
    assert!(calls[0].query.contains_key("access_token"));
    assert_eq!(calls[0].body, None);
}

// ---------------------------------------------------------------------------------------------
// Access token.

#[tokio::test]
async fn gettoken_sends_the_app_key_and_secret() {
    let t = start().await.with_alice();
    t.client.get_user("alice", None).await.unwrap();
    let call = only_call(t.calls("/gettoken"));
    assert_eq!(call.method, "GET");
    assert_eq!(call.query.get("appkey").map(String::as_str), Some(APP_KEY));
    assert_eq!(
        call.query.get("appsecret").map(String::as_str),
        Some(APP_SECRET)
    );
    assert_eq!(t.client.stats().token_fetches, 1);
    assert_eq!(
        t.counted().await,
        1,
        "the token fetch is not counted, the call is"
    );

    // Wrong credentials: a clear, permanent error that does not show the secret.
    let wrong = start_with(|c| c.app_secret = "wrong-secret-value".into()).await;
    let err = wrong.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::Token(_)), "{err:?}");
    assert!(err.is_permanent());
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-secret-value"), "{shown}");
    assert!(shown.contains("40089"), "{shown}");
}

#[tokio::test]
async fn fifty_concurrent_callers_cause_one_token_fetch() {
    let t = start().await.with_alice();
    // Slow gettoken so all fifty are waiting while the one fetch is in flight.
    t.fake
        .set_path_delay("/gettoken", Some(Duration::from_millis(200)));
    let calls = (0..50).map(|_| {
        let client = t.client.clone();
        tokio::spawn(async move { client.get_user("alice", None).await })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.unwrap().unwrap();
    }
    assert_eq!(t.fake.token_fetches(), 1);
    assert_eq!(t.calls(USER_GET).len(), 50);
}

#[tokio::test]
async fn expired_token_is_refetched_once_for_fifty_callers() {
    let t = start().await.with_alice();
    // A 2 s token is replaced after 1 s (the refresh margin is capped at half the lifetime).
    t.fake.set_token_ttl(Duration::from_secs(2));
    t.client.get_user("alice", None).await.unwrap();
    assert_eq!(t.fake.token_fetches(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    t.fake
        .set_path_delay("/gettoken", Some(Duration::from_millis(100)));
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let client = t.client.clone();
            tokio::spawn(async move { client.get_user("alice", None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        t.fake.token_fetches(),
        2,
        "exactly one refresh for fifty callers"
    );
}

#[tokio::test]
async fn token_invalidated_by_dingtalk_is_refetched_once_and_the_call_succeeds() {
    let t = start().await.with_alice();
    t.client.get_user("alice", None).await.unwrap();
    let first_token = t.calls(USER_GET)[0].query["access_token"].clone();
    t.fake.expire_token();
    t.fake.clear_calls();

    t.client.get_user("alice", None).await.unwrap();
    let calls = t.fake.calls();
    let sequence: Vec<(&str, Option<&str>)> = calls
        .iter()
        .map(|c| (c.path.as_str(), c.answer_code.as_deref()))
        .collect();
    assert_eq!(
        sequence,
        [
            (USER_GET, Some("42001")),
            ("/gettoken", Some("0")),
            (USER_GET, Some("0"))
        ]
    );
    assert_ne!(calls[2].query["access_token"], first_token);
    assert_eq!(t.client.stats().token_rejections, 1);

    // The new API says InvalidAuthentication; same remedy, token in the header.
    t.fake
        .add_group(json!({"openConversationId": "cid-1", "title": "G"}));
    t.fake.expire_token();
    t.client.query_scene_group("cid-1", None).await.unwrap();
    let codes: Vec<Option<String>> = t
        .calls(GROUP_QUERY)
        .into_iter()
        .map(|c| c.answer_code)
        .collect();
    assert_eq!(
        codes,
        [Some("InvalidAuthentication".into()), Some("ok".into())]
    );
    assert_eq!(t.fake.token_fetches(), 2);
}

#[tokio::test]
async fn fifty_callers_rejected_with_the_same_token_refetch_it_once() {
    let t = start().await.with_alice();
    t.client.get_user("alice", None).await.unwrap();
    t.fake.expire_token();
    // Hold every answer a little so the fifty requests all carry the old token, and the
    // refetch too, so the rejected callers pile up behind it.
    t.fake
        .set_path_delay(USER_GET, Some(Duration::from_millis(100)));
    t.fake
        .set_path_delay("/gettoken", Some(Duration::from_millis(100)));
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let client = t.client.clone();
            tokio::spawn(async move { client.get_user("alice", None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(t.fake.token_fetches(), 2, "one initial fetch, one refetch");
}

#[tokio::test]
async fn a_token_rejected_twice_gives_invalid_token() {
    let t = start().await.with_alice();
    t.fake
        .fail_next(FaultSpec::errcode(40014).on_path(USER_GET).times(5));
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidToken { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(t.calls(USER_GET).len(), 2, "one refetch, no more");
    assert_eq!(t.fake.token_fetches(), 2);

    // errcode 88 counts as token trouble only when its sub-message says so.
    t.fake.clear_faults();
    t.fake.fail_next(FaultSpec {
        body: Some(json!({"errcode": 88, "errmsg": "鉴权异常", "sub_code": "40014", "sub_msg": "不合法的access_token"})),
        ..FaultSpec::default()
    }
    .on_path(USER_GET));
    t.client.get_user("alice", None).await.unwrap();
    // The twice-rejected token was dropped too, so this call fetched one before being told
    // (by errcode 88) to fetch another.
    assert_eq!(t.fake.token_fetches(), 4);
}

// ---------------------------------------------------------------------------------------------
// Limits.

/// Largest number of `times` (sorted) inside any half-open window `[t, t + window)`.
fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut end = 0;
    for start in 0..times.len() {
        while end < times.len() && times[end] < times[start] + window {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qps_limiter_keeps_200_calls_at_20_per_second() {
    let t = start_with(|c| c.qps = 20).await.with_alice();
    // The fake enforces the same limit, so any overshoot would also show up as 90018.
    t.fake.set_qps_limit(Some(20));
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let client = t.client.clone();
            tokio::spawn(async move { client.get_user("alice", None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(9500),
        "200 calls took only {elapsed:?}"
    );
    let mut times: Vec<Instant> = t.calls(USER_GET).iter().map(|c| c.at).collect();
    assert_eq!(times.len(), 200, "no call was throttled and retried");
    times.sort();
    let peak = max_in_window(&times, Duration::from_secs(1));
    assert!(peak <= 20, "the fake saw {peak} calls within one second");
    assert_eq!(t.client.stats().throttled_retries, 0);
}

#[tokio::test]
async fn throttled_answers_are_retried_and_succeed() {
    let t = start().await.with_alice();
    t.fake.fail_next(FaultSpec::errcode(90018).times(2));
    t.fake.fail_next(FaultSpec::errcode(90002));
    t.client.get_user("alice", None).await.unwrap();
    let codes: Vec<Option<String>> = t
        .calls(USER_GET)
        .into_iter()
        .map(|c| c.answer_code)
        .collect();
    assert_eq!(
        codes,
        [
            Some("90018".into()),
            Some("90018".into()),
            Some("90002".into()),
            Some("0".into())
        ]
    );
    assert_eq!(t.client.stats().throttled_retries, 3);
    assert_eq!(t.counted().await, 1, "throttled calls are not counted");

    // New API: HTTP 403 Forbidden.AccessDenied.QpsLimitForAppkeyAndApi.
    t.fake
        .add_group(json!({"openConversationId": "cid-1", "title": "G"}));
    t.fake.fail_next(FaultSpec::api_code(
        403,
        "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
    ));
    t.client.query_scene_group("cid-1", None).await.unwrap();
    assert_eq!(t.calls(GROUP_QUERY).len(), 2);
    assert_eq!(t.client.stats().throttled_retries, 4);
}

#[tokio::test]
async fn throttling_without_end_gives_throttled_after_bounded_retries() {
    let t = start_with(|c| c.max_retries = 3).await.with_alice();
    t.fake.fail_next(FaultSpec::errcode(90018).times(100));
    let err = t.client.get_user("alice", None).await.unwrap_err();
    match &err {
        Error::Throttled { code, attempts } => {
            assert_eq!(code, "90018");
            assert_eq!(*attempts, 4);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable() && !err.is_permanent());
    assert_eq!(t.calls(USER_GET).len(), 4);
    assert_eq!(t.counted().await, 0);
}

#[tokio::test]
async fn monthly_quota_answer_is_not_retried_and_is_counted() {
    let t = start().await.with_alice();
    t.fake.fail_next(FaultSpec::errcode(90020));
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::QuotaExhausted { .. }), "{err:?}");
    assert!(!err.is_retryable() && !err.is_permanent());
    assert_eq!(t.calls(USER_GET).len(), 1, "exactly one call: no retry");
    assert_eq!(t.client.stats().quota_rejections, 1);

    // The fake's own quota, on the new API.
    t.fake
        .add_group(json!({"openConversationId": "cid-1", "title": "G"}));
    t.fake.set_quota_used(0);
    t.fake.set_monthly_quota(Some(1));
    t.client.query_scene_group("cid-1", None).await.unwrap();
    let err = t.client.query_scene_group("cid-1", None).await.unwrap_err();
    assert!(matches!(err, Error::QuotaExhausted { .. }), "{err:?}");
    let codes: Vec<Option<String>> = t
        .calls(GROUP_QUERY)
        .into_iter()
        .map(|c| c.answer_code)
        .collect();
    assert_eq!(
        codes,
        [
            Some("ok".into()),
            Some("Forbidden.AccessDenied.ApiCountLimitForOrg".into())
        ]
    );
    assert_eq!(t.client.stats().quota_rejections, 2);
}

#[tokio::test]
async fn system_busy_and_5xx_are_retried() {
    let t = start().await.with_alice();
    t.fake.fail_next(FaultSpec::errcode(-1));
    t.fake.fail_next(FaultSpec::http_status(502));
    t.fake.fail_next(FaultSpec::api_code(503, "systemError"));
    t.client.get_user("alice", None).await.unwrap();
    let statuses: Vec<Option<u16>> = t.calls(USER_GET).into_iter().map(|c| c.status).collect();
    assert_eq!(statuses, [Some(200), Some(502), Some(503), Some(200)]);
    assert_eq!(t.client.stats().busy_retries, 3);

    // Bounded: a DingTalk that stays busy yields its own error, marked retryable.
    t.fake.fail_next(FaultSpec::errcode(-1).times(100));
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert_eq!(err.errcode(), Some(-1));
    assert!(err.is_retryable());
    assert_eq!(t.calls(USER_GET).len(), 4 + 4);
}

// ---------------------------------------------------------------------------------------------
// DingTalk's error codes as its tables define them (issue 16, part 2), each injected through
// the fake's admin routes and judged by what the fake received and what the caller got.

/// Scripts the next answers over the fake's admin route, as a curl script would.
async fn inject(t: &support::TestDingTalk, faults: Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/_fake/faults", t.base_url))
        .body(faults.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

const BY_UNION_ID: &str = "/topapi/user/getbyunionid";

#[tokio::test]
async fn temporarily_disabled_requests_are_not_repeated_and_hold_calls_back() {
    // 90001–90017 without 90002 (a QPS throttle): "requests temporarily disabled", for every
    // API or for the one called, as the global table words each of them.
    let every_api = [90001, 90003, 90004, 90007, 90009, 90011, 90013, 90017];
    for errcode in (90001..=90017).filter(|c| *c != 90002) {
        let t = start().await.with_alice();
        inject(&t, json!({"path": USER_GET, "errcode": errcode})).await;
        let err = t.client.get_user("alice", None).await.unwrap_err();
        assert!(matches!(err, Error::Disabled { .. }), "{errcode}: {err:?}");
        assert_eq!(err.errcode(), Some(errcode));
        assert!(err.is_retryable() && !err.is_permanent(), "{errcode}");
        assert_eq!(t.calls(USER_GET).len(), 1, "{errcode}: not repeated");
        assert_eq!(t.client.stats().disabled_answers, 1);
        assert_eq!(
            t.counted().await,
            0,
            "{errcode}: a refused call is not counted"
        );

        // The same API is held back without a request; another one only if every API was
        // disabled.
        let again = t.client.get_user("alice", None).await.unwrap_err();
        assert!(
            matches!(again, Error::Disabled { .. }),
            "{errcode}: {again:?}"
        );
        assert_eq!(t.calls(USER_GET).len(), 1, "{errcode}: held back");
        let other = t.client.user_by_union_id("union-alice").await;
        if every_api.contains(&errcode) {
            let other = other.unwrap_err();
            assert_eq!(other.errcode(), Some(errcode), "{errcode}: {other:?}");
            assert!(t.calls(BY_UNION_ID).is_empty(), "{errcode}");
        } else {
            assert_eq!(other.unwrap().userid, "alice", "{errcode}");
            assert_eq!(t.calls(BY_UNION_ID).len(), 1, "{errcode}");
        }
    }
}

#[tokio::test]
async fn old_api_system_errors_are_retried_with_back_off() {
    let t = start().await.with_alice();
    // errcode 500 ("系统异常", in a 200 answer) and 400001 ("系统错误"): passing faults.
    inject(
        &t,
        json!([{"path": USER_GET, "errcode": 500}, {"path": USER_GET, "errcode": 400001}]),
    )
    .await;
    t.client.get_user("alice", None).await.unwrap();
    let codes: Vec<Option<String>> = t
        .calls(USER_GET)
        .into_iter()
        .map(|c| c.answer_code)
        .collect();
    assert_eq!(
        codes,
        [Some("500".into()), Some("400001".into()), Some("0".into())]
    );
    assert_eq!(t.client.stats().busy_retries, 2);

    // One that stays: bounded, and the caller may retry later.
    inject(&t, json!({"path": USER_GET, "errcode": 500, "times": 100})).await;
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert_eq!(err.errcode(), Some(500));
    assert!(err.is_retryable() && !err.is_permanent());
    assert_eq!(t.calls(USER_GET).len(), 3 + 4, "max_retries (3) + 1");

    // On the legacy to-do API, 400001 is a refusal (the same content twice a day): not retried.
    t.fake.clear_faults();
    let add = "/topapi/workrecord/add";
    inject(&t, json!({"path": add, "errcode": 400001})).await;
    let err = t
        .client
        .oapi_post_json(add, &json!({"userid": "alice", "title": "t"}))
        .await
        .unwrap_err();
    assert_eq!(err.errcode(), Some(400001));
    assert!(err.is_permanent() && !err.is_retryable());
    assert_eq!(t.calls(add).len(), 1);
}

#[tokio::test]
async fn new_api_system_errors_are_busy_whatever_the_http_status() {
    let t = start().await;
    t.fake
        .add_group(json!({"openConversationId": "cid-1", "title": "G"}));
    inject(
        &t,
        json!([
            {"path": GROUP_QUERY, "status": 400, "code": "systemError"},
            {"path": GROUP_QUERY, "status": 400, "code": "system.error"},
            {"path": GROUP_QUERY, "status": 500, "code": "system.error"},
        ]),
    )
    .await;
    assert_eq!(
        t.client
            .query_scene_group("cid-1", None)
            .await
            .unwrap()
            .title,
        "G"
    );
    let statuses: Vec<Option<u16>> = t.calls(GROUP_QUERY).into_iter().map(|c| c.status).collect();
    assert_eq!(statuses, [Some(400), Some(400), Some(500), Some(200)]);
    assert_eq!(t.client.stats().busy_retries, 3);

    // `system.busy` is the table's "requests too frequent": throttled, retried.
    inject(
        &t,
        json!({"path": GROUP_QUERY, "status": 400, "code": "system.busy"}),
    )
    .await;
    t.client.query_scene_group("cid-1", None).await.unwrap();
    assert_eq!(t.client.stats().throttled_retries, 1);
    assert_eq!(t.calls(GROUP_QUERY).len(), 6);

    // A `systemError.…` the table lists as a refusal is not retried.
    inject(
        &t,
        json!({"path": GROUP_QUERY, "status": 400, "code": "systemError.notPermittedAccess"}),
    )
    .await;
    let err = t.client.query_scene_group("cid-1", None).await.unwrap_err();
    assert_eq!(err.code(), Some("systemError.notPermittedAccess"));
    assert!(err.is_permanent());
    assert_eq!(t.calls(GROUP_QUERY).len(), 7);
}

#[tokio::test]
async fn errcode_33001_refetches_the_token_once() {
    let t = start().await.with_alice();
    inject(&t, json!({"path": USER_GET, "errcode": 33001})).await;
    t.client.get_user("alice", None).await.unwrap();
    let sequence: Vec<(String, Option<String>)> = t
        .fake
        .calls()
        .into_iter()
        .map(|c| (c.path, c.answer_code))
        .collect();
    assert_eq!(
        sequence,
        [
            ("/gettoken".into(), Some("0".into())),
            (USER_GET.into(), Some("33001".into())),
            ("/gettoken".into(), Some("0".into())),
            (USER_GET.into(), Some("0".into())),
        ]
    );
    assert_eq!(t.client.stats().token_rejections, 1);

    // Twice in a row: one refetch, then the caller is told.
    inject(&t, json!({"path": USER_GET, "errcode": 33001, "times": 5})).await;
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidToken { .. }), "{err:?}");
    assert_eq!(t.calls(USER_GET).len(), 2 + 2);
}

#[tokio::test]
async fn the_per_ip_ban_as_an_html_page_is_a_ban() {
    // DingTalk's throttling page: the per-IP ban "returns an HTML page". It states five
    // minutes, longer than the client waits inside a call (max_ban_wait is 3 s in tests).
    for status in [200, 403] {
        let t = start().await.with_alice();
        if status == 200 {
            // The fake's own page, through its ban route.
            let response = reqwest::Client::new()
                .post(format!("{}/_fake/ban", t.base_url))
                .body(r#"{"html": true}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        } else {
            let page = "<html><body>denied</body></html>";
            inject(&t, json!({"html": page, "status": status})).await;
        }
        let err = t.client.get_user("alice", None).await.unwrap_err();
        match &err {
            Error::IpBanned { wait } => assert_eq!(*wait, Duration::from_secs(300), "{status}"),
            other => panic!("{status}: {other:?}"),
        }
        assert!(err.is_retryable() && !err.is_permanent());
        assert_eq!(t.calls(USER_GET).len(), 1);
        assert_eq!(t.client.stats().ip_bans, 1);
        assert_eq!(t.counted().await, 0, "a banned call is not counted");
        // Nothing reaches DingTalk while the ban runs.
        let err = t.client.user_by_union_id("union-alice").await.unwrap_err();
        assert!(matches!(err, Error::IpBanned { .. }), "{err:?}");
        assert!(t.calls(BY_UNION_ID).is_empty());
    }
}

#[tokio::test]
async fn status_bar_41052_waits_for_the_send_to_finish() {
    const STATUS_BAR: &str = "/topapi/message/corpconversation/status_bar/update";
    const PROGRESS: &str = "/topapi/message/corpconversation/getsendprogress";
    let t = start().await;
    let oa = WorkMessage::Oa {
        oa: OaMessage {
            message_url: "https://example.com/todo".into(),
            status_bar: Some(OaStatusBar {
                status_value: "待办".into(),
                status_bg: None,
            }),
            ..OaMessage::default()
        },
    };
    let task = t
        .client
        .send_work_notification(&WorkNotification::to_users(["alice"], oa))
        .await
        .unwrap();
    let done = OaStatusBar {
        status_value: "已完成".into(),
        status_bg: None,
    };
    let bar_of = |t: &support::TestDingTalk| {
        t.fake
            .sent_messages()
            .into_iter()
            .find(|m| m.task_id == task)
            .and_then(|m| m.status_bar)
    };

    // Still being sent (set over the admin route): 41052, then getsendprogress says so, and
    // the caller gets a retryable error naming the progress.
    let response = reqwest::Client::new()
        .post(format!("{}/_fake/send-progress/{task}", t.base_url))
        .body(r#"{"progress_in_percent": 40, "status": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let err = t
        .client
        .update_work_notification_status(task, &done)
        .await
        .unwrap_err();
    match &err {
        Error::SendInProgress {
            task_id,
            progress_in_percent,
            status,
        } => assert_eq!((*task_id, *progress_in_percent, *status), (task, 40, 1)),
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable() && !err.is_permanent());
    assert_eq!(t.calls(STATUS_BAR).len(), 1);
    assert_eq!(t.calls(PROGRESS).len(), 1);
    assert_eq!(bar_of(&t), None);

    // Finished since: the retry goes through.
    t.fake.set_send_progress(task, 100, 2);
    t.client
        .update_work_notification_status(task, &done)
        .await
        .unwrap();
    assert_eq!(t.calls(STATUS_BAR).len(), 2);
    assert_eq!(bar_of(&t).unwrap()["status_value"], "已完成");

    // 41052 while the progress already says done (the send finished in between): one more
    // update, which succeeds.
    inject(&t, json!({"path": STATUS_BAR, "errcode": 41052})).await;
    t.client
        .update_work_notification_status(task, &done)
        .await
        .unwrap();
    assert_eq!(t.calls(STATUS_BAR).len(), 2 + 2);
    assert_eq!(t.calls(PROGRESS).len(), 2);

    // 41052 again after a finished send: DingTalk's "too many recipients", a refusal.
    inject(
        &t,
        json!({"path": STATUS_BAR, "errcode": 41052, "times": 2}),
    )
    .await;
    let err = t
        .client
        .update_work_notification_status(task, &done)
        .await
        .unwrap_err();
    assert_eq!(err.errcode(), Some(41052));
    assert!(err.is_permanent() && !err.is_retryable());
    assert_eq!(t.calls(STATUS_BAR).len(), 4 + 2);
    assert_eq!(t.calls(PROGRESS).len(), 3);
}

#[tokio::test]
async fn per_ip_ban_is_honoured() {
    let t = start().await.with_alice();
    t.fake.ban_next(1, 1);
    let started = std::time::Instant::now();
    t.client.get_user("alice", None).await.unwrap();
    let calls = t.calls(USER_GET);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].answer_code.as_deref(), Some("1111"));
    let gap = calls[1].at - calls[0].at;
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(t.client.stats().ip_bans, 1);

    // A ban longer than max_ban_wait (3 s here) is reported at once, and calls made while it
    // runs do not reach DingTalk at all.
    t.fake.ban_next(60, 1);
    let err = t.client.get_user("alice", None).await.unwrap_err();
    match err {
        Error::IpBanned { wait } => assert_eq!(wait, Duration::from_secs(60)),
        other => panic!("{other:?}"),
    }
    let before = t.calls(USER_GET).len();
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::IpBanned { .. }) && err.is_retryable());
    assert_eq!(
        t.calls(USER_GET).len(),
        before,
        "nothing sent during the ban"
    );
}

#[tokio::test]
async fn slow_answers_time_out_without_a_blind_retry() {
    let t = start_with(|c| c.request_timeout = Duration::from_millis(300))
        .await
        .with_alice();
    t.client.get_user("alice", None).await.unwrap();
    t.fake
        .set_path_delay(USER_GET, Some(Duration::from_secs(2)));
    let err = t.client.get_user("alice", None).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(
        t.calls(USER_GET).len(),
        2,
        "a time-out is left to the caller"
    );
}

#[tokio::test]
async fn transport_errors_do_not_show_the_token_or_secret() {
    // Nothing listens on this port once the listener is dropped.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = Client::new(
        support::test_config(&base),
        Arc::new(dinghook::dingtalk::MemoryCounter::new()),
    )
    .unwrap();
    let err = client.get_user("alice", None).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(!shown.contains(APP_SECRET), "{shown}");
    assert!(!shown.contains("appsecret"), "{shown}");
    assert!(!format!("{client:?}").contains(APP_SECRET));
}

// ---------------------------------------------------------------------------------------------
// Monthly quota counter.

#[tokio::test]
async fn quota_counter_warns_at_80_percent_and_reports_remaining() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let t = start_with(|c| c.monthly_quota = 10).await.with_alice();
    // Another replica already made 6 calls this month.
    t.counter.set(&current_month(), 6);

    t.client.get_user("alice", None).await.unwrap(); // 7: 70 %
    assert_eq!(t.client.stats().quota_warnings, 0);
    assert!(!logs.text().contains("quota above the warning threshold"));

    t.fake.fail_next(FaultSpec::errcode(90018)); // throttled, then served: counts once
    t.client.get_user("alice", None).await.unwrap(); // 8: 80 %
    let quota = t.client.quota().await;
    assert_eq!((quota.used, quota.limit, quota.remaining), (8, 10, 2));
    assert_eq!(quota.month, current_month());
    assert_eq!(t.client.stats().quota_warnings, 1);
    assert_eq!(t.client.stats().quota_used, 8);
    let text = logs.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("quota above the warning threshold"), "{text}");
    assert!(text.contains("used=8"), "{text}");

    t.client.get_user("alice", None).await.unwrap(); // 9: no second warning
    assert_eq!(t.client.stats().quota_warnings, 1);
    t.client.user_id_by_mobile("13800000000").await.unwrap(); // not metered
    t.client.get_user("alice", None).await.unwrap(); // 10: used up
    assert_eq!(t.client.stats().quota_warnings, 2);
    assert!(logs.text().contains("quota used up"));
    let quota = t.client.quota().await;
    assert_eq!((quota.used, quota.remaining), (10, 0));
    // The client does not refuse calls itself: DingTalk is the authority on the real quota.
    t.client.get_user("alice", None).await.unwrap();
    assert_eq!(t.client.quota().await.remaining, 0);
    assert!(!logs.text().contains(APP_SECRET));
}

struct BrokenCounter;

#[async_trait]
impl CallCounter for BrokenCounter {
    async fn add_calls(&self, _month: &str, _n: u64) -> Result<u64, CounterError> {
        Err(CounterError("database is locked".into()))
    }
    async fn calls(&self, _month: &str) -> Result<u64, CounterError> {
        Err(CounterError("database is locked".into()))
    }
}

#[tokio::test]
async fn counter_failures_do_not_fail_calls() {
    let (fake, base) = fake_dingtalk::FakeDingTalk::spawn().await.unwrap();
    fake.add_user(json!({"userid": "alice"}));
    let client = Client::new(support::test_config(&base), Arc::new(BrokenCounter)).unwrap();
    let user = client.get_user("alice", None).await.unwrap();
    assert_eq!(user.userid, "alice");
    let quota = client.quota().await;
    assert_eq!((quota.used, quota.remaining), (0, 5_000));
}
