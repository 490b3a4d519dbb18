//! Routes over real HTTP: events received by the server go on to a receiver running in the
//! test, signed as Standard Webhooks says (checked with the `standardwebhooks` crate, not with
//! our signing code) and shaped as `docs/envelope.schema.json` says (checked with the
//! `jsonschema` crate). Retries, dead letters, replay, a 410 pause and a second route that
//! keeps going meanwhile.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dinghook::handler::RegistryBuilder;
use dinghook::routes::config::RouteConfig;
use dinghook::secret::Secret;
use dinghook::store::{DeliveryQuery, DeliveryReplay, EventState};
use serde_json::{json, Value};

use support::TestApp;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_c2VjcmV0LWZvci10aGUtb2xkLXJlY2VpdmVyLTEyMzQ=";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// A receiver on a free port: records every request and answers from a script (then 200).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Answers to give, in order.
    script: Arc<Mutex<VecDeque<Answer>>>,
}

/// A scripted answer: status, `Retry-After`, body.
type Answer = (u16, Option<&'static str>, &'static str);

impl Receiver {
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.got.lock().unwrap().push(Received { headers, body });
                    let (status, retry_after, text) = state
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, None, "ok"));
                    let mut response_headers = HeaderMap::new();
                    if let Some(wait) = retry_after {
                        response_headers.insert("retry-after", wait.parse().unwrap());
                    }
                    (
                        StatusCode::from_u16(status).unwrap(),
                        response_headers,
                        text,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    fn answer(&self, status: u16, retry_after: Option<&'static str>, body: &'static str) {
        self.script
            .lock()
            .unwrap()
            .push_back((status, retry_after, body));
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver got {} of {n} requests",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn route(name: &str, url: &str, events: &[&str]) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        apps: Vec::new(),
        events: events.iter().map(|e| e.to_string()).collect(),
        url: url.into(),
        secret: None,
        secrets: vec![Secret::new(SECRET), Secret::new(OLD_SECRET)],
        secret_file: None,
        headers: [("X-Team".to_owned(), "ops".to_owned())].into(),
        timeout: Duration::from_secs(2),
        concurrency: 4,
        rate: 0,
        retry_schedule: vec![Duration::from_millis(100); 3],
        subject: None,
        exchange: None,
        routing_key: None,
        stream: None,
        maxlen: None,
    }
}

/// A route to a broker at `url`: no signing secrets or HTTP headers (brokers take neither).
fn broker_route(name: &str, url: &str, events: &[&str]) -> RouteConfig {
    RouteConfig {
        secrets: Vec::new(),
        headers: Default::default(),
        ..route(name, url, events)
    }
}

fn renamed(id: &str) -> String {
    json!({
        "EventType": "chat_update_title", "eventId": id, "CorpId": "dingcorp",
        "ChatId": "chat1", "OpenConversationId": "cid1", "Title": "新名字", "TimeStamp": 1
    })
    .to_string()
}

fn verify(received: &Received, secret: &str) -> Value {
    let webhook = standardwebhooks::Webhook::new(secret).unwrap();
    webhook
        .verify(&received.body, &received.headers)
        .unwrap_or_else(|e| panic!("signature with {secret:.10}…: {e:?}"));
    serde_json::from_slice(&received.body).unwrap()
}

async fn deliveries(app: &TestApp, route: &str) -> Vec<dinghook::store::StoredDelivery> {
    app.store
        .deliveries()
        .list_deliveries(&DeliveryQuery {
            route: Some(route.into()),
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn wait_state(
    app: &TestApp,
    route: &str,
    state: EventState,
) -> dinghook::store::StoredDelivery {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = deliveries(app, route).await;
        if let Some(d) = all.iter().find(|d| d.state == state) {
            return d.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {state:?} delivery on {route}: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn events_go_on_signed_and_in_the_documented_shape() {
    let (receiver, url) = Receiver::start().await;
    let app = TestApp::spawn_with_handlers(
        |config| config.routes = vec![route("crm", &url, &["chat_*"])],
        RegistryBuilder::new(),
    )
    .await;
    assert_eq!(app.post_event(&renamed("r-1")).await.status(), 200);
    // Sent again by DingTalk: stored once, delivered once.
    assert_eq!(app.post_event(&renamed("r-1")).await.status(), 200);
    // Not a chat_* event: not routed.
    let other = json!({"EventType": "todo_task_create", "eventId": "t-1"}).to_string();
    assert_eq!(app.post_event(&other).await.status(), 200);

    let got = receiver.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 1, "one delivery");
    // Both signatures of the rotation verify, each with its own secret.
    let envelope = verify(&got[0], SECRET);
    verify(&got[0], OLD_SECRET);
    assert_eq!(got[0].headers["x-team"], "ops");
    assert_eq!(got[0].headers["content-type"], "application/json");
    assert_eq!(
        got[0].headers["webhook-id"],
        envelope["id"].as_str().unwrap()
    );

    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string("docs/envelope.schema.json").unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&envelope)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?} in {envelope}");
    assert_eq!(envelope["app"], "default");
    assert_eq!(envelope["type"], "chat_update_title");
    assert_eq!(envelope["corp_id"], "dingcorp");
    assert_eq!(envelope["source"], "push");
    assert_eq!(envelope["data"]["Title"], "新名字");
    // The schema is not a formality: it refuses what it should.
    let mut wrong = envelope.clone();
    wrong["source"] = json!("carrier pigeon");
    assert!(!validator.is_valid(&wrong));

    let done = wait_state(&app, "crm", EventState::Done).await;
    assert_eq!((done.attempts, done.last_status), (1, Some(200)));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"dinghook_route_deliveries_total{route="crm",outcome="done"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn failures_retry_die_replay_and_a_410_pauses_only_its_route() {
    let (flaky, flaky_url) = Receiver::start().await;
    let (steady, steady_url) = Receiver::start().await;
    let app = TestApp::spawn_with_handlers(
        |config| {
            config.routes = vec![
                route("flaky", &flaky_url, &[]),
                route("steady", &steady_url, &[]),
            ]
        },
        RegistryBuilder::new(),
    )
    .await;

    // 503 then 200: retried, done on the second attempt.
    flaky.answer(503, Some("0"), "busy");
    assert_eq!(app.post_event(&renamed("a-1")).await.status(), 200);
    flaky.wait_for(2).await;
    let done = wait_state(&app, "flaky", EventState::Done).await;
    assert_eq!(done.attempts, 2);
    let got = flaky.got();
    assert_eq!(
        got[0].headers["webhook-id"], got[1].headers["webhook-id"],
        "the same id on every attempt"
    );

    // 400: dead at once, with the status and what the receiver said.
    flaky.answer(400, None, "no such customer");
    assert_eq!(app.post_event(&renamed("a-2")).await.status(), 200);
    let dead = wait_state(&app, "flaky", EventState::Dead).await;
    assert_eq!(dead.last_status, Some(400));
    assert_eq!(
        dead.last_error.as_deref(),
        Some("HTTP 400: no such customer")
    );
    assert_eq!(dead.attempts, 1);
    // Replayed: sent again, done.
    let n = app
        .store
        .deliveries()
        .replay_deliveries(
            &DeliveryReplay::RouteState {
                route: "flaky".into(),
                state: EventState::Dead,
            },
            dinghook::time::now_millis(),
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    flaky.wait_for(4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while deliveries(&app, "flaky")
        .await
        .iter()
        .any(|d| d.state != EventState::Done)
    {
        assert!(tokio::time::Instant::now() < deadline, "replay not done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 410: the route pauses; the delivery is kept, not dead; the other route goes on.
    flaky.answer(410, None, "gone");
    assert_eq!(app.post_event(&renamed("a-3")).await.status(), 200);
    flaky.wait_for(5).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pauses = app.store.deliveries().route_pauses().await.unwrap();
        if pauses
            .iter()
            .any(|p| p.route == "flaky" && p.reason.contains("410"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not paused: {pauses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 4..8 {
        assert_eq!(
            app.post_event(&renamed(&format!("a-{i}"))).await.status(),
            200
        );
    }
    steady.wait_for(7).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(flaky.got().len(), 5, "nothing sent to a paused route");
    let waiting = deliveries(&app, "flaky")
        .await
        .iter()
        .filter(|d| matches!(d.state, EventState::Pending | EventState::Retry))
        .count();
    assert_eq!(waiting, 5, "a-3 (kept for the resume) and a-4..a-7");

    // Resumed by hand: the backlog goes out.
    assert!(app.store.deliveries().resume_route("flaky").await.unwrap());
    flaky.wait_for(10).await;
    app.stop().await;
}

/// `dinghook` itself, with `args` and the configuration file `config`; its standard output.
fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dinghook {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_cli_lists_pauses_resumes_and_replays() {
    let (receiver, url) = Receiver::start().await;
    let app = TestApp::spawn_with_handlers(
        |config| config.routes = vec![route("r", &url, &[])],
        RegistryBuilder::new(),
    )
    .await;
    let config = app.db_path.with_file_name("routes.toml");
    std::fs::write(
        &config,
        format!(
            "[callback]\ntoken = \"{}\"\naes_key = \"{}\"\nowner_key = \"{}\"\n\
             [store]\nurl = \"sqlite://{}\"\n\
             [[routes]]\nname = \"r\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n",
            support::TOKEN,
            support::AES_KEY,
            support::OWNER_KEY,
            app.db_path.display()
        ),
    )
    .unwrap();

    receiver.answer(400, None, "refused");
    assert_eq!(app.post_event(&renamed("c-1")).await.status(), 200);
    let dead = wait_state(&app, "r", EventState::Dead).await;
    let listed = cli(
        &config,
        &["deliveries", "list", "--state", "dead", "--json"],
    );
    let row: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(
        (row["id"].as_i64(), row["last_status"].as_i64()),
        (Some(dead.id), Some(400))
    );
    let out = cli(
        &config,
        &["deliveries", "replay", "--state", "dead", "--route", "r"],
    );
    assert!(out.contains("1 deliveries"), "{out}");
    receiver.wait_for(2).await;
    wait_state(&app, "r", EventState::Done).await;

    // Paused by hand: a new event waits, `routes list` says so; resumed, it goes.
    cli(
        &config,
        &["routes", "pause", "r", "--reason", "maintenance"],
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.post_event(&renamed("c-2")).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 2, "nothing sent while paused");
    let listed = cli(&config, &["routes", "list", "--json"]);
    let row: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(row["name"], "r");
    assert_eq!(row["paused"], "maintenance");
    assert_eq!(row["pending"], 1, "{row}");
    cli(&config, &["routes", "resume", "r"]);
    receiver.wait_for(3).await;

    // An event sent again to the routes that take it.
    let event_id = dead.event_id;
    let out = cli(
        &config,
        &["deliveries", "replay", "--event", &event_id.to_string()],
    );
    assert!(out.contains("1 deliveries of event"), "{out}");
    let got = receiver.wait_for(4).await;
    assert_eq!(
        got[0].headers["webhook-id"], got[3].headers["webhook-id"],
        "the same event, the same id"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_destination_that_keeps_failing_trips_the_breaker_and_a_probe_resumes_it() {
    // A port with nothing listening yet.
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let app = TestApp::spawn_with_handlers(
        |config| {
            let mut down = route("down", &url, &[]);
            down.retry_schedule = vec![Duration::from_millis(100); 20];
            config.routes = vec![down];
        },
        RegistryBuilder::new(),
    )
    .await;
    let events = dinghook::routes::runner::BREAKER_FAILURES as usize + 2;
    for i in 0..events {
        assert_eq!(
            app.post_event(&renamed(&format!("b-{i}"))).await.status(),
            200
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pauses = app.store.deliveries().route_pauses().await.unwrap();
        if pauses
            .iter()
            .any(|p| p.route == "down" && p.reason.starts_with("circuit breaker"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "breaker not open: {pauses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Open: nothing is tried, nothing is dead.
    let before: i64 = deliveries(&app, "down")
        .await
        .iter()
        .map(|d| d.attempts)
        .sum();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = deliveries(&app, "down").await;
    assert_eq!(
        after.iter().map(|d| d.attempts).sum::<i64>(),
        before,
        "no attempts while open"
    );
    assert!(after.iter().all(|d| d.state != EventState::Dead));

    // The destination comes up: the probe after the cool-down succeeds, the route resumes and
    // every event is delivered.
    let got = Arc::new(Mutex::new(0_usize));
    let counter = Arc::clone(&got);
    let receiver = axum::Router::new().route(
        "/hook",
        post(move || {
            let counter = Arc::clone(&counter);
            async move {
                *counter.lock().unwrap() += 1;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let deadline = tokio::time::Instant::now()
        + dinghook::routes::runner::FIRST_COOL_DOWN
        + Duration::from_secs(10);
    while deliveries(&app, "down")
        .await
        .iter()
        .any(|d| d.state != EventState::Done)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all delivered after the probe"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(*got.lock().unwrap(), events);
    assert!(app
        .store
        .deliveries()
        .route_pauses()
        .await
        .unwrap()
        .is_empty());
    app.stop().await;
}

/// End to end through the server: a callback becomes a JetStream message (read back with the
/// NATS client), its delivery done at the publish ack.
#[tokio::test]
async fn a_callback_reaches_a_jetstream_stream() {
    use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
    let Ok(url) = std::env::var("DINGHOOK_TEST_NATS_URL") else {
        eprintln!("SKIPPED: DINGHOOK_TEST_NATS_URL is not set");
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let name = format!("dinghook_e2e_{}", dinghook::crypto::random_nonce());
    js.create_stream(StreamConfig {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        storage: StorageType::Memory,
        ..StreamConfig::default()
    })
    .await
    .unwrap();
    let subject = format!("{name}.{{app}}.{{type}}");
    let app = TestApp::spawn_with_handlers(
        |config| {
            let mut bus = broker_route("bus", &url, &[]);
            bus.subject = Some(subject);
            config.routes = vec![bus];
        },
        RegistryBuilder::new(),
    )
    .await;
    assert_eq!(app.post_event(&renamed("n-1")).await.status(), 200);
    let done = wait_state(&app, "bus", EventState::Done).await;
    assert_eq!(done.attempts, 1);
    let stream = js.get_stream(&name).await.unwrap();
    let got = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        got.subject.as_str(),
        format!("{name}.default.chat_update_title")
    );
    let envelope: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(envelope["data"]["Title"], "新名字");
    assert_eq!(
        got.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        envelope["id"].as_str()
    );
    app.stop().await;
    js.delete_stream(&name).await.unwrap();
}

/// A stored event wakes its route's runner: with a poll interval of 10 s, each of a few events
/// sent one after another is still delivered within a second.
#[tokio::test]
async fn a_new_event_wakes_its_route_at_once() {
    let (receiver, url) = Receiver::start().await;
    let app = TestApp::spawn_with_handlers(
        |config| {
            config.dispatch.poll_interval = Duration::from_secs(10);
            config.routes = vec![route("quick", &url, &[])];
        },
        RegistryBuilder::new(),
    )
    .await;
    // Past the runner's first look at start-up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(
            app.post_event(&renamed(&format!("w-{i}"))).await.status(),
            200
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while receiver.got().len() < i + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "event {i} not delivered within 1 s of its acknowledgement"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "event {i} delivered {:?} after it was sent",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// A real `dinghook serve` SIGKILLed while a route delivers (each delivery takes the receiver
/// 20 ms, 8 at a time, so some are in flight at the kill), then started again: every event
/// reaches the receiver at least once, and only deliveries in flight at the kill (at most the
/// route's concurrency) reach it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_deliveries_loses_none_and_repeats_only_those_in_flight() {
    const EVENTS: usize = 600;
    const CONCURRENCY: usize = 8;
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = ids.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                // Taken when it arrives, as a receiver that acts on it would.
                let id = headers["webhook-id"]
                    .to_str()
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(id);
                tokio::time::sleep(Duration::from_millis(20)).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let config = dir.path().join("routes.toml");
    std::fs::write(
        &config,
        format!(
            "[[routes]]\nname = \"crm\"\nurl = \"{hook}\"\nsecret = \"{SECRET}\"\n\
             timeout = \"1s\"\nconcurrency = {CONCURRENCY}\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let env = [
        ("DINGHOOK_CONFIG", config.as_str()),
        ("DINGHOOK_RECOVERY", "off"),
    ];
    let port = support::free_port();
    let mut server = support::ServerProcess::start(&db, port, &env).await;
    let http = reqwest::Client::new();
    let url = server.url("/dingtalk/callback");
    let posts = futures_util::stream::iter(0..EVENTS).map(|i| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let sealed = support::seal(&support::sender(), &renamed(&format!("kill-{i}")));
            let response = http
                .post(format!("{url}?{}", sealed.query()))
                .header("content-type", "application/json")
                .body(sealed.body())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    });
    use futures_util::StreamExt;
    posts.buffer_unordered(16).collect::<Vec<()>>().await;
    support::wait_until("a third delivered", || {
        ids.lock().unwrap().len() >= EVENTS / 3
    })
    .await;
    server.kill().await;
    let at_kill = ids.lock().unwrap().len();
    assert!(at_kill < EVENTS, "all delivered before the kill");

    // The deliveries in flight at the kill go again once their lease (timeout + 10 s) ends.
    let _server = support::ServerProcess::start(&db, port, &env).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let distinct: std::collections::HashSet<String> =
            ids.lock().unwrap().iter().cloned().collect();
        if distinct.len() == EVENTS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {EVENTS} delivered",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Until every delivery is done: those in flight at the kill were taken by the receiver
    // already and go again when their lease ends.
    let undelivered = || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM deliveries WHERE state <> 'done'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .unwrap_or(-1)
    };
    while undelivered() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "deliveries left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = ids.lock().unwrap().len();
    let repeats = total - EVENTS;
    eprintln!("{at_kill} delivered at the kill; {repeats} delivered twice after the restart");
    assert!(
        repeats <= CONCURRENCY,
        "{repeats} repeated: more than were in flight"
    );
}

/// `/readyz` names each route's destination: up once reached, down (with why, on the operator
/// port only, without the URL's password) when a broker cannot be reached, already at start
/// before any delivery; a destination that is down never makes the replica unready.
#[tokio::test]
async fn readyz_reports_each_routes_destination_without_failing_on_it() {
    let (receiver, url) = Receiver::start().await;
    let closed = support::free_port();
    let app = TestApp::spawn_with_handlers(
        move |config| {
            config.routes = vec![
                route("crm", &url, &["chat_*"]),
                RouteConfig {
                    subject: Some("dinghook.{app}.{type}".into()),
                    ..broker_route(
                        "bus",
                        &format!("nats://dinghook:hunter2-secret@127.0.0.1:{closed}"),
                        &["todo_*"],
                    )
                },
            ]
        },
        RegistryBuilder::new(),
    )
    .await;
    assert_eq!(app.post_event(&renamed("up-1")).await.status(), 200);
    receiver.wait_for(1).await;
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (status, ops) = loop {
        let response = http.get(app.ops_url("/readyz")).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        let routes = &body["routes"];
        if routes["crm"]["up"] == true && routes["bus"]["up"] == false {
            break (status, body);
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status, 200,
        "a destination down does not make the replica unready"
    );
    assert_eq!(ops["status"], "ready");
    let error = ops["routes"]["bus"]["last_error"].as_str().unwrap();
    assert!(error.contains("NATS"), "{error}");
    assert!(!ops.to_string().contains("hunter2"), "{ops}");
    assert!(ops["routes"]["crm"]["last_ok_at"].is_i64(), "{ops}");
    // The public port says up or down and since when, nothing more.
    let public: Value = http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bus = public["routes"]["bus"].as_object().unwrap();
    assert_eq!(bus.keys().collect::<Vec<_>>(), ["since", "up"], "{public}");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"dinghook_route_up{route="bus"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"dinghook_route_up{route="crm"} 1"#),
        "{metrics}"
    );
}

/// A callback through the server reaches a RabbitMQ queue bound to the route's exchange:
/// persistent, confirmed, the envelope as the body and its id as the message id.
#[tokio::test]
async fn a_callback_reaches_a_rabbitmq_queue() {
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties, ExchangeKind};
    let Ok(url) = std::env::var("DINGHOOK_TEST_AMQP_URL") else {
        eprintln!("SKIPPED: DINGHOOK_TEST_AMQP_URL is not set");
        return;
    };
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let name = format!("dinghook_e2e_{}", dinghook::crypto::random_nonce());
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "default.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let exchange = name.clone();
    let app = TestApp::spawn_with_handlers(
        |config| {
            let mut mq = broker_route("mq", &url, &[]);
            mq.exchange = Some(exchange);
            mq.routing_key = Some("{app}.{type}".into());
            config.routes = vec![mq];
        },
        RegistryBuilder::new(),
    )
    .await;
    assert_eq!(app.post_event(&renamed("q-1")).await.status(), 200);
    let done = wait_state(&app, "mq", EventState::Done).await;
    assert_eq!(done.attempts, 1);
    let got = channel
        .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the queue");
    assert_eq!(got.routing_key.as_str(), "default.chat_update_title");
    let envelope: Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(envelope["data"]["Title"], "新名字");
    assert_eq!(
        got.properties.message_id().as_ref().map(|s| s.as_str()),
        envelope["id"].as_str()
    );
    assert_eq!(*got.properties.delivery_mode(), Some(2), "persistent");
    app.stop().await;
    channel
        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

/// A callback through the server becomes one entry of the app's Redis stream, the envelope
/// in its `envelope` field and its id in `id`.
#[tokio::test]
async fn a_callback_reaches_a_redis_stream() {
    let Ok(url) = std::env::var("DINGHOOK_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: DINGHOOK_TEST_REDIS_URL is not set");
        return;
    };
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = format!("dinghook_e2e_{}", dinghook::crypto::random_nonce());
    let stream = format!("{prefix}:{{app}}");
    let app = TestApp::spawn_with_handlers(
        |config| {
            let mut entries = broker_route("entries", &url, &[]);
            entries.stream = Some(stream);
            config.routes = vec![entries];
        },
        RegistryBuilder::new(),
    )
    .await;
    assert_eq!(app.post_event(&renamed("s-1")).await.status(), 200);
    let done = wait_state(&app, "entries", EventState::Done).await;
    assert_eq!(done.attempts, 1);
    let key = format!("{prefix}:default");
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let reply: Vec<Entry> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(reply.len(), 1, "one entry");
    let fields: std::collections::HashMap<String, Vec<u8>> = reply[0].1.iter().cloned().collect();
    let envelope: Value = serde_json::from_slice(&fields["envelope"]).unwrap();
    assert_eq!(envelope["data"]["Title"], "新名字");
    assert_eq!(fields["id"], envelope["id"].as_str().unwrap().as_bytes());
    assert_eq!(fields["type"], b"chat_update_title");
    app.stop().await;
    let _: redis::Value = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// SIGTERM while a destination takes longer than the shutdown grace: the process stops on
/// time, and the deliveries it had in flight are put back to `pending` at once (not left
/// leased for `timeout` + 10 s), so another replica or the next start sends them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_puts_back_the_deliveries_a_slow_destination_held() {
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = got.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        post(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let config = dir.path().join("routes.toml");
    std::fs::write(
        &config,
        format!("[[routes]]\nname = \"slow\"\nurl = \"{hook}\"\nsecret = \"{SECRET}\"\ntimeout = \"30s\"\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let env = [
        ("DINGHOOK_CONFIG", config.as_str()),
        ("DINGHOOK_RECOVERY", "off"),
        ("DINGHOOK_SHUTDOWN_TIMEOUT", "1s"),
    ];
    let mut server = support::ServerProcess::start(&db, support::free_port(), &env).await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let sealed = support::seal(&support::sender(), &renamed(&format!("slow-{i}")));
        let response = http
            .post(format!(
                "{}?{}",
                server.url("/dingtalk/callback"),
                sealed.query()
            ))
            .header("content-type", "application/json")
            .body(sealed.body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    support::wait_until("three deliveries in flight", || {
        got.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;
    let started = std::time::Instant::now();
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let states: Vec<(String, Option<String>)> = conn
        .prepare("SELECT state, lease_owner FROM deliveries ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(states, vec![("pending".to_owned(), None); 3]);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("abandoned deliveries put back"), "{log}");
}
