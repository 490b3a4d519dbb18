//! `attendance_check_record` end to end: the real server with the built-in handlers, over
//! HTTP, against the fake DingTalk. Each test reads what the fake received.

mod support;

use std::time::Duration;

use dinghook::config::Config;
use dinghook::dingtalk::fake::{FakeDingTalk, FaultSpec};
use dinghook::handlers::attendance::{NotifyMode, UtcOffset};
use dinghook::store::EventState;
use serde_json::{json, Value};
use support::*;

const GETUPDATEDATA: &str = "/topapi/attendance/getupdatedata";
const ASYNCSEND: &str = "/topapi/message/corpconversation/asyncsend_v2";
/// Short, so a window's lookup runs within a second.
const WINDOW_MS: i64 = 300;

fn short_window(config: &mut Config) {
    config.handlers.attendance.coalesce_window = Duration::from_millis(WINDOW_MS as u64);
}

fn china(text: &str) -> i64 {
    UtcOffset::CHINA.parse_time(text).expect("time")
}

/// A push with one punch per `(user, check time ms)`.
fn checkin(event_id: &str, punches: &[(&str, i64)], by_user: bool) -> String {
    let list: Vec<Value> = punches
        .iter()
        .map(|(user, at)| {
            json!({"userId": user, "corpId": "dingcorp", "checkTime": at, "groupId": "g1",
                   "bizId": format!("biz-{event_id}-{at}"), "locationMethod": "MAP",
                   "locationResult": "Normal", "checkByUser": by_user})
        })
        .collect();
    json!({"EventType": "attendance_check_record", "eventId": event_id, "CorpId": "dingcorp",
           "dataList": list})
    .to_string()
}

/// What `getupdatedata` answers: one result per `(check_type, user_check_time, time_result)`.
fn day(fake: &FakeDingTalk, user: &str, date: &str, results: &[(&str, &str, &str)]) {
    let list: Vec<Value> = results
        .iter()
        .map(|(check_type, at, result)| {
            json!({"check_type": check_type, "time_result": result, "location_result": "Normal",
                   "user_check_time": at, "plan_check_time": at, "source_type": "USER",
                   "record_id": 1, "group_id": 1})
        })
        .collect();
    fake.set_attendance_update_data(
        user,
        date,
        json!({"work_date": date, "userid": user, "attendance_result_list": list,
               "check_record_list": [], "approve_list": []}),
    );
}

fn lookup_key(user: &str, at: i64) -> String {
    format!(
        "attendance-lookup:{user}:{}:{}",
        UtcOffset::CHINA.date(at),
        at.div_euclid(WINDOW_MS)
    )
}

/// Waits (up to 10 s) until the fake has `n` calls to `path`.
async fn wait_for_calls(fake: &FakeDingTalk, path: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let calls = fake.calls_to(path);
        if calls.len() >= n {
            return calls.into_iter().filter_map(|c| c.body).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: {} calls, expected {n}",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Long enough for anything wrongly scheduled (a second lookup one window later, a repeated
/// send on a retry) to have happened.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(3 * WINDOW_MS as u64 + 300)).await;
}

#[tokio::test]
async fn a_late_check_in_is_looked_up_once_and_the_user_is_told() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    let at = china("2024-05-06 09:05:12");
    day(
        &fake,
        "u-late",
        "2024-05-06",
        &[("OnDuty", "2024-05-06 09:05:12", "Late")],
    );

    assert_success_reply(
        app.post_event(&checkin("late-1", &[("u-late", at)], true))
            .await,
    )
    .await;

    let sends = wait_for_calls(&fake, ASYNCSEND, 1).await;
    let lookups = fake.calls_to(GETUPDATEDATA);
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].body,
        Some(json!({"userid": "u-late", "work_date": "2024-05-06"}))
    );
    let send = &sends[0];
    assert_eq!(send["userid_list"], "u-late", "{send}");
    assert_eq!(send["agent_id"], 4242);
    assert_eq!(send["msg"]["msgtype"], "markdown");
    assert_eq!(send["msg"]["markdown"]["title"], "考勤打卡 2024-05-06");
    let text = send["msg"]["markdown"]["text"].as_str().unwrap();
    assert!(
        text.contains("上班 09:05 迟到 (Late)") && text.contains("2024-05-06"),
        "{text}"
    );

    // The day is kept, and the notification recorded against the lookup event.
    let doc = app
        .store
        .get_document("attendance", "u-late:2024-05-06")
        .await
        .unwrap()
        .expect("attendance document");
    assert_eq!(
        doc.body["data"]["attendance_result_list"][0]["time_result"],
        "Late"
    );
    assert_eq!(doc.body["lookup_event"], lookup_key("u-late", at));
    let lookup = app
        .wait_for_state(&lookup_key("u-late", at), EventState::Done)
        .await;
    assert_eq!(lookup.source, "internal");

    settle().await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn five_check_ins_inside_one_window_make_one_lookup_and_one_message() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    // Current check times, all inside the next window, so the lookup really waits for it.
    let now = dinghook::crypto::now_millis();
    let start = (now.div_euclid(WINDOW_MS) + 1) * WINDOW_MS + 10;
    let date = UtcOffset::CHINA.date(start);
    let punch_time = (start + 40).to_string();
    day(
        &fake,
        "u-burst",
        &date,
        &[("OffDuty", &punch_time, "Early")],
    );

    for i in 0..5 {
        let event = checkin(&format!("burst-{i}"), &[("u-burst", start + i * 50)], true);
        assert_success_reply(app.post_event(&event).await).await;
    }

    let sends = wait_for_calls(&fake, ASYNCSEND, 1).await;
    assert_eq!(sends[0]["userid_list"], "u-burst");
    let text = sends[0]["msg"]["markdown"]["text"].as_str().unwrap();
    assert!(text.contains("早退 (Early)"), "{text}");
    for i in 0..5 {
        app.wait_for_state(&format!("event:burst-{i}"), EventState::Done)
            .await;
    }
    settle().await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn an_on_time_check_in_is_looked_up_but_not_notified_under_abnormal() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    let at = china("2024-05-06 08:55:00");
    day(
        &fake,
        "u-ok",
        "2024-05-06",
        &[("OnDuty", "2024-05-06 08:55:00", "Normal")],
    );

    assert_success_reply(
        app.post_event(&checkin("ok-1", &[("u-ok", at)], true))
            .await,
    )
    .await;

    app.wait_for_state(&lookup_key("u-ok", at), EventState::Done)
        .await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    assert!(app
        .store
        .get_document("attendance", "u-ok:2024-05-06")
        .await
        .unwrap()
        .is_some());
    settle().await;
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 0);
    app.stop().await;
}

#[tokio::test]
async fn notify_all_tells_the_user_about_an_on_time_check_in_in_text() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, |config| {
        short_window(config);
        config.handlers.attendance.notify = NotifyMode::All;
        config.handlers.attendance.format = dinghook::handlers::attendance::MessageFormat::Text;
        config.handlers.attendance.message = dinghook::template::Template::parse(
            "{user_id} {check_type_label} {time} {time_result_label}",
        )
        .unwrap();
    })
    .await;
    let at = china("2024-05-06 18:01:30");
    day(
        &fake,
        "u-all",
        "2024-05-06",
        &[("OffDuty", "2024-05-06 18:01:30", "Normal")],
    );

    assert_success_reply(
        app.post_event(&checkin("all-1", &[("u-all", at)], true))
            .await,
    )
    .await;

    let sends = wait_for_calls(&fake, ASYNCSEND, 1).await;
    assert_eq!(sends[0]["msg"]["msgtype"], "text");
    assert_eq!(sends[0]["msg"]["text"]["content"], "u-all 下班 18:01 正常");
    app.stop().await;
}

#[tokio::test]
async fn notify_off_looks_up_and_stores_but_sends_nothing() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, |config| {
        short_window(config);
        config.handlers.attendance.notify = NotifyMode::Off;
    })
    .await;
    let at = china("2024-05-06 09:30:00");
    day(
        &fake,
        "u-off",
        "2024-05-06",
        &[("OnDuty", "2024-05-06 09:30:00", "SeriousLate")],
    );

    assert_success_reply(
        app.post_event(&checkin("off-1", &[("u-off", at)], true))
            .await,
    )
    .await;

    app.wait_for_state(&lookup_key("u-off", at), EventState::Done)
        .await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    let doc = app
        .store
        .get_document("attendance", "u-off:2024-05-06")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(
        doc.body["data"]["attendance_result_list"][0]["time_result"],
        "SeriousLate"
    );
    settle().await;
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 0);
    app.stop().await;
}

#[tokio::test]
async fn system_replays_are_skipped_unless_configured() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let at = china("2024-05-06 09:10:00");
    day(
        &fake,
        "u-replay",
        "2024-05-06",
        &[("OnDuty", "2024-05-06 09:10:00", "Late")],
    );

    let app = TestApp::spawn_builtin(&url, short_window).await;
    let replay = checkin("replay-1", &[("u-replay", at)], false);
    assert_success_reply(app.post_event(&replay).await).await;
    app.wait_for_state("event:replay-1", EventState::Done).await;
    assert!(app
        .store
        .find_by_dedup_key(&lookup_key("u-replay", at))
        .await
        .unwrap()
        .is_none());
    settle().await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 0);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 0);
    app.stop().await;

    // The same push with include_system_replays: looked up and notified.
    let app = TestApp::spawn_builtin(&url, |config| {
        short_window(config);
        config.handlers.attendance.include_system_replays = true;
    })
    .await;
    assert_success_reply(app.post_event(&replay).await).await;
    let sends = wait_for_calls(&fake, ASYNCSEND, 1).await;
    assert_eq!(sends[0]["userid_list"], "u-replay");
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_same_push_delivered_three_times_is_looked_up_and_sent_once() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    let at = china("2024-05-07 09:20:00");
    day(
        &fake,
        "u-dup",
        "2024-05-07",
        &[("OnDuty", "2024-05-07 09:20:00", "Late")],
    );
    let event = checkin("dup-1", &[("u-dup", at)], true);
    for _ in 0..3 {
        assert_success_reply(app.post_event(&event).await).await;
    }
    wait_for_calls(&fake, ASYNCSEND, 1).await;
    settle().await;
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn one_push_for_two_users_makes_a_lookup_and_a_message_each() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    let at = china("2024-05-06 09:15:00");
    for user in ["u-a", "u-b"] {
        day(
            &fake,
            user,
            "2024-05-06",
            &[("OnDuty", "2024-05-06 09:15:00", "Late")],
        );
    }
    let event = checkin("two-1", &[("u-a", at), ("u-b", at + 1)], true);
    assert_success_reply(app.post_event(&event).await).await;
    let sends = wait_for_calls(&fake, ASYNCSEND, 2).await;
    let mut users: Vec<&str> = sends
        .iter()
        .map(|s| s["userid_list"].as_str().unwrap())
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["u-a", "u-b"]);
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_failing_notification_is_retried_without_a_second_lookup() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    let at = china("2024-05-06 09:40:00");
    day(
        &fake,
        "u-retry",
        "2024-05-06",
        &[("OnDuty", "2024-05-06 09:40:00", "Late")],
    );
    // More failures than the client retries within one run: the lookup event runs again.
    fake.fail_next(FaultSpec::http_status(502).times(6).on_path(ASYNCSEND));

    assert_success_reply(
        app.post_event(&checkin("retry-1", &[("u-retry", at)], true))
            .await,
    )
    .await;

    let lookup = app
        .wait_for_state(&lookup_key("u-retry", at), EventState::Done)
        .await;
    assert!(lookup.attempts > 1, "{lookup:?}");
    assert_eq!(fake.sent_messages().len(), 1);
    assert_eq!(fake.calls_to(GETUPDATEDATA).len(), 1);
    app.stop().await;
}
