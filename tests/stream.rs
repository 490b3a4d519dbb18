//! Stream mode against the fake DingTalk over real WebSockets: events stored once and
//! acknowledged `SUCCESS` only after the commit, `LATER` while the store fails, pings,
//! `disconnect` without a gap, abrupt drops, a silent connection, refused credentials, bad
//! frames, robot messages, SIGKILL of a real `dinghook serve`, and two replicas on PostgreSQL.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinghook::config::Config;
use dinghook::handler::RegistryBuilder;
use dinghook::secret::Secret;
use dinghook::store::Store;
use dinghook::time::now_millis;
use fake_dingtalk::{FakeDingTalk, StreamEvent, StreamSettings};
use serde_json::json;
use support::counting::CountingStore;
use support::TestApp;

const APP_KEY: &str = "dingstreamapp";
const APP_SECRET: &str = "stream-secret-do-not-log";

async fn fake() -> (FakeDingTalk, String) {
    let (fake, url) = FakeDingTalk::spawn().await.expect("fake starts");
    fake.set_credentials(APP_KEY, APP_SECRET);
    let mut settings = fake.stream_settings();
    settings.redelivery_delay_ms = 100;
    settings.ack_timeout_ms = 3_000;
    fake.set_stream_settings(settings);
    (fake, url)
}

/// The default app in Stream mode against `url`, with quick back-off and watchdog.
fn stream_config(config: &mut Config, url: &str) {
    config.dingtalk.app_key = APP_KEY.into();
    config.dingtalk.app_secret = Secret::new(APP_SECRET);
    config.dingtalk.api_url = url.into();
    config.dingtalk.oapi_url = url.into();
    config.recovery.enabled = false;
    config.stream.enabled = true;
    config.stream.robot = true;
    config.stream.backoff_base = Duration::from_millis(50);
    config.stream.backoff_max = Duration::from_millis(400);
    config.stream.watchdog = Duration::from_secs(3);
    config.stream.ping_interval = Duration::from_millis(500);
    config.stream.store_timeout = Duration::from_secs(2);
}

async fn app_on(url: &str, tweak: impl FnOnce(&mut Config)) -> (TestApp, Arc<CountingStore>) {
    let url = url.to_owned();
    let slot: Arc<std::sync::Mutex<Option<Arc<CountingStore>>>> = Arc::default();
    let keep = Arc::clone(&slot);
    let app = TestApp::spawn_on(
        move |config| {
            stream_config(config, &url);
            tweak(config);
            RegistryBuilder::new()
        },
        move |store| {
            let counting = CountingStore::new(store);
            *keep.lock().unwrap() = Some(Arc::clone(&counting));
            counting as Arc<dyn Store>
        },
    )
    .await;
    let counting = slot.lock().unwrap().take().expect("store wrapped");
    (app, counting)
}

fn events(prefix: &str, n: usize) -> Vec<StreamEvent> {
    (1..=n)
        .map(|i| {
            StreamEvent::new(
                "user_add_org",
                &format!("{prefix}-{i}"),
                json!({"UserId": [format!("u{i}")]}),
            )
        })
        .collect()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every id of `ids` is stored once, from Stream (or from `other_source` when given).
async fn assert_stored(store: &Arc<dyn Store>, ids: &BTreeSet<String>) {
    for id in ids {
        let found = store
            .find_by_dedup_key(&format!("event:{id}"))
            .await
            .expect("store answers");
        assert!(
            found.is_some(),
            "acknowledged event {id} is not in the store"
        );
    }
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (0 if absent).
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn ids(prefix: &str, n: usize) -> BTreeSet<String> {
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test]
async fn events_are_stored_once_and_acknowledged_only_after_the_commit() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    // One event arrives by HTTP push first: the Stream copy is the same event.
    let pushed = r#"{"EventType":"user_add_org","eventId":"both-1","CorpId":"dingfakecorpid","UserId":["u1"]}"#;
    support::assert_success_reply(app.post_event(pushed).await).await;
    fake.stream_push_events(vec![StreamEvent::new(
        "user_add_org",
        "both-1",
        json!({"UserId": ["u1"]}),
    )])
    .unwrap();
    let n = 300;
    fake.stream_push_events(events("a", n)).unwrap();
    let expected = ids("a", n);
    // Sampled while it streams: whatever the fake saw acknowledged is already stored.
    let start = Instant::now();
    loop {
        let acked = fake.stream_acked_event_ids();
        for id in acked.iter().take(50) {
            let row = app
                .store
                .find_by_dedup_key(&format!("event:{id}"))
                .await
                .unwrap();
            assert!(row.is_some(), "{id} acknowledged before it was stored");
        }
        if expected.is_subset(&acked) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not all acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_stored(&app.store, &expected).await;
    let row = app
        .store
        .find_by_dedup_key("event:a-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.source, "stream");
    assert_eq!(row.event_type, "user_add_org");
    assert_eq!(row.corp_id.as_deref(), Some("dingfakecorpid"));
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload["UserId"], json!(["u1"]));
    assert_eq!(payload["eventId"], "a-1");
    let both = app
        .store
        .find_by_dedup_key("event:both-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(both.source, "push", "stored once, by the first to come");
    assert_eq!(app.store.count().await.unwrap(), n as u64 + 1);

    // Duplicate deliveries of acknowledged events: acknowledged again, not stored again.
    let again: Vec<String> = expected.iter().take(20).cloned().collect();
    assert!(fake.stream_duplicate(&again).is_empty());
    wait_for("duplicates acknowledged", Duration::from_secs(10), || {
        fake.stream_report()
            .acks
            .get("SUCCESS")
            .copied()
            .unwrap_or(0)
            >= n as u64 + 1 + 20
    })
    .await;
    assert_eq!(app.store.count().await.unwrap(), n as u64 + 1);
    let report = fake.stream_report();
    assert_eq!(report.bad_ack_count, 0, "{:?}", report.bad_acks);
    assert_eq!(report.acks.get("LATER"), None);
    let subscriptions: Vec<(String, String)> = report.connections[0]
        .subscriptions
        .iter()
        .map(|s| (s.kind.clone(), s.topic.clone()))
        .collect();
    assert!(subscriptions.contains(&("EVENT".into(), "*".into())));
    assert!(subscriptions.contains(&("CALLBACK".into(), "/v1.0/im/bot/messages/get".into())));
    assert!(report.connections[0]
        .ua
        .as_deref()
        .is_some_and(|ua| ua.starts_with("dinghook/")));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("dinghook_stream_connected{app=\"default\"} 1"),
        "{metrics}"
    );
    let redeliveries = metric(
        &metrics,
        "dinghook_stream_redeliveries_total{app=\"default\"}",
    );
    assert!(redeliveries >= 21.0, "{redeliveries}");
    assert!(metrics.contains("dinghook_stream_acks_total{app=\"default\",status=\"SUCCESS\"}"));
    assert!(metrics.contains("dinghook_stream_ack_duration_seconds_count{app=\"default\"}"));
    assert!(!metrics.contains(APP_SECRET));
    app.stop().await;
    // A clean stop closes the socket.
    wait_for("connection closed", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 0
    })
    .await;
}

#[tokio::test]
async fn a_failing_store_gets_later_and_everything_arrives_after_it_recovers() {
    let (fake, url) = fake().await;
    let (app, counting) = app_on(&url, |_| {}).await;
    counting.set_fail_inserts(true);
    fake.stream_push_events(events("out", 40)).unwrap();
    wait_for("LATER answers", Duration::from_secs(10), || {
        fake.stream_report().acks.get("LATER").copied().unwrap_or(0) >= 40
    })
    .await;
    assert!(
        fake.stream_acked_event_ids().is_empty(),
        "SUCCESS for an event that was not stored"
    );
    counting.set_fail_inserts(false);
    let expected = ids("out", 40);
    wait_for(
        "all acknowledged after recovery",
        Duration::from_secs(15),
        || expected.is_subset(&fake.stream_acked_event_ids()),
    )
    .await;
    assert_stored(&app.store, &expected).await;
    assert_eq!(app.store.count().await.unwrap(), 40);
    app.stop().await;
}

#[tokio::test]
async fn pings_are_echoed_and_unknown_system_frames_acknowledged() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    wait_for("connected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    assert_eq!(fake.stream_ping(None).len(), 1);
    fake.stream_system(None, "brand_new_topic", &json!({"x": 1}));
    wait_for("ping echoed", Duration::from_secs(5), || {
        let r = fake.stream_report();
        r.pings_echoed == 1 && r.system_acks.get("brand_new_topic") == Some(&1)
    })
    .await;
    assert_eq!(fake.stream_report().bad_ack_count, 0);
    app.stop().await;
}

#[tokio::test]
async fn disconnect_opens_the_next_connection_first_and_loses_nothing() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    let n = 600;
    fake.stream_push_events(events("d", n)).unwrap();
    for round in 1..=2 {
        wait_for("some acknowledged", Duration::from_secs(10), || {
            fake.stream_acked_event_ids().len() >= 100 * round
        })
        .await;
        fake.stream_disconnect(None, "load balancing", Some(Duration::from_millis(800)));
        // A new connection before the old one closes.
        wait_for("next connection", Duration::from_secs(5), || {
            fake.stream_report().connections.len() > round
        })
        .await;
    }
    let expected = ids("d", n);
    wait_for("all acknowledged", Duration::from_secs(20), || {
        expected.is_subset(&fake.stream_acked_event_ids())
    })
    .await;
    assert_stored(&app.store, &expected).await;
    assert_eq!(app.store.count().await.unwrap(), n as u64);
    wait_for("old connections closed", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let report = fake.stream_report();
    for pair in report.connections.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let closed = old.closed_at_ms.expect("old connection closed");
        assert!(
            new.opened_at_ms < closed,
            "no gap: connection {} opened at {} after {} closed at {closed}",
            new.id,
            new.opened_at_ms,
            old.id
        );
    }
    assert_eq!(report.bad_ack_count, 0, "{:?}", report.bad_acks);
    let metrics = app.metrics().await;
    assert!(
        metrics
            .contains("dinghook_stream_reconnects_total{app=\"default\",reason=\"disconnect\"} 2"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn abrupt_drops_lose_nothing_and_store_nothing_twice() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    // Batches pushed while the connection is dropped every 200 ms.
    let (batches, size) = (10, 150);
    let n = batches * size;
    let mut drops = 0;
    for batch in 0..batches {
        let list = events(&format!("x{batch}"), size);
        fake.stream_push_events(list).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drops += fake.stream_drop(None).len();
    }
    let expected: BTreeSet<String> = (0..batches)
        .flat_map(|b| ids(&format!("x{b}"), size))
        .collect();
    wait_for("all acknowledged", Duration::from_secs(30), || {
        expected.is_subset(&fake.stream_acked_event_ids())
    })
    .await;
    assert_stored(&app.store, &expected).await;
    assert_eq!(app.store.count().await.unwrap(), n as u64);
    let report = fake.stream_report();
    assert!(drops >= 6, "only {drops} drops happened");
    assert!(
        report.connections.len() > drops,
        "{:?}",
        report.connections.len()
    );
    // Each reconnection within the back-off cap (400 ms) plus connect time.
    for pair in report.connections.windows(2) {
        if let Some(closed) = pair[0].closed_at_ms {
            let gap = pair[1].opened_at_ms - closed;
            assert!(gap < 1_000.0, "reconnected {gap} ms after a drop");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_replaced_by_the_watchdog() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |c| {
        c.stream.watchdog = Duration::from_millis(800);
        c.stream.ping_interval = Duration::from_millis(200);
    })
    .await;
    wait_for("connected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let silenced = Instant::now();
    fake.stream_silence(None, true, None);
    wait_for("a second connection", Duration::from_secs(5), || {
        fake.stream_report().connections.len() >= 2
    })
    .await;
    assert!(silenced.elapsed() >= Duration::from_millis(700));
    fake.stream_push_events(events("w", 20)).unwrap();
    let expected = ids("w", 20);
    wait_for("events after the watchdog", Duration::from_secs(10), || {
        expected.is_subset(&fake.stream_acked_event_ids())
    })
    .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("dinghook_stream_reconnects_total{app=\"default\",reason=\"watchdog\"}"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn refused_credentials_back_off_instead_of_looping() {
    let (fake, url) = fake().await;
    fake.set_credentials(APP_KEY, "another-secret");
    let (app, _) = app_on(&url, |c| {
        c.stream.backoff_base = Duration::from_millis(200);
        c.stream.backoff_max = Duration::from_secs(5);
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let refused = fake.stream_report().opens_refused;
    // Opens at about 0, 0.2, 0.6, 1.4 s (jitter shortens each delay by up to 20 %).
    assert!((3..=6).contains(&refused), "{refused} opens in 2.5 s");
    let metrics = app.metrics().await;
    assert!(
        metrics
            .contains("dinghook_stream_reconnects_total{app=\"default\",reason=\"auth_failed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("dinghook_stream_connected{app=\"default\"} 0"));
    // Credentials fixed on DingTalk's side: the next attempt connects.
    fake.set_credentials(APP_KEY, APP_SECRET);
    wait_for("connected after the fix", Duration::from_secs(8), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    app.stop().await;
}

/// `GET path` on `url`: the status and the JSON body.
async fn readyz(client: &reqwest::Client, url: String) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.expect("readyz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("readyz JSON"))
}

#[tokio::test]
async fn readyz_reports_each_stream_connection_without_failing_on_it() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |c| {
        c.stream.backoff_base = Duration::from_millis(100);
        c.stream.backoff_max = Duration::from_millis(300);
    })
    .await;
    let public = app.url("/readyz");
    let ops = app.ops_url("/readyz");
    wait_for("connected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let start = now_millis();
    let (status, body) = readyz(&app.client, public.clone()).await;
    assert_eq!(status, 200, "{body}");
    let default = &body["stream"]["default"];
    assert_eq!(default["state"], "connected", "{body}");
    assert!(
        default["connected_since"]
            .as_i64()
            .is_some_and(|t| t <= start),
        "{body}"
    );
    assert!(default["down_since"].is_null(), "{body}");
    assert!(default.get("down_for_ms").is_none(), "{body}");

    // DingTalk refuses the credentials and drops the connection: down, backing off, and
    // still ready (HTTP pushes are stored all the same).
    fake.set_credentials(APP_KEY, "rotated-elsewhere");
    let dropped_at = now_millis();
    fake.stream_drop(None);
    let mut body = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(5);
    while body["stream"]["default"]["last_close_reason"] != "auth_failed" {
        assert!(Instant::now() < deadline, "no auth_failed in {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, read) = readyz(&app.client, public.clone()).await;
        assert_eq!(
            status, 200,
            "a Stream outage made the replica unready: {read}"
        );
        body = read;
    }
    let default = &body["stream"]["default"];
    assert!(
        ["backoff", "connecting"].contains(&default["state"].as_str().unwrap_or_default()),
        "{body}"
    );
    let down_since = default["down_since"].as_i64().expect("down since");
    assert!(
        down_since >= dropped_at && down_since <= now_millis(),
        "{body}"
    );
    assert!(
        default["down_for_ms"].as_i64().is_some_and(|ms| ms >= 0),
        "{body}"
    );
    assert!(default["connected_since"].is_null(), "{body}");
    assert!(
        default["since"].as_i64().is_some_and(|t| t >= down_since),
        "{body}"
    );
    // The public port names the reason, not the detail; the operator port has both.
    assert!(default.get("last_close_detail").is_none(), "{body}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, detailed) = readyz(&app.client, ops.clone()).await;
    assert_eq!(status, 200, "{detailed}");
    let detail = detailed["stream"]["default"]["last_close_detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains("credentials"), "{detailed}");
    assert_eq!(
        detailed["stream"]["default"]["down_since"].as_i64(),
        Some(down_since),
        "retries do not move the outage's start: {detailed}"
    );
    support::assert_no_secrets(&detailed.to_string(), &[APP_SECRET]);
    support::assert_no_secrets(&body.to_string(), &[APP_SECRET]);

    // Fixed: connected again, no longer down.
    fake.set_credentials(APP_KEY, APP_SECRET);
    wait_for("reconnected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, body) = readyz(&app.client, public.clone()).await;
        assert_eq!(status, 200, "{body}");
        let default = &body["stream"]["default"];
        if default["state"] == "connected" {
            assert!(default["down_since"].is_null(), "{body}");
            assert!(
                default["connected_since"]
                    .as_i64()
                    .is_some_and(|t| t >= down_since),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_frames_are_counted_answered_and_survived() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |c| c.stream.max_frame = 64 * 1024).await;
    wait_for("connected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let huge = json!({"specVersion": "1.0", "type": "EVENT",
        "headers": {"messageId": "huge-1", "topic": "*", "eventType": "x", "eventId": "huge"},
        "data": "x".repeat(200 * 1024)})
    .to_string();
    for raw in [
        "not json at all",
        "[1,2,3]",
        r#"{"type":"EVENT"}"#,
        r#"{"type":"EVENT","headers":{"topic":"*"}}"#,
        r#"{"type":"MYSTERY","headers":{"messageId":"mystery-1"}}"#,
        huge.as_str(),
    ] {
        fake.stream_send_raw(None, raw);
    }
    // data that is not a JSON object: stored, raw data kept.
    let mut not_json = StreamEvent::new("user_add_org", "bad-data-1", json!(null));
    not_json.raw_data = Some("this is not json".into());
    let mut list = StreamEvent::new("user_add_org", "bad-data-2", json!(null));
    list.raw_data = Some("[1,2]".into());
    let mut no_type = StreamEvent::new("user_add_org", "no-type-1", json!({}));
    no_type
        .headers
        .insert("eventType".into(), serde_json::Value::Null);
    fake.stream_push_events(vec![not_json, list, no_type])
        .unwrap();
    fake.stream_push_events(events("ok", 10)).unwrap();
    let mut expected = ids("ok", 10);
    expected.extend(["bad-data-1", "bad-data-2", "no-type-1"].map(String::from));
    wait_for(
        "good events after bad frames",
        Duration::from_secs(10),
        || expected.is_subset(&fake.stream_acked_event_ids()),
    )
    .await;
    assert_stored(&app.store, &expected).await;
    let row = app
        .store
        .find_by_dedup_key("event:bad-data-1")
        .await
        .unwrap()
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload["streamData"], "this is not json");
    let row = app
        .store
        .find_by_dedup_key("event:no-type-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.event_type, "unknown");
    assert_eq!(app.store.count().await.unwrap(), 13);
    // Never a crash or a reconnect.
    let report = fake.stream_report();
    assert_eq!(
        report.connections.len(),
        1,
        "bad frames cost the connection"
    );
    let metrics = app.metrics().await;
    for reason in [
        "not_json",
        "not_object",
        "no_headers",
        "no_message_id",
        "unknown_type",
        "too_large",
        "bad_data",
    ] {
        assert!(
            metrics.contains(&format!(
                "dinghook_stream_bad_frames_total{{app=\"default\",reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn robot_messages_are_stored_once_as_robot_message() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    let message = json!({"msgId": "msg-robot-1", "text": {"content": " ack"}, "senderNick": "Ann"});
    fake.stream_push_robot(vec![message.clone(), message])
        .unwrap();
    wait_for("robot messages answered", Duration::from_secs(10), || {
        fake.stream_report()
            .acks
            .get("CALLBACK")
            .copied()
            .unwrap_or(0)
            >= 2
    })
    .await;
    let row = app
        .store
        .find_by_dedup_key("robot:msg-robot-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.event_type, "robot_message");
    assert_eq!(row.source, "stream");
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload["text"]["content"], " ack");
    assert_eq!(app.store.count().await.unwrap(), 1);
    app.stop().await;
}

#[tokio::test]
async fn sigkill_while_streaming_loses_nothing_acknowledged_and_stores_nothing_twice() {
    let (fake, url) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let env = [
        ("DINGHOOK_STREAM", "on"),
        ("DINGHOOK_APP_KEY", APP_KEY),
        ("DINGHOOK_APP_SECRET", APP_SECRET),
        ("DINGHOOK_DINGTALK_API_URL", url.as_str()),
        ("DINGHOOK_DINGTALK_OAPI_URL", url.as_str()),
        ("DINGHOOK_RECOVERY", "off"),
        ("DINGHOOK_DISPATCH", "off"),
        ("DINGHOOK_STREAM_BACKOFF_BASE", "50ms"),
        ("DINGHOOK_STREAM_BACKOFF_MAX", "500ms"),
    ];
    let n = 50_000;
    let mut server = support::ServerProcess::start(&db, support::free_port(), &env).await;
    fake.stream_push_events(events("k", n)).unwrap();
    let started = Instant::now();
    // Polled by count: copying 50 000 ids every few ms would hold the fake's lock.
    wait_for("some acknowledged", Duration::from_secs(30), || {
        fake.stream_acked_event_count() >= 10_000
    })
    .await;
    server.kill().await;
    let acked = fake.stream_acked_event_ids();
    assert!(
        acked.len() < n,
        "everything was acknowledged before the kill"
    );
    {
        let store = support::stores::open_url(&format!("sqlite://{}", db.display())).await;
        assert_stored(&store, &acked).await;
        store.close().await;
    }
    let mut server = support::ServerProcess::start(&db, support::free_port(), &env).await;
    let expected = ids("k", n);
    wait_for(
        "the rest after the restart",
        Duration::from_secs(60),
        || fake.stream_acked_event_count() >= n,
    )
    .await;
    assert!(expected.is_subset(&fake.stream_acked_event_ids()));
    eprintln!(
        "sigkill: {} of {n} acknowledged before the kill; all {n} acknowledged {:?} after the first start",
        acked.len(),
        started.elapsed()
    );
    assert!(server.terminate().await.success());
    let store = support::stores::open_url(&format!("sqlite://{}", db.display())).await;
    assert_stored(&store, &expected).await;
    assert_eq!(
        store.count().await.unwrap(),
        n as u64,
        "stored twice or extra"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    support::assert_no_secrets(&log, &[APP_SECRET]);
    store.close().await;
}

#[tokio::test]
async fn two_replicas_on_postgres_store_each_event_once() {
    let Some(pg) = support::stores::fresh_postgres_database().await else {
        return;
    };
    let (fake, url) = fake().await;
    let mut settings = fake.stream_settings();
    settings.duplicate_every = 3;
    fake.set_stream_settings(StreamSettings { ..settings });
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let pg = pg.clone();
        let url = url.clone();
        replicas.push(
            TestApp::spawn_with(move |config| {
                stream_config(config, &url);
                config.store.url = pg;
            })
            .await,
        );
    }
    wait_for("two connections", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 2
    })
    .await;
    let n = 600;
    fake.stream_push_events(events("r", n)).unwrap();
    let expected = ids("r", n);
    wait_for("all acknowledged", Duration::from_secs(20), || {
        expected.is_subset(&fake.stream_acked_event_ids())
    })
    .await;
    wait_for("duplicates delivered", Duration::from_secs(10), || {
        fake.stream_report().queued == 0 && fake.stream_report().in_flight == 0
    })
    .await;
    let report = fake.stream_report();
    assert!(report.duplicates_sent > 0);
    let per_connection: Vec<u64> = report.connections.iter().map(|c| c.frames_sent).collect();
    assert!(per_connection.iter().all(|f| *f > 0), "{per_connection:?}");
    let store = &replicas[0].store;
    assert_stored(store, &expected).await;
    assert_eq!(store.count().await.unwrap(), n as u64);
    for replica in replicas {
        replica.stop().await;
    }
}

/// PostgreSQL really stopped (`pg_ctl stop -m immediate`, a private server of the test's own)
/// while events stream in, then started again: while it is down nothing more is acknowledged
/// `SUCCESS` (the frames get `LATER`), and after it is back the same process, without a
/// restart, stores every event exactly once, every acknowledged one included.
#[tokio::test]
async fn postgres_going_away_mid_stream_loses_nothing_and_stores_each_event_once() {
    const TEST: &str = "postgres_going_away_mid_stream";
    if std::env::var_os("DINGHOOK_TEST_PG_URL").is_none() {
        eprintln!("SKIPPED {TEST}: DINGHOOK_TEST_PG_URL is not set (PostgreSQL tests are off)");
        return;
    }
    let mut pg = match support::private_pg::PrivatePostgres::start() {
        Ok(pg) => pg,
        Err(reason) => {
            eprintln!("SKIPPED {TEST}: no private PostgreSQL server: {reason}");
            return;
        }
    };
    let (fake, url) = fake().await;
    let store_url = pg.url();
    let app = TestApp::spawn_with(move |config| {
        stream_config(config, &url);
        config.store.url = store_url;
    })
    .await;
    let before = 200;
    fake.stream_push_events(events("pg-before", before))
        .unwrap();
    wait_for("the first events", Duration::from_secs(20), || {
        fake.stream_acked_event_count() >= before
    })
    .await;
    let during = 3_000;
    fake.stream_push_events(events("pg-during", during))
        .unwrap();
    wait_for("streaming", Duration::from_secs(20), || {
        fake.stream_acked_event_count() >= before + 300
    })
    .await;

    pg.stop().expect("stop PostgreSQL");
    let stopped = Instant::now();
    let later_at_stop = fake.stream_report().acks.get("LATER").copied().unwrap_or(0);
    // Commits under way when it stopped may still be answered; then nothing more is.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_while_down = fake.stream_acked_event_ids();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = fake.stream_report();
    assert_eq!(
        report.acked_event_ids.len(),
        acked_while_down.len(),
        "SUCCESS while PostgreSQL was down"
    );
    let later = report.acks.get("LATER").copied().unwrap_or(0);
    assert!(
        later > later_at_stop,
        "no LATER while PostgreSQL was down ({later_at_stop} before, {later} after)"
    );
    // Though the fake delivers again after 100 ms, a frame's LATER waits 250 ms: at most
    // `stream.concurrency` (64) store attempts per 250 ms, not thousands a second.
    let bound = 64 * (stopped.elapsed().as_millis() as u64 / 250 + 2);
    assert!(
        later - later_at_stop <= bound,
        "{} LATER in {:?}: more than {bound}",
        later - later_at_stop,
        stopped.elapsed()
    );
    assert!(
        acked_while_down.len() < before + during,
        "everything was acknowledged before the stop"
    );
    eprintln!(
        "{TEST}: {} acknowledged when PostgreSQL stopped, {} LATER while down",
        acked_while_down.len(),
        later - later_at_stop
    );

    pg.start_again().expect("start PostgreSQL again");
    let back = Instant::now();
    wait_for(
        "everything after the restart",
        Duration::from_secs(60),
        || fake.stream_acked_event_count() >= before + during,
    )
    .await;
    eprintln!(
        "{TEST}: all acknowledged {:?} after PostgreSQL was back",
        back.elapsed()
    );
    let mut expected = ids("pg-before", before);
    expected.extend(ids("pg-during", during));
    assert!(acked_while_down.is_subset(&expected));
    assert_stored(&app.store, &expected).await;
    assert_eq!(
        app.store.count().await.unwrap(),
        (before + during) as u64,
        "stored twice or extra"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_reload_turns_an_apps_stream_off_and_on() {
    let (fake, url) = fake().await;
    let (app, _) = app_on(&url, |_| {}).await;
    wait_for("connected", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 1
    })
    .await;
    let dir = app.db_path.parent().expect("db dir").to_owned();
    let mut config = support::test_config(&dir);
    stream_config(&mut config, &url);
    config.stream.enabled = false;
    let done = app.reloader.apply(config.clone()).await.expect("reload");
    assert_eq!(done.changed, ["default"]);
    wait_for("closed by the reload", Duration::from_secs(5), || {
        fake.stream_report().open_connections == 0
    })
    .await;
    // Unchanged settings keep the connection; changed ones replace it.
    config.stream.enabled = true;
    app.reloader.apply(config.clone()).await.expect("reload");
    wait_for("reconnected by the reload", Duration::from_secs(5), || {
        let r = fake.stream_report();
        r.open_connections == 1 && r.connections.len() == 2
    })
    .await;
    app.reloader.apply(config).await.expect("reload");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fake.stream_report().connections.len(),
        2,
        "an unchanged app reconnected"
    );
    fake.stream_push_events(events("after", 5)).unwrap();
    let expected = ids("after", 5);
    wait_for("events after the reloads", Duration::from_secs(5), || {
        expected.is_subset(&fake.stream_acked_event_ids())
    })
    .await;
    app.stop().await;
}
