//! The built-in group handlers and the delivery check, end to end: signed callbacks into the
//! real server, the dispatcher, the DingTalk client, and a fake DingTalk over real HTTP.

mod support;

use std::time::Duration;

use dinghook::store::EventState;
use fake_dingtalk::{FakeDingTalk, FaultSpec};
use serde_json::{json, Value};
use support::*;

const INSTALL_PATH: &str = "/v1.0/robot/groupMessages/send";
const QUERY_PATH: &str = "/v1.0/im/sceneGroups/query";

fn install(event_id: &str, ocid: &str) -> String {
    json!({
        "EventType": "im_cool_app_install", "EventTime": 1663143335567_i64, "CorpId": "dingcorp",
        "eventId": event_id, "coolAppCode": "COOLAPP-1-1018", "robotCode": "rBLBXuia",
        "openConversationId": ocid, "openConversationCorpId": "dingcorp",
        "operator": "0213454", "operateTime": "1641866135051"
    })
    .to_string()
}

fn uninstall(event_id: &str, ocid: &str) -> String {
    install(event_id, ocid)
        .replace("im_cool_app_install", "im_cool_app_uninstall")
        .replace("1641866135051", "1641866200000")
}

fn rename(event_id: &str, ocid: &str, title: &str) -> String {
    json!({
        "EventType": "chat_update_title", "eventId": event_id, "CorpId": "dingcorp",
        "timeStamp": 1641866300000_i64, "chatId": "chat1", "openConversationId": ocid,
        "title": title, "operator": "user456"
    })
    .to_string()
}

async fn group(app: &TestApp, ocid: &str) -> Value {
    app.store
        .get_document("group", ocid)
        .await
        .unwrap()
        .map(|d| d.body)
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn install_looks_the_group_up_and_greets_it_once() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(json!({"openConversationId": "cidT461w", "title": "开放平台", "coolAppCode": "COOLAPP-1-1018"}));
    let app = TestApp::spawn_builtin(&url, |_| {}).await;
    // DingTalk delivers the same install three times.
    for _ in 0..3 {
        assert_success_reply(app.post_event(&install("inst-1", "cidT461w")).await).await;
        app.wait_for_state("event:inst-1", EventState::Done).await;
    }
    assert_eq!(fake.calls_to(QUERY_PATH).len(), 1);
    let sends = fake.calls_to(INSTALL_PATH);
    assert_eq!(sends.len(), 1, "one welcome message");
    let body = sends[0].body.clone().unwrap();
    assert_eq!(body["robotCode"], "rBLBXuia");
    assert_eq!(body["openConversationId"], "cidT461w");
    assert_eq!(body["coolAppCode"], "COOLAPP-1-1018");
    assert_eq!(body["msgKey"], "sampleText");
    let param: Value = serde_json::from_str(body["msgParam"].as_str().unwrap()).unwrap();
    assert!(
        param["content"].as_str().unwrap().contains("开放平台"),
        "{param}"
    );
    assert!(
        sends[0].token_header.is_some(),
        "new API: token in the header"
    );

    let g = group(&app, "cidT461w").await;
    assert_eq!(g["status"], "installed");
    assert_eq!(g["title"], "开放平台");
    assert_eq!(g["robot_code"], "rBLBXuia");
    assert_eq!(g["operator"], "0213454");
    assert_eq!(g["installed_at"], 1641866135051_i64);
    assert!(app
        .metrics()
        .await
        .contains(r#"dinghook_notifications_sent_total{app="default",kind="group_message"} 1"#));
    app.stop().await;
}

#[tokio::test]
async fn after_an_uninstall_a_rename_is_stored_and_nothing_is_sent() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(
        json!({"openConversationId": "cidU", "title": "旧名", "coolAppCode": "COOLAPP-1-1018"}),
    );
    let app = TestApp::spawn_builtin(&url, |c| {
        c.handlers.cool_app.welcome = false;
        c.handlers.chat.announce = true;
    })
    .await;
    assert_success_reply(app.post_event(&install("i", "cidU")).await).await;
    app.wait_for_state("event:i", EventState::Done).await;
    assert_success_reply(app.post_event(&uninstall("u", "cidU")).await).await;
    app.wait_for_state("event:u", EventState::Done).await;
    assert_success_reply(app.post_event(&rename("r", "cidU", "新名")).await).await;
    app.wait_for_state("event:r", EventState::Done).await;
    let g = group(&app, "cidU").await;
    assert_eq!(
        (g["status"].as_str(), g["title"].as_str()),
        (Some("uninstalled"), Some("新名"))
    );
    assert!(
        fake.calls_to(INSTALL_PATH).is_empty(),
        "nothing sent to an uninstalled group"
    );
    assert!(app.metrics().await.contains(
        r#"dinghook_notifications_skipped_total{app="default",reason="group_not_installed"} 1"#
    ));

    // A rename of a group we never saw creates its row; an old rename arriving late is ignored.
    assert_success_reply(app.post_event(&rename("r2", "cidNew", "第一个名字")).await).await;
    app.wait_for_state("event:r2", EventState::Done).await;
    let late = rename("r3", "cidNew", "更早的名字").replace("1641866300000", "1641866000000");
    assert_success_reply(app.post_event(&late).await).await;
    app.wait_for_state("event:r3", EventState::Done).await;
    let g = group(&app, "cidNew").await;
    assert_eq!(
        (g["status"].as_str(), g["title"].as_str()),
        (Some("known"), Some("第一个名字"))
    );
    app.stop().await;
}

#[tokio::test]
async fn announced_renames_go_to_installed_groups() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(
        json!({"openConversationId": "cidA", "title": "A", "coolAppCode": "COOLAPP-1-1018"}),
    );
    let app = TestApp::spawn_builtin(&url, |c| {
        c.handlers.cool_app.welcome = false;
        c.handlers.chat.announce = true;
    })
    .await;
    assert_success_reply(app.post_event(&install("i", "cidA")).await).await;
    app.wait_for_state("event:i", EventState::Done).await;
    assert_success_reply(app.post_event(&rename("r", "cidA", "B 组")).await).await;
    app.wait_for_state("event:r", EventState::Done).await;
    let sends = fake.calls_to(INSTALL_PATH);
    assert_eq!(sends.len(), 1);
    let param = sends[0].body.as_ref().unwrap()["msgParam"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(param.contains("群名已更新为「B 组」"), "{param}");
    app.stop().await;
}

#[tokio::test]
async fn throttling_and_busy_answers_are_retried_until_everything_is_done() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(
        json!({"openConversationId": "cidT", "title": "T", "coolAppCode": "COOLAPP-1-1018"}),
    );
    let app = TestApp::spawn_builtin(&url, |_| {}).await;
    // Every call fails twice with "too many requests" and once with "system busy" before it
    // succeeds: 90018 / -1 on the old API, their HTTP forms on the new one.
    fake.fail_next(FaultSpec::errcode(90018).times(2).on_path("/gettoken"));
    fake.fail_next(FaultSpec::errcode(-1).times(1).on_path("/gettoken"));
    for path in [QUERY_PATH, INSTALL_PATH] {
        let qps = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi";
        fake.fail_next(FaultSpec::api_code(403, qps).times(2).on_path(path));
        fake.fail_next(FaultSpec::http_status(503).times(1).on_path(path));
    }
    assert_success_reply(app.post_event(&install("flaky", "cidT")).await).await;
    let done = app.wait_for_state("event:flaky", EventState::Done).await;
    assert!(done.attempts >= 1);
    assert_eq!(group(&app, "cidT").await["title"], "T");
    let sends: Vec<_> = fake
        .calls_to(INSTALL_PATH)
        .into_iter()
        .filter(|c| c.status == Some(200))
        .collect();
    assert_eq!(sends.len(), 1, "exactly one message got through");
    // The retries are on record: the client's counters and the event's attempts.
    let text = app.metrics().await;
    let retries: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("dinghook_dingtalk{app=\"default\",name=\"throttled_retries\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(retries >= 2.0, "{text}");
    app.stop().await;
}

#[tokio::test]
async fn an_exhausted_quota_skips_notifications_but_keeps_the_bookkeeping() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(
        json!({"openConversationId": "cidQ", "title": "Q", "coolAppCode": "COOLAPP-1-1018"}),
    );
    fake.set_monthly_quota(Some(0));
    let app = TestApp::spawn_builtin(&url, |_| {}).await;
    assert_success_reply(app.post_event(&install("q", "cidQ")).await).await;
    let done = app.wait_for_state("event:q", EventState::Done).await;
    assert_eq!(done.attempts, 1, "the quota answer is not retried");
    let g = group(&app, "cidQ").await;
    assert_eq!(g["status"], "installed", "group bookkeeping still done");
    assert!(fake
        .calls_to(INSTALL_PATH)
        .iter()
        .all(|c| c.status != Some(200)));
    let text = app.metrics().await;
    assert!(
        text.contains(
            r#"dinghook_notifications_skipped_total{app="default",reason="quota_exhausted"} 1"#
        ),
        "{text}"
    );

    // Under the configured reserve, dinghook does not even try.
    let (fake2, url2) = FakeDingTalk::spawn().await.unwrap();
    let app2 = TestApp::spawn_builtin(&url2, |c| {
        c.dingtalk.monthly_quota = 100;
        c.handlers.notify_quota_reserve = 500;
        c.handlers.cool_app.lookup_title = false;
    })
    .await;
    assert_success_reply(app2.post_event(&install("q2", "cidR")).await).await;
    app2.wait_for_state("event:q2", EventState::Done).await;
    assert!(fake2.calls_to(INSTALL_PATH).is_empty());
    assert!(app2.metrics().await.contains(
        r#"dinghook_notifications_skipped_total{app="default",reason="quota_reserve"} 1"#
    ));
    assert_eq!(group(&app2, "cidR").await["status"], "installed");
    app.stop().await;
    app2.stop().await;
}

#[tokio::test]
async fn the_delivery_check_records_a_forbidden_recipient() {
    use dinghook::dingtalk::{Text, WorkMessage};
    use dinghook::handler::{Registrations, RegistryBuilder};
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    // A handler of our own that sends a work notification through the built-in path.
    let app = TestApp::spawn_with_handlers_from(move |c| {
        c.dingtalk.app_key = "dingtestapp".into();
        c.dingtalk.app_secret = dinghook::secret::Secret::new("s");
        c.dingtalk.agent_id = Some(4242);
        c.dingtalk.oapi_url = url.clone();
        c.dingtalk.api_url = url;
        c.handlers.send_result_delay = Duration::from_millis(100);
        c.handlers.enabled = true;
        let handlers = c.handlers.clone();
        RegistryBuilder::new().on("test_notify", move |_event, ctx| {
            let handlers = handlers.clone();
            async move {
                let msg = WorkMessage::Text {
                    text: Text {
                        content: "hello".into(),
                    },
                };
                dinghook::builtin::notify::send(
                    &ctx,
                    &handlers,
                    "test",
                    "notify",
                    vec!["u1".into(), "u2".into()],
                    msg,
                )
                .await?;
                Ok(())
            }
        })
    })
    .await;
    assert_success_reply(
        app.post_event(r#"{"EventType":"test_notify","eventId":"n1"}"#)
            .await,
    )
    .await;
    app.wait_for_state("event:n1", EventState::Done).await;
    let sent = fake.calls_to("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sent.len(), 1);
    let task_id = fake.sent_messages()[0].task_id;
    fake.set_send_result(
        task_id,
        fake_dingtalk::FakeSendResult {
            read_user_id_list: vec!["u1".into()],
            forbidden_user_id_list: vec!["u2".into()],
            ..Default::default()
        },
    );
    let check = app
        .wait_for_state(&format!("send-result:{task_id}"), EventState::Done)
        .await;
    assert_eq!(check.source, "internal");
    let doc = app
        .store
        .get_document("notification", &task_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.body["status"], "checked");
    assert_eq!(doc.body["result"]["forbidden"], json!(["u2"]));
    assert_eq!(doc.body["result"]["read"], json!(["u1"]));
    assert_eq!(doc.body["userids"], json!(["u1", "u2"]));
    // And the operator sees it.
    let listed = app.cli(&["notifications", "list"]);
    assert!(
        listed.contains("forbidden 1") && listed.contains("checked"),
        "{listed}"
    );
    let shown: Value =
        serde_json::from_str(&app.cli(&["notifications", "show", &task_id.to_string()])).unwrap();
    assert_eq!(shown["result"]["forbidden"], json!(["u2"]));
    app.stop().await;
}

/// A program's own handler runs beside the built-in one for the same type: both run, each
/// records its own outcome, and the program's failure retries only the program's handler.
#[tokio::test]
async fn a_programs_handler_runs_beside_the_built_in_one() {
    use dinghook::handler::{HandlerError, Registrations, RegistryBuilder};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&runs);
    let app = TestApp::spawn_with_handlers_from(move |c| {
        c.dingtalk.app_key = "dingtestapp".into();
        c.dingtalk.app_secret = dinghook::secret::Secret::new("s");
        c.dingtalk.oapi_url = url.clone();
        c.dingtalk.api_url = url;
        c.handlers.enabled = true;
        // Recovery would read the failed-push list from the fake at start-up.
        c.recovery.enabled = false;
        RegistryBuilder::new()
            .named("crm.rename")
            .on_chat_update_title(move |rename, _ctx| {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert_eq!(rename.title, "新名");
                    if n == 0 {
                        Err(HandlerError::transient("crm is down"))
                    } else {
                        Ok(())
                    }
                }
            })
    })
    .await;
    assert_success_reply(app.post_event(&rename("own", "cidOwn", "新名")).await).await;
    let done = app.wait_for_state("event:own", EventState::Done).await;
    assert_eq!(done.attempts, 2, "the program's handler failed once");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        done.last_error.as_deref(),
        Some("crm.rename: crm is down"),
        "the failure names its handler"
    );
    // The built-in one kept the title (tests/dispatch.rs shows a success is not run again).
    assert_eq!(group(&app, "cidOwn").await["title"], "新名");
    assert!(
        fake.calls().is_empty(),
        "no announcement configured, no call"
    );
    app.stop().await;
}
