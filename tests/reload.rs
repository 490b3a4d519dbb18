//! Changing the apps of a running server: `dinghook reload`, SIGHUP and the library's
//! `Reloader`, with callbacks arriving all along. Nothing acknowledged is lost, a request under
//! way finishes with the keys it started with, and a configuration with an error changes
//! nothing.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dinghook::crypto::{random_nonce, CallbackCipher};
use dinghook::handler::RegistryBuilder;
use dinghook::store::ListQuery;
use dinghook::time::now_millis;
use fake_dingtalk::FakeDingTalk;
use serde_json::{json, Value};

use support::{deliver, free_port, stores, wait_until, ServerProcess, TestApp};

const KEY_A: &str = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut";
const KEY_B: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
const KEY_C: &str = "qrstuvwxyzABCDEFGHIJKLMNOP0123456789abcdefg";

/// One `[apps.NAME]` table: its token, aes_key and owner key.
struct AppKeys {
    name: &'static str,
    token: &'static str,
    aes_key: &'static str,
}

impl AppKeys {
    fn owner(&self) -> String {
        format!("ding{}", self.name)
    }

    fn cipher(&self) -> CallbackCipher {
        CallbackCipher::from_strings(self.token, self.aes_key, &[], &self.owner()).unwrap()
    }

    fn toml(&self) -> String {
        format!(
            "[apps.{}]\ntoken = \"{}\"\naes_key = \"{}\"\nowner_key = \"{}\"\n",
            self.name,
            self.token,
            self.aes_key,
            self.owner()
        )
    }
}

fn write_config(path: &Path, apps: &[&AppKeys]) {
    let text: String = apps.iter().map(|a| a.toml()).collect();
    std::fs::write(path, text).unwrap();
}

/// Posts `msg` to `path` sealed with `cipher`; the HTTP status.
async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    cipher: &CallbackCipher,
    msg: &str,
) -> u16 {
    let sealed = cipher
        .seal(msg.as_bytes(), &now_millis().to_string(), &random_nonce())
        .unwrap();
    client
        .post(format!("{base}{path}?{}", sealed.query()))
        .body(sealed.body())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn event(id: &str) -> String {
    format!(r#"{{"EventType":"x","eventId":"{id}"}}"#)
}

/// `dinghook reload --config FILE`, finding the server by `ops.listen` from the environment.
fn reload_cli(config: &Path, ops_port: u16) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
        .args(["reload", "--config"])
        .arg(config)
        .env_clear()
        .env("DINGHOOK_OPS_LISTEN", format!("0.0.0.0:{ops_port}"))
        .output()
        .unwrap()
}

/// Delivers distinct events to the default app until told to stop; counts what was
/// acknowledged and what was not.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = tokio::spawn({
            let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
            async move {
                let client = reqwest::Client::new();
                let mut i = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    if deliver(&client, &url, &event(&format!("load-{i}"))).await {
                        acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Load {
            stop,
            acked,
            failed,
            task,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.acked.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn wait_for_status(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    cipher: &CallbackCipher,
    want: u16,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let got = post(
            client,
            base,
            path,
            cipher,
            &event(&format!("probe-{path}-{n}")),
        )
        .await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still answers {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The eventId of a row of `events list --json` (its dedup key is `event:<eventId>`).
fn event_id(row: &Value) -> Option<String> {
    let key = row["dedup_key"].as_str()?;
    Some(key.strip_prefix("event:").unwrap_or(key).to_owned())
}

fn stored(db: &Path, app: &str) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
        .args([
            "events", "list", "--json", "--limit", "100000", "--app", app,
        ])
        .env_clear()
        .env("DINGHOOK_STORE_URL", format!("sqlite://{}", db.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn apps_are_added_changed_and_removed_while_callbacks_keep_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().join("data").join("dinghook.db");
    let config = dir.path().join("dinghook.toml");
    let a = AppKeys {
        name: "a",
        token: "token-a",
        aes_key: KEY_A,
    };
    let a_rotated = AppKeys {
        name: "a",
        token: "token-a-2",
        aes_key: KEY_C,
    };
    let b = AppKeys {
        name: "b",
        token: "token-b",
        aes_key: KEY_B,
    };
    write_config(&config, &[&a]);
    let port = free_port();
    let store_url = format!("sqlite://{}", db.display());
    let mut server = ServerProcess::start_program(
        env!("CARGO_BIN_EXE_dinghook"),
        &["serve", "--config", config.to_str().unwrap()],
        dir.path(),
        port,
        &[("DINGHOOK_STORE_URL", store_url.as_str())],
    )
    .await;
    let base = server.url("");
    let client = reqwest::Client::new();
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/a",
            &a.cipher(),
            &event("a-1")
        )
        .await,
        200
    );
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/b",
            &b.cipher(),
            &event("b-0")
        )
        .await,
        404
    );

    // The default app (the environment's keys) takes callbacks through every reload.
    let load = Load::start(server.url("/dingtalk/callback"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Add b, rotate a's keys: `dinghook reload` answers with what changed.
    write_config(&config, &[&a_rotated, &b]);
    let out = reload_cli(&config, server.ops_port);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["added"], json!(["b"]), "{answer}");
    assert_eq!(answer["changed"], json!(["a"]), "{answer}");
    assert_eq!(answer["removed"], json!([]), "{answer}");
    assert_eq!(answer["unchanged"], 1, "the default app: {answer}");
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/b",
            &b.cipher(),
            &event("b-1")
        )
        .await,
        200
    );
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/a",
            &a_rotated.cipher(),
            &event("a-2")
        )
        .await,
        200
    );
    let old_keys = post(
        &client,
        &base,
        "/dingtalk/callback/a",
        &a.cipher(),
        &event("a-old"),
    )
    .await;
    assert!(
        (400..500).contains(&old_keys),
        "a's replaced keys are refused like any bad signature: {old_keys}"
    );

    // A configuration with an error is refused with its key and reason; b keeps its keys.
    std::fs::write(
        &config,
        format!(
            "{}{}",
            a_rotated.toml(),
            b.toml().replace(KEY_B, &KEY_B[..42])
        ),
    )
    .unwrap();
    let out = reload_cli(&config, server.ops_port);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad configuration must be refused");
    assert!(stderr.contains("apps.b.aes_key"), "names the key: {stderr}");
    assert!(
        !stderr.contains(&KEY_B[..42]),
        "no secret in the error: {stderr}"
    );
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/b",
            &b.cipher(),
            &event("b-2")
        )
        .await,
        200
    );

    // SIGHUP does the same: a is removed, its path answers 404, its events stay.
    write_config(&config, &[&b]);
    let pid = server.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_for_status(
        &client,
        &base,
        "/dingtalk/callback/a",
        &a_rotated.cipher(),
        404,
    )
    .await;
    assert_eq!(
        post(
            &client,
            &base,
            "/dingtalk/callback/b",
            &b.cipher(),
            &event("b-3")
        )
        .await,
        200
    );

    let (acked, failed) = load.finish().await;
    assert!(acked > 10, "the load ran: {acked} acknowledged");
    assert_eq!(
        failed, 0,
        "callbacks failed during the reloads ({acked} acknowledged)"
    );

    let metrics = reqwest::get(server.ops_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "dinghook_config_reloads_total{result=\"ok\"} 2",
        "dinghook_config_reloads_total{result=\"refused\"} 1",
        "dinghook_apps 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("configuration reload refused"), "{log}");
    support::assert_no_secrets(&log, &["token-a-2", KEY_B, KEY_C]);
    assert_eq!(server.terminate().await.code(), Some(0));

    // Every acknowledged event is stored, and the removed app's events are kept.
    let default_ids: std::collections::HashSet<String> = stored(&db, "default")
        .iter()
        .filter_map(event_id)
        .filter(|id| id.starts_with("load-"))
        .collect();
    assert_eq!(
        default_ids.len() as u64,
        acked,
        "acknowledged events stored"
    );
    let a_ids: Vec<String> = stored(&db, "a").iter().filter_map(event_id).collect();
    for id in ["a-1", "a-2"] {
        assert!(
            a_ids.iter().any(|i| i == id),
            "{id} kept after a was removed: {a_ids:?}"
        );
    }
    assert!(!a_ids.iter().any(|i| i == "a-old"));
}

const OPS_TOKEN: &str = "ops-token-reload";
const OPS_OWNER: &str = "dingopsreload";
const OPS_PATH: &str = "/dingtalk/callback/ops";

fn ops_cipher() -> CallbackCipher {
    CallbackCipher::from_strings(OPS_TOKEN, KEY_A, &[], OPS_OWNER).unwrap()
}

fn install(event_id: &str) -> String {
    json!({
        "EventType": "im_cool_app_install", "EventTime": 1663143335567_i64, "CorpId": "dingcorp",
        "eventId": event_id, "coolAppCode": "COOLAPP-1-1018", "robotCode": "rBLBXuia",
        "openConversationId": "cid1", "openConversationCorpId": "dingcorp",
        "operator": "0213454", "operateTime": "1641866135051"
    })
    .to_string()
}

/// A fake DingTalk with the group the install events name.
async fn fake() -> (FakeDingTalk, String) {
    let (fake, url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_group(
        json!({"openConversationId": "cid1", "title": "团队", "coolAppCode": "COOLAPP-1-1018"}),
    );
    (fake, url)
}

/// The test server's configuration: the default app with the built-in handlers on the fake at
/// `default_url`, and, with `ops_url`, `[apps.ops]` on the fake there.
fn configure(config: &mut dinghook::config::Config, default_url: &str, ops_url: Option<&str>) {
    config.dispatch.poll_interval = Duration::from_millis(20);
    config.dispatch.retry_schedule = vec![Duration::from_millis(30); 3];
    config.dispatch.retry_jitter = 0.0;
    config.dingtalk.app_key = "dingtestapp".into();
    config.dingtalk.app_secret = dinghook::secret::Secret::new("test-app-secret");
    config.dingtalk.oapi_url = default_url.into();
    config.dingtalk.api_url = default_url.into();
    config.handlers.enabled = true;
    config.apps = match ops_url {
        None => Default::default(),
        Some(url) => toml::from_str(&format!(
            "[ops]\ntoken = \"{OPS_TOKEN}\"\naes_key = \"{KEY_A}\"\nowner_key = \"{OPS_OWNER}\"\n\
             app_key = \"dingopsapp\"\napp_secret = \"ops-secret\"\noapi_url = \"{url}\"\n\
             api_url = \"{url}\"\n"
        ))
        .unwrap(),
    };
}

/// The configuration `app` runs with, made again (as a reload reads it from the file).
fn config_of(app: &TestApp, default_url: &str, ops_url: Option<&str>) -> dinghook::config::Config {
    let mut config = support::test_config(app.db_path.parent().unwrap());
    configure(&mut config, default_url, ops_url);
    config
}

async fn post_ops(app: &TestApp, msg: &str) -> u16 {
    post(&app.client, &app.url(""), OPS_PATH, &ops_cipher(), msg).await
}

#[tokio::test]
async fn a_reload_gives_an_app_its_new_dingtalk_and_the_workers_follow() {
    use dinghook::store::EventState::Done;
    let (fake_a, url_a) = fake().await;
    let (fake_b, url_b) = fake().await;
    let (fake_c, url_c) = fake().await;
    let setup_url = url_a.clone();
    let app = TestApp::spawn_on(
        move |config| {
            configure(config, &setup_url, None);
            RegistryBuilder::new()
        },
        |store| store,
    )
    .await;

    // One app: the default, on fake A.
    assert_eq!(app.post_event(&install("d-1")).await.status(), 200);
    app.wait_for_state("event:d-1", Done).await;
    assert_eq!(post_ops(&app, &install("o-0")).await, 404);

    // ops added on fake B: the workers now share among two apps.
    let done = app
        .reloader
        .apply(config_of(&app, &url_a, Some(&url_b)))
        .await
        .unwrap();
    assert_eq!(
        (done.added.clone(), done.unchanged),
        (vec!["ops".to_owned()], 1),
        "{done:?}"
    );
    assert!(done.restart_needed.is_empty(), "{done:?}");
    assert_eq!(post_ops(&app, &install("o-1")).await, 200);
    app.wait_for_state("@ops/event:o-1", Done).await;
    assert_eq!(app.post_event(&install("d-2")).await.status(), 200);
    app.wait_for_state("event:d-2", Done).await;
    wait_until("ops's welcome on B", || fake_b.robot_messages().len() == 1).await;
    assert_eq!(
        fake_a.robot_messages().len(),
        2,
        "the default app's two welcomes"
    );

    // ops moves to fake C: its next call goes there with a new client.
    let done = app
        .reloader
        .apply(config_of(&app, &url_a, Some(&url_c)))
        .await
        .unwrap();
    assert_eq!(done.changed, vec!["ops".to_owned()], "{done:?}");
    assert_eq!(post_ops(&app, &install("o-2")).await, 200);
    app.wait_for_state("@ops/event:o-2", Done).await;
    wait_until("ops's welcome on C", || fake_c.robot_messages().len() == 1).await;
    assert_eq!(fake_b.robot_messages().len(), 1, "nothing more on B");

    // A configuration with an error changes nothing.
    let mut bad = config_of(&app, &url_a, Some(&url_b));
    bad.apps.insert("Bad Name".into(), bad.apps["ops"].clone());
    let refused = app.reloader.apply(bad).await.unwrap_err().to_string();
    assert!(refused.contains("Bad Name"), "{refused}");
    assert_eq!(post_ops(&app, &install("o-3")).await, 200);
    app.wait_for_state("@ops/event:o-3", Done).await;
    wait_until("still on C", || fake_c.robot_messages().len() == 2).await;

    // Back to one app: the workers return to whole batches and keep running; ops's client
    // figures leave /metrics with it.
    let ops_quota = r#"dinghook_dingtalk{app="ops",name="monthly_quota"}"#;
    assert!(app.metrics().await.contains(ops_quota));
    let done = app
        .reloader
        .apply(config_of(&app, &url_a, None))
        .await
        .unwrap();
    assert_eq!(done.removed, vec!["ops".to_owned()], "{done:?}");
    assert_eq!(post_ops(&app, &install("o-4")).await, 404);
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the scrape cache
    let metrics = app.metrics().await;
    assert!(!metrics.contains(ops_quota), "{metrics}");
    assert!(metrics.contains(r#"dinghook_dingtalk{app="default",name="monthly_quota"}"#));
    for i in 3..13 {
        assert_eq!(
            app.post_event(&install(&format!("d-{i}"))).await.status(),
            200
        );
    }
    for i in 3..13 {
        app.wait_for_state(&format!("event:d-{i}"), Done).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_request_under_way_finishes_with_the_keys_it_started_with() {
    let (_fake, url) = fake().await;
    let setup_url = url.clone();
    let app = TestApp::spawn_on(
        move |config| {
            configure(config, &setup_url, Some(&setup_url));
            config.handlers.enabled = false;
            RegistryBuilder::new()
        },
        |store| store,
    )
    .await;
    let sealed = ops_cipher()
        .seal(
            event("slow-1").as_bytes(),
            &now_millis().to_string(),
            &random_nonce(),
        )
        .unwrap();
    let body = sealed.body().into_bytes();
    let (first, rest) = body.split_at(body.len() / 2);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(first.to_vec())).await.unwrap();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let request = tokio::spawn(
        app.client
            .post(format!("{}?{}", app.url(OPS_PATH), sealed.query()))
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    // The request is routed to ops and reading its body when ops is removed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut without_ops = config_of(&app, &url, None);
    without_ops.handlers.enabled = false;
    let done = app.reloader.apply(without_ops).await.unwrap();
    assert_eq!(done.removed, vec!["ops".to_owned()]);
    assert_eq!(post_ops(&app, &event("after")).await, 404, "ops is gone");

    tx.send(Ok(rest.to_vec())).await.unwrap();
    drop(tx);
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the request under way is answered");
    let reply: dinghook::crypto::Sealed = response.json().await.unwrap();
    ops_cipher()
        .open(
            &reply.msg_signature,
            &reply.timestamp,
            &reply.nonce,
            &reply.encrypt,
        )
        .expect("sealed with ops's keys");
    let kept = app
        .store
        .list(&ListQuery {
            app: Some("ops".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].dedup_key, "@ops/event:slow-1");
    app.stop().await;
}

/// The same reload on PostgreSQL: two apps' events before, during and after.
#[tokio::test]
async fn a_reload_on_postgres_keeps_every_event() {
    let Some(pg) = stores::fresh_postgres_database().await else {
        eprintln!("SKIPPED: DINGHOOK_TEST_PG_URL is not set");
        return;
    };
    let (_fake, url) = fake().await;
    let (setup_url, setup_pg) = (url.clone(), pg.clone());
    let app = TestApp::spawn_on(
        move |config| {
            configure(config, &setup_url, None);
            config.handlers.enabled = false;
            config.store.url = setup_pg;
            RegistryBuilder::new()
        },
        |store| store,
    )
    .await;
    let mut with_ops = config_of(&app, &url, Some(&url));
    with_ops.handlers.enabled = false;
    with_ops.store.url = pg.clone();
    let load = Load::start(app.url("/dingtalk/callback"));
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let done = app.reloader.apply(with_ops.clone()).await.unwrap();
        assert!(done.restart_needed.is_empty(), "{done:?}");
        assert_eq!(post_ops(&app, &event(&format!("ops-{round}"))).await, 200);
        let mut without = with_ops.clone();
        without.apps.clear();
        app.reloader.apply(without).await.unwrap();
    }
    let (acked, failed) = load.finish().await;
    assert_eq!(failed, 0, "{acked} acknowledged");
    let stored = |app_name: &'static str| ListQuery {
        app: Some(app_name.into()),
        limit: Some(100_000),
        ..Default::default()
    };
    let defaults = app.store.list(&stored("default")).await.unwrap();
    assert_eq!(defaults.len() as u64, acked);
    assert_eq!(app.store.list(&stored("ops")).await.unwrap().len(), 3);
    app.stop().await;
}

#[test]
fn dinghook_reload_says_why_it_cannot_reach_the_server() {
    let run = |ops_listen: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
            .arg("reload")
            .env_clear()
            .env("DINGHOOK_OPS_LISTEN", ops_listen)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run("");
    assert!(
        stderr.contains("ops.listen is empty") && stderr.contains("SIGHUP"),
        "{stderr}"
    );
    let stderr = run(&format!("127.0.0.1:{}", free_port()));
    assert!(stderr.contains("is the server running?"), "{stderr}");
}
