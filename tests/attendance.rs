//! `attendance_check_record` end to end: the real server with the built-in handlers, over
//! HTTP, against the fake DingTalk. Each test reads what the fake received.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dinghook::builtin::attendance::NotifyMode;
use dinghook::config::Config;
use dinghook::store::EventState;
use dinghook::time::UtcOffset;
use fake_dingtalk::{FakeDingTalk, FaultSpec, RecordedCall};
use serde_json::{json, Value};
use support::*;

const LIST: &str = "/attendance/list";
const GETUPDATEDATA: &str = "/topapi/attendance/getupdatedata";
const ASYNCSEND: &str = "/topapi/message/corpconversation/asyncsend_v2";
/// Short, so a window's lookup runs within a second.
const WINDOW_MS: i64 = 300;

fn short_window(config: &mut Config) {
    config.handlers.attendance.coalesce_window = Duration::from_millis(WINDOW_MS as u64);
}

/// Makes the number of `attendance/list` calls deterministic: one worker that claims every
/// due lookup at once (so they all run at the same time), and a linger long enough for all
/// of them to reach the batcher; only a partial batch waits for it. The client's QPS limit is
/// lifted so a batch's call does not queue behind a hundred notifications.
fn one_round(config: &mut Config) {
    short_window(config);
    config.dispatch.workers = 1;
    config.dispatch.batch_size = 500;
    config.handlers.attendance.batch_size = 50;
    config.handlers.attendance.batch_linger = Duration::from_secs(1);
    config.dingtalk.qps = 10_000;
}

fn china(text: &str) -> i64 {
    UtcOffset::CHINA.parse_time(text).expect("time")
}

/// `workDate` of `attendance/list`: the day's midnight at +08:00, in ms.
fn midnight(date: &str) -> i64 {
    china(&format!("{date} 00:00:00"))
}

/// The users named in an `attendance/list` call.
fn users_of(call: &RecordedCall) -> Vec<String> {
    call.body.as_ref().expect("body")["userIdList"]
        .as_array()
        .expect("userIdList")
        .iter()
        .map(|u| u.as_str().expect("user id").to_owned())
        .collect()
}

/// The calls DingTalk answered with success.
fn answered(calls: Vec<RecordedCall>) -> Vec<RecordedCall> {
    calls
        .into_iter()
        .filter(|c| c.status == Some(200) && c.answer_code.as_deref() == Some("0"))
        .collect()
}

/// The user each sent work notification went to, in sending order.
fn notified(fake: &FakeDingTalk) -> Vec<String> {
    fake.sent_messages()
        .iter()
        .map(|m| {
            m.request["userid_list"]
                .as_str()
                .expect("userid_list")
                .to_owned()
        })
        .collect()
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

/// A user's `attendance/list` records of a day: one per `(check_type, check time, time_result)`,
/// the time as `yyyy-MM-dd HH:mm:ss` at +08:00 or as epoch ms.
fn records(user: &str, date: &str, results: &[(&str, &str, &str)]) -> Vec<Value> {
    results
        .iter()
        .map(|(check_type, at, result)| {
            let at = china(at);
            json!({"id": format!("{user}-{at}"), "userId": user, "workDate": midnight(date),
                   "checkType": check_type, "timeResult": result, "locationResult": "Normal",
                   "userCheckTime": at, "baseCheckTime": at, "sourceType": "USER",
                   "groupId": 1, "planId": 1})
        })
        .collect()
}

/// What `attendance/list` answers for the user's day (other users' data stays).
fn day(fake: &FakeDingTalk, user: &str, date: &str, results: &[(&str, &str, &str)]) {
    fake.set_attendance_list_for_users(&[user.to_owned()], &records(user, date, results));
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
    let lookups = fake.calls_to(LIST);
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].body,
        Some(
            json!({"workDateFrom": "2024-05-06 00:00:00", "workDateTo": "2024-05-06 00:00:00",
                    "userIdList": ["u-late"], "offset": 0, "limit": 50})
        )
    );
    assert!(fake.calls_to(GETUPDATEDATA).is_empty());
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
    let kept = doc.body["data"]["records"].as_array().expect("records");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["timeResult"], "Late");
    assert_eq!(kept[0]["userCheckTime"], at);
    assert_eq!(doc.body["lookup_event"], lookup_key("u-late", at));
    let lookup = app
        .wait_for_state(&lookup_key("u-late", at), EventState::Done)
        .await;
    assert_eq!(lookup.source, "internal");

    settle().await;
    assert_eq!(fake.calls_to(LIST).len(), 1);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn five_check_ins_inside_one_window_make_one_lookup_and_one_message() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, short_window).await;
    // Current check times, all inside the next window, so the lookup really waits for it.
    let now = dinghook::time::now_millis();
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
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
        config.handlers.attendance.format = dinghook::builtin::attendance::MessageFormat::Text;
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
    let doc = app
        .store
        .get_document("attendance", "u-off:2024-05-06")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(doc.body["data"]["records"][0]["timeResult"], "SeriousLate");
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
    assert_eq!(fake.calls_to(LIST).len(), 0);
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
    assert_eq!(fake.calls_to(ASYNCSEND).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn one_push_for_two_users_makes_a_lookup_and_a_message_each_from_one_call() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, one_round).await;
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
    // Two lookup events, each with its own document, and one attendance/list call for both.
    let calls = fake.calls_to(LIST);
    assert_eq!(calls.len(), 1);
    let mut asked = users_of(&calls[0]);
    asked.sort_unstable();
    assert_eq!(asked, ["u-a", "u-b"]);
    for (user, at) in [("u-a", at), ("u-b", at + 1)] {
        let lookup = app
            .wait_for_state(&lookup_key(user, at), EventState::Done)
            .await;
        assert_eq!(lookup.attempts, 1);
        let doc = app
            .store
            .get_document("attendance", &format!("{user}:2024-05-06"))
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(doc.body["lookup_event"], lookup_key(user, at));
        assert_eq!(doc.body["data"]["records"][0]["userId"], user);
    }
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
    assert_eq!(fake.calls_to(LIST).len(), 1);
    app.stop().await;
}

/// `count` users named `prefix-NNN`, user `i` punching on duty on 2024-05-06 at
/// 08:00 + `i` minutes: the punches, and each user's `attendance/list` record (even users
/// late, odd ones on time).
fn storm(prefix: &str, count: usize) -> (Vec<(String, i64)>, Vec<Value>) {
    let mut punches = Vec::new();
    let mut all = Vec::new();
    for i in 0..count {
        let user = format!("{prefix}-{i:03}");
        let at = china("2024-05-06 08:00:00") + i as i64 * 60_000;
        let result = if i % 2 == 0 { "Late" } else { "Normal" };
        all.extend(records(
            &user,
            "2024-05-06",
            &[("OnDuty", &at.to_string(), result)],
        ));
        punches.push((user, at));
    }
    (punches, all)
}

fn push_of(event_id: &str, punches: &[(String, i64)]) -> String {
    let punches: Vec<(&str, i64)> = punches.iter().map(|(u, at)| (u.as_str(), *at)).collect();
    checkin(event_id, &punches, true)
}

#[tokio::test]
async fn check_ins_of_120_users_share_three_attendance_list_calls() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, one_round).await;
    let (punches, all) = storm("storm", 120);
    fake.set_attendance_list(all);

    assert_success_reply(app.post_event(&push_of("storm-1", &punches)).await).await;

    for (user, at) in &punches {
        let lookup = app
            .wait_for_state(&lookup_key(user, *at), EventState::Done)
            .await;
        assert_eq!(lookup.attempts, 1, "{user}");
    }
    // ⌈120 / 50⌉ = 3 calls: two full batches, then the rest after the linger.
    let calls = fake.calls_to(LIST);
    let mut sizes: Vec<usize> = calls.iter().map(|c| users_of(c).len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [20, 50, 50]);
    let mut asked: Vec<String> = calls.iter().flat_map(users_of).collect();
    asked.sort_unstable();
    let users: Vec<String> = punches.iter().map(|(u, _)| u.clone()).collect();
    assert_eq!(asked, users, "each user asked for exactly once");
    for call in &calls {
        let body = call.body.as_ref().unwrap();
        assert_eq!(body["workDateFrom"], "2024-05-06 00:00:00", "{body}");
        assert_eq!(body["workDateTo"], "2024-05-06 00:00:00", "{body}");
        assert_eq!(
            (body["offset"].clone(), body["limit"].clone()),
            (json!(0), json!(50))
        );
    }

    // Each lookup kept its own user's record.
    for (user, at) in &punches {
        let doc = app
            .store
            .get_document("attendance", &format!("{user}:2024-05-06"))
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(doc.body["lookup_event"], lookup_key(user, *at));
        let kept = doc.body["data"]["records"].as_array().unwrap();
        assert_eq!(kept.len(), 1, "{user}: {kept:?}");
        assert_eq!(kept[0]["userId"], user.as_str());
        assert_eq!(kept[0]["userCheckTime"], *at);
    }

    // notify = "abnormal": the 60 late users are told, once each, about their own punch.
    wait_for_calls(&fake, ASYNCSEND, 60).await;
    settle().await;
    let mut told = notified(&fake);
    told.sort_unstable();
    let late: Vec<String> = users.iter().step_by(2).cloned().collect();
    assert_eq!(told, late);
    for message in fake.sent_messages() {
        let user = message.request["userid_list"].as_str().unwrap();
        let at = punches.iter().find(|(u, _)| u == user).unwrap().1;
        let text = message.request["msg"]["markdown"]["text"].as_str().unwrap();
        let expected = format!("上班 {} 迟到 (Late)", UtcOffset::CHINA.clock(at));
        assert!(text.contains(&expected), "{user}: {text}");
    }
    assert_eq!(fake.calls_to(LIST).len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn a_failed_call_retries_each_of_its_lookups_and_nobody_is_told_twice() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, |config| {
        one_round(config);
        config.handlers.attendance.notify = NotifyMode::All;
        // The client gives up at once, so the 5xx reaches the lookups.
        config.dingtalk.max_retries = 0;
    })
    .await;
    let (punches, all) = storm("flaky", 120);
    fake.set_attendance_list(all);
    fake.fail_next(FaultSpec::http_status(503).on_path(LIST));

    assert_success_reply(app.post_event(&push_of("flaky-1", &punches)).await).await;

    let mut attempts = BTreeMap::new();
    for (user, at) in &punches {
        let lookup = app
            .wait_for_state(&lookup_key(user, *at), EventState::Done)
            .await;
        attempts.insert(user.clone(), lookup.attempts);
    }
    let calls = fake.calls_to(LIST);
    let failed: Vec<&RecordedCall> = calls.iter().filter(|c| c.status == Some(503)).collect();
    assert_eq!(failed.len(), 1, "one call failed");
    let failed_users: BTreeSet<String> = users_of(failed[0]).into_iter().collect();
    assert!(
        failed_users.len() == 50 || failed_users.len() == 20,
        "{failed_users:?}"
    );
    // Every lookup of the failed call ran again, the others once.
    for (user, runs) in &attempts {
        let expected = if failed_users.contains(user) { 2 } else { 1 };
        assert_eq!(*runs, expected, "{user}");
    }
    // Each user was answered by exactly one successful call; the retried ones shared calls.
    let ok = answered(calls);
    assert!((3..=5).contains(&ok.len()), "{} successful calls", ok.len());
    let mut asked: Vec<String> = ok.iter().flat_map(users_of).collect();
    asked.sort_unstable();
    let users: Vec<String> = punches.iter().map(|(u, _)| u.clone()).collect();
    assert_eq!(asked, users);

    // notify = "all": every user told exactly once, the retried ones included.
    wait_for_calls(&fake, ASYNCSEND, 120).await;
    settle().await;
    let mut told = notified(&fake);
    told.sort_unstable();
    assert_eq!(told, users);
    app.stop().await;
}

#[tokio::test]
async fn lookups_of_two_dates_get_a_call_each_paged_through_has_more() {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    let app = TestApp::spawn_builtin(&url, |config| {
        one_round(config);
        config.handlers.attendance.notify = NotifyMode::All;
    })
    .await;
    let days = ["2024-05-06", "2024-05-07"];
    let users: Vec<String> = (0..30).map(|i| format!("two-{i:02}")).collect();
    // Each user punched on both days; each day has an on-duty result (late on the 6th, on
    // time on the 7th) and a planned off-duty check: 60 records a day, two pages.
    let mut all = Vec::new();
    let mut punches = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for (day, result) in days.iter().zip(["Late", "Normal"]) {
            let at = china(&format!("{day} 09:00:00")) + i as i64 * 60_000;
            all.extend(records(
                user,
                day,
                &[
                    ("OnDuty", &at.to_string(), result),
                    ("OffDuty", &format!("{day} 18:00:00"), "NotSigned"),
                ],
            ));
            punches.push((user.clone(), at));
        }
    }
    fake.set_attendance_list(all);

    // One push with both days, so both days' lookups run at the same time.
    assert_success_reply(app.post_event(&push_of("two-days-1", &punches)).await).await;

    for (user, at) in &punches {
        let lookup = app
            .wait_for_state(&lookup_key(user, *at), EventState::Done)
            .await;
        assert_eq!(lookup.attempts, 1, "{user}");
    }
    // Per day: one batch of the 30 users, paged at offsets 0 and 50.
    let mut pages: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for call in fake.calls_to(LIST) {
        let body = call.body.clone().unwrap();
        assert_eq!(body["workDateFrom"], body["workDateTo"], "{body}");
        let mut asked = users_of(&call);
        asked.sort_unstable();
        assert_eq!(asked, users, "{body}");
        let from = body["workDateFrom"].as_str().unwrap().to_owned();
        pages
            .entry(from)
            .or_default()
            .push(body["offset"].as_i64().unwrap());
    }
    for offsets in pages.values_mut() {
        offsets.sort_unstable();
    }
    let expected: BTreeMap<String, Vec<i64>> = days
        .iter()
        .map(|d| (format!("{d} 00:00:00"), vec![0, 50]))
        .collect();
    assert_eq!(pages, expected);

    // Each user's day holds that day's two records only.
    for user in &users {
        for day in days {
            let doc = app
                .store
                .get_document("attendance", &format!("{user}:{day}"))
                .await
                .unwrap()
                .expect("stored");
            let kept = doc.body["data"]["records"].as_array().unwrap();
            assert_eq!(kept.len(), 2, "{user} {day}: {kept:?}");
            for record in kept {
                assert_eq!(record["workDate"], midnight(day), "{user} {day}: {record}");
                assert_eq!(record["userId"], user.as_str());
            }
        }
    }

    // One message per user and day, each about its own day.
    wait_for_calls(&fake, ASYNCSEND, 60).await;
    settle().await;
    let mut seen = BTreeMap::new();
    for message in fake.sent_messages() {
        let markdown = &message.request["msg"]["markdown"];
        let user = message.request["userid_list"].as_str().unwrap().to_owned();
        let title = markdown["title"].as_str().unwrap().to_owned();
        let text = markdown["text"].as_str().unwrap();
        let expected = if title.ends_with("2024-05-06") {
            "迟到 (Late)"
        } else {
            "正常 (Normal)"
        };
        assert!(text.contains(expected), "{user} {title}: {text}");
        assert!(!text.contains("NotSigned"), "{text}");
        *seen.entry((user, title)).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 60, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    app.stop().await;
}
