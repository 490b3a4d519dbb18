//! Recovery of failed pushes: the real server (or the real `Recovery` task) reading the fake
//! DingTalk's failed-push list over loopback HTTP into a real store.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinghook::config::Config;
use dinghook::event::Event;
use dinghook::handler::{Registrations, RegistryBuilder};
use dinghook::metrics::Metrics;
use dinghook::sources::recovery::{Recovery, RecoveryError};
use dinghook::store::{EventState, Store};
use fake_dingtalk::FakeDingTalk;
use serde_json::{json, Value};
use support::stores::open_url;
use support::*;

const FAILED_PATH: &str = "/call_back/get_call_back_failed_result";

/// A failed-list entry for a group rename, shaped as DingTalk documents it.
fn failed_rename(id: &str) -> Value {
    json!({
        "call_back_tag": "chat_update_title",
        "event_time": 1_700_000_000_000_i64,
        "chat_update_title": {
            "corpid": "dingcorp",
            "callbackData": {"eventId": id, "title": format!("t-{id}"), "ChatId": "chat1"}
        }
    })
}

/// The push DingTalk would have sent for the same event.
fn pushed_rename(id: &str) -> String {
    json!({"EventType": "chat_update_title", "eventId": id, "title": format!("t-{id}"),
           "ChatId": "chat1", "CorpId": "dingcorp"})
    .to_string()
}

/// Handler runs per title.
type Runs = Arc<Mutex<HashMap<String, usize>>>;

fn counting_handlers() -> (RegistryBuilder, Runs) {
    let runs: Runs = Arc::default();
    let seen = Arc::clone(&runs);
    let handlers = RegistryBuilder::new().on_chat_update_title(move |rename, _ctx| {
        *seen.lock().unwrap().entry(rename.title).or_insert(0) += 1;
        async { Ok(()) }
    });
    (handlers, runs)
}

async fn fake() -> (FakeDingTalk, String) {
    FakeDingTalk::spawn().await.expect("fake DingTalk")
}

/// Waits up to 10 s for `check`.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn five_failed_pushes_over_two_pages_are_stored_and_handled_once_at_start_up() {
    let (fake, base) = fake().await;
    fake.set_failed_page_size(3);
    let ids = ["f1", "f2", "f3", "f4", "f5"];
    fake.load_failed_callbacks(ids.iter().map(|id| failed_rename(id)).collect());
    let (handlers, runs) = counting_handlers();
    // An hour between cycles: everything below comes from the cycle run at start-up.
    let app = TestApp::spawn_with_handlers(
        |c| {
            use_fake_dingtalk(c, &base);
            c.recovery.interval = Duration::from_secs(3600);
        },
        handlers,
    )
    .await;

    for id in ids {
        let event = app
            .wait_for_state(&format!("event:{id}"), EventState::Done)
            .await;
        assert_eq!(event.source, "recovery");
        assert_eq!(event.event_type, "chat_update_title");
        assert_eq!(event.corp_id.as_deref(), Some("dingcorp"));
    }
    // Both pages were read in the one cycle, and reading emptied the list.
    assert_eq!(fake.calls_to(FAILED_PATH).len(), 2);
    assert_eq!(fake.failed_callbacks_left(), 0);

    // DingTalk's own late retry of f3 arrives by push: acknowledged, not stored again.
    assert_success_reply(app.post_event(&pushed_rename("f3")).await).await;
    assert_eq!(app.store.count().await.unwrap(), 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = runs.lock().unwrap().clone();
    let expected: HashMap<String, usize> = ids.iter().map(|id| (format!("t-{id}"), 1)).collect();
    assert_eq!(runs, expected, "each event handled exactly once");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"dinghook_recovered_events_total{app="default",outcome="stored"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"dinghook_recovery_runs_total{app="default",outcome="ok"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_interval_comes_from_the_environment_and_a_later_batch_is_picked_up() {
    let env = |extra: &'static [(&'static str, &'static str)]| {
        let base = [
            ("DINGHOOK_TOKEN", TOKEN),
            ("DINGHOOK_AES_KEY", AES_KEY),
            ("DINGHOOK_OWNER_KEY", OWNER_KEY),
        ];
        base.iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let parsed =
        Config::load_with_env(None, &env(&[("DINGHOOK_RECOVERY_INTERVAL", "2s")])).unwrap();
    assert_eq!(parsed.recovery.interval, Duration::from_secs(2));
    assert!(parsed.recovery.enabled);
    let defaults = Config::load_with_env(None, &env(&[])).unwrap();
    assert_eq!(defaults.recovery.interval, Duration::from_secs(1800));
    let off = Config::load_with_env(None, &env(&[("DINGHOOK_RECOVERY", "off")])).unwrap();
    assert!(!off.recovery.enabled);
    let err = Config::load_with_env(None, &env(&[("DINGHOOK_RECOVERY_INTERVAL", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("DINGHOOK_RECOVERY_INTERVAL"), "{err}");
    let err = Config::load_with_env(None, &env(&[("DINGHOOK_RECOVERY_INTERVAL", "0")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("recovery.interval"), "{err}");

    let (fake, base) = fake().await;
    let (handlers, runs) = counting_handlers();
    let interval = parsed.recovery.interval;
    let app = TestApp::spawn_with_handlers(
        |c| {
            use_fake_dingtalk(c, &base);
            c.recovery.interval = interval;
        },
        handlers,
    )
    .await;
    // The start-up cycle finds nothing.
    eventually("the start-up cycle", async || {
        fake.calls_to(FAILED_PATH).len() == 1
    })
    .await;
    // g1 is pushed and also lands in the failed list (DingTalk did not see our reply).
    assert_success_reply(app.post_event(&pushed_rename("g1")).await).await;
    app.wait_for_state("event:g1", EventState::Done).await;
    let loaded = tokio::time::Instant::now();
    fake.load_failed_callbacks(vec![failed_rename("g1"), failed_rename("g2")]);

    let g2 = app.wait_for_state("event:g2", EventState::Done).await;
    assert_eq!(g2.source, "recovery");
    assert!(
        loaded.elapsed() <= interval + Duration::from_secs(1),
        "picked up on the next 2 s tick, not later: {:?}",
        loaded.elapsed()
    );
    assert_eq!(fake.calls_to(FAILED_PATH).len(), 2);
    assert_eq!(app.store.count().await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runs.lock().unwrap().get("t-g1"),
        Some(&1),
        "g1 handled once"
    );
    let g1 = app
        .store
        .find_by_dedup_key("event:g1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g1.source, "push");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"dinghook_recovered_events_total{app="default",outcome="duplicate"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn string_and_unparseable_payloads_are_stored_and_reach_their_handlers() {
    let (fake, base) = fake().await;
    let java_map = json!({
        "call_back_tag": "user_modify_org", "event_time": "1663143335000",
        "user_modify_org": "{corpid=dingcorp, userid=[u1]}"
    });
    fake.load_failed_callbacks(vec![
        json!({
            "call_back_tag": "chat_update_title",
            "chat_update_title": {"corpid": "dingcorp", "callbackData":
                r#"{"eventId":"s1","title":"from a string","ChatId":"c"}"#}
        }),
        java_map.clone(),
        json!("not even an object"),
    ]);
    let titles: Arc<Mutex<Vec<String>>> = Arc::default();
    let unknown: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (seen_titles, seen_unknown) = (Arc::clone(&titles), Arc::clone(&unknown));
    let handlers = RegistryBuilder::new()
        .on_chat_update_title(move |rename, _| {
            seen_titles.lock().unwrap().push(rename.title);
            async { Ok(()) }
        })
        .on("user_modify_org", move |event: Event, _| {
            if let Event::Unknown { raw, .. } = event {
                seen_unknown.lock().unwrap().push(raw);
            }
            async { Ok(()) }
        });
    let app = TestApp::spawn_with_handlers(|c| use_fake_dingtalk(c, &base), handlers).await;

    eventually("three events stored", async || {
        app.store.count().await.unwrap() == 3
    })
    .await;
    app.wait_for_state("event:s1", EventState::Done).await;
    assert_eq!(*titles.lock().unwrap(), ["from a string"]);

    let all = app.store.list(&Default::default()).await.unwrap();
    assert!(all.iter().all(|e| e.source == "recovery"));
    let kept = all
        .iter()
        .find(|e| e.event_type == "user_modify_org")
        .expect("the Java-map entry is kept");
    let payload: Value = serde_json::from_str(&kept.payload).unwrap();
    assert_eq!(payload["raw"], java_map, "the whole entry is kept");
    app.wait_for_state(&kept.dedup_key, EventState::Done).await;
    assert_eq!(unknown.lock().unwrap()[0]["raw"], java_map);

    let odd = all
        .iter()
        .find(|e| e.event_type == "unknown")
        .expect("an entry without a tag is kept");
    let payload: Value = serde_json::from_str(&odd.payload).unwrap();
    assert_eq!(payload["raw"], "not even an object");
    app.stop().await;
}

#[tokio::test]
async fn recovery_off_or_without_an_app_key_reads_nothing() {
    let (fake, base) = fake().await;
    fake.load_failed_callbacks(vec![failed_rename("x1")]);
    let off = TestApp::spawn_with(|c| {
        use_fake_dingtalk(c, &base);
        c.recovery.enabled = false;
    })
    .await;
    let no_key = TestApp::spawn_with(|c| c.recovery.enabled = true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert_eq!(fake.failed_callbacks_left(), 1);
    off.stop().await;
    no_key.stop().await;
}

/// The `Recovery` task itself on a SQLite store, so each cycle runs exactly when the test says.
struct Direct {
    recovery: Recovery,
    store: Arc<dyn Store>,
    db: std::path::PathBuf,
    stop: tokio::sync::watch::Receiver<bool>,
    _stop_tx: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn direct(base: &str) -> Direct {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("direct.db");
    let store = open_url(&format!("sqlite://{}", db.display())).await;
    let mut config = test_config(dir.path());
    use_fake_dingtalk(&mut config, base);
    let counter = Arc::new(dinghook::dingtalk::MemoryCounter::new());
    let client = dinghook::dingtalk::Client::new(config.dingtalk.clone(), counter).unwrap();
    let recovery = Recovery::new(
        "default",
        Arc::clone(&store),
        client,
        Duration::from_secs(3600),
        Arc::new(Metrics::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    Direct {
        recovery,
        store,
        db,
        stop,
        _stop_tx: stop_tx,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_store_failure_stops_the_cycle_before_the_next_page_is_read() {
    let (fake, base) = fake().await;
    fake.set_failed_page_size(2);
    fake.load_failed_callbacks(
        ["p1", "p2", "p3", "p4", "p5"]
            .iter()
            .map(|id| failed_rename(id))
            .collect(),
    );
    let d = direct(&base).await;
    // Break inserts from outside, as a failing disk would.
    let conn = rusqlite::Connection::open(&d.db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER broken BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    )
    .unwrap();

    let result = d.recovery.run_cycle(&d.stop).await;
    assert!(matches!(result, Err(RecoveryError::Store(_))), "{result:?}");
    // One page read (and, as on DingTalk, consumed); the next one was NOT asked for.
    assert_eq!(fake.calls_to(FAILED_PATH).len(), 1);
    assert_eq!(fake.failed_callbacks_left(), 3);
    assert_eq!(d.store.count().await.unwrap(), 0);

    // The store heals: the next cycle takes the rest. p1 and p2 went with the failed page
    // (DingTalk deleted them when they were read); they exist only in the error log.
    conn.execute_batch("DROP TRIGGER broken").unwrap();
    let report = d.recovery.run_cycle(&d.stop).await.unwrap();
    assert_eq!((report.pages, report.stored), (2, 3));
    assert_eq!(fake.failed_callbacks_left(), 0);
    for id in ["p3", "p4", "p5"] {
        assert!(d
            .store
            .find_by_dedup_key(&format!("event:{id}"))
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn a_dingtalk_error_ends_the_cycle_and_the_next_one_reads_the_list() {
    let (fake, base) = fake().await;
    fake.load_failed_callbacks(vec![failed_rename("d1")]);
    // 60011: no permission (qyapi_base missing): permanent, so no client retries.
    fake.fail_next(fake_dingtalk::FaultSpec::errcode(60011).on_path(FAILED_PATH));
    let d = direct(&base).await;
    let result = d.recovery.run_cycle(&d.stop).await;
    assert!(
        matches!(result, Err(RecoveryError::DingTalk(_))),
        "{result:?}"
    );
    assert_eq!(
        fake.failed_callbacks_left(),
        1,
        "a refused read deletes nothing"
    );
    let report = d.recovery.run_cycle(&d.stop).await.unwrap();
    assert_eq!(report.stored, 1);
}

mod postgres {
    use super::*;
    use support::stores::fresh_postgres_database;

    #[tokio::test]
    async fn only_one_replica_leads_and_a_dead_leaders_lock_goes_with_its_session() {
        let Some(url) = fresh_postgres_database().await else {
            return;
        };
        let a = open_url(&url).await;
        let b = open_url(&url).await;
        let guard = a.try_lead("recovery").await.unwrap().expect("a leads");
        assert!(b.try_lead("recovery").await.unwrap().is_none());
        // The same replica cannot take it twice either (the lock is not re-entered).
        assert!(a.try_lead("recovery").await.unwrap().is_none());
        // Other names are independent.
        let other = b.try_lead("something else").await.unwrap().expect("free");
        other.release().await;
        guard.release().await;
        let guard = b.try_lead("recovery").await.unwrap().expect("b leads now");

        // b's session dies (a crashed replica): the lock goes with it.
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let key = dinghook::store::postgres::leader_lock_key("recovery");
        let killed: i64 = admin
            .query_one(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let taken = loop {
            if let Some(g) = a.try_lead("recovery").await.unwrap() {
                break g;
            }
            assert!(tokio::time::Instant::now() < deadline, "lock never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eventually("b notices it lost the lock", async || guard.lost()).await;
        // Dropping without release (a cancelled task) closes the session, which frees it too.
        drop(taken);
        drop(guard);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while b.try_lead("recovery").await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "dropped guard kept the lock"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn two_apps_on_one_database_poll_one_at_a_time() {
        let Some(url) = fresh_postgres_database().await else {
            return;
        };
        let (fake, base) = fake().await;
        // Slow pages: the first app's cycle is still running when the second one starts.
        fake.set_path_delay(FAILED_PATH, Some(Duration::from_millis(1000)));
        fake.set_failed_page_size(2);
        fake.load_failed_callbacks(
            ["q1", "q2", "q3", "q4"]
                .iter()
                .map(|id| failed_rename(id))
                .collect(),
        );
        let (handlers_a, runs_a) = counting_handlers();
        let (handlers_b, runs_b) = counting_handlers();
        let spawn = |handlers| {
            let (url, base) = (url.clone(), base.clone());
            TestApp::spawn_with_handlers(
                move |c| {
                    use_fake_dingtalk(c, &base);
                    c.store.url = url;
                    c.recovery.interval = Duration::from_secs(3600);
                },
                handlers,
            )
        };
        let a = spawn(handlers_a).await;
        eventually("a's cycle started", async || {
            !fake.calls_to(FAILED_PATH).is_empty()
        })
        .await;
        let b = spawn(handlers_b).await;
        for id in ["q1", "q2", "q3", "q4"] {
            a.wait_for_state(&format!("event:{id}"), EventState::Done)
                .await;
        }
        eventually("b's start-up cycle ended", async || {
            b.metrics()
                .await
                .contains("dinghook_recovery_runs_total{app=\"default\",")
        })
        .await;
        let b_metrics = b.metrics().await;
        assert!(
            b_metrics
                .contains(r#"dinghook_recovery_runs_total{app="default",outcome="not_leader"} 1"#),
            "{b_metrics}"
        );
        // Only a read the list: two pages, one after the other.
        let reads = fake.calls_to(FAILED_PATH);
        assert_eq!(reads.len(), 2, "{reads:?}");
        let events = a.store.list(&Default::default()).await.unwrap();
        assert_eq!(events.len(), 4);
        assert!(events.iter().all(|e| e.source == "recovery"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut total: HashMap<String, usize> = runs_a.lock().unwrap().clone();
        for (title, n) in runs_b.lock().unwrap().iter() {
            *total.entry(title.clone()).or_insert(0) += n;
        }
        assert!(total.values().all(|n| *n == 1), "{total:?}");
        assert_eq!(total.len(), 4);
        a.stop().await;
        b.stop().await;
    }
}
