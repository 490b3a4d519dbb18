//! The dispatcher with handlers written here, over the real server and SQLite store.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinghook::handler::{HandlerError, Registrations, RegistryBuilder};
use dinghook::store::EventState;
use support::*;

fn rename(id: &str) -> String {
    format!(r#"{{"EventType":"chat_update_title","eventId":"{id}","title":"t-{id}","chatId":"c"}}"#)
}

#[tokio::test]
async fn three_failures_then_success_ends_done_with_four_attempts() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let handlers = RegistryBuilder::new().on_chat_update_title(move |rename, ctx| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            assert_eq!(rename.title, "t-flaky");
            assert_eq!(
                ctx.record.attempts as usize, n,
                "attempt number visible to the handler"
            );
            if n <= 3 {
                Err(HandlerError::transient(format!("failure {n}")))
            } else {
                Ok(())
            }
        }
    });
    let app = TestApp::spawn_with_handlers(|_| {}, handlers).await;
    assert_success_reply(app.post_event(&rename("flaky")).await).await;
    let event = app.wait_for_state("event:flaky", EventState::Done).await;
    assert_eq!(event.attempts, 4);
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert_eq!(event.last_error.as_deref(), Some("failure 3"));
    app.stop().await;
}

#[tokio::test]
async fn always_failing_ends_dead_with_its_last_error_and_replay_brings_it_back() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let handlers = RegistryBuilder::new().on_chat_update_title(move |_, ctx| {
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok(())
            } else {
                Err(HandlerError::transient(format!(
                    "downstream down (run {})",
                    ctx.record.attempts
                )))
            }
        }
    });
    // Three retries: four runs, then dead.
    let app = TestApp::spawn_with_handlers(|_| {}, handlers).await;
    assert_success_reply(app.post_event(&rename("doomed")).await).await;
    let dead = app.wait_for_state("event:doomed", EventState::Dead).await;
    assert_eq!(dead.attempts, 4);
    let error = dead.last_error.unwrap();
    assert!(
        error.contains("downstream down (run 4)") && error.contains("gave up"),
        "{error}"
    );

    healthy.store(true, Ordering::SeqCst);
    // The operator's command, against the file the running server uses.
    let out = app.cli(&["events", "replay", "--state", "dead"]);
    assert_eq!(out.trim(), "1 event(s) sent back to pending");
    let done = app.wait_for_state("event:doomed", EventState::Done).await;
    assert_eq!(done.attempts, 1, "replay starts a fresh schedule");
    app.stop().await;
}

#[tokio::test]
async fn permanent_failures_and_undecodable_payloads_go_straight_to_dead() {
    let handlers = RegistryBuilder::new()
        .on_chat_update_title(|_, _| async { Err(HandlerError::permanent("group is gone")) })
        .on_cool_app_install(|_, _| async { Ok(()) });
    let app = TestApp::spawn_with_handlers(|_| {}, handlers).await;
    assert_success_reply(app.post_event(&rename("perm")).await).await;
    let dead = app.wait_for_state("event:perm", EventState::Dead).await;
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.unwrap().contains("group is gone"));

    // An install without its codes can never be handled.
    let broken = r#"{"EventType":"im_cool_app_install","eventId":"broken"}"#;
    assert_success_reply(app.post_event(broken).await).await;
    let dead = app.wait_for_state("event:broken", EventState::Dead).await;
    assert!(dead.last_error.unwrap().contains("coolAppCode"));
    app.stop().await;
}

#[tokio::test]
async fn events_without_a_handler_are_kept_and_marked_done() {
    let app = TestApp::spawn().await;
    let msg = r#"{"EventType":"user_modify_org","eventId":"nobody-cares","UserId":["u"]}"#;
    assert_success_reply(app.post_event(msg).await).await;
    let done = app
        .wait_for_state("event:nobody-cares", EventState::Done)
        .await;
    assert_eq!(done.payload, msg);
    app.stop().await;
}

#[tokio::test]
async fn panics_and_time_outs_are_retried_not_fatal() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let handlers = RegistryBuilder::new().on_chat_update_title(move |_, _| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => panic!("handler bug"),
                1 => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    });
    let app = TestApp::spawn_with_handlers(
        |c| c.dispatch.handler_timeout = Duration::from_millis(200),
        handlers,
    )
    .await;
    assert_success_reply(app.post_event(&rename("wobbly")).await).await;
    let done = app.wait_for_state("event:wobbly", EventState::Done).await;
    assert_eq!(done.attempts, 3);
    assert!(done.last_error.unwrap().contains("timed out"));
    app.stop().await;
}

#[tokio::test]
async fn slow_handlers_do_not_slow_the_acknowledgements() {
    let handlers = RegistryBuilder::new().on_chat_update_title(|_, _| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    });
    let app = TestApp::spawn_with_handlers(|c| c.dispatch.workers = 2, handlers).await;
    // Occupy every worker, then measure acknowledgements.
    for i in 0..4 {
        assert_success_reply(app.post_event(&rename(&format!("busy{i}"))).await).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let started = Instant::now();
        assert_success_reply(app.post_event(&rename(&format!("quick{i}"))).await).await;
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "an ack took {slowest:?}"
    );
    let running = app.store.stats(dinghook::time::now_millis()).await.unwrap();
    assert!(running.by_state["running"] >= 1, "{running:?}");
}

#[tokio::test]
async fn a_crashed_workers_events_come_back_after_the_lease() {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let handlers = RegistryBuilder::new().on_chat_update_title(move |_, _| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let app = TestApp::spawn_with_handlers(
        |c| {
            c.dispatch.enabled = false;
        },
        handlers,
    )
    .await;
    assert_success_reply(app.post_event(&rename("orphan")).await).await;
    // A worker of a process that then died claims the event with a 300 ms lease.
    let now = dinghook::time::now_millis();
    let claimed = app
        .store
        .claim("dead-process-w0", 10, 300, now)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let dispatcher = app.dispatcher.clone().unwrap();
    assert_eq!(dispatcher.drain().await.unwrap(), 0, "still leased");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(dispatcher.drain().await.unwrap(), 1);
    let done = app.wait_for_state("event:orphan", EventState::Done).await;
    assert_eq!(done.attempts, 2);
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn two_handlers_with_one_name_fail_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // A program's handler may not take a built-in one's name either.
    config.handlers.enabled = true;
    let result = dinghook::app::Application::builder(config)
        .named("builtin.chat.update_title")
        .on_chat_update_title(|_, _| async { Ok(()) })
        .build()
        .await;
    let err = result.err().expect("duplicate name refused").to_string();
    assert!(err.contains("builtin.chat.update_title"), "{err}");
}

#[tokio::test]
async fn metrics_report_receipts_rejections_queue_and_handler_runs() {
    let handlers = RegistryBuilder::new()
        .on_chat_update_title(|_, _| async { Err(HandlerError::permanent("no")) });
    let app = TestApp::spawn_with_handlers(|_| {}, handlers).await;
    assert_success_reply(app.post_event(&rename("m1")).await).await;
    assert_success_reply(app.post_event(&rename("m1")).await).await;
    let _ = app.post_raw("timestamp=1&nonce=n", "{}").await;
    app.wait_for_state("event:m1", EventState::Dead).await;
    let text = app.metrics().await;
    for line in [
        r#"dinghook_events_received_total{app="default",event_type="chat_update_title",outcome="stored"} 1"#,
        r#"dinghook_events_received_total{app="default",event_type="chat_update_title",outcome="duplicate"} 1"#,
        r#"dinghook_callbacks_rejected_total{app="default",reason="missing_parameter"} 1"#,
        r#"dinghook_handler_runs_total{app="default",event_type="chat_update_title",outcome="dead"} 1"#,
        r#"dinghook_dead_letters_total 1"#,
        r#"dinghook_queue_depth{app="default",state="dead"} 1"#,
        r#"dinghook_store_up 1"#,
        "dinghook_ack_duration_seconds_count 2",
        "dinghook_oldest_pending_age_seconds",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    app.stop().await;
}

/// Three handlers for one type: one succeeds at once, one fails twice, one fails for good.
/// Each retry runs only the handlers that have not succeeded; the event dies of the
/// permanent failure with the successes recorded, and a replay runs only the failed one.
#[tokio::test]
async fn several_handlers_per_type_each_keep_their_own_outcome() {
    let runs: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (ok_runs, flaky_runs, broken_runs) =
        (Arc::clone(&runs), Arc::clone(&runs), Arc::clone(&runs));
    let broken_fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fixed = Arc::clone(&broken_fixed);
    let handlers = RegistryBuilder::new()
        .named("steady")
        .on_chat_update_title(move |_, _| {
            ok_runs.lock().unwrap().push("steady".into());
            async { Ok(()) }
        })
        .named("flaky")
        .on_chat_update_title(move |_, ctx| {
            flaky_runs
                .lock()
                .unwrap()
                .push(format!("flaky@{}", ctx.record.attempts));
            async move {
                if ctx.record.attempts <= 2 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        })
        .on(
            "chat_update_title",
            move |_, ctx: dinghook::handler::Context| {
                broken_runs
                    .lock()
                    .unwrap()
                    .push(format!("broken@{}", ctx.record.attempts));
                let ok = fixed.load(Ordering::SeqCst);
                async move {
                    if ok || ctx.record.attempts < 3 {
                        if ok {
                            return Ok(());
                        }
                        return Err(HandlerError::transient("warming up"));
                    }
                    Err(HandlerError::permanent("bad data"))
                }
            },
        );
    let app = TestApp::spawn_with_handlers(|_| {}, handlers).await;
    assert_success_reply(app.post_event(&rename("multi")).await).await;
    let dead = app.wait_for_state("event:multi", EventState::Dead).await;
    assert_eq!(dead.attempts, 3);
    let error = dead.last_error.clone().unwrap();
    assert!(
        error.contains("chat_update_title#1: bad data") && !error.contains("flaky"),
        "the failing handler is named: {error}"
    );
    assert_eq!(dead.handled, ["steady", "flaky"]);
    let seen = runs.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|r| *r == "steady").count(),
        1,
        "a handler that succeeded is not run again: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|r| r.starts_with("flaky")).count(),
        3,
        "{seen:?}"
    );

    broken_fixed.store(true, Ordering::SeqCst);
    runs.lock().unwrap().clear();
    app.cli(&["events", "replay", "--state", "dead"]);
    let done = app.wait_for_state("event:multi", EventState::Done).await;
    assert!(done.handled.is_empty(), "done forgets the list");
    assert_eq!(
        *runs.lock().unwrap(),
        ["broken@1"],
        "the replay ran only the handler that had failed"
    );
    app.stop().await;
}

/// A signed event type cannot forge a metric line, and thousands of distinct types do not
/// grow `/metrics` without bound: past the first 100, and for anything not written like a
/// type, the label is `other`.
#[tokio::test]
async fn event_types_cannot_break_or_bloat_the_metrics() {
    let app = TestApp::spawn_with(|c| c.dispatch.enabled = false).await;
    let evil = "evil\"} 1\ndinghook_store_up 0\nINJECTED_METRIC{a=\"b";
    let msg = serde_json::json!({"EventType": evil, "eventId": "m-evil"}).to_string();
    assert_success_reply(app.post_event(&msg).await).await;
    for i in 0..300 {
        let msg = format!(r#"{{"EventType":"type_{i}","eventId":"m-{i}"}}"#);
        assert_success_reply(app.post_event(&msg).await).await;
    }
    let text = app.metrics().await;
    assert!(!text.contains("INJECTED"), "{text}");
    assert!(
        !text.lines().any(|l| l.trim() == "dinghook_store_up 0"),
        "a forged line"
    );
    let types: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("dinghook_events_received_total{app=\"default\","))
        .filter_map(|l| l.split("event_type=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        types.contains("other") && types.contains("type_0"),
        "{types:?}"
    );
    assert!(types.len() <= 101, "{} labels", types.len());
    let other: u64 = text
        .lines()
        .filter(|l| l.contains("event_type=\"other\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(other, 301 - 100, "the rest count as other");
    app.stop().await;
}
