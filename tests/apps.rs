//! Several DingTalk apps in one deployment, over real HTTP, each with its own keys and its own
//! fake DingTalk (so every DingTalk call can be told apart by where it arrived), on SQLite and
//! on PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use dinghook::crypto::{random_nonce, CallbackCipher};
use dinghook::handler::{Registrations, RegistryBuilder};
use dinghook::store::{EventState, ListQuery};
use dinghook::time::now_millis;
use fake_dingtalk::FakeDingTalk;
use serde_json::json;

use support::{assert_error, stores, wait_until, TestApp};

const OPS_TOKEN: &str = "ops-token-4d3c2b";
const OPS_AES_KEY: &str = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut";
const OPS_OWNER: &str = "dingopsapp";
const OPS_PATH: &str = "/dingtalk/callback/ops";

fn install(event_id: &str, ocid: &str) -> String {
    json!({
        "EventType": "im_cool_app_install", "EventTime": 1663143335567_i64, "CorpId": "dingcorp",
        "eventId": event_id, "coolAppCode": "COOLAPP-1-1018", "robotCode": "rBLBXuia",
        "openConversationId": ocid, "openConversationCorpId": "dingcorp",
        "operator": "0213454", "operateTime": "1641866135051"
    })
    .to_string()
}

/// The `[apps.ops]` table: its keys, plus `extra` TOML lines (credentials, URLs, sub-tables).
fn ops_table(extra: &str) -> BTreeMap<String, figment::value::Value> {
    toml::from_str(&format!(
        "[ops]\ntoken = \"{OPS_TOKEN}\"\naes_key = \"{OPS_AES_KEY}\"\nowner_key = \"{OPS_OWNER}\"\n{extra}"
    ))
    .unwrap()
}

fn ops_cipher() -> CallbackCipher {
    CallbackCipher::from_strings(OPS_TOKEN, OPS_AES_KEY, &[], OPS_OWNER).unwrap()
}

/// The default app (the top-level keys, on fake A) and `[apps.ops]` (its own keys and
/// credentials, on fake B), on the store at `store_url` (`None`: the test's SQLite file).
async fn two_apps(store_url: Option<String>) -> (TestApp, FakeDingTalk, FakeDingTalk) {
    let (fake_a, url_a) = FakeDingTalk::spawn().await.unwrap();
    let (fake_b, url_b) = FakeDingTalk::spawn().await.unwrap();
    for fake in [&fake_a, &fake_b] {
        fake.add_group(
            json!({"openConversationId": "cid1", "title": "团队", "coolAppCode": "COOLAPP-1-1018"}),
        );
    }
    let ops = ops_table(&format!(
        r#"
app_key = "dingopsapp"
app_secret = "ops-secret"
agent_id = 777
oapi_url = "{url_b}"
api_url = "{url_b}"
"#
    ));
    let app = TestApp::spawn_builtin_on(
        &url_a,
        move |config| {
            if let Some(url) = store_url {
                config.store.url = url;
            }
            config.apps = ops;
        },
        |store| store,
    )
    .await;
    (app, fake_a, fake_b)
}

async fn post_ops(app: &TestApp, cipher: &CallbackCipher, msg: &str) -> reqwest::Response {
    let sealed = cipher
        .seal(msg.as_bytes(), &now_millis().to_string(), &random_nonce())
        .unwrap();
    app.client
        .post(format!("{}?{}", app.url(OPS_PATH), sealed.query()))
        .body(sealed.body())
        .send()
        .await
        .unwrap()
}

async fn two_apps_side_by_side(store_url: Option<String>) {
    let (app, fake_a, fake_b) = two_apps(store_url).await;

    // The same eventId reaches both apps: two events, one per app.
    let reply = app.post_event(&install("inst-1", "cid1")).await;
    assert_eq!(reply.status(), 200);
    let reply = post_ops(&app, &ops_cipher(), &install("inst-1", "cid1")).await;
    assert_eq!(reply.status(), 200, "{}", reply.text().await.unwrap());
    // Delivered again to ops: still one.
    let reply = post_ops(&app, &ops_cipher(), &install("inst-1", "cid1")).await;
    assert_eq!(reply.status(), 200);

    let default_event = app.wait_for_state("event:inst-1", EventState::Done).await;
    let ops_event = app
        .wait_for_state("@ops/event:inst-1", EventState::Done)
        .await;
    assert_eq!(default_event.app, "default");
    assert_eq!(ops_event.app, "ops");
    assert_ne!(default_event.id, ops_event.id);

    // Each app's welcome went to its own DingTalk, with its own credentials.
    wait_until("both welcomes", || {
        fake_a.robot_messages().len() == 1 && fake_b.robot_messages().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake_a.robot_messages().len(), 1);
    assert_eq!(fake_b.robot_messages().len(), 1);

    // Each app's group document is its own.
    assert!(app
        .store
        .get_document("group", "cid1")
        .await
        .unwrap()
        .is_some());
    assert!(app
        .store
        .get_document("@ops/group", "cid1")
        .await
        .unwrap()
        .is_some());

    // One app's signature at another's path is a bad signature; an unknown path is a 404.
    let sealed = support::seal(&support::sender(), &install("inst-2", "cid1"));
    let wrong = app
        .client
        .post(format!("{}?{}", app.url(OPS_PATH), sealed.query()))
        .body(sealed.body())
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, "signature_mismatch").await;
    let nowhere = app
        .client
        .post(format!(
            "{}?{}",
            app.url("/dingtalk/callback/nope"),
            sealed.query()
        ))
        .body(sealed.body())
        .send()
        .await
        .unwrap();
    assert_error(nowhere, 404, "not_found").await;

    // Metrics carry the app.
    let metrics = app.metrics().await;
    for line in [
        r#"dinghook_events_received_total{app="ops",event_type="im_cool_app_install",outcome="stored"} 1"#,
        r#"dinghook_events_received_total{app="ops",event_type="im_cool_app_install",outcome="duplicate"} 1"#,
        r#"dinghook_events_received_total{app="default",event_type="im_cool_app_install",outcome="stored"} 1"#,
        r#"dinghook_callbacks_rejected_total{app="ops",reason="signature_mismatch"} 1"#,
        r#"dinghook_handler_runs_total{app="ops",event_type="im_cool_app_install",outcome="done"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // Listing by app.
    let only_ops = app
        .store
        .list(&ListQuery {
            app: Some("ops".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_ops.len(), 1, "{only_ops:?}");
    assert_eq!(only_ops[0].id, ops_event.id);
    app.stop().await;
}

#[tokio::test]
async fn two_apps_side_by_side_on_sqlite() {
    two_apps_side_by_side(None).await;
}

#[tokio::test]
async fn two_apps_side_by_side_on_postgres() {
    let Some(url) = stores::fresh_postgres_database().await else {
        return;
    };
    two_apps_side_by_side(Some(url)).await;
}

/// A program's own handler runs for every app's events; the built-in ones only for their
/// app's, with that app's options.
#[tokio::test]
async fn program_handlers_see_every_app_and_builtins_their_own() {
    let (fake_b, url_b) = FakeDingTalk::spawn().await.unwrap();
    fake_b.add_group(
        json!({"openConversationId": "cid1", "title": "团队", "coolAppCode": "COOLAPP-1-1018"}),
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = std::sync::Arc::clone(&seen);
    let ops = ops_table(&format!(
        r#"
app_key = "dingopsapp"
app_secret = "ops-secret"
oapi_url = "{url_b}"
api_url = "{url_b}"
[ops.handlers]
enabled = true
"#
    ));
    let app = TestApp::spawn_on(
        move |config| {
            // The default app has no built-in handlers; ops has them.
            config.handlers.enabled = false;
            config.apps = ops;
            RegistryBuilder::new().named("audit").on(
                "im_cool_app_install",
                move |_event, ctx: dinghook::handler::Context| {
                    let recorded = std::sync::Arc::clone(&recorded);
                    async move {
                        recorded.lock().unwrap().push(ctx.record.app.clone());
                        Ok(())
                    }
                },
            )
        },
        |store| store,
    )
    .await;
    assert_eq!(app.post_event(&install("a-1", "cid1")).await.status(), 200);
    assert_eq!(
        post_ops(&app, &ops_cipher(), &install("b-1", "cid1"))
            .await
            .status(),
        200
    );
    let default_done = app.wait_for_state("event:a-1", EventState::Done).await;
    let ops_done = app.wait_for_state("@ops/event:b-1", EventState::Done).await;
    assert_eq!(default_done.handled, Vec::<String>::new());
    assert!(ops_done.handled.is_empty(), "cleared when done");
    let mut apps = seen.lock().unwrap().clone();
    apps.sort();
    assert_eq!(apps, ["default", "ops"]);
    wait_until("the ops welcome", || fake_b.robot_messages().len() == 1).await;
    app.stop().await;
}

/// A backlog of one app does not hold back another's events: with 5 000 slow events of
/// `default` waiting, an event of `ops` is handled within a second or two, while most of the
/// backlog still waits.
async fn a_backlog_of_one_app_does_not_delay_another(store_url: Option<String>) {
    let ops = ops_table("");
    let app = TestApp::spawn_on(
        move |config| {
            if let Some(url) = store_url {
                config.store.url = url;
            }
            config.handlers.enabled = false;
            config.apps = ops;
            RegistryBuilder::new()
                .on("backlog", |_, _| async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(())
                })
                .on("chat_update_title", |_, _| async { Ok(()) })
        },
        |store| store,
    )
    .await;
    let inserts = (0..5_000).map(|i| {
        let store = std::sync::Arc::clone(&app.store);
        async move {
            store
                .insert(dinghook::store::NewEvent {
                    app: "default".into(),
                    dedup_key: format!("backlog-{i}"),
                    event_type: "backlog".into(),
                    corp_id: None,
                    payload: r#"{"EventType":"backlog"}"#.into(),
                    source: dinghook::store::Source::Push,
                    received_at: now_millis(),
                    routes: Vec::new(),
                })
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(inserts).await;
    // Let the workers sink their teeth into the backlog.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = std::time::Instant::now();
    let msg =
        json!({"EventType": "chat_update_title", "eventId": "ops-1", "chatId": "c", "title": "t"})
            .to_string();
    let reply = post_ops(&app, &ops_cipher(), &msg).await;
    let status = reply.status();
    assert_eq!(status, 200, "{}", reply.text().await.unwrap_or_default());
    app.wait_for_state("@ops/event:ops-1", EventState::Done)
        .await;
    let took = started.elapsed();
    let waiting = app
        .store
        .list(&ListQuery {
            app: Some("default".into()),
            state: Some(EventState::Pending),
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    eprintln!("ops event handled in {took:?} with {waiting} default events still pending");
    assert!(
        waiting > 2_000,
        "the backlog was not a backlog: {waiting} left"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_backlog_of_one_app_does_not_delay_another_on_sqlite() {
    a_backlog_of_one_app_does_not_delay_another(None).await;
}

#[tokio::test]
async fn a_backlog_of_one_app_does_not_delay_another_on_postgres() {
    let Some(url) = stores::fresh_postgres_database().await else {
        return;
    };
    a_backlog_of_one_app_does_not_delay_another(Some(url)).await;
}

/// One app's runs hanging (its DingTalk not answering, here a handler that takes 5 s) hold at
/// most half of each worker: another app's event is handled at once, not after them.
#[tokio::test]
async fn one_apps_hanging_runs_do_not_hold_up_another() {
    let ops = ops_table("");
    let app = TestApp::spawn_on(
        move |config| {
            config.handlers.enabled = false;
            config.apps = ops;
            RegistryBuilder::new()
                .on("hangs", |_, _| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                })
                .on("chat_update_title", |_, _| async { Ok(()) })
        },
        |store| store,
    )
    .await;
    // More hanging events than all workers can hold at once (4 x 16).
    for i in 0..200 {
        let msg = json!({"EventType": "hangs", "eventId": format!("h-{i}")}).to_string();
        assert_eq!(app.post_event(&msg).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let msg =
        json!({"EventType": "chat_update_title", "eventId": "ops-2", "chatId": "c", "title": "t"})
            .to_string();
    assert_eq!(post_ops(&app, &ops_cipher(), &msg).await.status(), 200);
    app.wait_for_state("@ops/event:ops-2", EventState::Done)
        .await;
    let took = started.elapsed();
    let running = app
        .store
        .list(&ListQuery {
            app: Some("default".into()),
            state: Some(EventState::Running),
            limit: Some(1_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    eprintln!("ops event handled in {took:?} beside {running} hanging runs of default");
    assert!(
        running >= 4,
        "the default app's runs were not hanging: {running}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    app.stop().await;
}

/// One app's DingTalk in trouble — refusing its credentials, its monthly quota used up, every
/// answer 3 s late — touches only that app: the other's welcome goes out at once.
#[tokio::test]
async fn one_apps_dingtalk_trouble_stays_with_that_app() {
    let (app, fake_a, fake_b) = two_apps(None).await;
    fake_a.set_credentials("someone-else", "another-secret");
    fake_a.set_monthly_quota(Some(0));
    fake_a.set_delay(Some(Duration::from_secs(3)));
    for i in 0..20 {
        let reply = app.post_event(&install(&format!("a-{i}"), "cid1")).await;
        assert_eq!(reply.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_eq!(
        post_ops(&app, &ops_cipher(), &install("b-1", "cid1"))
            .await
            .status(),
        200
    );
    wait_until("the ops welcome", || fake_b.robot_messages().len() == 1).await;
    let took = started.elapsed();
    app.wait_for_state("@ops/event:b-1", EventState::Done).await;
    eprintln!("ops welcome sent in {took:?} while the default app's DingTalk is in trouble");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(fake_a.robot_messages().is_empty());
    let a0 = app
        .store
        .find_by_dedup_key("event:a-0")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(a0.state, EventState::Done, "{a0:?}");
    app.stop().await;
}
